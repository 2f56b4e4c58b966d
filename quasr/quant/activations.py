"""Activation quantization: symmetric integer inputs for every Linear and the convolution stem.

    fake_quant(x, scale, bits)           x rounded to the symmetric grid scale·{−(2^(b−1)−1) .. 2^(b−1)−1}
    dynamic_scale(x, bits)               per-token (last-dim row) scales, max|x| / qmax
    calibrate(rows, name, bits, ...)     one static per-tensor scale from sampled input rows:
        max          the largest |x| seen (exact, over all calibration positions)
        percentile   the 99.99th percentile of |x|
        mse          the scale minimizing Σ (x − Q(x))² over the sampled values
        entropy      TensorRT's KL-divergence threshold on a 2048-bin histogram of |x|
        output-mse   the scale minimizing ‖x Wᵀ − Q(x) Wᵀ‖² (ESC's local step; needs the layer's weight)

Statistics come from `RowSampler`: the exact max|x| and a seeded reservoir sample of input rows (positions),
so no calibrator ever holds all activations. Small pure functions; the engine (quasr.quantize.calibrate_inputs)
collects the rows and the packed modules (quasr.quant.modules) apply the scales.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from quasr.quant.grid import QuantConfigError

CALIBRATORS = ("max", "percentile", "mse", "entropy", "output-mse")
ACT_BITS = (4, 8)


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Round x to the symmetric integer grid of `bits` with step `scale` (broadcastable) and back."""
    q = qmax(bits)
    return torch.clamp(torch.round(x / scale), -q, q) * scale


def dynamic_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token scales: max|x| of each row (last dim) over qmax."""
    return (x.abs().amax(dim=-1, keepdim=True) / qmax(bits)).clamp(min=1e-12)


class RowSampler:
    """The exact max|x| over everything seen and a seeded uniform sample of at most `capacity` rows."""

    def __init__(self, capacity: int = 1024, seed: int = 0):
        self.capacity, self.seen, self.max = capacity, 0, 0.0
        self.rows: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not x.numel():
            return
        self.max = max(self.max, float(x.abs().max()))
        if self.rows is None:
            self.rows = x.new_empty((0, x.shape[1]))
        free = self.capacity - len(self.rows)
        if free > 0:
            self.rows = torch.cat([self.rows, x[:free]])
            self.seen += len(x[:free])
            x = x[free:]
        if len(x):  # reservoir sampling: the k-th row seen replaces a random kept one with probability capacity / k
            k = self.seen + torch.arange(1, len(x) + 1)
            j = (torch.rand(len(x), generator=self.gen) * k).long()
            keep = j < self.capacity
            self.rows[j[keep]] = x[keep]
            self.seen += len(x)


def _mse_scale(v: torch.Tensor, bits: int, amax: float, steps: int = 100) -> float:
    best, best_s = math.inf, amax / qmax(bits)
    for k in range(1, steps + 1):
        s = amax * k / steps / qmax(bits)
        err = float((fake_quant(v, s, bits) - v).pow(2).sum())
        if err < best:
            best, best_s = err, s
    return best_s


def _entropy_scale(v: torch.Tensor, bits: int, amax: float, bins: int = 2048) -> float:
    """TensorRT's calibration: the clipping threshold whose quantized distribution is closest (KL) to the
    original histogram of |x|."""
    hist, edges = np.histogram(v.abs().numpy(), bins=bins, range=(0, amax))
    hist = hist.astype(np.float64)
    nq = qmax(bits) + 1
    best, best_i = math.inf, bins
    for i in range(nq, bins + 1, max(1, (bins - nq) // 256)):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # the clipped mass goes to the last bin
        if p.sum() == 0:
            continue
        chunks = np.array_split(hist[:i], nq)
        q = np.concatenate([np.where(c > 0, c.sum() / max(1, (c > 0).sum()), 0) for c in chunks])
        p, q = p / p.sum(), q / max(q.sum(), 1e-12)
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i]) / qmax(bits)


def calibrate(sampler: RowSampler, name: str, bits: int, method: str, weight: torch.Tensor | None = None) -> float:
    """A static per-tensor scale for one input (see the module docstring)."""
    if method not in CALIBRATORS:
        raise QuantConfigError(f"unknown activation calibrator {method!r} (choose from {', '.join(CALIBRATORS)})",
                               option="act_calibrator")
    if sampler.rows is None or sampler.max <= 0:
        return 1e-8
    amax = sampler.max
    v = sampler.rows.reshape(-1)
    if method == "max":
        return amax / qmax(bits)
    if method == "percentile":
        return float(torch.quantile(v.abs()[:2_000_000], 0.9999)) / qmax(bits) or amax / qmax(bits)
    if method == "mse":
        return _mse_scale(v, bits, amax)
    if method == "entropy":
        return _entropy_scale(v, bits, amax)
    if weight is None:
        raise QuantConfigError(f"{name}: the output-MSE calibrator needs the layer's weight")
    x = sampler.rows
    y = x @ weight.T
    best, best_s = math.inf, amax / qmax(bits)
    for k in range(5, 101):
        s = amax * k / 100 / qmax(bits)
        err = float((fake_quant(x, s, bits) @ weight.T - y).pow(2).sum())
        if err < best:
            best, best_s = err, s
    return best_s


def check_bits(bits: int) -> None:
    if bits not in ACT_BITS:
        raise QuantConfigError(f"activation bits must be 4 or 8, got {bits}", option="act_bits")
