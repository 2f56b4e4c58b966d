"""FADE: cross-layer error compensation whose strength α_l is set per layer, from two diagnostics, with no search.

Paper: arXiv 2601.02455 (encoder and decoder layers differ in sensitivity; one global α is unstable). The
paper's formula is not available: what follows is our reconstruction (shared/METHODS.md, docs/methods/fade.md),
with the pieces switchable by variant.

Per layer, with H = Σ x̂x̂ᵀ, H_Δ = Σ (x − x̂)x̂ᵀ and QEP's full correction ΔW = W H_Δ (H + λI)⁻¹:

    vulnerability v ∈ [0, 1], the mean of
        v_w   the layer's rank among all quantized layers (0 lowest, 1 highest) in round-to-nearest noise
              against the typical weight, mean((W − Q(W))²) / median(W²) at the target grid: outliers widen the
              grid's steps for every weight that shares their group (weights alone)
        v_g   the share of round-to-nearest's output error that GPTQ leaves on this layer,
              ‖(W − GPTQ(W))X̂‖² / ‖(W − RTN(W))X̂‖², clipped to [0, 1] (a pilot GPTQ solve)
    reliability r ∈ [0, 1]
        split  max(0, cos_H(ΔW_A, ΔW_B)): the correction computed on two disjoint halves of the calibration set
               (even and odd items) changes the layer's outputs the same way; the cosine is taken in the metric
               of H, cos_H(A, B) = tr(A H Bᵀ) / (‖A‖_H ‖B‖_H), so directions the inputs hardly excite (where
               H⁻¹ magnifies noise) do not decide it (the plain Frobenius cosine is kept as r_split_frob)
        size   1 / (1 + ‖ΔW‖ / ‖W‖): a large correction is a large change of the weight

    α_l = α_max · clip(r · (1 − v), 0, 1);   Ŵ = GPTQ(W + α_l ΔW, H)

A vulnerable layer (hard to round, little that GPTQ can repair) gets less correction, because the correction
moves the weight it must then round; a correction the two halves disagree on is mostly calibration noise.
α_max is `alpha` (default 1). Every factor goes into the layer's diagnostics (checkpoint, `quasr info`).

Variants: split-vuln (r = split, with v), split (r = split, v = 0), size-vuln (r = size, with v),
split-size-vuln (r = split · size, with v; the default, chosen on calib-dev: DEFAULT_VARIANT).
"""
from __future__ import annotations

import torch

from quasr.methods import Method, register
from quasr.quant.gptq import gptq, qep_correct
from quasr.quant.grid import rtn

VARIANTS = ("split-vuln", "split", "size-vuln", "split-size-vuln")
# chosen on held-in data, not the test sets: `python bench/fade.py --select` (tiny.en W3G128, calib-dev
# cross-entropy and WER, two seeds; bench/results/fade-select.json, docs/methods/fade.md)
DEFAULT_VARIANT = "split-size-vuln"
MIN_CALIB = 4  # two halves of at least two utterances each


def accumulate(stats, xh: torch.Tensor, x: torch.Tensor | None, item: dict, rows: str | None = None) -> None:
    """Half A of the calibration set (items with an even index): its H and H_Δ; half B is the rest."""
    if item["index"] % 2:
        return
    e = stats.extra
    if "H_A" not in e:
        e["H_A"] = torch.zeros_like(stats.H)
        e["Hd_A"] = torch.zeros_like(stats.H)
    e["H_A"].addmm_(xh.T, xh)
    if x is not None:
        e["Hd_A"].addmm_((x - xh).T, xh)


def rank01(values: dict[str, float]) -> dict[str, float]:
    """Each value's rank among all, scaled to [0, 1] (ties share their mean rank; one value gets 0.5)."""
    if len(values) == 1:
        return {k: 0.5 for k in values}
    order = sorted(values, key=values.get)
    ranks: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 / (len(order) - 1)
        i = j + 1
    return ranks


def prepare(weights: dict[str, torch.Tensor], cfg) -> dict:
    """v_w of every layer: its rank in round-to-nearest noise against the typical weight's energy."""
    grid = cfg.grid()
    noise = {}
    for name, W in weights.items():
        d = W - rtn(W, grid, name).dequantize()
        noise[name] = float(d.pow(2).mean() / W.pow(2).median().clamp(min=1e-30))
    return {"v_w": rank01(noise), "rtn_noise": noise}


def _cos(a: torch.Tensor, b: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """cos(a, b) of two [out, in] matrices, in the metric of H [in, in] if given: tr(a H bᵀ) / (‖a‖_H ‖b‖_H)."""
    a, b = a.double(), b.double()
    if H is None:
        ab, aa, bb = (a * b).sum(), (a * a).sum(), (b * b).sum()
    else:
        aH = a @ H.double()
        ab, aa, bb = (aH * b).sum(), (aH * a).sum(), ((b @ H.double()) * b).sum()
    if aa <= 0 or bb <= 0:
        return 0.0
    return float(ab / (aa.sqrt() * bb.sqrt()))


def _out_err(D: torch.Tensor, H: torch.Tensor) -> float:
    return float(((D.double() @ H.double()) * D.double()).sum())


def diagnose(W: torch.Tensor, stats, cfg, name: str, ctx: dict) -> dict:
    """v, r and the correction ΔW of one layer (see the module docstring)."""
    grid, damp = cfg.grid(), cfg.percdamp
    variant = cfg.variant or DEFAULT_VARIANT
    H, Hd = stats.H, stats.H_delta
    dW = qep_correct(W, H, Hd, 1.0, percdamp=damp, name=name) - W
    H_A, Hd_A = stats.extra["H_A"], stats.extra["Hd_A"]
    dW_A = qep_correct(W, H_A, Hd_A, 1.0, percdamp=damp, name=name) - W
    dW_B = qep_correct(W, H - H_A, Hd - Hd_A, 1.0, percdamp=damp, name=name) - W
    r_split = max(0.0, _cos(dW_A, dW_B, H))
    rel = float(dW.norm() / W.norm().clamp(min=1e-30))
    r_size = 1.0 / (1.0 + rel)
    factor: dict = {}  # the pilot's damped factor of H, reused by the final solve
    pilot, _ = gptq(W, H, grid, name=name, percdamp=damp, act_order=cfg.act_order, factor_cache=factor)
    e_rtn = _out_err(W - rtn(W, grid, name).dequantize(), H)
    v_g = min(1.0, _out_err(W - pilot.dequantize(), H) / e_rtn) if e_rtn > 0 else 0.0
    v_w = ctx["v_w"][name]
    v = 0.5 * (v_w + v_g) if variant.endswith("vuln") else 0.0
    r = {"split-vuln": r_split, "split": r_split, "size-vuln": r_size, "split-size-vuln": r_split * r_size}[variant]
    alpha_max = 1.0 if cfg.alpha is None else cfg.alpha
    alpha = alpha_max * min(1.0, max(0.0, r * (1.0 - v)))
    return {"dW": dW, "factor": factor, "alpha": alpha, "v": v, "v_w": v_w, "v_g": v_g, "r": r, "r_split": r_split,
            "r_split_frob": _cos(dW_A, dW_B), "r_size": r_size, "dw_rel": rel, "variant": variant}


def solve(W, stats, cfg, name, ctx=None):
    d = diagnose(W, stats, cfg, name, ctx)
    target = W + d.pop("dW") * d["alpha"]
    qw, info = gptq(target, stats.H, cfg.grid(), name=name, percdamp=cfg.percdamp, act_order=cfg.act_order,
                    factor_cache=d.pop("factor"))
    return qw, dict(info, **d)


register(Method("fade", solve, needs_fp_stream=True, default_alpha=1.0, min_calib=MIN_CALIB, accumulate=accumulate,
                prepare=prepare, variants=VARIANTS, default_variant=DEFAULT_VARIANT,
                doc="FADE: per-layer compensation strength from vulnerability and reliability"))
