"""quasr's GPTQ against llm-compressor's GPTQ on the same job, timed under the same conditions.

    python bench/peers/time_gptq.py                                  # tiny.en, 1 and 2 threads, 2 repetitions
    python bench/peers/time_gptq.py --models whisper-base --threads 1 --reps 1

The job: W4 group 128 asymmetric, the Linears of encoder and decoder, calibrated on the same 128 utterances
(asterisk:calib + tts:calib, seed 0). llm-compressor runs in its own venv (bench/peers/setup.sh llmcompressor)
through bench/peers/runner.py --quantize-only; quasr runs `quasr quantize --method gptq` with its defaults. Each
repetition runs the two one after the other (which one first alternates), each with OMP_NUM_THREADS set to the
thread count, and each records the seconds its tool reports for quantizing a loaded model (calibration audio
already read), the wall time of the whole process, and the load average just before it started: run it with
nothing else on the machine, or the load column says so. Results: bench/results/gptq-timing.json, and
`python bench/report.py timing` prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

from run import VENVS, model_dir  # noqa: E402

from quasr.results import ResultsFile, record  # noqa: E402

SCHEME = "gptq-w4a16-g128-asym"
CALIB, N_CALIB, SEED = "asterisk:calib,tts:calib", 128, 0
OPTION_KEYS = ("tool", "threads", "rep")


def run_llmcompressor(model: str, threads: int) -> dict:
    py = VENVS / "llmcompressor" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"error: no venv for llm-compressor at {py}: run bash bench/peers/setup.sh llmcompressor")
    cmd = [str(py), str(Path(__file__).parent / "runner.py"), "--peer", "llmcompressor", "--scheme", SCHEME,
           "--model", model, "--path", str(model_dir(model)), "--out", os.devnull, "--calib", CALIB,
           "--n-calib", str(N_CALIB), "--seed", str(SEED), "--quantize-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(threads))
    if proc.returncode != 0:
        raise SystemExit(f"llm-compressor failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_quasr(model: str, threads: int) -> dict:
    from quasr import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        cmd = [sys.executable, "-m", "quasr", "quantize", "--model", model, "--method", "gptq", "--bits", "4",
               "--group-size", "128", "--n-calib", str(N_CALIB), "--seed", str(SEED), "--out", str(out),
               "--no-progress", *[x for c in CALIB.split(",") for x in ("--calib", c)]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(threads))
        if proc.returncode != 0:
            raise SystemExit(f"quasr quantize failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        r = checkpoint.info(out)["recipe"]
        return {"quant_seconds": r["quant_seconds"], "peak_rss_mb": r.get("peak_rss_mb"),
                "pad_weight": r.get("pad_weight"), "numerics": (r.get("numerics") or {}).get("mode")}


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gptq-timing.json")
    args = ap.parse_args()
    from quasr.models import BUNDLED

    for model in args.models.split(","):  # fail before any work: an unknown model, or no llm-compressor venv
        if model not in BUNDLED:
            raise SystemExit(f"error: unknown model {model!r} (bundled: {', '.join(BUNDLED)})")
    if not (VENVS / "llmcompressor" / "bin" / "python").exists():
        raise SystemExit(f"error: no venv for llm-compressor under {VENVS}: run bash bench/peers/setup.sh llmcompressor")
    results = ResultsFile(args.out, "gptq-timing", option_keys=OPTION_KEYS)
    tools = {"llmcompressor": run_llmcompressor, "quasr": run_quasr}
    for model in args.models.split(","):
        for threads in [int(t) for t in args.threads.split(",")]:
            for rep in range(args.reps):
                for tool in (list(tools) if rep % 2 == 0 else list(tools)[::-1]):
                    keys = dict(model=model, method=f"llmcompressor:{SCHEME}" if tool == "llmcompressor" else "gptq",
                                bits=4, group_size=128, calib=CALIB.replace(",", "+"), n_calib=N_CALIB, seed=SEED,
                                tool=tool, threads=threads, rep=rep)
                    if results.done(keys):
                        continue
                    load = round(os.getloadavg()[0], 2)
                    t = time.perf_counter()
                    got = tools[tool](model, threads)
                    if "threads" in got:  # the runner's torch.get_num_threads(), beside the OMP_NUM_THREADS asked
                        got["torch_threads"] = got.pop("threads")
                    wall = round(time.perf_counter() - t, 1)
                    results.add(record(**keys, **got, wall_seconds=wall, load_avg_before=load))
                    print(f"{model} {tool:13s} threads={threads} rep={rep}: {got['quant_seconds']:.1f} s "
                          f"(process {wall} s, load before {load})", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
