"""Activation quantization (calibrators, packed modules with quantized inputs, the int8 path, checkpoints) and ESC's
search (resumable after a kill, refusing another recipe's state)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from quasr.quant.activations import RowSampler, calibrate, fake_quant, qmax


def _sampler(x: torch.Tensor, capacity: int = 4096) -> RowSampler:
    s = RowSampler(capacity, seed=0)
    for chunk in x.split(100):
        s.add(chunk)
    return s


def test_fake_quant_is_the_symmetric_grid():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 0.26, 2.0])
    assert fake_quant(x, 0.5, 4).tolist() == [-3.0, -0.5, 0.0, 0.0, 0.5, 2.0]
    assert fake_quant(torch.tensor([100.0, -100.0]), 0.5, 4).tolist() == [3.5, -3.5]  # clipped at ±qmax·s
    assert qmax(8) == 127 and qmax(4) == 7


def test_row_sampler_keeps_the_exact_max_and_a_seeded_sample():
    torch.manual_seed(0)
    x = torch.randn(5000, 8)
    x[4321, 3] = 50.0
    a, b = _sampler(x, 256), _sampler(x, 256)
    assert a.max == 50.0 and a.seen == 5000 and a.rows.shape == (256, 8)
    assert torch.equal(a.rows, b.rows)  # same seed, same sample
    # a uniform sample: its rows come from the whole stream, not only the first ones
    firsts = {tuple(r.tolist()) for r in x[:256]}
    assert sum(tuple(r.tolist()) in firsts for r in a.rows) < 64


def test_calibrators_order_on_heavy_tailed_inputs():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((20000, 16))
    s = _sampler(x, 20000)
    amax = float(x.abs().max())
    sc = {m: calibrate(s, "t", 8, m) for m in ("max", "percentile", "mse", "entropy")}
    assert sc["max"] == pytest.approx(amax / 127)
    assert sc["mse"] < sc["max"] and sc["percentile"] < sc["max"] and sc["entropy"] < sc["max"]

    def err(scale):
        return float((fake_quant(x, scale, 8) - x).pow(2).sum())
    assert err(sc["mse"]) <= min(err(sc["max"]), err(sc["percentile"]), err(sc["entropy"])) * 1.001
    u = torch.rand(20000, 4) * 2 - 1  # uniform: nothing to clip, every calibrator keeps the range
    su = _sampler(u, 20000)
    for m in ("max", "percentile", "mse", "entropy"):
        assert calibrate(su, "u", 8, m) * 127 == pytest.approx(1.0, rel=0.02), m
    with pytest.raises(Exception, match="unknown activation calibrator 'kl'"):
        calibrate(s, "t", 8, "kl")


def test_output_mse_weighs_the_input_by_the_layer():
    torch.manual_seed(0)
    x = torch.randn(2000, 8)
    x[:, 0] *= 30  # an outlier channel
    w = torch.randn(4, 8)
    s = _sampler(x, 2000)
    big = calibrate(s, "l", 4, "output-mse", weight=w)
    w2 = w.clone()
    w2[:, 0] = 0  # the layer ignores the outlier channel: its output error no longer asks to keep it
    small = calibrate(s, "l", 4, "output-mse", weight=w2)
    assert small < big


@pytest.fixture()
def packed_w8():
    from quasr.quant.grid import QuantGrid, rtn
    from quasr.quant.modules import QuantizedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    return QuantizedLinear.from_linear(lin, rtn(lin.weight.data, QuantGrid(8, None, sym=True)))


def test_packed_linear_quantizes_its_input_static_and_dynamic(packed_w8):
    m = packed_w8
    x = torch.randn(3, 5, 64)
    w = m.dequantize()
    m.set_input_quant(8, "static", 0.02)
    assert torch.allclose(m(x), torch.nn.functional.linear(fake_quant(x, 0.02, 8), w, m.bias), atol=1e-5)
    m.set_input_quant(4, "dynamic")
    s = x.abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(m(x), torch.nn.functional.linear(fake_quant(x, s, 4), w, m.bias), atol=1e-5)
    m.set_input_quant(None)
    assert torch.allclose(m(x), torch.nn.functional.linear(x, w, m.bias), atol=1e-5)
    with pytest.raises(Exception, match="activation bits must be 4 or 8"):
        m.set_input_quant(6)


def test_int8_path_computes_the_fake_quantized_product(packed_w8):
    m = packed_w8
    m.set_input_quant(8, "static", 0.03)
    assert m.int8_ready()
    for rows in (1, 7, 40):
        x = torch.randn(rows, 64)
        fake = m(x)
        m.int8 = True
        real = m(x)
        m.int8 = False
        assert torch.allclose(real, fake, atol=1e-4, rtol=1e-4), rows
    m.set_input_quant(8, "dynamic")
    assert not m.int8_ready()  # per-token scales cannot use one integer product


def _calib(n=6):
    from quasr.data import load_source

    return list(load_source("asterisk:calib", limit=n))


def _w8a8(calibrator="mse"):
    from quasr.models import load_model
    from quasr.quantize import QuantConfig, quantize_

    asr = load_model("whisper-tiny.en")
    cfg = QuantConfig(method="rtn", bits=8, group_size=None, sym=True, act_bits=8, act_calibrator=calibrator)
    rep = quantize_(asr, cfg, _calib(), progress=False)
    return asr, rep


def test_w8a8_checkpoint_carries_its_activation_scales(tmp_path):
    from quasr import checkpoint
    from quasr.quant.modules import QuantizedInput, QuantizedLinear

    asr, rep = _w8a8()
    info = rep.method_info["activations"]
    assert info["bits"] == 8 and info["calibrator"] == "mse" and info["modules"] > 60
    # RTN weights calibrate nothing, the activation scales do: the draw is recorded (held-out checks exclude it)
    assert rep.calib_ids == [u.id for u in _calib()] and rep.n_calib == len(rep.calib_ids)
    scales = {n: float(m.input_scale) for n, m in asr.model.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedInput))}
    assert len(set(scales.values())) > 30  # one scale a layer, set from that layer's inputs
    checkpoint.save(asr, tmp_path / "ck")
    back = checkpoint.load(tmp_path / "ck")
    scales2 = {n: float(m.input_scale) for n, m in back.model.named_modules()
               if isinstance(m, (QuantizedLinear, QuantizedInput))}
    assert scales2 == scales
    checkpoint.save(asr, tmp_path / "ck16", fp_dtype=torch.float16)  # activation scales stay float32
    back16 = checkpoint.load(tmp_path / "ck16")
    assert {n: float(m.input_scale) for n, m in back16.model.named_modules()
            if isinstance(m, (QuantizedLinear, QuantizedInput))} == scales
    assert all(m.act_bits == 8 for m in back.model.modules() if isinstance(m, (QuantizedLinear, QuantizedInput)))
    u = _calib(1)[0]
    b1, b2 = asr.training_batch([u]), back.training_batch([u])
    with torch.inference_mode():
        assert torch.equal(asr.model(**b1).logits, back.model(**b2).logits)
    import os

    out = subprocess.run([sys.executable, "-m", "quasr", "info", str(tmp_path / "ck")], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    shown = out.stdout + out.stderr  # the tables go to the console (stderr)
    assert "int8 static" in shown and "model.encoder.conv1" in shown


def test_esc_search_resumes_after_a_kill_to_the_same_scales(tmp_path, monkeypatch):
    from quasr.methods import esc
    from quasr.quantize import QuantConfig, input_quant_modules

    asr, _ = _w8a8("output-mse")
    modules = input_quant_modules(asr)
    local = {n: float(m.input_scale) for n, m in modules.items()}
    calib = _calib(4)
    cfg = QuantConfig(method="rtn", bits=8, group_size=None, sym=True, act_bits=8, act_calibrator="esc")
    opts = dict(budget=9, population=4, subset=1, seed=3)

    ref = esc.search(asr, modules, local, calib, esc.EscOptions(**opts), cfg, progress=False)
    ref_scales = {n: float(m.input_scale) for n, m in modules.items()}
    assert ref["generations"] == 2 and ref["evaluations"] == 10
    assert len(ref["subset_ids"]) == 1 and ref["subset_ids"][0] in {u.id for u in calib}  # what the fitness saw
    assert ref_scales != local and ref["max_abs_offset"] > 0

    state = tmp_path / "state.pkl"
    real = esc._fitness_fn
    calls = {"n": 0}

    def dying(*a, **k):
        f = real(*a, **k)

        def g(z):
            calls["n"] += 1
            if calls["n"] == 8:  # inside the second generation: the first one's state is on disk
                raise KeyboardInterrupt
            return f(z)
        return g

    monkeypatch.setattr(esc, "_fitness_fn", dying)
    with pytest.raises(KeyboardInterrupt):
        esc.search(asr, modules, local, calib, esc.EscOptions(**opts, state=str(state)), cfg, progress=False)
    assert state.exists()
    monkeypatch.setattr(esc, "_fitness_fn", real)
    got = esc.search(asr, modules, local, calib, esc.EscOptions(**opts, state=str(state)), cfg, progress=False)
    assert {n: float(m.input_scale) for n, m in modules.items()} == ref_scales
    assert got["history"] == ref["history"]
    # the search's time counts the killed run's kept generation too, and says where it resumed
    assert ref["resumed_at_evaluation"] is None and ref["seconds"] == ref["seconds_this_run"]
    assert got["resumed_at_evaluation"] == 5 and got["seconds"] > got["seconds_this_run"]
    # another recipe's saved search is refused
    with pytest.raises(Exception, match="another model or recipe"):
        esc.search(asr, modules, local, calib, esc.EscOptions(**dict(opts, seed=4), state=str(state)), cfg,
                   progress=False)
    with pytest.raises(Exception, match="does not fit one generation"):
        esc.search(asr, modules, local, calib, esc.EscOptions(budget=4, population=4, subset=2), cfg, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--act-bits", "6"], "activation bits must be 4 or 8"),
    (["--act-bits", "8", "--act-calibrator", "kl"], "unknown activation calibrator 'kl'"),
    (["--act-bits", "8", "--act-calibrator", "esc", "--esc-budget", "0"], "budget must be a positive"),
    (["--act-bits", "8", "--act-mode", "tokenwise"], "static or dynamic"),
    (["--act-bits", "8", "--layers", "decoder"], "cannot be combined with --layers decoder"),
])
def test_bad_activation_settings_fail_before_any_work(tmp_path, args, message):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "quasr", "quantize", "--model", "whisper-tiny.en", "--method", "rtn",
                          "--bits", "8", "--out", str(tmp_path / "o"), *args], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert time.perf_counter() - t < 20 and not (tmp_path / "o").exists()


def test_exports_refuse_quantized_activations(tmp_path):
    from quasr import checkpoint

    asr, _ = _w8a8("max")
    checkpoint.save(asr, tmp_path / "ck")
    for fmt, typ, out in [("ggml", "q8_0", "m.bin"), ("ct2", "int8", "ct2"), ("compressed-tensors", None, "ct")]:
        res = subprocess.run([sys.executable, "-m", "quasr", "export", str(tmp_path / "ck"), str(tmp_path / out),
                              "--format", fmt, *(["--type", typ] if typ else [])], capture_output=True, text=True)
        assert res.returncode != 0 and "quantize their input activations" in res.stdout + res.stderr, fmt
        assert "Traceback" not in res.stderr and not (tmp_path / out).exists()



def test_tied_head_int8_path_is_the_product_with_per_token_inputs():
    from quasr.quant.grid import QuantGrid, rtn
    from quasr.quant.modules import QuantizedEmbedding, TiedQuantizedHead

    torch.manual_seed(0)
    w = torch.randn(300, 64)
    emb = QuantizedEmbedding.from_weight(rtn(w, QuantGrid(8, None, sym=True)))
    head = TiedQuantizedHead(emb)
    assert head.int8_ready()
    x = torch.randn(2, 5, 64)
    ref = head(x)
    s = x.abs().amax(-1, keepdim=True) / 127
    expect = fake_quant(x, s, 8) @ emb.dequantize().T  # the int8 product is this, up to float summation order
    head.int8 = True
    got = head(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8  # close to the float head's choices
    emb4 = QuantizedEmbedding.from_weight(rtn(w, QuantGrid(4, None, sym=True)))
    assert not TiedQuantizedHead(emb4).int8_ready()
