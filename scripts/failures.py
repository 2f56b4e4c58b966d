"""Failed decodes in committed transcripts: how many utterances ended early or ran away, and their errors.

    python scripts/failures.py 'bench/results/transcripts/*fade-bits=3-*seed=4-*-asterisk_test.jsonl'
    python scripts/failures.py PATTERN [PATTERN ...] --list     # also name the utterances

Each file is scored again (quasr.metrics.score_utterance, the scorer of every benchmark) and each utterance
classified by quasr.metrics.failure: "truncated" (a reference of 8+ words lost at least half of them to
deletions) or "runaway" (more errors than 3 x its reference words + 10, the benchmark reports' test). One line per file: utterances,
errors, then truncated and runaway utterances with their errors and share of the file's errors.
"""
from __future__ import annotations

import glob
import os
import sys

from quasr.errors import QuasrError
from quasr.results import transcript_failures


def summarize(path: str) -> dict:
    errors, failed = transcript_failures(path)
    n = sum(1 for _ in open(path))
    out = {"file": os.path.basename(path), "n_utts": n, "errors": errors, "truncated": [], "runaway": []}
    for uid, kind, e, words in failed:
        out[kind].append((uid, e, words))
    return out


def line(s: dict) -> str:
    def part(kind: str) -> str:
        e = sum(x[1] for x in s[kind])
        share = f"{100 * e / s['errors']:.0f} %" if s["errors"] else "-"
        return f"{kind} {len(s[kind])} ({e} errors, {share})"
    return f"{s['file']}: {s['n_utts']} utts, {s['errors']} errors; {part('truncated')}; {part('runaway')}"


def main(argv: list[str]) -> None:
    show = "--list" in argv
    patterns = [a for a in argv if a != "--list"]
    if not patterns:
        raise SystemExit(__doc__)
    for pattern in patterns:
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"error: no transcripts match {pattern}")
        for f in files:
            try:
                s = summarize(f)
            except QuasrError as e:
                raise SystemExit(f"error: {e}") from None
            print(line(s))
            if show:
                for kind in ("truncated", "runaway"):
                    for uid, e, n in s[kind]:
                        print(f"    {kind:9s} {uid}: {e} errors on {n} words")


if __name__ == "__main__":
    main(sys.argv[1:])
