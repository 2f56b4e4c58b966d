"""A hostile user at the command line: every bad input gets exit code 2 and one line naming what is wrong, no
traceback, nothing written at the output path, and the checks that can run before the work run before it.

Each case runs `python -m quasr ...` as a subprocess, as a user would. Where a quantization is needed it is RTN
(seconds); cases that would otherwise quantize with GPTQ first must fail before the calibration walk (a time
bound shows it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ASTERISK_WAV = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
FAST = 30.0  # seconds: a check that runs before the work finishes well within this (GPTQ alone takes a minute)


def quasr(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "quasr", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_usage_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out  # one line says what is wrong
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree_state(path: Path) -> dict:
    """Every file under `path` (or `path` itself) with its sha256: compared before and after a failed command."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir") for p in files}


@pytest.fixture(scope="module")
def wavs():
    if not ASTERISK_WAV.is_dir():
        pytest.skip("Debian asterisk-core-sounds-en-wav is not installed (scripts/setup.sh installs it)")
    return sorted(ASTERISK_WAV.glob("*.wav"))[:2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "rtn"
    r = quasr("quantize", "--method", "rtn", "--bits", "4", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory in which nothing can be created (root ignores permissions, so it uses /sys or /proc)."""
    candidates = []
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        candidates.append(d)
    candidates += [Path("/sys"), Path("/proc")]
    for d in candidates:
        try:
            os.rmdir(tempfile.mkdtemp(dir=d))
        except OSError:
            yield d
            break
    else:
        pytest.skip("no read-only directory available on this machine")
    if os.geteuid() != 0:
        (tmp_path / "ro").chmod(0o755)


def manifest(tmp_path: Path, wavs, lines: list[bytes]) -> Path:
    m = tmp_path / "m.jsonl"
    good = json.dumps({"id": "good", "audio": str(wavs[0]), "text": "fine"}).encode()
    m.write_bytes(b"\n".join([good, *lines]) + b"\n")
    return m


# 1. a checkpoint without its manifest must not load as a model with random weights


def test_checkpoint_without_manifest_is_refused(ckpt, tmp_path, wavs):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "quasr_checkpoint.json").unlink()
    out = tmp_path / "res.json"
    r = quasr("eval", "--model", str(broken), "--data", str(manifest(tmp_path, wavs, [])), "--out", str(out),
              "--no-progress")
    assert_usage_error(r, str(broken), "missing", "quasr_checkpoint.json")
    assert not out.exists()


def test_no_load_leaves_a_weight_at_its_initial_value(ckpt, tmp_path):
    """A transformers directory with one weight removed from its safetensors is refused, not filled randomly."""
    from safetensors.torch import load_file, save_file

    from quasr.errors import ModelError
    from quasr.models import load_model

    fp = load_model("whisper-tiny.en")
    d = tmp_path / "hf"
    fp.model.save_pretrained(d)
    fp.processor.save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.encoder.layers.0.fc1.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.encoder.layers.0.fc1.weight.*randomly initialized"):
        load_model(str(d))


# 2. manifests that are not UTF-8


def test_manifest_with_bytes_that_are_not_utf8(tmp_path, wavs):
    m = manifest(tmp_path, wavs, [b'{"audio": "a.wav", "text": "caf\xe9"}'])
    out = tmp_path / "res.json"
    r = quasr("eval", "--data", str(m), "--out", str(out), "--no-progress")
    assert_usage_error(r, f"{m}:2", "not UTF-8")
    assert not out.exists()
    r = quasr("eval", "--data", str(m), "--skip-bad", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"skipped {m}:2: not UTF-8" in r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["records"][0]["n_utts"] == 1 and res["skipped"][str(m)][0]["item"] == f"{m}:2"


@pytest.mark.parametrize("line, message", [
    (b'{"audio": "a.wav"}', 'missing transcript (no "text")'),
    (b'{"audio": "a.wav", "text": ""}', "empty transcript"),
    (b'{"audio": "a.wav", "text": 42}', '"text" must be a string, got a int (42)'),
])
def test_missing_empty_and_numeric_text_are_told_apart(tmp_path, wavs, line, message):
    r = quasr("eval", "--data", str(manifest(tmp_path, wavs, [line])), "--no-progress")
    assert_usage_error(r, ":2:", message)


# 3, 4. quantize: bad counts and output paths fail before the calibration walk


def test_negative_n_calib(tmp_path):
    out = tmp_path / "q"
    r = quasr("quantize", "--method", "gptq", "--n-calib", "-3", "--out", str(out), "--no-progress")
    assert_usage_error(r, "--n-calib", "-3")
    assert not out.exists()


def _quantize_gptq_to(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = quasr("quantize", "--method", "gptq", "--out", str(out), "--no-progress")
    return r, time.perf_counter() - t


def test_quantize_out_is_an_existing_file(tmp_path):
    out = tmp_path / "file.bin"
    out.write_bytes(b"precious")
    r, seconds = _quantize_gptq_to(out)
    assert_usage_error(r, "--out", str(out), "not a directory")
    assert out.read_bytes() == b"precious" and seconds < FAST


def test_quantize_out_is_a_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = tree_state(out)
    r, seconds = _quantize_gptq_to(out)
    assert_usage_error(r, "--out", "not a quasr checkpoint")
    assert tree_state(out) == before and seconds < FAST


def test_quantize_out_is_read_only(read_only_dir):
    out = read_only_dir / "quasr-ckpt"
    r, seconds = _quantize_gptq_to(out)
    assert_usage_error(r, "--out", "cannot write in")
    assert not out.exists() and seconds < FAST


# 5, 6. eval: batch size, decoding and output path


@pytest.mark.parametrize("args, needles", [
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--batch-size", "-2"], ["--batch-size", "-2"]),
    (["--decoding", "beam0"], ["beam0", "at least 1"]),
    (["--decoding", "nucleus"], ["unknown decoding 'nucleus'"]),
    (["--temperatures", ""], ["--temperatures", "empty"]),
    (["--temperatures", "0,-0.2"], ["--temperatures", ">= 0"]),
])
def test_eval_bad_options(tmp_path, wavs, args, needles):
    out = tmp_path / "res.json"
    r = quasr("eval", "--data", str(manifest(tmp_path, wavs, [])), "--out", str(out), *args, "--no-progress")
    assert_usage_error(r, *needles)
    assert not out.exists()


def test_eval_out_is_a_directory_or_read_only(tmp_path, wavs, read_only_dir):
    m = manifest(tmp_path, wavs, [])
    d = tmp_path / "adir"
    d.mkdir()
    t = time.perf_counter()
    r = quasr("eval", "--data", str(m), "--out", str(d), "--no-progress")
    assert_usage_error(r, "--out", "is a directory")
    r = quasr("eval", "--data", str(m), "--out", str(read_only_dir / "res.json"), "--no-progress")
    assert_usage_error(r, "--out", "cannot write in")
    assert list(d.iterdir()) == [] and time.perf_counter() - t < 2 * FAST


# 7. model specs that look like paths


@pytest.mark.parametrize("spec, needle", [("./nosuchdir", "no such model directory"),
                                          ("tests/nosuchdir", "no such model directory"),
                                          ("nobody-xyz/nosuchmodel", "hub cannot be reached")])
def test_model_paths_that_do_not_exist_fail_at_once(spec, needle, tmp_path, wavs, monkeypatch):
    m = manifest(tmp_path, wavs, [])
    env_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # as on this machine: no hub (also where the internet is reachable)
    try:
        t = time.perf_counter()
        r = quasr("eval", "--model", spec, "--data", str(m), "--no-progress")
        seconds = time.perf_counter() - t
    finally:
        if env_offline is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = env_offline
    assert_usage_error(r, needle)
    assert seconds < 15  # no hub retries (those took about 28 s)


# 8. info verifies what eval verifies


def test_info_verifies_the_checkpoint(ckpt, tmp_path):
    bad = tmp_path / "flipped"
    shutil.copytree(ckpt, bad)
    w = bad / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    assert_usage_error(quasr("info", str(bad)), "model.safetensors", "sha256")
    r = quasr("info", "--no-verify", str(bad))
    assert r.returncode == 0 and "not verified" in r.stdout + r.stderr
    assert json.loads(r.stdout)["verified"] is False

    no_cfg = tmp_path / "nocfg"
    shutil.copytree(ckpt, no_cfg)
    (no_cfg / "config.json").unlink()
    assert_usage_error(quasr("info", str(no_cfg)), "config.json", "missing")
    r = quasr("info", str(ckpt))
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is True


# 9. option names in messages, skipped items listed, stale temporary directories


@pytest.mark.parametrize("args, needles", [
    (["--embedding-bits", "9"], ["--embedding-bits", "between 2 and 8", "got 9"]),
    (["--group-size", "-5"], ["--group-size", "got -5"]),
    (["--bits", "1"], ["--bits", "between 2 and 8"]),
    (["--method", "qep", "--alpha", "1.5"], ["--alpha", "[0, 1]"]),
    (["--method", "magic"], ["--method", "unknown method 'magic'"]),
    (["--percdamp", "nan"], ["--percdamp", "finite"]),
])
def test_quantize_options_are_named(tmp_path, args, needles):
    out = tmp_path / "q"
    r = quasr("quantize", *args, "--out", str(out), "--no-progress")
    line = assert_usage_error(r, *needles)
    assert "None" not in line
    assert not out.exists()


def test_quantize_skip_bad_lists_what_it_skipped(tmp_path, wavs):
    m = tmp_path / "calib.jsonl"
    m.write_text("".join(json.dumps({"id": f"u{i}", "audio": str(w), "text": "hello"}) + "\n"
                         for i, w in enumerate(wavs))
                 + json.dumps({"id": "gone", "audio": "missing.wav", "text": "hello"}) + "\n")
    out = tmp_path / "q"
    r = quasr("quantize", "--method", "gptq", "--calib", str(m), "--n-calib", "2", "--skip-bad",
              "--encoder-frames", "speech", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"skipped {m}:3:" in r.stdout + r.stderr and "missing.wav" in r.stdout + r.stderr
    assert (out / "quasr_checkpoint.json").exists()


def test_a_save_killed_midway_leaves_nothing_behind_the_next_one(tmp_path):
    """SIGKILL during a save leaves its hidden staging directory; the next save to the same place removes it."""
    out = tmp_path / "ck"
    script = f"""
import time, safetensors.torch as st
from quasr import checkpoint
from quasr.models import load_model
from quasr.quantize import QuantConfig, quantize_
asr = load_model("whisper-tiny.en")
quantize_(asr, QuantConfig(method="rtn"), progress=False)
real = st.save_file
def slow(*a, **k):
    real(*a, **k)
    print("writing", flush=True)
    time.sleep(120)
st.save_file = slow
checkpoint.save(asr, {str(out)!r})
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        p.kill()
    stale = list(tmp_path.glob(".ck.tmp-*"))
    assert len(stale) == 1 and not out.exists()
    r = quasr("quantize", "--method", "rtn", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(tmp_path.glob(".ck.*")) == [] and (out / "quasr_checkpoint.json").exists()
