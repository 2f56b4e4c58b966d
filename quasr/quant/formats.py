"""Storage formats of a quantized matrix: each knows its buffers, how to fill them, dequantize rows of them and
describe itself in a checkpoint. The packed modules (quasr.quant.modules) and the checkpoint ask the format
instead of assuming one.

    Affine(bits, group_size, sym)   w = scale·(code − zero) per row and group of columns (quasr.quant.grid):
                                    weight_packed (planar codes), weight_scale (float16), weight_zero (packed
                                    stream, asymmetric only)
    NF4(block_size, double_quant)   w = absmax·L[code], L the 16 NormalFloat4 levels, absmax = max|w| of each
                                    block of `block_size` consecutive weights of a row (bitsandbytes' NF4):
                                    weight_packed (planar 4-bit codes) and weight_absmax (float32), or with
                                    double quantization weight_absmax_q (uint8) + weight_absmax_scale (float32, one
                                    per 256 absmax values in row-major order) + weight_absmax_offset (float32)

Every buffer has the matrix's rows as its first dimension, except the double-quantization constants, which are
indexed by position; `dequantize` takes the row range it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quasr.quant.grid import QuantConfigError, QuantGrid, QuantizedWeight
from quasr.quant.pack import pack, pack_stream, packed_width, stream_width, unpack, unpack_stream

# NormalFloat4 (QLoRA; bitsandbytes' NF4 code book): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
DQ_BLOCK = 256  # absmax values per double-quantization scale


class StorageFormat:
    name: str

    def buffers(self, rows: int, cols: int, scale_dtype: torch.dtype, device=None) -> dict:
        raise NotImplementedError

    def fill(self, qw) -> dict:
        """The buffers' contents from a quantized weight of this format."""
        raise NotImplementedError

    def dequantize(self, bufs: dict, r0: int, r1: int, cols: int, dtype) -> torch.Tensor:
        raise NotImplementedError

    def select_rows(self, bufs: dict, index: torch.Tensor, cols: int, dtype) -> torch.Tensor:
        """Rows `index` of the matrix (an embedding lookup)."""
        raise NotImplementedError

    def entry(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Affine(StorageFormat):
    bits: int
    group_size: int | None
    sym: bool
    name: str = "affine"

    def n_groups(self, cols: int) -> int:
        return 1 if self.group_size is None else cols // self.group_size

    def buffers(self, rows, cols, scale_dtype=torch.float16, device=None):
        ng = self.n_groups(cols)
        return {"weight_packed": torch.empty(rows, packed_width(cols, self.bits), dtype=torch.uint8, device=device),
                "weight_scale": torch.empty(rows, ng, dtype=scale_dtype, device=device),
                "weight_zero": None if self.sym else torch.empty(rows, stream_width(ng, self.bits), dtype=torch.uint8,
                                                                 device=device)}

    def fill(self, qw: QuantizedWeight) -> dict:
        return {"weight_packed": pack(qw.codes.to(torch.uint8).cpu(), self.bits), "weight_scale": qw.scales,
                "weight_zero": None if self.sym else pack_stream(qw.zeros.to(torch.uint8).cpu(), self.bits)}

    def _rows(self, packed, scale, zero, cols, dtype):
        r = packed.shape[0]
        ng = self.n_groups(cols)
        w = unpack(packed, self.bits, cols).to(dtype).reshape(r, ng, -1)
        if zero is None:
            w.sub_(float(1 << (self.bits - 1)))
        else:
            w.sub_(unpack_stream(zero, self.bits, ng).to(dtype).unsqueeze(-1))
        w.mul_(scale.to(dtype).unsqueeze(-1))
        return w.reshape(r, cols)

    def dequantize(self, bufs, r0, r1, cols, dtype):
        z = bufs["weight_zero"]
        return self._rows(bufs["weight_packed"][r0:r1], bufs["weight_scale"][r0:r1],
                          None if z is None else z[r0:r1], cols, dtype)

    def select_rows(self, bufs, index, cols, dtype):
        z = bufs["weight_zero"]
        return self._rows(bufs["weight_packed"].index_select(0, index), bufs["weight_scale"].index_select(0, index),
                          None if z is None else z.index_select(0, index), cols, dtype)

    def quantized_weight(self, bufs: dict, rows: int, cols: int) -> QuantizedWeight:
        codes = unpack(bufs["weight_packed"], self.bits, cols).clone()
        ng = self.n_groups(cols)
        if bufs["weight_zero"] is None:
            zeros = torch.full((rows, ng), 1 << (self.bits - 1), dtype=torch.uint8, device=codes.device)
        else:
            zeros = unpack_stream(bufs["weight_zero"], self.bits, ng).clone()
        return QuantizedWeight(codes, bufs["weight_scale"].float(), zeros, QuantGrid(self.bits, self.group_size,
                                                                                     self.sym))

    def entry(self):
        return {"format": "affine", "bits": self.bits, "group_size": self.group_size, "sym": self.sym}


@dataclass
class NF4Weight:
    """An NF4-quantized [rows, cols] matrix: codes (uint8 < 16) and the float32 absmax of each block."""

    codes: torch.Tensor       # uint8 [rows, cols]
    absmax: torch.Tensor      # float32 [rows, cols / block_size]
    block_size: int = 64
    double_quant: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def format(self) -> "NF4":
        return NF4(self.block_size, self.double_quant)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        r, c = self.shape
        absmax = self.absmax
        if self.double_quant:
            absmax = dq_decode(*dq_encode(absmax.reshape(-1)), absmax.numel()).reshape(absmax.shape)
        w = NF4_LEVELS.to(dtype)[self.codes.long()].reshape(r, -1, self.block_size) * absmax.to(dtype).unsqueeze(-1)
        return w.reshape(r, c)


def nf4_quantize(W: torch.Tensor, block_size: int = 64, double_quant: bool = False, name: str = "weight") -> NF4Weight:
    """NF4 round-to-nearest of an [out, in] weight: per block of `block_size` consecutive weights of a row,
    absmax = max|w|, code = the nearest NF4 level of w / absmax (bitsandbytes' quantize_4bit, quant_type nf4)."""
    if W.dim() != 2:
        raise QuantConfigError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if cols % block_size:
        raise QuantConfigError(f"{name}: NF4 block size {block_size} does not divide its input width {cols}")
    if not torch.isfinite(W).all():
        raise QuantConfigError(f"{name}: weight has NaN or infinite values; cannot quantize")
    w = W.float().reshape(rows, -1, block_size)
    absmax = w.abs().amax(dim=-1)
    x = w / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    mid = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # decision thresholds between neighbouring levels
    codes = torch.bucketize(x, mid, right=True).to(torch.uint8)
    return NF4Weight(codes.reshape(rows, cols), absmax, block_size, double_quant)


def dq_encode(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of flat absmax values: minus their mean, then symmetric 8-bit codes with one float32
    scale per DQ_BLOCK values. Returns (uint8 codes, scales, offset)."""
    flat = absmax.float().reshape(-1)
    offset = flat.mean()
    v = flat - offset
    n = -(-len(v) // DQ_BLOCK)
    padded = torch.nn.functional.pad(v, (0, n * DQ_BLOCK - len(v))).reshape(n, DQ_BLOCK)
    scale = padded.abs().amax(dim=1).clamp(min=1e-12) / 127
    codes = (torch.round(padded / scale[:, None]).clamp(-127, 127) + 128).to(torch.uint8).reshape(-1)[:len(v)]
    return codes, scale, offset.reshape(1)


def dq_decode(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Absmax values [start, start + n) (flat positions) from their double-quantized form."""
    idx = torch.arange(start, start + n, device=codes.device)
    return (codes[:n].float() - 128) * scale[idx // DQ_BLOCK] + offset


@dataclass(frozen=True)
class NF4(StorageFormat):
    block_size: int = 64
    double_quant: bool = False
    name: str = "nf4"

    bits = 4
    sym = True

    @property
    def group_size(self) -> int:
        return self.block_size

    def buffers(self, rows, cols, scale_dtype=torch.float32, device=None):
        nb = cols // self.block_size
        out = {"weight_packed": torch.empty(rows, packed_width(cols, 4), dtype=torch.uint8, device=device)}
        if self.double_quant:
            n = -(-rows * nb // DQ_BLOCK)
            out.update(weight_absmax_q=torch.empty(rows, nb, dtype=torch.uint8, device=device),
                       weight_absmax_scale=torch.empty(n, dtype=torch.float32, device=device),
                       weight_absmax_offset=torch.empty(1, dtype=torch.float32, device=device))
        else:
            out["weight_absmax"] = torch.empty(rows, nb, dtype=torch.float32, device=device)
        return out

    def fill(self, qw: NF4Weight) -> dict:
        out = {"weight_packed": pack(qw.codes.to(torch.uint8).cpu(), 4)}
        if self.double_quant:
            codes, scale, offset = dq_encode(qw.absmax)
            out.update(weight_absmax_q=codes.reshape(qw.absmax.shape), weight_absmax_scale=scale,
                       weight_absmax_offset=offset)
        else:
            out["weight_absmax"] = qw.absmax.float()
        return out

    def _absmax(self, bufs, r0, r1, cols):
        if not self.double_quant:
            return bufs["weight_absmax"][r0:r1].float()
        nb = cols // self.block_size
        q = bufs["weight_absmax_q"][r0:r1].reshape(-1)
        return dq_decode(q, bufs["weight_absmax_scale"], bufs["weight_absmax_offset"], q.numel(),
                         r0 * nb).reshape(r1 - r0, nb)

    def _rows(self, packed, absmax, cols, dtype):
        r = packed.shape[0]
        levels = NF4_LEVELS.to(device=packed.device, dtype=dtype)
        w = levels[unpack(packed, 4, cols).long()].reshape(r, -1, self.block_size)
        return (w * absmax.to(dtype).unsqueeze(-1)).reshape(r, cols)

    def dequantize(self, bufs, r0, r1, cols, dtype):
        return self._rows(bufs["weight_packed"][r0:r1], self._absmax(bufs, r0, r1, cols), cols, dtype)

    def select_rows(self, bufs, index, cols, dtype):
        absmax = torch.cat([self._absmax(bufs, int(i), int(i) + 1, cols) for i in index]) if self.double_quant \
            else bufs["weight_absmax"].index_select(0, index)
        return self._rows(bufs["weight_packed"].index_select(0, index), absmax, cols, dtype)

    def quantized_weight(self, bufs: dict, rows: int, cols: int) -> NF4Weight:
        return NF4Weight(unpack(bufs["weight_packed"], 4, cols).clone(), self._absmax(bufs, 0, rows, cols),
                         self.block_size, self.double_quant)

    def entry(self):
        return {"format": "nf4", "bits": 4, "group_size": self.block_size, "sym": True,
                "double_quant": self.double_quant}


def format_of(qw) -> StorageFormat:
    """The storage format of a quantized weight (QuantizedWeight: affine; NF4Weight: NF4)."""
    if isinstance(qw, NF4Weight):
        return qw.format
    return Affine(qw.grid.bits, qw.grid.group_size, bool(qw.grid.sym and bool((qw.zeros == (1 << (qw.grid.bits - 1))).all())))


def format_from_entry(spec: dict) -> StorageFormat:
    """The format a checkpoint's module entry describes (entries without "format" are affine)."""
    kind = spec.get("format", "affine")
    if kind == "affine":
        return Affine(int(spec["bits"]), spec.get("group_size"), bool(spec["sym"]))
    if kind == "nf4":
        return NF4(int(spec.get("group_size") or 64), bool(spec.get("double_quant", False)))
    raise QuantConfigError(f"unknown storage format {kind!r}")
