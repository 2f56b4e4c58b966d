"""Shared pieces of the benchmark scripts in bench/: one record per cell, resumable, one table printer.

Each (recipe, seed, data) cell is measured once and appended to the results file at once; a rerun skips
finished cells, so a long grid can run in parts and survive interruption. Transcripts of each cell are
kept beside the results (bench/results/transcripts/) so full-precision transcripts are computed once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from quasr.data import Dataset, load_source
from quasr.decoding import Decoding
from quasr.evaluate import SetResult, evaluate, to_records
from quasr.models.base import AsrModel
from quasr.results import ResultsFile, atomic_write_text, record

_SETS: dict[tuple[str, int | None], Dataset] = {}


def dataset(spec: str, limit: int | None) -> Dataset:
    """Load a speech set once per process (benchmarks evaluate many models on the same sets)."""
    if (spec, limit) not in _SETS:
        _SETS[spec, limit] = load_source(spec, limit=limit)
    return _SETS[spec, limit]


def transcripts_path(results: ResultsFile, recipe: dict, data: str) -> Path:
    """One file per cell, named by every key of the cell that is set (options such as alpha and the decoding
    included)."""
    parts = [f"{k}={recipe[k]}" if k not in ("model", "method") else str(recipe[k])
             for k in results.keys if recipe.get(k) is not None and k not in ("data", "speaker")]
    name = "-".join(parts + [data]).replace("/", "_").replace(":", "_")
    return results.path.parent / "transcripts" / f"{results.path.stem}-{name}.jsonl"


TRANSCRIPT_KEYS = ("id", "speaker", "ref", "hyp", "errors", "n_ref", "rare_words", "rare_errors", "windows",
                   "fallbacks", "fallback_windows", "skipped_windows", "temperature")


def eval_cell(results: ResultsFile, model: AsrModel, data: str, limit: int | None, recipe: dict,
              extra: dict | None = None, progress: bool = True, decoding: Decoding | None = None,
              batch_size: int = 8) -> list[dict] | None:
    """Evaluate one (recipe, data) cell with a decoding policy (default standard) unless it is already in
    `results`; returns its new records."""
    decoding = decoding or Decoding()
    recipe = dict(recipe, decoding=decoding.label)
    if results.done(record(**recipe, data=data, speaker=None)):
        return None
    ds = dataset(data, limit)
    load_before = os.getloadavg()[0]
    [res] = evaluate(model, [ds], batch_size=batch_size, decoding=decoding, progress=progress)
    # other work on the machine slows transcription: the 1-minute load average is kept beside the timing
    load = {"load_avg": round(max(load_before, os.getloadavg()[0]), 2)}
    path = transcripts_path(results, recipe, data)
    # each record names its transcript file (relative to the results file), for paired per-utterance comparisons
    recs = [dict(r, **load, **(extra or {}), transcripts=str(path.relative_to(results.path.parent)))
            for r in to_records([res], **recipe)]
    atomic_write_text(path, "".join(json.dumps({k: u[k] for k in TRANSCRIPT_KEYS if k in u}, ensure_ascii=False) + "\n"
                                        for u in res.utterances))
    results.add(*recs)
    return recs


def print_records(records: list[dict], columns: list[str], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=title or None)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("model", "method", "data", "speaker") else "left")
    for r in records:
        t.add_row(*("-" if r.get(c) is None else (f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]))
                    for c in columns))
    console.print(t)


__all__ = ["SetResult", "dataset", "eval_cell", "print_records"]
