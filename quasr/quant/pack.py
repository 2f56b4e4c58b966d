"""Bit packing of quantization codes (1 to 8 bits a code), row by row, vectorized.

Codes are grouped by the smallest whole number of bytes: g = 8 / gcd(8, bits) codes fill B = g * bits / 8
bytes (4-bit: 2 codes in 1 byte; 2-bit: 4 in 1; 3-bit: 8 in 3; 8-bit: 1 in 1). Within a group, code k takes
bits [k*bits, (k+1)*bits) of the group's little-endian B-byte word, least significant bit first.

Two layouts of the groups of a row:

    pack / unpack                 "planar", the in-memory and checkpoint layout. A row of `cols` codes is
                                  n = ceil(cols / g) groups; group i holds columns i, n+i, 2n+i, ... and its
                                  byte j is stored at j*n + i (byte plane j). Unpacking is then g operations
                                  on contiguous byte planes, several times faster than de-interleaving (4-bit:
                                  low nibbles are the first half of the row, high nibbles the second half).
    pack_stream / unpack_stream   one little-endian bit stream a row: code i at bits [i*bits, (i+1)*bits).
                                  Read as little-endian int32 words this is compressed-tensors' dense
                                  "pack-quantized" layout (32 codes in `bits` words), used by quasr.export.

Planar rows take packed_width = ceil(cols/g) * B bytes, streams stream_width = ceil(cols*bits/8) bytes (the
same when g divides cols, as for weight rows); pad bits are zero. Zero points ([rows, n_groups], few
columns) are stored as streams, so they never take more than ceil(n_groups*bits/8) bytes a row.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer between 1 and 8, got {bits!r}")


@lru_cache(maxsize=None)
def _layout(bits: int) -> tuple[int, int, tuple[tuple[int, int, int, bool], ...]]:
    """(codes a group, bytes a group, per code position: (k, byte j, shift s, spills into byte j+1))."""
    n_codes = 8 // math.gcd(8, bits)
    terms = []
    for k in range(n_codes):
        j, s = divmod(k * bits, 8)
        terms.append((k, j, s, s + bits > 8))
    return n_codes, n_codes * bits // 8, tuple(terms)


def packed_width(cols: int, bits: int) -> int:
    """Bytes a packed row of `cols` codes takes (either layout)."""
    _check_bits(bits)
    g, nb, _ = _layout(bits)
    return -(-cols // g) * nb


def stream_width(cols: int, bits: int) -> int:
    """Bytes a bit-stream row of `cols` codes takes."""
    _check_bits(bits)
    return -(-cols * bits // 8)


def _as_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"pack expects integer codes, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 255):
            raise ValueError("pack: codes out of the uint8 range")
        codes = codes.to(torch.uint8)
    if codes.numel() and bits < 8 and int(codes.max()) >= (1 << bits):
        raise ValueError(f"pack: a code {int(codes.max())} does not fit in {bits} bits")
    return codes


def _check_packed(packed: torch.Tensor, bits: int, cols: int, width) -> None:
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != width(cols, bits):
        raise ValueError(f"unpack: {packed.shape[1]} bytes a row do not hold {cols} codes of {bits} bits "
                         f"(expected {width(cols, bits)})")


def _pack_groups(c: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """c: code position k of every group at c[..., k, :]; out: byte j of every group at out[..., j, :]."""
    _, _, terms = _layout(bits)
    for k, j, s, spills in terms:  # a loop over the few code positions of a group, never over elements
        out[..., j, :] |= c[..., k, :] << s  # uint8 shifts drop the bits that spill over
        if spills:
            out[..., j + 1, :] |= c[..., k, :] >> (8 - s)


def _unpack_groups(p: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """The inverse of _pack_groups: p [..., bytes, groups] -> out [..., codes, groups]."""
    _, _, terms = _layout(bits)
    mask = (1 << bits) - 1
    for k, j, s, spills in terms:
        v = p[..., j, :] >> s if s else p[..., j, :]
        if spills:
            v = v | (p[..., j + 1, :] << (8 - s))
        if s + bits == 8:  # the top bits of a byte: nothing above them to mask
            out[..., k, :] = v
        else:
            torch.bitwise_and(v, mask, out=out[..., k, :])


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] (each < 2**bits) -> uint8 [rows, packed_width(cols, bits)], planar layout."""
    codes = _as_codes(codes, bits)
    if bits == 8:
        return codes.contiguous().clone()
    rows, cols = codes.shape
    g, nb, _ = _layout(bits)
    n = -(-cols // g)
    c = torch.nn.functional.pad(codes, (0, g * n - cols)) if g * n != cols else codes
    out = torch.zeros(rows, nb, n, dtype=torch.uint8, device=codes.device)
    _pack_groups(c.reshape(rows, g, n), out, bits)
    return out.reshape(rows, nb * n)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """uint8 [rows, packed_width(cols, bits)] -> uint8 codes [rows, cols] (the inverse of `pack`)."""
    _check_packed(packed, bits, cols, packed_width)
    if bits == 8:
        return packed
    rows = packed.shape[0]
    g, nb, _ = _layout(bits)
    n = -(-cols // g)
    out = torch.empty(rows, g, n, dtype=torch.uint8, device=packed.device)
    _unpack_groups(packed.reshape(rows, nb, n), out, bits)
    out = out.reshape(rows, g * n)
    return out if g * n == cols else out[:, :cols]


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> uint8 [rows, stream_width(cols, bits)], one bit stream a row."""
    codes = _as_codes(codes, bits)
    if bits == 8:
        return codes.contiguous().clone()
    rows, cols = codes.shape
    g, nb, _ = _layout(bits)
    n = -(-cols // g)
    c = torch.nn.functional.pad(codes, (0, g * n - cols)) if g * n != cols else codes
    out = torch.zeros(rows, nb, n, dtype=torch.uint8, device=codes.device)
    _pack_groups(c.reshape(rows, n, g).transpose(1, 2), out, bits)
    out = out.transpose(1, 2).reshape(rows, nb * n)
    width = stream_width(cols, bits)  # the bytes past it hold pad bits only
    return out if width == nb * n else out[:, :width].contiguous()


def unpack_stream(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack_stream`."""
    _check_packed(packed, bits, cols, stream_width)
    if bits == 8:
        return packed
    rows = packed.shape[0]
    g, nb, _ = _layout(bits)
    n = -(-cols // g)
    if nb * n > packed.shape[1]:
        packed = torch.nn.functional.pad(packed, (0, nb * n - packed.shape[1]))
    out = torch.empty(rows, g, n, dtype=torch.uint8, device=packed.device)
    _unpack_groups(packed.reshape(rows, n, nb).transpose(1, 2), out, bits)
    out = out.transpose(1, 2).reshape(rows, g * n)
    return out if g * n == cols else out[:, :cols]
