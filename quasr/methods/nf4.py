"""NF4: round each block of 64 consecutive weights of a row to the nearest NormalFloat4 level times the block's
absmax (QLoRA's NF4, bitsandbytes' quantize_4bit with quant_type="nf4"); optional double quantization of the
absmax constants. No calibration. The storage format is quasr.quant.formats.NF4; `--group-size` sets the block.
"""
from __future__ import annotations

from dataclasses import dataclass

from quasr.methods import Method, register
from quasr.quant.formats import nf4_quantize


@dataclass
class Nf4Options:
    double_quant: bool = False   # store the absmax constants in 8 bits (one float32 scale per 256 of them)


def solve(W, stats, cfg, name, ctx=None):
    opts = cfg.method_options()
    qw = nf4_quantize(W, cfg.group_size or 64, opts.double_quant, name)
    return qw, {"block_size": qw.block_size, "double_quant": int(qw.double_quant)}


register(Method("nf4", solve, needs_calibration=False, options=Nf4Options, fixed_bits=4, default_group_size=64,
                doc="NF4 (QLoRA's NormalFloat4, block absmax)"))
