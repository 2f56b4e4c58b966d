"""The peers benchmark never omits a peer silently: a peer whose venv is missing gets a record with its error,
and a later run leaves it alone unless asked to retry."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QUASR_PEER_VENVS=str(out.parent / "no-venvs"))
    return subprocess.run([sys.executable, str(ROOT / "bench" / "peers" / "run.py"), "--peers", "hqq,quanto",
                           "--models", "whisper-tiny.en", "--limit", "2", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_a_peer_without_its_venv_gets_an_error_record(tmp_path):
    out = tmp_path / "peers.json"
    res = _run(out)
    assert res.returncode == 0, res.stderr
    recs = json.loads(out.read_text())["records"]
    cells = {(r["method"], r["data"]) for r in recs}
    assert cells == {(m, d) for m in ("hqq:4bit-g64", "quanto:qint4", "quanto:qint8")
                     for d in ("asterisk:test", "tts:test")}
    assert all("no venv for" in r["error"] and r.get("wer") is None for r in recs)
    assert all(r["decoding"] == "standard" and r["model"] == "whisper-tiny.en" for r in recs)
    before = out.read_bytes()
    res = _run(out)  # a failed cell is not run again by default...
    assert res.returncode == 0 and out.read_bytes() == before and "==" not in res.stdout
    res = _run(out, "--retry-failed")  # ...but is with --retry-failed (and fails again, recorded once)
    assert res.returncode == 0 and res.stdout.count("==") == 3
    assert len(json.loads(out.read_text())["records"]) == len(recs)


def test_a_failure_never_overwrites_a_measured_set(tmp_path):
    from quasr.bench import OPTION_KEYS
    from quasr.results import ResultsFile, record

    out = tmp_path / "peers.json"
    rf = ResultsFile(out, "peers", option_keys=OPTION_KEYS + ("peer", "scheme"))
    keys = dict(model="whisper-tiny.en", method="hqq:4bit-g64", peer="hqq", scheme="4bit-g64", bits=4, group_size=64)
    rf.add(record(**keys, decoding="standard", data="asterisk:test", speaker=None, wer=12.3))
    res = _run(out, "--retry-failed")
    assert res.returncode == 0, res.stderr
    recs = {(r["method"], r["data"]): r for r in json.loads(out.read_text())["records"]}
    assert recs["hqq:4bit-g64", "asterisk:test"].get("wer") == 12.3 and "error" not in recs["hqq:4bit-g64", "asterisk:test"]
    assert "no venv for" in recs["hqq:4bit-g64", "tts:test"]["error"]
