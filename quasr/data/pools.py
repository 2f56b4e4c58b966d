"""Choosing calibration utterances from a pool (the union of the --calib sources).

    random   a seeded sample (the default)
    r-top    the utterances with the highest rare-word density (rare words / words; rare: wordfreq Zipf < 3 of
             the Whisper-normalized word), ties in a seeded order
    r-mix    half r-top, half a seeded sample of the rest
"""
from __future__ import annotations

import random

from quasr.errors import DataError

POOLS = ("random", "r-top", "r-mix")


def rare_density(text: str, zipf: float = 3.0, lang: str = "en") -> float:
    from wordfreq import zipf_frequency

    from quasr.metrics import normalize

    words = normalize(text).split()
    return sum(zipf_frequency(w, lang) < zipf for w in words) / len(words) if words else 0.0


def choose(pool: list, n: int, seed: int = 0, how: str = "random", zipf: float = 3.0, lang: str = "en",
           max_seconds: float | None = None, rejected: list | None = None) -> list:
    """n utterances of `pool` chosen `how` (see the module docstring), sorted by id.

    Utterances longer than `max_seconds` (the model's input window) cannot calibrate: a draw that picks one
    replaces it with further draws from the same generator, so a seed whose draw had none picks exactly what it
    picked before; the ids replaced are appended to `rejected`.
    """
    if how not in POOLS:
        raise DataError(f"unknown calibration pool {how!r} (choose from {', '.join(POOLS)})")
    fits = (lambda u: True) if max_seconds is None else (lambda u: u.seconds <= max_seconds)
    usable = sum(map(fits, pool))
    if n > usable:
        raise DataError(f"asked for {n} calibration utterances but the pool has only {usable}"
                        + (f" no longer than {max_seconds:.0f} s" if usable < len(pool) else ""))
    rng = random.Random(seed)
    rejected = [] if rejected is None else rejected
    if how == "random":
        out = rng.sample(pool, n)
    else:
        order = rng.sample(pool, len(pool))  # the seeded order breaks ties in density
        ranked = sorted(order, key=lambda u: -rare_density(u.text, zipf, lang))
        k = n if how == "r-top" else n // 2
        rejected += [u.id for u in ranked[:k] if not fits(u)]
        out = [u for u in ranked if fits(u)][:k]
        if k < n:
            chosen = {u.id for u in out}
            out += rng.sample([u for u in pool if u.id not in chosen], n - k)
    while bad := [u for u in out if not fits(u)]:
        rejected += [u.id for u in bad]
        seen = {u.id for u in out} | set(rejected)
        out = [u for u in out if fits(u)]
        out += rng.sample([u for u in pool if u.id not in seen], len(bad))
    return sorted(out, key=lambda u: u.id)
