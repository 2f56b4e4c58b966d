"""Does a calibration draw that under-covers long utterances explain a seed's early stops?

    python scripts/calib_draws.py [--calib asterisk:calib,tts:calib] [--n-calib 128] [--seeds 0,1,2,3,4]
                                  [--results bench/results/fade.json] [--model whisper-tiny.en] [--bits 3]

For every seed: what the calibration draw holds (utterances per source, reference words, seconds, how many
long utterances), beside the early stops (quasr.metrics.failure, "truncated") that each calibrated recipe of
the results file made on each test set with that seed. The draw is the one `quasr quantize` and the benchmarks
make (quasr.cli._calibration); the early stops are counted again from the committed transcripts.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from quasr.results import transcript_failures

ROOT = Path(__file__).resolve().parents[1]


def draw_stats(utts) -> dict:
    words = [len(u.text.split()) for u in utts]
    secs = [u.seconds for u in utts]
    return {"asterisk": sum(u.id.startswith("asterisk") for u in utts), "words": sum(words),
            "median words": statistics.median(words), "max words": max(words),
            "20+ words": sum(w >= 20 for w in words), "30+ words": sum(w >= 30 for w in words),
            "seconds": round(sum(secs), 1), "10+ s": sum(s >= 10 for s in secs)}


def early_stops(results: Path, model: str, bits: int) -> dict[tuple[str, str], dict[int, int]]:
    """{(recipe, set): {seed: truncated utterances}} from the transcripts the results file names."""
    out: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for r in json.loads(results.read_text())["records"]:
        if r.get("model") != model or r.get("bits") != bits or r.get("seed") is None or not r.get("transcripts"):
            continue
        recipe = r["method"] + (f" ({r['variant']})" if r.get("variant") else "") + \
            (f" α={r['alpha']}" if r.get("alpha") is not None else "") + \
            (f" pad {r['pad_weight']}" if r.get("pad_weight") is not None else "")
        _, failed = transcript_failures(results.parent / r["transcripts"])
        out[(recipe, r["data"])][r["seed"]] = sum(kind == "truncated" for _, kind, _, _ in failed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default="asterisk:calib,tts:calib")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "fade.json")
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--bits", type=int, default=3)
    args = ap.parse_args()
    from quasr.cli import _calibration
    from quasr.errors import QuasrError

    if not args.results.is_file():
        raise SystemExit(f"error: --results: no results file at {args.results}")
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        stats = {s: draw_stats(_calibration(args.calib.split(","), args.n_calib, s, False)) for s in seeds}
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
    cols = list(next(iter(stats.values())))
    print(f"calibration draws ({args.n_calib} of {args.calib}):")
    print("| seed | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for s in seeds:
        print(f"| {s} | " + " | ".join(str(stats[s][c]) for c in cols) + " |")
    stops = early_stops(args.results, args.model, args.bits)
    print(f"\nearly stops of {args.model} W{args.bits} by seed ({args.results.name}):")
    print("| recipe | set | " + " | ".join(f"seed {s}" for s in seeds) + " |\n|---|---" + "|---" * len(seeds) + "|")
    for (recipe, data), by_seed in sorted(stops.items()):
        print(f"| {recipe} | {data} | " + " | ".join(str(by_seed.get(s, "-")) for s in seeds) + " |")
    for data in sorted({d for _, d in stops}):  # recipes measured on every seed only, so the sums compare
        full = [by_seed for (_, d), by_seed in stops.items() if d == data and all(s in by_seed for s in seeds)]
        print(f"| sum of the {len(full)} recipes with every seed | {data} | "
              + " | ".join(str(sum(b[s] for b in full)) for s in seeds) + " |")


if __name__ == "__main__":
    main()
