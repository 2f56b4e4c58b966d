"""Weight-only PTQ grid: full precision, RTN, GPTQ, QEP (α 0.25/0.5/1) and GPTAQ at W4G128 and W3G128,
calibrated recipes over several calibration seeds.

    python bench/ptq.py                                   # the grid on whisper-tiny.en, seeds 0,1,2 (about 4 h)
    python bench/ptq.py --models whisper-base --methods fp,rtn,gptq --bits 4
    python bench/ptq.py --limit 20 --n-calib 16 --seeds 0 # smoke run -> bench/results/ptq-limit20.json

Each quantized cell runs `quasr quantize` in a subprocess (its wall time and peak RSS are the cost of
quantizing), then loads the written checkpoint (so every number is for the reloaded low-bit model) and scores
it on the test sets with the decoding policy (default `standard`, openai-whisper's; see quasr.decoding). One
record per (model, method, bits, group size, alpha, seed, decoding, data) is appended as soon as it is
measured; a rerun skips finished cells. Default test sets: all of asterisk:test (300) and tts:test (202);
`--limit N` (or SET@N in --data) keeps N utterances spread evenly over a set. `quasr quantize` pins its
numerics (quasr.numerics), so the checkpoints are the same on every AVX2 machine; the evaluation runs with
torch's native kernels (1.5-2x faster on AVX-512 machines).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from quasr.bench import OPTION_KEYS, Cell, measure, measure_fp, parse_alphas, parse_data, print_records
from quasr.decoding import parse_decoding
from quasr.models.whisper import quiet_transformers
from quasr.results import ResultsFile

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = "asterisk:test,tts:test"
# (method, alpha) in the default grid
GRID = [("rtn", None), ("gptq", None), ("qep", 0.25), ("qep", 0.5), ("qep", 1.0), ("gptaq", 0.25)]


def arguments(ap: argparse.ArgumentParser, seeds: str = "0,1,2") -> None:
    """The options every grid script shares (recipe settings, data, decoding)."""
    ap.add_argument("--models", default="whisper-tiny.en")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--data", default=DEFAULT_DATA, help="SET[@N],... (N utterances spread evenly)")
    ap.add_argument("--limit", type=int, default=None, help="utterances per test set (overrides @N)")
    ap.add_argument("--calib", default="asterisk:calib,tts:calib")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seeds", default=seeds, help="calibration seeds of the calibrated recipes")
    ap.add_argument("--decoding", default="standard", help="standard | greedy | beamN (quasr.decoding)")
    ap.add_argument("--batch-size", type=int, default=8, help="utterances per decoding batch")
    ap.add_argument("--encoder-frames", default="window")
    ap.add_argument("--pad-stride", type=int, default=4, help="window mode: every k-th padding frame, weight k")
    ap.add_argument("--pad-weight", type=float, default=1.0, help="window mode: weight of padding frames")
    ap.add_argument("--embedding-bits", type=int, default=8, help="tied embedding/head bits per row; 0 keeps FP32")
    ap.add_argument("--layers", default="all", choices=["all", "encoder", "decoder"],
                    help="which Linears to quantize; the others stay full precision")
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping (fraction of the mean Hessian diagonal)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--act-order", action="store_true", help="GPTQ-based methods: columns by decreasing Hessian "
                                                              "diagonal, static groups (quasr quantize --act-order)")


def cell(args, model: str, method: str, bits: int, alpha=None, seed=None, group_size=None, variant=None) -> Cell:
    return Cell(model, method, bits, group_size or args.group_size or None, alpha, variant, seed,
                tuple(args.calib.split(",")), args.n_calib, args.encoder_frames, args.pad_stride, args.pad_weight,
                args.embedding_bits, args.percdamp, args.layers, act_order=getattr(args, "act_order", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap)
    ap.add_argument("--methods", default="fp," + ",".join(sorted({m for m, _ in GRID})))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--alphas", default=None, help="override QEP alphas, e.g. 0.5")
    args = ap.parse_args()
    try:
        alphas = parse_alphas(args.alphas) if args.alphas else None
    except ValueError as e:
        ap.error(str(e))
    decoding = parse_decoding(args.decoding)
    seeds = [int(x) for x in args.seeds.split(",")]
    quiet_transformers()
    out = args.out or RESULTS / (f"ptq-limit{args.limit}.json" if args.limit else "ptq.json")
    results = ResultsFile(out, "ptq", fresh=args.fresh, option_keys=OPTION_KEYS)
    data = parse_data(args.data, args.limit)
    methods = args.methods.split(",")
    grid = [(m, a) for m, a in GRID if m in methods]
    if alphas and "qep" in methods:
        grid = [(m, a) for m, a in grid if m != "qep"] + [("qep", a) for a in alphas]

    for model_name in args.models.split(","):
        if "fp" in methods:
            measure_fp(results, model_name, data, decoding, args.batch_size)
        for bits in map(int, args.bits.split(",")):
            for method, alpha in grid:
                for seed in ([None] if method == "rtn" else seeds):
                    measure(results, cell(args, model_name, method, bits, alpha, seed), data, decoding,
                            args.batch_size)
    table(results, out)


def table(results: ResultsFile, out: Path) -> None:
    recs = [dict(r) for r in results.records if r["speaker"] is None]
    fp_speed = {(r["model"], r["data"]): r["sec_per_utt"] for r in recs if r["method"] == "fp"}
    for r in recs:
        base = fp_speed.get((r["model"], r["data"]))
        r["speed_vs_fp"] = round(base / r["sec_per_utt"], 2) if base and r.get("sec_per_utt") else None
    print_records(recs, ["model", "method", "bits", "group_size", "alpha", "seed", "decoding", "data", "n_utts", "wer",
                         "rare_wer", "n_fallback_windows",
                         "quant_seconds", "peak_rss_mb", "size_mb", "bits_per_weight", "sec_per_utt", "speed_vs_fp"],
                  title=f"Weight-only PTQ ({out.name})")
    print(f"wrote {out}")


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
