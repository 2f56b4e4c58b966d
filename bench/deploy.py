"""Deployment benchmark: quasr's calibrated codes against each runtime's own rounding, in that runtime.

    python bench/deploy.py                        # tiny.en and base -> bench/results/deploy.json
    python bench/deploy.py --models whisper-tiny.en --limit 20 --seeds 0   # a quick look
    python bench/deploy.py --types q4_0,ct2      # only these files (in this order; the f16 reference with ggml types)

whisper.cpp (pywhispercpp): f16; its own rounding (ggml's reference quantizer, as its quantize tool) to q4_0,
q4_1, q5_0, q8_0; and quasr's GPTQ codes quantized for the same types (`quasr quantize --target ggml-TYPE`).
faster-whisper (CTranslate2): float32; its own int8 rounding (its converter's); quasr's GPTQ int8 codes
(`--target ct2-int8`). Every file is made by `quasr export`, transcribed in the runtime with the standard
decoding policy translated to the runtime's settings (recorded), and scored by quasr. `python bench/report.py
deploy` pairs each quasr file with the runtime's own rounding of the same type.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ptq import RESULTS, arguments, cell  # noqa: E402

from quasr.bench import OPTION_KEYS, eval_cell, parse_data  # noqa: E402
from quasr.decoding import parse_decoding  # noqa: E402
from quasr.models.whisper import quiet_transformers  # noqa: E402
from quasr.paths import cache_dir  # noqa: E402
from quasr.results import ResultsFile  # noqa: E402

GGML_TYPES = ("q4_0", "q4_1", "q5_0", "q8_0")
SEEDED = ("q4_0", "q4_1", "ct2-int8")  # targets measured over every seed (the others: the first seed)
KEYS = OPTION_KEYS + ("runtime", "rtype")


def checkpoint_for(results: ResultsFile, args, model: str, method: str, target: str, seed: int) -> Path:
    """A quasr checkpoint quantized for a runtime target (quantized once, in a subprocess, and cached)."""
    import json
    import shutil
    import subprocess

    from quasr.cli import TARGETS

    g = TARGETS[target]
    c = cell(args, model, method, g["bits"], alpha=args.alpha, seed=seed, group_size=g["group_size"] or None)
    mse = "-mse" if args.mse else ""
    out = cache_dir("bench", "deploy", "ckpt") / f"{c.tag()}-{target}{mse}"  # the whole recipe names the entry
    meta = out / "quasr_checkpoint.json"
    if meta.exists():  # a checkpoint of an older grid rule (e.g. before q4_0's signed-max scales) is made again
        recipe = json.loads(meta.read_text()).get("recipe", {})
        if bool(recipe.get("signed_max", False)) != bool(g.get("signed_max", False)):
            print(f"== {out.name}: cached with another grid rule, quantizing again", flush=True)
            shutil.rmtree(out)
    if not meta.exists():
        cmd = c.quantize_command(out) + ["--target", target] + (["--mse"] if args.mse else [])
        print(f"== {out.name}: quantizing", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"quantize failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return out


def run(results, keys: dict, make, runtime: str, compute_type: str, data, decoding, ckpt=None) -> None:
    """Export (make() -> path) unless every set is measured, then transcribe in the runtime and score. `ckpt()`
    (quasr's files) gives the checkpoint the file was written from: its quantization seconds and peak RSS go into
    the records."""
    import json

    from quasr.deploy.runtimes import load_runtime

    if all(results.done(dict(keys, decoding=decoding.label, data=d, speaker=None)) for d, _ in data):
        return
    path = make()
    print(f"== {path.name}: transcribing in {runtime} ({', '.join(d for d, _ in data)})", flush=True)
    asr = load_runtime(runtime, str(path), compute_type)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir())
    extra = {"size_mb": round(size / 1e6, 2), "runtime_settings": asr.settings(decoding), "file": str(path)}
    if ckpt is not None:
        recipe = json.loads((ckpt() / "quasr_checkpoint.json").read_text()).get("recipe", {})
        extra.update({k: recipe[k] for k in ("quant_seconds", "peak_rss_mb") if recipe.get(k) is not None})
    for d, n in data:
        eval_cell(results, asr, d, n, keys, extra=extra, decoding=decoding)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap)
    ap.set_defaults(models="whisper-tiny.en,whisper-base")
    ap.add_argument("--method", default="gptq", help="quasr's calibrated method for the runtime files")
    ap.add_argument("--alpha", type=float, default=None, help="QEP / GPTAQ strength of --method (default: its own)")
    ap.add_argument("--types", default=",".join(GGML_TYPES + ("ct2",)),
                    help="which files, in this order: ggml types (q4_0,q4_1,q5_0,q8_0) and ct2 (faster-whisper)")
    ap.add_argument("--mse", action="store_true", help="quasr's files search each group's scale (quasr quantize "
                                                       "--mse): the scale GPTQ rounds on, not the runtime's rule")
    args = ap.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if bad := [t for t in types if t not in GGML_TYPES + ("ct2",)]:
        raise SystemExit(f"error: --types: unknown {', '.join(bad)} (of {', '.join(GGML_TYPES + ('ct2',))})")
    quiet_transformers()
    from quasr.deploy.ggml import export_ggml

    decoding = parse_decoding(args.decoding)
    data = parse_data(args.data, args.limit)
    out = args.out or RESULTS / (f"deploy-limit{args.limit}.json" if args.limit else "deploy.json")
    results = ResultsFile(out, "deploy", fresh=args.fresh, option_keys=KEYS)
    seeds = [int(s) for s in args.seeds.split(",")]
    files = cache_dir("bench", "deploy", "files")
    for model in args.models.split(","):
        base = dict(model=model, group_size=None)
        if any(t in GGML_TYPES for t in types):  # whisper.cpp's reference: f16
            run(results, dict(base, method="fp", bits=16, runtime="whispercpp", rtype="f16"),
                lambda: export_ggml(model, files / f"{model}-f16.bin", "f16") and files / f"{model}-f16.bin",
                "whispercpp", "default", data, decoding)
        for t in types:
            if t == "ct2":
                ct2(results, args, model, seeds, files, data, decoding)
                continue
            bits, gs = int(t[1]), 32
            f = files / f"{model}-own-{t}.bin"
            run(results, dict(base, method="rtn-runtime", bits=bits, group_size=gs, runtime="whispercpp", rtype=t),
                lambda f=f, t=t: export_ggml(model, f, t) and f, "whispercpp", "default", data, decoding)
            for seed in (seeds if t in SEEDED else seeds[:1]):
                f = files / f"{model}-{args.method}-{t}-s{seed}{'-mse' if args.mse else ''}.bin"
                ck = lambda seed=seed, t=t: checkpoint_for(results, args, model, args.method, f"ggml-{t}", seed)  # noqa: E731
                run(results, dict(base, method=args.method, bits=bits, group_size=gs, seed=seed, runtime="whispercpp",
                                  rtype=t, calib="+".join(args.calib.split(",")), n_calib=args.n_calib,
                                  **({"alpha": args.alpha} if args.alpha is not None else {}),
                                  **({"mse": True} if args.mse else {})),
                    lambda f=f, t=t, ck=ck: export_ggml(ck(), f, t) and f, "whispercpp", "default", data, decoding,
                    ckpt=ck)


def ct2(results, args, model: str, seeds: list[int], files: Path, data, decoding) -> None:
    """faster-whisper / CTranslate2: float32, its own int8 rounding, quasr's int8 codes."""
    from quasr.deploy.ct2 import export_ct2

    base = dict(model=model, group_size=None)
    d32 = files / f"{model}-ct2-float32"
    run(results, dict(base, method="fp", bits=32, runtime="ctranslate2", rtype="float32"),
        lambda: export_ct2(model, d32, "float32") and d32, "ctranslate2", "float32", data, decoding)
    d8 = files / f"{model}-ct2-own-int8"
    run(results, dict(base, method="rtn-runtime", bits=8, runtime="ctranslate2", rtype="int8"),
        lambda: export_ct2(model, d8, "int8") and d8, "ctranslate2", "int8", data, decoding)
    for seed in seeds:
        dq = files / f"{model}-ct2-{args.method}-int8-s{seed}{'-mse' if args.mse else ''}"
        ck = lambda seed=seed: checkpoint_for(results, args, model, args.method, "ct2-int8", seed)  # noqa: E731
        run(results, dict(base, method=args.method, bits=8, seed=seed, runtime="ctranslate2", rtype="int8",
                          calib="+".join(args.calib.split(",")), n_calib=args.n_calib,
                          **({"alpha": args.alpha} if args.alpha is not None else {}),
                          **({"mse": True} if args.mse else {})),
            lambda dq=dq, ck=ck: export_ct2(ck(), dq, "int8") and dq, "ctranslate2", "int8", data, decoding, ckpt=ck)


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
