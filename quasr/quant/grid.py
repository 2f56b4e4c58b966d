"""Uniform quantization grids and round-to-nearest: small pure functions over tensors.

Conventions (as the GPTQ reference code): codes are unsigned integers in [0, 2^bits - 1];
w ≈ scale * (code - zero). Asymmetric: scale = (max - min) / (2^bits - 1), zero = round(-min / scale).
Symmetric: scale = 2 * max|w| / (2^bits - 1), zero = 2^(bits - 1); with `signed_max` (ggml's q4_0 / q5_0 rule)
scale = m / -2^(bits - 1) for m the signed value of largest magnitude, which then lands exactly on code 0 (the
scale is negative when m is positive), so the grid's 2^bits levels are spaced max|w| / 2^(bits - 1) and the
largest weight is never clipped. Parameters are fitted per output row and
per group of `group_size` consecutive input columns (None: one group per row, "per channel").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quasr.errors import QuasrError


class QuantConfigError(QuasrError, ValueError):
    """A quantization setting that cannot work; `option` names the setting (the CLI shows it as --option)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class QuantGrid:
    bits: int = 4
    group_size: int | None = 128  # None: per output channel
    sym: bool = False
    mse: bool = False             # shrink the range while the rounding error falls (MSE clipping search)
    signed_max: bool = False      # symmetric: scale from the signed largest-magnitude value (ggml's q4_0/q5_0);
    #                               with mse, the search also tries the largest value on the positive end

    def __post_init__(self):
        if self.signed_max and not self.sym:
            raise QuantConfigError("signed_max is a rule for symmetric grids")
        if not 2 <= self.bits <= 8:
            raise QuantConfigError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise QuantConfigError(f"group size must be positive (or None for per channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, shape: tuple[int, ...], name: str = "weight") -> None:
        if self.group_size is not None and shape[-1] % self.group_size:
            raise QuantConfigError(f"{name}: group size {self.group_size} does not divide its input width {shape[-1]}")

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Storage cost: the code plus a scale (and a zero point when asymmetric) per group."""
        per_group = scale_bits + (0 if self.sym else self.bits)
        g = in_features if self.group_size is None else self.group_size
        return self.bits + per_group / g


@dataclass
class QuantizedWeight:
    """A quantized [out, in] matrix: codes in original column order, per-(row, group) scale and zero."""

    codes: torch.Tensor   # uint8 [out, in]
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor   # uint8 [out, n_groups]
    grid: QuantGrid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.grid.group_size).to(dtype)


def expand_groups(t: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """[out, n_groups] -> [out, in] (each group's value repeated over its columns)."""
    g = in_features if group_size is None else group_size
    return t.repeat_interleave(g, dim=1)


def dequantize(codes, scales, zeros, group_size: int | None) -> torch.Tensor:
    n = codes.shape[1]
    return expand_groups(scales.float(), n, group_size) * (codes.float() - expand_groups(zeros.float(), n, group_size))


def fit_params(w: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of w ([rows, cols] -> [rows], [rows]) over all of its columns."""
    w = w.float()
    maxq = grid.maxq
    if grid.sym and grid.signed_max:
        half = (maxq + 1) // 2
        m = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        m = torch.where(m.abs() < 1e-8, torch.full_like(m, -1e-8), m)
        zero = torch.full_like(m, half)
        if grid.mse:
            return _mse_search_signed(w, m, zero, maxq), zero
        return m / -half, zero
    if grid.sym:
        amax = w.abs().amax(dim=1).clamp(min=1e-8)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
        if grid.mse:
            scale = _mse_search_sym(w, amax, zero, maxq)
        return scale, zero
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    same = (xmax - xmin) < 1e-8
    xmin, xmax = torch.where(same, xmin - 1e-4, xmin), torch.where(same, xmax + 1e-4, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    if grid.mse:
        scale, zero = _mse_search_asym(w, xmin, xmax, maxq)
    return scale, zero


def _mse_search_sym(w, amax, zero, maxq, steps: int = 80, shrink: float = 0.8, norm: float = 2.4):
    """Symmetric MSE clipping: grid search over shrunken ranges p·max|w| (p = 1, 1 − 1/steps, ..., > 1 − shrink),
    keeping for each row the scale with the lowest Σ|Q(w) − w|^norm (zero fixed at the midpoint)."""
    best = torch.full_like(amax, float("inf"))
    best_scale = 2 * amax / maxq
    for i in range(int(shrink * steps)):
        s = 2 * amax * (1 - i / steps) / maxq
        err = (quantize_dequantize(w, s[:, None], zero[:, None], maxq) - w).abs().pow(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, s, best_scale)
    return best_scale


def _mse_search_signed(w, m, zero, maxq, steps: int = 80, shrink: float = 0.8, norm: float = 2.4):
    """ggml-style symmetric grid (levels d·(q − half), q in [0, maxq]) with the MSE search: scales m·p/−half (the
    signed largest value m on the grid's long end, ggml's rule at p = 1) and m·p/(half − 1) (on its short end),
    p = 1, 1 − 1/steps, ..., > 1 − shrink; each row keeps the lowest Σ|Q(w) − w|^norm, ties to ggml's rule.
    Any scale is representable in a ggml block (it stores d as it is), so this changes rounding, not format."""
    half = (maxq + 1) // 2
    best_scale = m / -half
    best = (quantize_dequantize(w, best_scale[:, None], zero[:, None], maxq) - w).abs().pow(norm).sum(dim=1)
    for i in range(int(shrink * steps)):
        for s in (m * (1 - i / steps) / -half, m * (1 - i / steps) / (half - 1)):
            err = (quantize_dequantize(w, s[:, None], zero[:, None], maxq) - w).abs().pow(norm).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better, s, best_scale)
    return best_scale


def _mse_search_asym(w, xmin, xmax, maxq, steps: int = 80, shrink: float = 0.8, norm: float = 2.4):
    """Grid search over shrunken ranges [p*min, p*max] (as in the GPTQ reference), keeping the lowest error."""
    best = torch.full_like(xmin, float("inf"))
    best_scale = (xmax - xmin) / maxq
    best_zero = torch.round(-xmin / best_scale).clamp(0, maxq)
    for i in range(int(shrink * steps)):
        p = 1 - i / steps
        lo, hi = p * xmin, p * xmax
        s = (hi - lo) / maxq
        z = torch.round(-lo / s).clamp(0, maxq)
        err = (quantize_dequantize(w, s[:, None], z[:, None], maxq) - w).abs().pow(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, s, best_scale)
        best_zero = torch.where(better, z, best_zero)
    return best_scale, best_zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for w given broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def quantize_dequantize(w, scale, zero, maxq):
    return scale * (quantize_codes(w, scale, zero, maxq) - zero)


def check_finite(w: torch.Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise QuantConfigError(f"{name}: weight has {bad} NaN or infinite values; cannot quantize")


def rtn(w: torch.Tensor, grid: QuantGrid, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantization of an [out, in] matrix on the grid."""
    if w.dim() != 2:
        raise QuantConfigError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    grid.check(tuple(w.shape), name)
    check_finite(w, name)
    w = w.float()
    out_f, in_f = w.shape
    g = in_f if grid.group_size is None else grid.group_size
    wg = w.reshape(out_f * (in_f // g), g)
    scale, zero = fit_params(wg, grid)
    codes = quantize_codes(wg, scale[:, None], zero[:, None], grid.maxq)
    return QuantizedWeight(codes.reshape(out_f, in_f).to(torch.uint8), scale.reshape(out_f, -1),
                           zero.reshape(out_f, -1).to(torch.uint8), grid)
