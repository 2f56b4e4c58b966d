"""FADE: the per-layer strength follows its two diagnostics; on the real tiny.en it varies by layer and is
stored in the report."""
from __future__ import annotations

import pytest
import torch

from quasr.methods import LayerStats, get_method
from quasr.methods.fade import diagnose, prepare, rank01
from quasr.quant.grid import QuantConfigError
from quasr.quantize import QuantConfig, quantize_


def test_rank01():
    assert rank01({"a": 3.0, "b": 1.0, "c": 2.0}) == {"b": 0.0, "c": 0.5, "a": 1.0}
    assert rank01({"a": 1.0, "b": 1.0, "c": 5.0}) == {"a": 0.25, "b": 0.25, "c": 1.0}
    assert rank01({"only": 7.0}) == {"only": 0.5}


def _stats(X: torch.Tensor, Xh: torch.Tensor) -> LayerStats:
    """Statistics as the engine accumulates them, rows of X being positions; half A = the first half of rows
    (the engine's even items)."""
    s = LayerStats(Xh.T @ Xh, n=len(X), H_delta=(X - Xh).T @ Xh, XX=X.T @ X)
    a = slice(0, len(X) // 2)
    s.extra = {"H_A": Xh[a].T @ Xh[a], "Hd_A": (X[a] - Xh[a]).T @ Xh[a]}
    return s


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    Xh = torch.randn(2000, 128, generator=g)
    return W, Xh, g


def test_consistent_inherited_error_gets_compensated(layer):
    """X = X̂ M: both halves see the same systematic shift, so the correction is reliable (r near 1)."""
    W, Xh, g = layer
    M = torch.eye(128) + 0.05 * torch.randn(128, 128, generator=g)
    stats = _stats(Xh @ M.T, Xh)
    cfg = QuantConfig(method="fade", bits=4, group_size=64, variant="split")
    d = diagnose(W, stats, cfg, "l", {"v_w": {"l": 0.5}})
    assert d["r_split"] > 0.9 and d["alpha"] == pytest.approx(d["r_split"])
    d = diagnose(W, stats, QuantConfig(method="fade", bits=4, group_size=64, alpha=0.5, variant="split"), "l",
                 {"v_w": {"l": 0.5}})
    assert d["alpha"] == pytest.approx(0.5 * d["r_split"])  # alpha is the upper bound


def test_noise_gets_no_compensation(layer):
    """Independent noise on the inputs: the two halves' corrections disagree, r is near 0, and FADE is GPTQ."""
    W, Xh, g = layer
    X = Xh + 0.3 * torch.randn(Xh.shape, generator=g)
    stats = _stats(X, Xh)
    cfg = QuantConfig(method="fade", bits=4, group_size=64)
    d = diagnose(W, stats, cfg, "l", {"v_w": {"l": 0.0}})
    assert d["r_split"] < 0.2 and d["alpha"] < 0.2
    assert 0 <= d["v_g"] <= 1 and d["v"] == pytest.approx(0.5 * (0.0 + d["v_g"]))


def test_vulnerability_lowers_alpha(layer):
    W, Xh, g = layer
    stats = _stats(Xh @ (torch.eye(128) + 0.05 * torch.randn(128, 128, generator=g)).T, Xh)
    cfg = QuantConfig(method="fade", bits=4, group_size=64)
    lo = diagnose(W, stats, cfg, "l", {"v_w": {"l": 0.0}})
    hi = diagnose(W, stats, cfg, "l", {"v_w": {"l": 1.0}})
    assert hi["alpha"] < lo["alpha"] and hi["r"] == lo["r"]
    assert hi["alpha"] == pytest.approx(hi["r"] * (1 - 0.5 * (1.0 + hi["v_g"])))


def test_prepare_ranks_layers_by_rounding_error():
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(32, 64, generator=g)
    spiky = flat.clone()
    spiky[:, ::16] *= 25  # outliers widen every group's range: a larger relative rounding error
    ctx = prepare({"flat": flat, "spiky": spiky}, QuantConfig(method="fade", bits=3, group_size=32))
    assert ctx["v_w"] == {"flat": 0.0, "spiky": 1.0}


@pytest.mark.parametrize("cfg, n, message", [
    (dict(variant="magic"), 4, "fade has no variant 'magic'"),
    (dict(variant="split", method="gptq"), 4, "gptq has no variant 'split'"),
    (dict(alpha=1.5), 4, r"alpha must lie in \[0, 1\]"),
    (dict(), 3, "need at least 4"),
])
def test_bad_settings_fail_before_any_work(tiny, cfg, n, message):
    from quasr.data import load_source

    utts = load_source("asterisk:calib", limit=n).utterances
    with pytest.raises(QuantConfigError, match=message):
        quantize_(tiny, QuantConfig(**{"method": "fade", **cfg}), utts, progress=False)
    assert not any(type(m).__name__.startswith("Quantized") for m in tiny.model.modules())


@pytest.mark.slow
def test_fade_on_tiny_sets_alpha_per_layer():
    from quasr.data import load_source
    from quasr.models import load_model

    asr = load_model("whisper-tiny.en")
    utts = load_source("asterisk:calib", limit=6).utterances
    report = quantize_(asr, QuantConfig(method="fade", bits=3, encoder_frames="speech"), utts, progress=False)
    rows = [r for r in report.layers if "alpha" in r]
    assert len(rows) == 4 * 6 + 4 * 10  # every encoder and decoder Linear of tiny.en
    first = rows[0]  # encoder layer 0 q: no earlier layer is quantized, nothing to compensate
    assert first["name"].endswith("encoder.layers.0.self_attn.q_proj") and first["dw_rel"] == 0 and first["alpha"] == 0
    alphas = [r["alpha"] for r in rows[3:]]
    assert all(0 <= a <= 1 for a in alphas) and max(alphas) - min(alphas) > 0.2  # it does vary by layer
    for r in rows:
        assert {"v", "v_w", "v_g", "r", "r_split", "r_size", "err", "err_rtn"} <= r.keys()
    assert asr.recipe["variant"] == "split-size-vuln" and get_method("fade").needs_fp_stream


def test_toolkit_defaults_are_the_committed_selection():
    """FADE's default variant and every method's padding-frame weight are the ones `bench/fade.py --select` chose
    on calib-dev (bench/results/fade-select.json); moving either without measuring again fails here. The `quasr
    quantize` and `quasr compare` options default to the same weight."""
    import inspect
    import json
    from pathlib import Path

    from quasr import cli
    from quasr.methods.fade import DEFAULT_VARIANT

    chosen = json.loads((Path(__file__).parents[1] / "bench/results/fade-select.json").read_text())["chosen"]
    assert DEFAULT_VARIANT == chosen["variant"]
    assert QuantConfig(method="gptq").pad_weight == chosen["pad_weight"]
    for command in (cli.quantize_cmd, cli.compare_cmd):
        assert inspect.signature(command).parameters["pad_weight"].default.default == chosen["pad_weight"]


def test_padding_weight_leaves_one_only_on_evidence_and_not_against_fade():
    """bench/fade.py --select's rule for the padding weight every method shares: the lowest-scoring weight, but it
    leaves 1 only on a cross-entropy interval below zero for some model, above zero for none, and (the guard) not
    above zero for FADE at W3."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("fade_bench", bench / "fade.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    choose = mod.choose_pad_weight
    scores = {1.0: [0.60, 0.50], 0.25: [0.59, 0.49], 0.0: [0.61, 0.51]}
    below, tie, above = [-0.01, -0.02, -0.001], [-0.01, -0.03, 0.01], [0.01, 0.002, 0.02]
    assert choose(scores, None) == 0.25  # the WER criterion: the lowest, no interval rule
    assert choose(scores, {0.25: [below, tie], 0.0: [tie, tie]}) == 0.25
    assert choose(scores, {0.25: [tie, tie], 0.0: [tie, tie]}) == 1.0  # noise does not move a shared default
    assert choose(scores, {0.25: [below, above], 0.0: [tie, tie]}) == 1.0  # better on one model, worse on another
    assert choose(scores, {0.25: [below, tie], 0.0: [tie, tie]}, {0.25: above}) == 1.0  # FADE W3 worse: stays 1
    assert choose(scores, {0.25: [below, tie], 0.0: [tie, tie]}, {0.25: tie}) == 0.25
    assert choose(scores, {0.25: [below, tie], 0.0: [tie, tie]}, {0.25: None}) == 1.0  # guard not measured: stays
    assert choose({1.0: [0.5, 0.4], 0.25: [0.6, 0.5]}, {0.25: [below, below]}) == 1.0  # 1 scores lowest
