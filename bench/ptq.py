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
import subprocess
import sys
import time
from pathlib import Path

from quasr import checkpoint
from quasr.bench import eval_cell, print_records
from quasr.decoding import parse_decoding
from quasr.models import load_model
from quasr.models.whisper import quiet_transformers
from quasr.paths import cache_dir
from quasr.results import ResultsFile

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = "asterisk:test,tts:test"
# (method, alpha) in the default grid
GRID = [("rtn", None), ("gptq", None), ("qep", 0.25), ("qep", 0.5), ("qep", 1.0), ("gptaq", 0.25)]


def parse_data(spec: str, limit: int | None) -> list[tuple[str, int | None]]:
    out = []
    for part in spec.split(","):
        name, _, n = part.partition("@")
        out.append((name, limit or (int(n) if n else None)))
    return out


def quantize_subprocess(model: str, method: str, bits: int, group: int, alpha, seed: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "quasr", "quantize", "--model", model, "--method", method, "--bits", str(bits),
           "--group-size", str(group), "--n-calib", str(args.n_calib), "--seed", str(seed),
           "--encoder-frames", args.encoder_frames, "--pad-stride", str(args.pad_stride),
           "--embedding-bits", str(args.embedding_bits), "--percdamp", str(args.percdamp), "--layers", args.layers,
           "--out", str(out), "--no-progress"]
    for c in args.calib.split(","):
        cmd += ["--calib", c]
    if alpha is not None:
        cmd += ["--alpha", str(alpha)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall": wall, "log": proc.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en")
    ap.add_argument("--methods", default="fp," + ",".join(sorted({m for m, _ in GRID})))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--alphas", default=None, help="override QEP alphas, e.g. 0.5")
    ap.add_argument("--data", default=DEFAULT_DATA, help="SET[@N],... (N utterances spread evenly)")
    ap.add_argument("--limit", type=int, default=None, help="utterances per test set (overrides @N)")
    ap.add_argument("--calib", default="asterisk:calib,tts:calib")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds of the calibrated recipes")
    ap.add_argument("--decoding", default="standard", help="standard | greedy | beamN (quasr.decoding)")
    ap.add_argument("--batch-size", type=int, default=8, help="utterances per decoding batch")
    ap.add_argument("--encoder-frames", default="window")
    ap.add_argument("--pad-stride", type=int, default=4, help="window mode: every k-th padding frame, weight k")
    ap.add_argument("--embedding-bits", type=int, default=8, help="tied embedding/head bits per row; 0 keeps FP32")
    ap.add_argument("--layers", default="all", choices=["all", "encoder", "decoder"],
                    help="which Linears to quantize; the others stay full precision")
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping (fraction of the mean Hessian diagonal)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    decoding = parse_decoding(args.decoding)
    seeds = [int(x) for x in args.seeds.split(",")]
    quiet_transformers()
    out = args.out or RESULTS / (f"ptq-limit{args.limit}.json" if args.limit else "ptq.json")
    results = ResultsFile(out, "ptq", fresh=args.fresh, option_keys=("alpha", "encoder_frames", "pad_stride", "embedding_bits", "percdamp", "layers"))
    data = parse_data(args.data, args.limit)
    methods = args.methods.split(",")
    grid = [(m, a) for m, a in GRID if m in methods]
    if args.alphas and "qep" in methods:
        grid = [(m, a) for m, a in grid if m != "qep"] + [("qep", float(a)) for a in args.alphas.split(",")]
    calib_name = "+".join(args.calib.split(","))

    for model_name in args.models.split(","):
        if "fp" in methods:
            fp = None
            for d, n in data:
                rec = dict(model=model_name, method="fp", bits=None, group_size=None)
                if not results.done(dict(rec, decoding=decoding.label, data=d, speaker=None)):
                    fp = fp or load_model(model_name)
                    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in fp.model.parameters()}.values())
                    eval_cell(results, fp, d, n, rec, extra={"size_mb": round(size / 1e6, 2), "bits_per_weight": 32},
                              decoding=decoding, batch_size=args.batch_size)
            del fp
        for bits in map(int, args.bits.split(",")):
            for method, alpha in grid:
                for seed in ([None] if method == "rtn" else seeds):
                    run_cell(results, model_name, method, bits, alpha, seed, calib_name, data, decoding, args)
    table(results, out)


def run_cell(results: ResultsFile, model_name: str, method: str, bits: int, alpha, seed, calib_name: str, data,
             decoding, args) -> None:
    """Quantize one recipe in a subprocess (unless all its cells are measured) and score the checkpoint."""
    recipe = dict(model=model_name, method=method, bits=bits, group_size=args.group_size,
                  calib=None if method == "rtn" else calib_name,
                  n_calib=None if method == "rtn" else args.n_calib, seed=seed, alpha=alpha)
    recipe["encoder_frames"] = None if method == "rtn" else args.encoder_frames
    recipe["pad_stride"] = args.pad_stride if recipe["encoder_frames"] == "window" else None
    recipe["embedding_bits"] = args.embedding_bits or None
    recipe["percdamp"] = None if method == "rtn" else args.percdamp
    recipe["layers"] = None if args.layers == "all" else args.layers
    if all(results.done(dict(recipe, decoding=decoding.label, data=d, speaker=None)) for d, _ in data):
        return
    tag = f"{model_name}-{method}-w{bits}g{args.group_size}" + (f"-a{alpha}" if alpha is not None else "") \
        + f"-n{args.n_calib}-s{seed}-{args.encoder_frames}{args.pad_stride}-e{args.embedding_bits}" \
        + f"-d{args.percdamp}" + ("" if args.layers == "all" else f"-{args.layers}")
    ckpt = cache_dir("bench", "ptq") / tag
    print(f"== {tag}: quantizing", flush=True)
    q = quantize_subprocess(model_name, method, bits, args.group_size, alpha, 0 if seed is None else seed, args,
                            ckpt)
    info = checkpoint.info(ckpt)
    r = info["recipe"]
    extra = {"quant_seconds": r.get("quant_seconds"), "quant_wall_seconds": round(q["wall"], 1),
             "peak_rss_mb": r.get("peak_rss_mb"), "size_mb": round(info["dir_mb"], 2),
             "weights_mb": round(info["file_mb"], 2), "bits_per_weight": round(info["bits_per_weight"], 3),
             "embedding_bits_per_weight": info["embedding"]["bits_per_weight"],
             "numerics": (r.get("numerics") or {}).get("mode"), "weights_sha256": info["sha256"]}
    asr = checkpoint.load(ckpt)
    for d, n in data:
        eval_cell(results, asr, d, n, recipe, extra=extra, decoding=decoding, batch_size=args.batch_size)


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
