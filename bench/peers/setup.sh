#!/usr/bin/env bash
# One virtual environment per peer tool (each pins its own torch/transformers), under .venvs/peers/NAME.
#
#   bash bench/peers/setup.sh                 # every peer
#   bash bench/peers/setup.sh quanto hqq      # some
#
# Each venv gets the CPU build of torch (pinned here, as in scripts/setup.sh), the peer's package, and quasr
# itself (editable, --no-deps) with the few libraries its loading, decoding and scoring need, so a peer's model
# is transcribed and scored by the same code as quasr's. `pip freeze` of each venv is written beside it
# (versions.txt) and copied into every record the peer produces.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
declare -A PKGS=(
  [llmcompressor]="llmcompressor==0.14.0.1"
  [bitsandbytes]="bitsandbytes==0.50.2 accelerate"
  [quanto]="optimum-quanto==0.2.7"
  [hqq]="hqq==0.2.8.post1"
  [torchao]="torchao==0.18.0"
  [ctranslate2]="ctranslate2==4.8.5 faster-whisper==1.2.1"
)
QUASR_DEPS="transformers safetensors numpy soundfile soxr jiwer>=3 wordfreq>=3 whisper-normalizer typer rich"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(llmcompressor bitsandbytes quanto hqq torchao ctranslate2)
for name in "${names[@]}"; do
  [ -n "${PKGS[$name]:-}" ] || { echo "setup: unknown peer $name (one of ${!PKGS[*]})" >&2; exit 2; }
  venv=.venvs/peers/$name
  if [ ! -x "$venv/bin/python" ]; then "$PYTHON" -m venv "$venv"; fi
  log=$(mktemp)
  echo "setup: $name"
  if ! { "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 &&
         "$venv/bin/python" -m pip install -q --disable-pip-version-check ${PKGS[$name]} $QUASR_DEPS &&
         "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .; } >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -20; rm -f "$log"
    echo "setup: $name FAILED" >&2; continue
  fi
  rm -f "$log"
  "$venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null | grep -v "^-e " > "$venv/versions.txt"
  echo "setup: $name ok ($(grep -i -E "^(torch|transformers)==" "$venv/versions.txt" | tr '\n' ' '))"
done
