"""Transcribe speech sets with a model and score them: WER, rare-WER, per speaker, mean over sets."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from quasr import metrics
from quasr.data import Dataset
from quasr.decoding import Decoding
from quasr.models.base import AsrModel


@dataclass
class SetResult:
    data: str
    counts: metrics.WordCounts
    by_speaker: dict[str, metrics.WordCounts]
    utterances: list[dict]
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    decoding: str | None = None    # the policy's label (quasr.decoding)
    meta: dict = field(default_factory=dict)  # the set's facts (e.g. tts: utterances differing from the reference)

    def windows(self) -> dict[str, int]:
        """Decoding windows of the set: decoded, decoded again at a higher temperature (at least once), and
        skipped as silent; plus the total number of fallback decodes."""
        us = self.utterances

        def total(key: str, default: int = 0) -> int | None:  # None when the model did not report it
            v = [u.get(key, default) for u in us]
            return None if any(x is None for x in v) else sum(v)

        return {"n_windows": total("windows", 1), "n_fallback_windows": total("fallback_windows"),
                "n_fallbacks": total("fallbacks"), "n_skipped_windows": total("skipped_windows")}

    def failures(self) -> dict[str, int]:
        """Failed decodes of the set (quasr.metrics.failure): utterances that ended early ("truncated") or ran
        away, and the word errors they hold."""
        out = {}
        for kind in ("truncated", "runaway"):
            us = [u for u in self.utterances if u.get("failure") == kind]
            out[f"n_{kind}"], out[f"{kind}_errors"] = len(us), sum(u["errors"] for u in us)
        return out

    @property
    def n_utts(self) -> int:
        return len(self.utterances)

    @property
    def sec_per_utt(self) -> float:
        return self.seconds / max(1, self.n_utts)


def score_set(data: Dataset, hyps: list, seconds: float = 0.0, decoding: str | None = None) -> SetResult:
    """Score hypotheses (texts, or Transcripts with their decoding counts) against a set's references
    (Whisper English normalizer first)."""
    utts, total, by_speaker = [], metrics.WordCounts(), {}
    for u, h in zip(data.utterances, hyps, strict=True):
        hyp = h if isinstance(h, str) else h.text
        dec = {} if isinstance(h, str) else {k: v for k, v in h.to_dict().items() if k != "text"}
        s = metrics.score_utterance(u.text, hyp)
        c = s["counts"]
        total = total + c
        if u.speaker is not None:
            by_speaker[u.speaker] = by_speaker.get(u.speaker, metrics.WordCounts()) + c
        utts.append({"id": u.id, "speaker": u.speaker, "ref": u.text, "hyp": hyp, "ref_norm": s["ref"],
                     "hyp_norm": s["hyp"], "n_ref": c.n_ref, "errors": c.errors, "sub": c.sub, "del": c.dele,
                     "ins": c.ins, "rare_words": s["rare_words"], "rare_errors": c.rare_errors,
                     "common_errors": c.common_errors, "rare_pairs": s["rare_pairs"], "failure": metrics.failure(c), **dec})
    return SetResult(data.name, total, by_speaker, utts, seconds, list(data.skipped), decoding,
                     dict(getattr(data, "meta", {}) or {}))


def evaluate(model: AsrModel, sets: list[Dataset], batch_size: int = 8, decoding: Decoding | None = None,
             progress: bool = True, adapters=None) -> list[SetResult]:
    """Transcribe each set with the decoding policy (default: standard) and score it; with `adapters`
    (quasr.adapt.AdapterSet) each utterance is transcribed with its speaker's adapter."""
    decoding = decoding or Decoding()
    results = []
    for data in sets:
        t0 = time.perf_counter()
        if adapters is not None:
            hyps = adapters.transcribe(data.utterances, batch_size, decoding, progress, data.name)
        else:
            hyps = model.transcribe_detailed([u.audio for u in data.utterances], batch_size=batch_size,
                                             decoding=decoding, progress=progress, desc=data.name)
        results.append(score_set(data, hyps, time.perf_counter() - t0, decoding.label))
    return results


def teacher_forced_batches(text_model: AsrModel, utts, batch_size: int = 4) -> list[dict]:
    """Teacher-forced batches of `utts` (features, decoder inputs, labels), tokenized by `text_model`: give the
    same batches to every model that is compared, so that all of them are scored on the same token ids (a
    checkpoint keeps the tokenizer it was saved with)."""
    return [text_model.training_batch(utts[i:i + batch_size]) for i in range(0, len(utts), batch_size)]


def token_cross_entropy(model: AsrModel, batches: list[dict]) -> tuple[list[float], list[int]]:
    """Teacher-forced token cross-entropy: per utterance, the summed nats over its target tokens (text and
    <|endoftext|>) and their count. A criterion for choosing recipe options on held-in data that is smoother
    than WER: it sees every token's probability, not only the argmax path's mistakes."""
    import torch

    nats: list[float] = []
    counts: list[int] = []
    with torch.inference_mode():
        for b in batches:
            logits = model.model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
            lab = b["labels"]
            # over a contiguous [tokens, vocab] view, as the model's own loss: the class dimension transposed
            # into place gives a log-softmax a few 1e-4 nats off on this vocabulary
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                                   reduction="none").view(lab.shape)
            mask = lab != -100
            nats += ce.sum(1).tolist()
            counts += mask.sum(1).tolist()
    return nats, counts


def _pct(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def to_records(results: list[SetResult], **recipe) -> list[dict]:
    """RESULTS.md records: one per set (speaker null) and one per speaker of each set."""
    from quasr.results import record

    out = []
    for r in results:
        dec = {"decoding": r.decoding} if r.decoding and "decoding" not in recipe else {}
        out.append(record(**recipe, **dec, data=r.data, speaker=None, n_utts=r.n_utts, n_words=r.counts.n_ref,
                          n_rare_words=r.counts.n_rare_ref, wer=_pct(r.counts.wer),
                          rare_wer=_pct(r.counts.rare_wer), common_wer=_pct(r.counts.common_wer),
                          sec_per_utt=round(r.sec_per_utt, 4),
                          n_skipped=len(r.skipped), **r.windows(), **r.failures(), **r.meta))
        for spk, c in r.by_speaker.items():
            n = sum(1 for u in r.utterances if u["speaker"] == spk)
            out.append(record(**recipe, **dec, data=r.data, speaker=spk, n_utts=n, n_words=c.n_ref,
                              n_rare_words=c.n_rare_ref, wer=_pct(c.wer), rare_wer=_pct(c.rare_wer),
                              common_wer=_pct(c.common_wer)))
    return out


def print_tables(results: list[SetResult], title: str = "", console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 170)
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    count = lambda x: "-" if x is None else str(x)  # noqa: E731  (None: not reported, e.g. by a runtime)
    t = Table(title=title or None)
    for col in ("set", "utts", "words", "WER %", "rare words", "rare-WER %", "common-WER %", "windows", "fell back",
                "silent", "ended early", "ran away", "s/utt", "skipped"):
        t.add_column(col, justify="left" if col == "set" else "right", no_wrap=col == "set")
    for r in results:
        w, f = r.windows(), r.failures()
        failed = lambda k: f"{f[f'n_{k}']} ({f[f'{k}_errors']} err)" if f[f"n_{k}"] else "0"  # noqa: E731
        t.add_row(r.data, str(r.n_utts), str(r.counts.n_ref), fmt(r.counts.wer), str(r.counts.n_rare_ref),
                  fmt(r.counts.rare_wer), fmt(r.counts.common_wer), str(w["n_windows"]), count(w["n_fallback_windows"]),
                  count(w["n_skipped_windows"]), failed("truncated"), failed("runaway"), f"{r.sec_per_utt:.2f}",
                  str(len(r.skipped)))
    if len(results) > 1:
        t.add_row("mean over sets", "", "", fmt(metrics.mean_over_sets([r.counts.wer for r in results])), "",
                  fmt(metrics.mean_over_sets([r.counts.rare_wer for r in results])),
                  fmt(metrics.mean_over_sets([r.counts.common_wer for r in results])), "", "", "", "", "", "", "")
    console.print(t)
    for r in results:
        if len(r.by_speaker) > 1:
            s = Table(title=f"{r.data} by speaker")
            for col in ("speaker", "utts", "words", "WER %", "rare-WER %"):
                s.add_column(col, justify="left" if col == "speaker" else "right")
            for spk, c in r.by_speaker.items():
                n = sum(1 for u in r.utterances if u["speaker"] == spk)
                s.add_row(spk, str(n), str(c.n_ref), fmt(c.wer), fmt(c.rare_wer))
            console.print(s)
        for item, why in r.skipped:
            console.print(f"[yellow]skipped[/] {why}")


def rare_errors(results: list[SetResult], top: int = 20) -> list[tuple[str, str, int]]:
    """The most frequent rare-word errors over the sets: (reference word, hypothesis word or "∅" for a deletion,
    count), most frequent first."""
    from collections import Counter

    c = Counter((ref, hyp or "∅") for r in results for u in r.utterances for ref, hyp in u.get("rare_pairs", []))
    return [(ref, hyp, n) for (ref, hyp), n in c.most_common(top)]


def print_rare_errors(results: list[SetResult], top: int = 20, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 140)
    t = Table(title=f"most frequent rare-word errors (top {top})")
    for col in ("reference", "hypothesis", "times"):
        t.add_column(col, justify="right" if col == "times" else "left")
    for ref, hyp, n in rare_errors(results, top):
        t.add_row(ref, hyp, str(n))
    console.print(t)
