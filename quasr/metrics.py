"""Word error rate and rare-word error rate, scored like NIST sclite.

Text normalization
    Both reference and hypothesis go through Whisper's English text normalizer
    (``whisper_normalizer.english.EnglishTextNormalizer``): lowercasing,
    punctuation and bracketed text removed, contractions expanded, numbers and
    currencies standardised ("twenty five dollars" -> "$25"), British spellings
    mapped to American ("colour" -> "color").  Words are the whitespace tokens of
    the normalized text.

Alignment
    A Levenshtein alignment with sclite's default word costs and tie-breaking:
    correct 0, insertion 3, deletion 3, substitution 4; at equal cost a cell
    prefers substitution/correct, then deletion, then insertion.  With these
    weights sclite may choose an alignment with more errors than the plain
    (unit-cost) edit distance, e.g. "p q r a b" vs "a b s t u" gives 3 D + 3 I,
    not 5 S, so this reproduces sclite's Sub/Del/Ins counts exactly.

WER
    100 * (S + D + I) / N_ref, summed over utterances before dividing (like
    sclite).  An utterance whose normalized reference is empty adds 0 to N_ref
    but its insertions still count.

Rare-word error rate
    The rare reference words are the normalized reference words with wordfreq
    Zipf frequency (English) below ``RARE_ZIPF`` (3.0), i.e. rarer than about
    one per million words.  ``rare_errors`` counts, over the alignment:

    * a substitution or deletion of a rare reference word;
    * an insertion, charged to the reference word that follows it in the
      alignment (or to the last reference word when the insertion comes at the
      end); it is a rare error if that word is rare.  Insertions into an empty
      reference are charged to no word.

    rare_wer = 100 * rare_errors / n_rare_ref (None when n_rare_ref is 0).

Common-word error rate
    The same charging for the other reference words: common_wer = 100 * common_errors / (n_ref - n_rare_ref).
    rare_errors + common_errors = all errors, except insertions into an empty reference.

Failed decodes
    Quantized Whisper mostly fails in two ways that a set's WER mixes with ordinary word errors: it ends a long
    utterance early (the end-of-text token wins mid-sentence) or it runs away (a loop or a hallucination that
    the fallback checks let through).  ``failure(counts)`` names them per utterance: "truncated" when a
    reference of at least ``TRUNCATED_MIN_WORDS`` (8) words loses at least half of them to deletions,
    "runaway" when the errors exceed 3 x the reference words + 10 (``ran_away``, the test the benchmark
    reports have used since the evaluation issue), else None.  Both are reading aids, not tuned to any score;
    full-precision tiny.en has one such utterance in asterisk:test and tts:test together (a tts sentence that
    ends early).  ``python bench/report.py fade --failures`` counts them per recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Hashable, Iterable, Sequence

NORMALIZER = "whisper-english"
RARE_ZIPF = 3.0

# sclite word-alignment costs (SCTK src/sclite/word.c, wwd_WORD)
_COST_SUB, _COST_INS, _COST_DEL = 4, 3, 3

_normalizer = None


def normalize(text: str) -> str:
    """Whisper English normalization of ``text`` (see module docstring)."""
    global _normalizer
    if _normalizer is None:
        from whisper_normalizer.english import EnglishTextNormalizer

        _normalizer = EnglishTextNormalizer()
    return _normalizer(text)


@lru_cache(maxsize=200_000)
def is_rare(word: str, threshold: float = RARE_ZIPF) -> bool:
    """True if the (already normalized) ``word`` has English Zipf frequency < threshold."""
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en") < threshold


def align(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[str, int | None, int | None]]:
    """Align word lists as sclite does; return ``(op, ref_index, hyp_index)`` in order.

    ``op`` is "C" (correct), "S" (substitution), "D" (deletion: hyp index None)
    or "I" (insertion: ref index None).
    """
    n, m = len(ref), len(hyp)
    # cost[i][j]: best cost aligning ref[:i] with hyp[:j]; back[i][j]: the op taken
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    back = [[""] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        cost[0][j], back[0][j] = cost[0][j - 1] + _COST_INS, "I"
    for i in range(1, n + 1):
        cost[i][0], back[i][0] = cost[i - 1][0] + _COST_DEL, "D"
        for j in range(1, m + 1):
            same = ref[i - 1] == hyp[j - 1]
            sub = cost[i - 1][j - 1] + (0 if same else _COST_SUB)
            dele = cost[i - 1][j] + _COST_DEL
            ins = cost[i][j - 1] + _COST_INS
            if sub <= dele and sub <= ins:
                cost[i][j], back[i][j] = sub, "C" if same else "S"
            elif dele < ins:
                cost[i][j], back[i][j] = dele, "D"
            else:
                cost[i][j], back[i][j] = ins, "I"
    ops = []
    i, j = n, m
    while i > 0 or j > 0:
        op = back[i][j]
        if op in ("C", "S"):
            i, j = i - 1, j - 1
            ops.append((op, i, j))
        elif op == "D":
            i -= 1
            ops.append((op, i, None))
        else:
            j -= 1
            ops.append((op, None, j))
    ops.reverse()
    return ops


@dataclass
class WordCounts:
    """Error tallies; add them to sum over utterances or sets."""

    n_ref: int = 0
    sub: int = 0
    dele: int = 0
    ins: int = 0
    n_rare_ref: int = 0
    rare_errors: int = 0
    common_errors: int = 0     # the same charging, for the other (common) reference words

    @property
    def errors(self) -> int:
        return self.sub + self.dele + self.ins

    @property
    def wer(self) -> float | None:
        """Word error rate in percent, None if there are no reference words."""
        return 100.0 * self.errors / self.n_ref if self.n_ref else None

    @property
    def rare_wer(self) -> float | None:
        """Rare-word error rate in percent, None if there are no rare reference words."""
        return 100.0 * self.rare_errors / self.n_rare_ref if self.n_rare_ref else None

    @property
    def common_wer(self) -> float | None:
        """Error rate of the common (not rare) reference words in percent, charged like rare-WER."""
        n = self.n_ref - self.n_rare_ref
        return 100.0 * self.common_errors / n if n else None

    def __add__(self, other: WordCounts) -> WordCounts:
        if not isinstance(other, WordCounts):
            return NotImplemented
        return WordCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _count(ref: list[str], hyp: list[str], threshold: float = RARE_ZIPF):
    """(counts, rare reference words, rare-word errors as (reference word, hypothesis word or None) pairs)."""
    rare = [is_rare(w, threshold) for w in ref]
    c = WordCounts(n_ref=len(ref), n_rare_ref=sum(rare))
    pairs = []
    pending_ins = 0  # insertions waiting for the next reference word
    for op, i, j in align(ref, hyp):
        if op == "I":
            c.ins += 1
            pending_ins += 1
            continue
        if op == "S":
            c.sub += 1
        elif op == "D":
            c.dele += 1
        if rare[i]:
            c.rare_errors += pending_ins + (op != "C")
            if op != "C":
                pairs.append((ref[i], None if j is None else hyp[j]))
        else:
            c.common_errors += pending_ins + (op != "C")
        pending_ins = 0
    if pending_ins and ref:  # trailing insertions go to the last ref word
        if rare[-1]:
            c.rare_errors += pending_ins
        else:
            c.common_errors += pending_ins
    return c, [w for w, r in zip(ref, rare) if r], pairs


def score_utterance(ref_text: str, hyp_text: str) -> dict:
    """Normalize and score one utterance.

    Returns ``{"ref": normalized ref, "hyp": normalized hyp, "counts": WordCounts,
    "rare_words": [rare reference words, in order], "rare_pairs": [(rare reference word, its hypothesis word,
    None when deleted) for each substituted or deleted rare word]}``.
    """
    ref, hyp = normalize(ref_text), normalize(hyp_text)
    counts, rare_words, pairs = _count(ref.split(), hyp.split())
    return {"ref": ref, "hyp": hyp, "counts": counts, "rare_words": rare_words, "rare_pairs": pairs}


def score(refs: Sequence[str], hyps: Sequence[str]) -> WordCounts:
    """Total counts over paired reference and hypothesis texts."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    return sum((score_utterance(r, h)["counts"] for r, h in zip(refs, hyps)), WordCounts())


def score_by(keys: Sequence[Hashable], refs: Sequence[str], hyps: Sequence[str]) -> dict[Hashable, WordCounts]:
    """Counts grouped by key (e.g. speaker), keys in first-seen order."""
    if not len(keys) == len(refs) == len(hyps):
        raise ValueError(f"lengths differ: {len(keys)} keys, {len(refs)} refs, {len(hyps)} hyps")
    out: dict[Hashable, WordCounts] = {}
    for k, r, h in zip(keys, refs, hyps):
        out[k] = out.get(k, WordCounts()) + score_utterance(r, h)["counts"]
    return out


TRUNCATED_MIN_WORDS = 8
RUNAWAY_FACTOR, RUNAWAY_EXTRA = 3, 10


def ran_away(errors: int, n_ref: int) -> bool:
    """Whether an utterance's errors exceed RUNAWAY_FACTOR x its reference words + RUNAWAY_EXTRA."""
    return errors > RUNAWAY_FACTOR * n_ref + RUNAWAY_EXTRA


def failure(counts: WordCounts) -> str | None:
    """"truncated", "runaway" or None for one utterance's counts (see "Failed decodes" above)."""
    if counts.n_ref >= TRUNCATED_MIN_WORDS and 2 * counts.dele >= counts.n_ref:
        return "truncated"
    if ran_away(counts.errors, counts.n_ref):
        return "runaway"
    return None


def mean_over_sets(values: Iterable[float | None]) -> float | None:
    """Plain (unweighted) mean of per-set rates, skipping None; None if nothing is left."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
