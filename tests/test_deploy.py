"""Exports to the runtimes people deploy Whisper with: whisper.cpp (ggml files) and CTranslate2 (faster-whisper).
The files load in the real runtimes and transcribe real speech; quasr's codes arrive unchanged."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from quasr.deploy.ggml import BLOCK, TYPES, GgmlError, decode_blocks, encode_blocks, read_ggml
from quasr.quant.grid import QuantGrid, rtn


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_blocks_hold_quasr_codes(name):
    t = TYPES[name]
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 4 * BLOCK, generator=g)
    qw = rtn(W, QuantGrid(t.bits, BLOCK, t.sym))
    scales = qw.scales.to(torch.float16)
    ours = (scales.float().repeat_interleave(BLOCK, 1) * (qw.codes.float() - qw.zeros.float().repeat_interleave(BLOCK, 1)))
    raw = encode_blocks(qw.codes.numpy(), scales.numpy(), None if t.sym else qw.zeros.numpy(), t)
    assert raw.shape == (8, 4 * t.block_bytes)
    back = decode_blocks(raw, t, 8, 4 * BLOCK)
    if t.sym:
        assert np.array_equal(back, ours.numpy())  # exact: w = d·(q − zero) with d = the float16 scale
    else:  # m = −d·zero rounded to float16
        assert np.abs(back - ours.numpy()).max() <= 2 ** -10 * float(ours.abs().max())


@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_signed_max_grid_is_ggmls_own_rounding(name):
    """--target ggml-q4_0 / q5_0 fit each block's scale as ggml does (d = m / -2^(bits-1), m the signed value of
    largest magnitude): quasr's round-to-nearest then writes the very blocks ggml's reference quantizer writes, and
    the block's largest weight is not clipped (it is, by up to 1/15, on quasr's plain symmetric grid)."""
    pytest.importorskip("gguf")
    from quasr.deploy.ggml import reference_blocks

    t = TYPES[name]
    W = np.random.default_rng(2).standard_normal((16, 4 * BLOCK)).astype(np.float32)
    qw = rtn(torch.from_numpy(W), QuantGrid(t.bits, BLOCK, sym=True, signed_max=True))
    raw = encode_blocks(qw.codes.numpy(), qw.scales.to(torch.float16).numpy(), None, t)
    assert np.array_equal(raw, reference_blocks(W, t))
    blocks = W.reshape(-1, BLOCK)
    extreme = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    back = qw.dequantize().numpy().reshape(-1, BLOCK)[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    assert np.allclose(back, extreme, rtol=1e-6)
    plain = rtn(torch.from_numpy(W), QuantGrid(t.bits, BLOCK, sym=True)).dequantize().numpy().reshape(-1, BLOCK)
    assert (np.abs(plain[np.arange(len(blocks)), np.abs(blocks).argmax(1)] - extreme) > 1e-3).any()



@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_signed_max_mse_search_stays_in_the_block_format(name):
    """`--target ggml-q4_0 --mse` searches each block's d (both ends of the grid, shrunken ranges): no block's
    rounding error is above ggml's rule, many are below, and the searched blocks still round-trip through ggml's
    block layout exactly (ggml stores any d; the format is unchanged, only the choice of d)."""
    t = TYPES[name]
    W = torch.from_numpy(np.random.default_rng(3).standard_normal((32, 4 * BLOCK)).astype(np.float32))
    W[:, ::7] *= 4  # heavy tails: clipping pays
    plain = rtn(W, QuantGrid(t.bits, BLOCK, sym=True, signed_max=True))
    searched = rtn(W, QuantGrid(t.bits, BLOCK, sym=True, mse=True, signed_max=True))
    err = lambda qw: (qw.dequantize() - W).abs().pow(2.4).reshape(-1, BLOCK).sum(1)  # noqa: E731
    assert (err(searched) <= err(plain) * (1 + 1e-5)).all()
    assert (err(searched) < err(plain) * 0.99).float().mean() > 0.3
    assert (searched.zeros == 2 ** (t.bits - 1)).all() and int(searched.codes.max()) <= 2 ** t.bits - 1
    scales = searched.scales.to(torch.float16)
    raw = encode_blocks(searched.codes.numpy(), scales.numpy(), None, t)
    back = decode_blocks(raw, t, 32, 4 * BLOCK)
    ours = scales.float().repeat_interleave(BLOCK, 1) * (searched.codes.float() - 2 ** (t.bits - 1))
    assert np.array_equal(back, ours.numpy())

@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_reader_agrees_with_ggml_reference(name):
    """Our block reader against the gguf package's port of ggml's dequantization, on ggml's own rounding."""
    gguf = pytest.importorskip("gguf")
    from quasr.deploy.ggml import reference_blocks

    W = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)
    raw = reference_blocks(W, TYPES[name])
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()])
    assert np.array_equal(decode_blocks(raw, TYPES[name], 6, 128), ref)


@pytest.fixture(scope="module")
def q4_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dep") / "tiny-q4_0"
    r = subprocess.run([sys.executable, "-m", "quasr", "quantize", "--method", "rtn", "--target", "ggml-q4_0",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_q4_0_file_holds_the_checkpoints_weights_and_runs_in_whisper_cpp(q4_ckpt, tmp_path):
    pytest.importorskip("pywhispercpp")
    from quasr import checkpoint
    from quasr.data import load_source
    from quasr.deploy.ggml import export_ggml, ggml_name
    from quasr.deploy.runtimes import WhisperCppAsr

    asr = checkpoint.load(q4_ckpt)
    info = export_ggml(q4_ckpt, tmp_path / "m.bin", "q4_0")
    assert info["from_quasr_codes"] == 4 * 6 + 4 * 10 + 1  # every Linear and the token embedding
    f = read_ggml(tmp_path / "m.bin")
    assert f["hparams"]["ftype"] == 2002
    for name, m in asr.model.named_modules():
        if hasattr(m, "weight_packed") and ggml_name(f"{name}.weight"):
            kind, w = f["tensors"][ggml_name(f"{name}.weight")]
            assert kind == "q4_0" and np.array_equal(w, m.dequantize(torch.float32).numpy()), name
    utts = load_source("asterisk:test", limit=3).utterances
    asr = WhisperCppAsr(tmp_path / "m.bin")
    hyps = asr.transcribe([u.audio for u in utts], progress=False)
    assert sum(len(h.split()) for h in hyps) >= 3  # real words came out
    # Each file is decoded on its own: whisper.cpp keeps past text in its state, and with it a run of month names
    # made tiny.en hear "May." in the next files ("oh", "pound", and five times in dir-first). Temperature 0 only:
    # the sampled fallbacks of `standard` draw from one generator in whisper.cpp's state, which no call can reseed.
    from dataclasses import replace

    from quasr.decoding import Decoding

    ids = [u.id for u in load_source("asterisk:test").utterances]
    i, j = ids.index("asterisk/digits/mon-4"), ids.index("asterisk/dir-first")
    run = load_source("asterisk:test").utterances[i:j + 1]
    t0 = replace(Decoding(), temperatures=(0.0,))
    forward = asr.transcribe([u.audio for u in run], progress=False, decoding=t0)
    backward = asr.transcribe([u.audio for u in reversed(run)], progress=False, decoding=t0)
    assert forward == backward[::-1]


def test_a_grid_that_does_not_fit_is_refused(q4_ckpt, tmp_path):
    from quasr.deploy.ggml import export_ggml

    with pytest.raises(GgmlError, match="q4_1 is 4-bit asymmetric in groups of 32.*--target ggml-q4_1"):
        export_ggml(q4_ckpt, tmp_path / "x.bin", "q4_1")
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.slow
def test_ct2_int8_keeps_quasr_codes_and_runs_in_faster_whisper(tmp_path):
    pytest.importorskip("faster_whisper")
    from quasr.data import load_source
    from quasr.deploy.ct2 import export_ct2
    from quasr.deploy.runtimes import FasterWhisperAsr
    from quasr.models import load_model
    from quasr.models.ct2 import read_model_bin
    from quasr.quantize import QuantConfig, quantize_

    asr = load_model("whisper-tiny.en")
    quantize_(asr, QuantConfig(method="rtn", bits=8, group_size=None, sym=True), progress=False)
    info = export_ct2(asr, tmp_path / "ct2", "int8")
    assert info["from_quasr_codes"] == info["layers"]
    v = read_model_bin(tmp_path / "ct2" / "model.bin")
    w = v["decoder/layer_1/ffn/linear_0/weight"].astype(np.float32) / v["decoder/layer_1/ffn/linear_0/weight_scale"][:, None]
    ref = asr.model.model.decoder.layers[1].fc1.dequantize().numpy()
    assert np.abs(w - ref).max() < 1e-6 * np.abs(ref).max()
    utts = load_source("asterisk:test", limit=3).utterances
    hyps = FasterWhisperAsr(tmp_path / "ct2", "int8").transcribe([u.audio for u in utts], progress=False)
    assert sum(len(h.split()) for h in hyps) >= 3


def test_export_cli_errors_name_the_problem(q4_ckpt, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "quasr", "export", *args], capture_output=True, text=True)

    r = run(str(q4_ckpt), str(tmp_path / "o.bin"), "--format", "ggml", "--type", "q3_k")
    assert r.returncode == 2 and "--type 'q3_k'" in r.stdout + r.stderr and not (tmp_path / "o.bin").exists()
    r = run(str(q4_ckpt), str(tmp_path / "o"), "--format", "onnx")
    assert r.returncode == 2 and "--format 'onnx'" in r.stdout + r.stderr
    r = run(str(q4_ckpt), str(tmp_path / "o.bin"), "--format", "ggml", "--type", "q8_0")
    assert r.returncode == 2 and "--target ggml-q8_0" in r.stdout + r.stderr and not (tmp_path / "o.bin").exists()


def test_runtimes_take_their_thread_count_from_omp_num_threads(monkeypatch):
    """A runtime beside other work uses OMP_NUM_THREADS (as torch does), not every CPU."""
    import os

    from quasr.deploy.runtimes import _threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert _threads() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _threads() == len(os.sched_getaffinity(0))


def test_runtime_transcripts_say_fallbacks_were_not_reported():
    """whisper.cpp and faster-whisper fall back inside their own code and do not say so: a set decoded in them
    counts its fallbacks as not reported (None), not as zero."""
    from quasr import metrics
    from quasr.deploy.runtimes import WhisperCppAsr
    from quasr.evaluate import SetResult

    class Fake(WhisperCppAsr):
        def __init__(self):
            pass

        def transcribe(self, audios, *a, **k):
            return ["hello"] * len(audios)

    ts = Fake().transcribe_detailed([np.zeros(16000)] * 2)
    assert [t.text for t in ts] == ["hello", "hello"] and all(t.fallbacks is None for t in ts)
    r = SetResult("x", metrics.WordCounts(), {}, [t.to_dict() for t in ts], 1.0)
    assert r.windows() == {"n_windows": 2, "n_fallback_windows": None, "n_fallbacks": None, "n_skipped_windows": None}
    measured = SetResult("x", metrics.WordCounts(), {}, [{"windows": 1, "fallback_windows": 1, "fallbacks": 2}], 1.0)
    assert measured.windows()["n_fallback_windows"] == 1 and measured.windows()["n_fallbacks"] == 2
