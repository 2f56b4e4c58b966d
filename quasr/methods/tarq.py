"""TARQ: tail-aware calibration (rareBAL) and a closed-form residual correction (arXiv 2605.27808).

Per-token reconstruction weighs tokens by how often they occur: rare words (names, numbers, medicines) get a
few percent of the decoder's calibration mass and suffer most from quantization. TARQ gives the positions of
rare words the same total mass as the common ones, then corrects the target toward the full-precision
behaviour (shared/METHODS.md, "TARQ"; choices the paper leaves open are ours, docs/methods/tarq.md).

Tagging (label-free): a word of a calibration transcript is rare when a word of its Whisper-normalized form has
wordfreq Zipf frequency below `tail_zipf` (3.0) in `tail_lang` ("en"). A decoder position is a tail position
when the token it predicts (the next one) belongs to a rare word.

Per decoder Linear that reads token positions (self-attention q/k/v, out, cross-attention q, out, fc1, fc2):

    H_common = Σ_{t∈C} x̂x̂ᵀ,  H_tail = Σ_{t∈T} x̂x̂ᵀ,  H_Δ = Σ_t (x − x̂)x̂ᵀ
    rareBAL   λ = tr(H_common) / (tr(H_tail) + ε),   H_rB = H_common + c·λ·H_tail      (c = tail_cost)
    pilot     Ŵ⁰ = GPTQ(W, H_rB)
    direction D = W H_Δ (H_rB + δ·mean(diag H_rB)·I)⁻¹
    step      E = Ŵ⁰ − W,  α* = tr(E H_rB Dᵀ) / (tr(D H_rB Dᵀ) + ε), clipped to [0, 1] (ours)
    final     Ŵ = GPTQ(W + α*·D, H_rB)

Encoder Linears and the cross-attention k/v (their rows are encoder frames, which carry no word labels) use the
plain H in place of H_rB. Methods: `tarq` (both), `tarq-rarebal` (H_rB only: GPTQ under it), `tarq-residual`
(the residual step with the plain H). A calibration set without a rare word falls back to the plain H (said at
the start, and recorded as `method_info.tail_positions = 0`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quasr.methods import Method, register
from quasr.quant.gptq import gptq, qep_correct
from quasr.quant.grid import QuantConfigError

EPS = 1e-12


@dataclass
class TarqOptions:
    tail_cost: float = 1.0     # c: the tail's mass against the common positions' (1 = equal)
    tail_zipf: float = 3.0     # a word is rare below this wordfreq Zipf frequency
    tail_lang: str = "en"      # wordfreq language of the calibration transcripts
    delta: float = 0.01        # relative damping of H_rB in the direction D (the engine's GPTQ damping by default)

    def check(self) -> None:
        import math

        from wordfreq import available_languages

        if not (isinstance(self.tail_cost, (int, float)) and math.isfinite(self.tail_cost) and self.tail_cost >= 0):
            raise QuantConfigError(f"the tail cost must be a finite number >= 0, got {self.tail_cost}",
                                   option="tail_cost")
        if not (isinstance(self.tail_zipf, (int, float)) and 0 < self.tail_zipf < 8):
            raise QuantConfigError(f"the rare-word threshold is a Zipf frequency between 0 and 8, got "
                                   f"{self.tail_zipf}", option="tail_zipf")
        if self.tail_lang not in available_languages():
            raise QuantConfigError(f"wordfreq has no frequency list for language {self.tail_lang!r} (it has "
                                   f"{', '.join(sorted(available_languages()))})", option="tail_lang")
        if not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and self.delta >= 0):
            raise QuantConfigError(f"delta must be a finite number >= 0, got {self.delta}", option="delta")


def rare_word(word: str | None, zipf: float = 3.0, lang: str = "en") -> bool:
    """Whether a raw transcript word is rare: a word of its Whisper-normalized form is below `zipf`."""
    from wordfreq import zipf_frequency

    from quasr.metrics import normalize

    if not word:
        return False
    return any(zipf_frequency(w, lang) < zipf for w in normalize(word).split())


def tag(items: list[dict], opts: TarqOptions) -> dict:
    """Give every calibration item a boolean `tail` mask over its decoder positions; return counts."""
    cache: dict[str | None, bool] = {None: False}
    rare_words, words = set(), set()
    n_tail = n_pos = 0
    for it in items:
        nxt = it["next_word"]
        for w in nxt:
            if w not in cache:
                cache[w] = rare_word(w, opts.tail_zipf, opts.tail_lang)
        it["tail"] = torch.tensor([cache[w] for w in nxt], dtype=torch.bool)
        n_tail += int(it["tail"].sum())
        n_pos += len(nxt)
        words.update(w for w in nxt if w)
        rare_words.update(w for w in nxt if w and cache[w])
    return {"tail_positions": n_tail, "positions": n_pos, "rare_words": len(rare_words), "words": len(words),
            "tail_zipf": opts.tail_zipf, "tail_lang": opts.tail_lang}


def prepare_items(items: list[dict], cfg) -> dict:
    info = tag(items, cfg.method_options())
    if info["tail_positions"] == 0:
        from quasr.progress import console

        console.print(f"[yellow]note:[/] {cfg.method}: the calibration transcripts hold no rare word (wordfreq Zipf "
                      f"< {info['tail_zipf']}, {info['tail_lang']}); it falls back to GPTQ's metric (plain H)",
                      highlight=False)
    return info


def accumulate(stats, xh: torch.Tensor, x: torch.Tensor | None, item: dict, rows: str | None = None) -> None:
    """H_tail over the tail positions of decoder token rows (H_common = H − H_tail)."""
    if rows != "tokens":
        return
    tail = item["tail"]
    if len(tail) != len(xh):
        raise QuantConfigError(f"calibration item {item.get('id')}: {len(tail)} tagged positions for {len(xh)} rows")
    e = stats.extra
    if "H_tail" not in e:
        e["H_tail"] = torch.zeros_like(stats.H)
        e["tokens"] = True
    if tail.any():
        t = xh[tail]
        e["H_tail"].addmm_(t.T, t)


def rarebal(stats, opts: TarqOptions) -> tuple[torch.Tensor, dict]:
    """H_rB and what it did: the plain H where the rows carry no word labels or no tail position was seen."""
    e = stats.extra
    if not e.get("tokens") or float(e["H_tail"].trace()) <= 0:
        return stats.H, {"rarebal": 0, "lambda": None}
    H_tail = e["H_tail"]
    H_common = stats.H - H_tail
    lam = float(H_common.trace()) / (float(H_tail.trace()) + EPS)
    return H_common + opts.tail_cost * lam * H_tail, {"rarebal": 1, "lambda": lam,
                                                      "tail_mass": float(H_tail.trace() / stats.H.trace())}


def residual(W: torch.Tensor, H_m: torch.Tensor, stats, cfg, opts: TarqOptions, name: str) -> tuple[torch.Tensor, dict]:
    """The corrected target W + α*·D (see the module docstring) under the metric H_m."""
    pilot, _ = gptq(W, H_m, cfg.grid(), name=name, percdamp=cfg.percdamp, act_order=cfg.act_order)
    D = qep_correct(W, H_m, stats.H_delta, 1.0, percdamp=opts.delta, name=name).double() - W.double()
    E = pilot.dequantize().double() - W.double()
    H64 = H_m.double()
    num = float(((E @ H64) * D).sum())
    den = float(((D @ H64) * D).sum()) + EPS
    raw = num / den
    alpha = min(1.0, max(0.0, raw))
    return (W.double() + alpha * D).to(W.dtype), {"alpha": alpha, "alpha_raw": raw,
                                                  "d_rel": float(D.norm() / W.double().norm().clamp(min=1e-30))}


def _solver(use_rarebal: bool, use_residual: bool):
    def solve(W, stats, cfg, name, ctx=None):
        opts = cfg.method_options()
        H_m, info = rarebal(stats, opts) if use_rarebal else (stats.H, {})
        target = W
        if use_residual:
            target, more = residual(W, H_m, stats, cfg, opts, name)
            info.update(more)
        qw, ginfo = gptq(target, H_m, cfg.grid(), name=name, percdamp=cfg.percdamp, act_order=cfg.act_order)
        return qw, dict(ginfo, **info)
    return solve


for _name, _rb, _res, _doc in [("tarq", True, True, "TARQ: rareBAL metric and residual correction"),
                               ("tarq-rarebal", True, False, "TARQ ablation: rareBAL metric only"),
                               ("tarq-residual", False, True, "TARQ ablation: residual correction only")]:
    register(Method(_name, _solver(_rb, _res), needs_fp_stream=_res, doc=_doc, accumulate=accumulate if _rb else None,
                    prepare_items=prepare_items if _rb else None, options=TarqOptions))

