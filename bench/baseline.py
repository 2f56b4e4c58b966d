"""Full-precision baseline: both bundled Whisper models on asterisk:test and tts:test.

    python bench/baseline.py                  # full sets -> bench/results/baseline.json (about 25 min on 2 cores)
    python bench/baseline.py --limit 20       # quick look -> bench/results/baseline-limit20.json
    python bench/baseline.py --decoding greedy --out bench/results/baseline-greedy.json

Writes one record per (model, set) and per (model, set, speaker) in the format of shared/RESULTS.md;
a rerun skips cells already measured (use --fresh to start over).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from quasr.bench import eval_cell, print_records
from quasr.decoding import parse_decoding
from quasr.models import load_model
from quasr.models.whisper import quiet_transformers
from quasr.results import ResultsFile

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base")
    ap.add_argument("--data", default="asterisk:test,tts:test")
    ap.add_argument("--limit", type=int, default=None, help="utterances per set (spread evenly)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true", help="ignore records already in the output file")
    ap.add_argument("--decoding", default="standard", help="standard | greedy | beamN (quasr.decoding)")
    args = ap.parse_args()
    decoding = parse_decoding(args.decoding)
    quiet_transformers()
    out = args.out or RESULTS / (f"baseline-limit{args.limit}.json" if args.limit else "baseline.json")
    results = ResultsFile(out, "baseline", fresh=args.fresh)
    for name in args.models.split(","):
        model = None
        for data in args.data.split(","):
            recipe = dict(model=name, method="fp", bits=None, group_size=None)
            if results.done(dict(recipe, decoding=decoding.label, data=data, speaker=None)):
                print(f"{name} on {data}: already measured, skipping")
                continue
            model = model or load_model(name)
            eval_cell(results, model, data, args.limit, recipe, decoding=decoding)
    print_records([r for r in results.records if r["speaker"] is None],
                  ["model", "method", "decoding", "data", "n_utts", "n_words", "wer", "n_rare_words", "rare_wer",
                   "n_fallback_windows", "sec_per_utt"],
                  title=f"Full-precision baseline ({out.name})")
    print_records([r for r in results.records if r["speaker"] is not None and r["data"].startswith("tts")],
                  ["model", "data", "speaker", "n_utts", "n_words", "wer", "rare_wer"], title="Per speaker (tts)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
