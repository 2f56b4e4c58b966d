"""GPTQ: second-order layer-wise rounding with H = Σ x̂x̂ᵀ from the partially quantized model."""
from quasr.methods import Method, register
from quasr.quant.gptq import gptq


def solve(W, stats, cfg, name, ctx=None):
    return gptq(W, stats.H, cfg.grid(), name=name, percdamp=cfg.percdamp, act_order=cfg.act_order)


register(Method("gptq", solve, doc="GPTQ (Frantar et al. 2022)"))
