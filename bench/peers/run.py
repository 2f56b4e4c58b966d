"""Side by side with the tools users pick today: each peer quantizes the same bundled Whisper in its own venv, and
quasr transcribes and scores every model with the same decoding, utterances and scorer.

    bash bench/peers/setup.sh                          # once: a venv per peer under .venvs/peers/
    python bench/peers/run.py                          # every peer and scheme, tiny.en and base -> peers.json
    python bench/peers/run.py --limit 20               # a quick look -> peers-limit20.json
    python bench/peers/run.py --peers quanto,hqq --models whisper-tiny.en

Each cell runs bench/peers/runner.py in the peer's venv (schemes in bench/peers/schemes.py). llm-compressor's
GPTQ calibrates on the same 128 utterances as quasr's GPTQ seed 0 (asterisk:calib + tts:calib). CTranslate2 runs
in faster-whisper on the bundled CTranslate2 files (`quasr eval --runtime faster-whisper` settings), float32
beside int8 and int8_float32: its decoder is not transformers', so compare it within the engine. A cell that
fails gets a record with its error, never a silent omission. quasr's own rows come from ptq.json (and the
method benchmarks) through `python bench/report.py peers`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).parent))

from schemes import SCHEMES  # noqa: E402

from quasr.bench import OPTION_KEYS, TRANSCRIPT_KEYS, parse_data, transcripts_path  # noqa: E402
from quasr.results import ResultsFile, atomic_write_text, machine_info, record  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VENVS = Path(os.environ.get("QUASR_PEER_VENVS", ROOT / ".venvs" / "peers"))
CT2_TYPES = ("float32", "int8", "int8_float32")


def model_dir(name: str) -> Path:
    from quasr.models import BUNDLED, converted_ct2_dir

    src, parts = BUNDLED[name].locate()
    return converted_ct2_dir(src, parts, name)


def ct2_dir(name: str) -> Path:
    """The bundled model's original CTranslate2 directory (a model.bin shipped in parts is joined once, in the
    cache)."""
    import shutil

    from quasr.models import BUNDLED
    from quasr.paths import cache_dir

    src, parts = BUNDLED[name].locate()
    if len(parts) == 1 and parts[0].name == "model.bin":
        return src
    out = cache_dir("models") / f"{name}-ct2"
    if not (out / "model.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
            if (src / f).exists():
                shutil.copy(src / f, out / f)
        tmp = out / ".model.bin.tmp"
        with open(tmp, "wb") as fh:
            for part in parts:
                fh.write(part.read_bytes())
        tmp.replace(out / "model.bin")
    return out


def failed(results: ResultsFile, keys: dict, sets: list[str], decoding: str, error: str, seconds: float) -> None:
    """Error records for the sets not measured (a set already scored keeps its record)."""
    for d in sets:
        results.add(record(**keys, decoding=decoding, data=d, speaker=None, error=error[-2000:],
                           seconds_before_failing=round(seconds, 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base")
    ap.add_argument("--peers", default=",".join(list(SCHEMES) + ["ctranslate2"]))
    ap.add_argument("--data", default="asterisk:test,tts:test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--decoding", default="standard")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--retry-failed", action="store_true", help="run again the cells recorded as failed")
    args = ap.parse_args()
    out = args.out or RESULTS / (f"peers-limit{args.limit}.json" if args.limit else "peers.json")
    data = parse_data(args.data, args.limit)
    from quasr.decoding import parse_decoding

    dec = parse_decoding(args.decoding).label
    command = " ".join(["python", "bench/peers/run.py", *sys.argv[1:]])
    for model in args.models.split(","):
        path = model_dir(model)
        for peer in args.peers.split(","):
            schemes = CT2_TYPES if peer == "ctranslate2" else list(SCHEMES.get(peer, {}))
            if not schemes:
                raise SystemExit(f"error: unknown peer {peer!r} (choose from {', '.join(list(SCHEMES) + ['ctranslate2'])})")
            for scheme in schemes:
                keys = dict(model=model, method=f"{peer}:{scheme}", peer=peer, scheme=scheme,
                            bits=(SCHEMES[peer][scheme][0] if peer in SCHEMES else {"float32": None}.get(scheme, 8)),
                            group_size=SCHEMES[peer][scheme][1] if peer in SCHEMES else None)
                if peer == "llmcompressor":
                    keys.update(calib="asterisk:calib+tts:calib", n_calib=128, seed=0)
                # re-read each time: the runners write into the same file (ResultsFile.add merges under a lock)
                results = ResultsFile(out, "peers", option_keys=OPTION_KEYS + ("peer", "scheme"))
                mine = [r for r in results.records if r["model"] == model and r["method"] == keys["method"]
                        and r.get("decoding") == dec and r["speaker"] is None]
                done = {r["data"] for r in mine if not r.get("error")}
                todo = [d for d, _ in data if d not in done]
                if not todo or (any(r.get("error") for r in mine) and not args.retry_failed):
                    continue  # measured, or failed before (its record says why; --retry-failed runs it again)
                print(f"== {model} {peer} {scheme}", flush=True)
                t = time.perf_counter()
                if peer == "ctranslate2":
                    cmd = [sys.executable, "-m", "quasr", "eval", "--model", str(ct2_dir(model)), "--runtime", "ctranslate2",
                           "--compute-type", scheme, *[x for d, _ in data for x in ("--data", d)],
                           "--decoding", args.decoding,
                           "--out", str(out.with_suffix(f".{model}.{scheme}.tmp.json"))]
                    limits = {n for _, n in data}
                    if len(limits) > 1:
                        raise SystemExit("error: CTranslate2 cells take one --limit for every set, not per-set @N")
                    if limits != {None}:
                        cmd += ["--limit", str(limits.pop())]
                else:
                    py = VENVS / peer / "bin" / "python"
                    if not py.exists():
                        failed(results, keys, todo, dec, f"no venv for {peer}: run bash bench/peers/setup.sh {peer}", 0)
                        continue
                    cmd = [str(py), str(Path(__file__).parent / "runner.py"), "--peer", peer, "--scheme", scheme,
                           "--model", model, "--path", str(path), "--out", str(out), "--data", args.data,
                           "--decoding", args.decoding, "--command", command]
                    if args.limit:
                        cmd += ["--limit", str(args.limit)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    err = (proc.stderr or proc.stdout).strip()
                    print(f"   failed: {err.splitlines()[-1] if err else proc.returncode}", flush=True)
                    failed(results, keys, todo, dec, err, time.perf_counter() - t)
                    continue
                if peer == "ctranslate2":
                    tmp = out.with_suffix(f".{model}.{scheme}.tmp.json")
                    ev = json.loads(tmp.read_text())
                    recs = []
                    for r in ev["records"]:  # keep each set's transcripts, for paired comparisons
                        path = transcripts_path(results, dict(keys, decoding=r["decoding"]), r["data"])
                        if r["speaker"] is None:
                            atomic_write_text(path, "".join(
                                json.dumps({k: u[k] for k in TRANSCRIPT_KEYS if k in u}, ensure_ascii=False) + "\n"
                                for u in ev["utterances"][r["data"]]))
                        recs.append(dict(r, **keys, command=command, machine=machine_info(),
                                         runtime_settings=ev["recipe"].get("runtime_settings"),
                                         size_mb=round((ct2_dir(model) / "model.bin").stat().st_size / 1e6, 2),
                                         size_note="the bundled CTranslate2 file; the compute type is applied when "
                                                   "faster-whisper loads it",
                                         transcripts=str(path.relative_to(results.path.parent))))
                    results.add(*recs)
                    tmp.unlink()
                print(f"   {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else 'done'}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
