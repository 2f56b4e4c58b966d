"""Paired bootstrap between two recipes' seed-mean models, from their committed transcripts (no model runs).

    python scripts/paired_seed_means.py \
        'bench/results/transcripts/ptq-whisper-tiny.en-qep-bits=3-*seed=?-decoding=standard-alpha=0.25-*-{set}.jsonl' \
        'bench/results/transcripts/ptq-whisper-tiny.en-gptq-bits=3-*seed=?-decoding=standard-encoder*-{set}.jsonl'

Each pattern (with {set} replaced by asterisk_test and tts_test) matches one transcript file per seed; each
utterance's errors are averaged over seeds, and A − B is reported in WER points with a 95 % paired bootstrap
interval over utterances (quasr.stats.paired_bootstrap), as `bench/report.py` does against RTN and FP32.
"""
from __future__ import annotations

import glob
import json
import sys

from quasr.stats import better_worse, paired_bootstrap


def seed_mean(pattern: str):
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"error: no transcripts match {pattern}")
    per = [{u["id"]: (u["errors"], u["n_ref"]) for u in map(json.loads, open(f))} for f in files]
    ids = list(per[0])
    if any(p.keys() != per[0].keys() for p in per):
        raise SystemExit(f"error: the files of {pattern} hold different utterances")
    return ids, [sum(p[i][0] for p in per) / len(per) for i in ids], [per[0][i][1] for i in ids], len(files)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    for s in ("asterisk_test", "tts_test"):
        ia, a, n, ka = seed_mean(sys.argv[1].format(set=s))
        ib, b, _, kb = seed_mean(sys.argv[2].format(set=s))
        if ia != ib:
            raise SystemExit(f"error: {s}: the two recipes were scored on different utterances")
        bw = better_worse(a, b)
        print(f"{s}: A ({ka} seeds) − B ({kb} seeds): {paired_bootstrap(a, b, n)} WER points; "
              f"A better / worse on {bw[0]} / {bw[1]} utterances")


if __name__ == "__main__":
    main()
