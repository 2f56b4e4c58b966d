"""Statistics for comparing two recipes on the same utterances: paired bootstrap intervals, seed spreads.

    paired_bootstrap(errors_a, errors_b, n_ref)   WER(a) − WER(b) in points, with a 95 % interval over
                                                  utterances (resampled together: the comparison is paired)
    better_worse(errors_a, errors_b)              utterances where a has fewer / more errors than b
    mean_std(values)                              mean and sample standard deviation (over seeds)

A WER difference of a set is Σ(e_a − e_b) / Σ n_ref over its utterances; the bootstrap resamples utterances
with replacement (seeded, so a report is reproducible) and takes the 2.5 and 97.5 percentiles of the
resampled differences. The interval says how much the difference depends on which utterances were in the
test set; the spread over calibration seeds (mean ± std) says how much it depends on the calibration draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from quasr.errors import QuasrError

DEFAULT_RESAMPLES = 10_000


class StatsError(QuasrError, ValueError):
    pass


@dataclass(frozen=True)
class Interval:
    diff: float        # WER(a) − WER(b), points
    lo: float          # 95 % bootstrap interval
    hi: float
    n_utts: int
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def __str__(self) -> str:
        return f"{self.diff:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}]"


def paired_bootstrap(errors_a: Sequence[float], errors_b: Sequence[float], n_ref: Sequence[int],
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> Interval:
    """WER(a) − WER(b) over the same utterances (points), with a paired bootstrap interval."""
    if not isinstance(resamples, int) or resamples <= 0:
        raise StatsError(f"the bootstrap needs a positive number of resamples, got {resamples!r}")
    if not 0 < level < 1:
        raise StatsError(f"the interval level must lie between 0 and 1, got {level!r}")
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, n_ref))
    if not (a.shape == b.shape == n.shape) or a.ndim != 1:
        raise StatsError(f"paired comparison needs one error count per utterance on both sides and one reference "
                         f"length each (got {a.shape}, {b.shape}, {n.shape})")
    if len(a) == 0 or n.sum() <= 0:
        raise StatsError("paired comparison needs at least one utterance with reference words")
    d = a - b
    diff = 100 * d.sum() / n.sum()
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(d))
    for s in range(0, resamples, chunk):
        idx = rng.integers(0, len(d), size=(min(chunk, resamples - s), len(d)))
        out[s:s + len(idx)] = 100 * d[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(out, [tail, 100 - tail])
    return Interval(float(diff), float(lo), float(hi), len(d), resamples)


def better_worse(errors_a: Sequence[float], errors_b: Sequence[float]) -> tuple[int, int]:
    """(utterances where a has fewer errors than b, utterances where it has more). Unlike a WER difference,
    one runaway utterance counts once."""
    if len(errors_a) != len(errors_b):
        raise StatsError("paired comparison needs the same utterances on both sides")
    return (sum(x < y for x, y in zip(errors_a, errors_b)), sum(x > y for x, y in zip(errors_a, errors_b)))


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the values that are not None; std is None for fewer than 2."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd, len(v)


def align_utterances(a: dict[str, float], b: dict[str, float], what: str = "") -> list[str]:
    """The utterance ids both sides share, in a's order; an error if the two sets differ."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise StatsError(f"{what + ': ' if what else ''}paired comparison needs the same utterances on both sides "
                         f"({len(only_a)} only on one side, e.g. {only_a[:1]}; {len(only_b)} only on the other, "
                         f"e.g. {only_b[:1]})")
    return list(a)


__all__ = ["DEFAULT_RESAMPLES", "Interval", "StatsError", "align_utterances", "better_worse", "mean_std",
           "paired_bootstrap"]


def speaker_mean_relative(errors_a: Sequence[float], errors_b: Sequence[float], n_ref: Sequence[int],
                          groups: Sequence[str], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                          level: float = 0.95) -> Interval:
    """Relative change (%) of the mean over groups (speakers) of the per-group WER, a against b:
    100 · (mean_g WER_a(g) − mean_g WER_b(g)) / mean_g WER_b(g), with a bootstrap interval that resamples
    utterances within each group (the groups stay as they are)."""
    if not isinstance(resamples, int) or resamples <= 0:
        raise StatsError(f"the bootstrap needs a positive number of resamples, got {resamples!r}")
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, n_ref))
    names = sorted(set(groups))
    idx = {g: np.array([i for i, x in enumerate(groups) if x == g]) for g in names}

    def rel(sel: dict) -> float:
        wa = [a[s].sum() / max(n[s].sum(), 1) for s in sel.values()]
        wb = [b[s].sum() / max(n[s].sum(), 1) for s in sel.values()]
        mb = float(np.mean(wb))
        return 100 * (float(np.mean(wa)) - mb) / mb if mb > 0 else float("nan")

    point = rel(idx)
    rng = np.random.default_rng(seed)
    vals = np.array([rel({g: ix[rng.integers(0, len(ix), len(ix))] for g, ix in idx.items()})
                     for _ in range(resamples)])
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(vals, [tail, 100 - tail])
    return Interval(point, float(lo), float(hi), len(a), resamples)
