"""QEP: correct the target for the error inherited from earlier layers, one global strength α, then GPTQ.

W* = W + α · W H_Δ (H + λI)⁻¹, H_Δ = Σ (x − x̂) x̂ᵀ (shared/METHODS.md, "Base: QEP"); Ŵ = GPTQ(W*, H).
"""
from quasr.methods import Method, register
from quasr.quant.gptq import gptq, qep_correct


def solve(W, stats, cfg, name, ctx=None):
    alpha = cfg.alpha if cfg.alpha is not None else 0.5
    target = qep_correct(W, stats.H, stats.H_delta, alpha, percdamp=cfg.percdamp)
    qw, info = gptq(target, stats.H, cfg.grid(), name=name, percdamp=cfg.percdamp, act_order=cfg.act_order)
    return qw, dict(info, alpha=alpha)


register(Method("qep", solve, needs_fp_stream=True, default_alpha=0.5, doc="QEP (global α)"))
