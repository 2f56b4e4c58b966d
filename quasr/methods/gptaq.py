"""GPTAQ: the asymmetric-calibration correction applied inside the GPTQ column loop (default α = 0.25)."""
from quasr.methods import Method, register
from quasr.quant.gptq import gptq


def solve(W, stats, cfg, name, ctx=None):
    alpha = cfg.alpha if cfg.alpha is not None else 0.25
    qw, info = gptq(W, stats.H, cfg.grid(), name=name, percdamp=cfg.percdamp, act_order=cfg.act_order,
                    dXXT=stats.H_delta, alpha=alpha)
    return qw, dict(info, alpha=alpha)


register(Method("gptaq", solve, needs_fp_stream=True, default_alpha=0.25, doc="GPTAQ (Li et al. 2025)"))
