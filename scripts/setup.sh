#!/usr/bin/env bash
# Install what quasr needs on a fresh Debian machine with Python 3.11 (idempotent, safe to rerun):
#   - Debian packages: the asterisk speech prompts, NIST sclite (sctk), offline TTS voices, libsndfile
#   - a virtual environment in .venv with the CPU build of torch, quasr and its bundled models and voices
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="asterisk-core-sounds-en-wav asterisk-core-sounds-en sctk flite festival festvox-us-slt-hts
  festvox-kallpc16k espeak-ng libsndfile1"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    echo "setup: need root (or sudo) to install:$missing" >&2; exit 1; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() {  # quiet pip; shows its output (less this machine's find-links noise) and stops if it fails
  local log rc=0
  log=$(mktemp)
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return $rc
}
# torch is pinned here (the CPU build), not in pyproject: a bare `torch` requirement pulls a CUDA build.
pip_install torch==2.13.0
pip_install -e ".[bundled,test,deploy]"
.venv/bin/python -c "import quasr, torch; print('setup: ok, torch', torch.__version__)"
