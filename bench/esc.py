"""ESC benchmark: full-integer recipes (weights and activations) under each activation calibrator.

    python bench/esc.py                                 # tiny.en and base; W8A8, W4A8, W4A4; max, percentile, mse,
                                                        #   entropy and ESC (search seeds 0,1,2) -> bench/results/esc.json
    python bench/esc.py --models whisper-tiny.en --recipes w8a8 --limit 20 --esc-seeds 0   # a quick look
    python bench/esc.py --speed                         # the int8 path against fake quantization and FP32

Weights: W8 is round-to-nearest per row, symmetric (the grid int8 matrix products use); W4 is `--w4-method`
(default rtn) at group size 128, so the calibrators are compared on the same weights. Activation scales are
static, one per tensor, set from `quasr quantize`'s calibration draw (--n-calib from --calib with --seed; the
activation statistics use a seeded 32 of them, ESC's fitness a held-in 16). Each cell is `quasr quantize` in a
subprocess, its checkpoint reloaded and scored with the decoding policy (default standard). `python
bench/report.py esc` prints paired intervals against the MSE calibrator and ESC's mean ± std over search seeds.

--speed: on `--speed-utts` utterances of asterisk:test, one thread, greedy decoding: FP32, the W8A8 (MSE)
checkpoint fake-quantized, and the same checkpoint with its Linears as int8 matrix products (torch._int_mm; the checkpoint's arithmetic), and the same
with the tied output head as one too (its input quantized per token: a slightly different model);
seconds per utterance and how many transcripts the int8 path shares with fake quantization -> esc-speed.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ptq import RESULTS  # noqa: E402

from quasr.bench import OPTION_KEYS, Cell, measure, measure_fp, parse_data, print_records  # noqa: E402
from quasr.decoding import parse_decoding  # noqa: E402
from quasr.models.whisper import quiet_transformers  # noqa: E402
from quasr.results import ResultsFile  # noqa: E402

RECIPES = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w8a4": (8, 4)}
CALIBRATORS = ("max", "percentile", "mse", "entropy", "esc")


def recipe_cell(args, model: str, wbits: int, abits: int, calibrator: str, esc_seed: int = 0) -> Cell:
    w8 = wbits == 8
    return Cell(model, "rtn" if w8 else args.w4_method, wbits, None if w8 else 128, seed=args.seed,
                calib=tuple(args.calib.split(",")), n_calib=args.n_calib, embedding_bits=args.embedding_bits,
                sym=w8, act_bits=abits, act_calibrator=calibrator, esc_seed=esc_seed, esc_budget=args.esc_budget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base")
    ap.add_argument("--recipes", default="w8a8,w4a8,w4a4", help=f"of {', '.join(RECIPES)}")
    ap.add_argument("--calibrators", default=",".join(CALIBRATORS))
    ap.add_argument("--esc-seeds", default="0,1,2")
    ap.add_argument("--esc-budget", type=int, default=None, help="fitness evaluations (default: quasr's)")
    ap.add_argument("--w4-method", default="rtn", help="weight method of the W4 recipes (rtn, gptq, ...)")
    ap.add_argument("--seed", type=int, default=0, help="calibration draw")
    ap.add_argument("--calib", default="asterisk:calib,tts:calib")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--embedding-bits", type=int, default=8)
    ap.add_argument("--data", default="asterisk:test,tts:test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--decoding", default="standard")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--speed-utts", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    if args.speed:
        return speed(args)
    bad = [r for r in args.recipes.split(",") if r not in RECIPES]
    if bad:
        raise SystemExit(f"error: unknown recipe {bad[0]!r} (choose from {', '.join(RECIPES)})")
    decoding = parse_decoding(args.decoding)
    data = parse_data(args.data, args.limit)
    out = args.out or RESULTS / (f"esc-limit{args.limit}.json" if args.limit else "esc.json")
    results = ResultsFile(out, "esc", fresh=args.fresh, option_keys=OPTION_KEYS)
    sources = [ResultsFile(RESULTS / "ptq.json", "ptq", option_keys=OPTION_KEYS)] if (RESULTS / "ptq.json").exists() \
        else []
    for model in args.models.split(","):
        measure_fp(results, model, data, decoding, args.batch_size, sources)
        for r in args.recipes.split(","):
            wbits, abits = RECIPES[r]
            for cal in args.calibrators.split(","):
                for s in ([int(x) for x in args.esc_seeds.split(",")] if cal == "esc" else [0]):
                    measure(results, recipe_cell(args, model, wbits, abits, cal, s), data, decoding, args.batch_size)
    recs = [r for r in results.records if r["speaker"] is None]
    print_records(recs, ["model", "method", "bits", "act_bits", "act_calibrator", "esc_seed", "data", "n_utts", "wer",
                         "rare_wer", "quant_seconds", "sec_per_utt"], title=f"ESC ({out.name})")
    print(f"wrote {out}")


def speed(args) -> None:
    """FP32 vs W8A8 fake-quantized vs W8A8 int8 matmuls, one thread, greedy, the same utterances."""
    import subprocess
    import time

    import torch

    from quasr import checkpoint
    from quasr.bench import dataset
    from quasr.metrics import score
    from quasr.models import load_model
    from quasr.paths import cache_dir
    from quasr.quant.modules import enable_int8
    from quasr.results import machine_info, now, write_json

    torch.set_num_threads(1)
    model = args.models.split(",")[0]
    cell = recipe_cell(args, model, 8, 8, "mse")
    ckpt = cache_dir("bench", "esc") / cell.tag()
    if not (ckpt / "quasr_checkpoint.json").exists():
        subprocess.run(cell.quantize_command(ckpt), check=True, capture_output=True)
    ds = dataset("asterisk:test", args.speed_utts)
    audios, refs = [u.audio for u in ds], [u.text for u in ds]
    greedy = parse_decoding("greedy")
    runs = {}
    for name in ("fp32", "w8a8-fake", "w8a8-int8", "w8a8-int8-head"):
        asr = load_model(model) if name == "fp32" else checkpoint.load(ckpt)
        if name.startswith("w8a8-int8"):
            n, n_head = enable_int8(asr.model, head=name.endswith("head"))
        asr.transcribe(audios[:2], decoding=greedy, progress=False)  # warm-up
        t = time.perf_counter()
        hyps = asr.transcribe(audios, batch_size=1, decoding=greedy, progress=False)
        sec = (time.perf_counter() - t) / len(audios)
        runs[name] = {"sec_per_utt": round(sec, 4), "wer": round(score(refs, hyps).wer, 3), "hyps": hyps}
        print(f"{name}: {sec:.3f} s/utt, WER {runs[name]['wer']}", flush=True)
    same = sum(a == b for a, b in zip(runs["w8a8-fake"]["hyps"], runs["w8a8-int8"]["hyps"]))
    same_head = sum(a == b for a, b in zip(runs["w8a8-fake"]["hyps"], runs["w8a8-int8-head"]["hyps"]))
    out = args.out or RESULTS / "esc-speed.json"
    write_json(out, {"benchmark": "esc-speed", "created": now(), "command": " ".join(["python", *sys.argv]),
                     "machine": machine_info(), "model": model, "checkpoint_recipe": cell.keys(),
                     "data": f"asterisk:test@{args.speed_utts}", "decoding": greedy.label, "batch_size": 1,
                     "threads": 1, "int8_linears": n, "transcripts_same_int8_vs_fake": same,
                     "transcripts_same_int8_head_vs_fake": same_head, "n_utts": len(audios),
                     "runs": {k: {kk: vv for kk, vv in v.items() if kk != "hyps"} for k, v in runs.items()},
                     "transcripts": {k: v["hyps"] for k, v in runs.items()}})
    print(f"int8 vs fake quantization: {same}/{len(audios)} transcripts identical ({same_head} with the int8 head); "
          f"wrote {out}")


if __name__ == "__main__":
    main()
