"""Shared pieces of the benchmark scripts in bench/: one record per cell, resumable, one table printer.

Each (recipe, seed, data) cell is measured once and appended to the results file at once; a rerun skips
finished cells, so a long grid can run in parts and survive interruption. Transcripts of each cell are
kept beside the results (bench/results/transcripts/) so full-precision transcripts are computed once.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from quasr.data import Dataset, load_source
from quasr.decoding import Decoding
from quasr.evaluate import SetResult, evaluate, to_records
from quasr.models.base import AsrModel
from quasr.results import ResultsFile, atomic_write_text, record

_SETS: dict[tuple[str, int | None], Dataset] = {}


def _dataset(spec: str, limit: int | None) -> Dataset:
    """Load a speech set once per process (benchmarks evaluate many models on the same sets)."""
    if (spec, limit) not in _SETS:
        _SETS[spec, limit] = load_source(spec, limit=limit)
    return _SETS[spec, limit]


def transcripts_path(results: ResultsFile, recipe: dict, data: str) -> Path:
    """One file per cell, named by every key of the cell that is set (options such as alpha and the decoding
    included)."""
    parts = [f"{k}={recipe[k]}" if k not in ("model", "method") else str(recipe[k])
             for k in results.keys if recipe.get(k) is not None and k not in ("data", "speaker")]
    name = "-".join(parts + [data]).replace("/", "_").replace(":", "_")
    if len(results.path.stem) + len(name) > 200:  # file systems stop at 255 bytes: keep a readable head, hash the rest
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[:150]}-{digest}-{data}".replace("/", "_").replace(":", "_")
    return results.path.parent / "transcripts" / f"{results.path.stem}-{name}.jsonl"


TRANSCRIPT_KEYS = ("id", "speaker", "ref", "hyp", "errors", "n_ref", "rare_words", "rare_errors", "common_errors",
                   "rare_pairs", "windows",
                   "fallbacks", "fallback_windows", "skipped_windows", "temperature")


def eval_cell(results: ResultsFile, model: AsrModel, data: str, limit: int | None, recipe: dict,
              extra: dict | None = None, progress: bool = True, decoding: Decoding | None = None,
              batch_size: int = 8, dataset: Dataset | None = None) -> list[dict] | None:
    """Evaluate one (recipe, data) cell with a decoding policy (default standard) unless it is already in
    `results`; returns its new records. `dataset` gives the utterances directly (named `data`)."""
    decoding = decoding or Decoding()
    recipe = dict(recipe, decoding=decoding.label)
    if results.done(record(**recipe, data=data, speaker=None)):
        return None
    ds = dataset if dataset is not None else _dataset(data, limit)
    load_before = os.getloadavg()[0]
    [res] = evaluate(model, [ds], batch_size=batch_size, decoding=decoding, progress=progress)
    # other work on the machine slows transcription: the 1-minute load average is kept beside the timing
    load = {"load_avg": round(max(load_before, os.getloadavg()[0]), 2)}
    path = transcripts_path(results, recipe, data)
    # each record names its transcript file (relative to the results file), for paired per-utterance comparisons
    recs = [dict(r, **load, **(extra or {}), transcripts=str(path.relative_to(results.path.parent)))
            for r in to_records([res], **recipe)]
    atomic_write_text(path, "".join(json.dumps({k: u[k] for k in TRANSCRIPT_KEYS if k in u}, ensure_ascii=False) + "\n"
                                        for u in res.utterances))
    results.add(*recs)
    return recs


def print_records(records: list[dict], columns: list[str], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=title or None)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("model", "method", "data", "speaker") else "left")
    for r in records:
        t.add_row(*("-" if r.get(c) is None else (f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]))
                    for c in columns))
    console.print(t)




# -- quantized cells: one recipe, quantized in a subprocess, its checkpoint scored ------------------------------

OPTION_KEYS = ("alpha", "variant", "encoder_frames", "pad_stride", "pad_weight", "embedding_bits", "percdamp",
               "layers", "pool", "tail_cost", "sym", "act_mode", "act_calibrator", "esc_seed", "esc_budget",
               "mse", "act_order")


@dataclass(frozen=True)
class Cell:
    """One quantization recipe of a benchmark grid (with its calibration seed)."""

    model: str
    method: str
    bits: int
    group_size: int | None = 128
    alpha: float | None = None
    variant: str | None = None
    seed: int | None = 0
    calib: tuple[str, ...] = ("asterisk:calib", "tts:calib")
    n_calib: int = 128
    encoder_frames: str = "window"
    pad_stride: int = 4
    pad_weight: float = 1.0
    embedding_bits: int = 8
    percdamp: float = 0.01
    layers: str = "all"
    pool: str = "random"
    tail_cost: float | None = None
    sym: bool = False                   # symmetric weight grid (W8 for the int8 path)
    act_bits: int | None = None         # quantized inputs (quasr.quant.activations): 8 or 4
    act_mode: str = "static"
    act_calibrator: str = "mse"
    esc_seed: int = 0
    esc_budget: int | None = None       # None: quasr's default
    act_order: bool = False             # GPTQ's columns by decreasing Hessian diagonal (static groups)

    @property
    def calibrated(self) -> bool:
        from quasr.methods import get_method

        return get_method(self.method).needs_calibration or (self.act_bits is not None and self.act_mode == "static")

    def keys(self) -> dict:
        """The record keys of the cell (None where a setting does not apply or is the default that older
        records left out)."""
        c = self.calibrated
        window = c and self.encoder_frames == "window"
        return dict(model=self.model, method=self.method, bits=self.bits, group_size=self.group_size,
                    calib="+".join(self.calib) if c else None, n_calib=self.n_calib if c else None,
                    seed=self.seed if c else None, alpha=self.alpha, variant=self.variant,
                    encoder_frames=self.encoder_frames if c else None,
                    pad_stride=self.pad_stride if window else None,
                    pad_weight=self.pad_weight if window and self.pad_weight != 1.0 else None,
                    embedding_bits=self.embedding_bits or None, percdamp=self.percdamp if c else None,
                    layers=None if self.layers == "all" else self.layers,
                    pool=self.pool if c and self.pool != "random" else None, tail_cost=self.tail_cost,
                    act_order=True if self.act_order else None, **self._act_keys())

    def _act_keys(self) -> dict:
        if self.act_bits is None:
            return {"sym": True} if self.sym else {}
        esc = self.act_calibrator == "esc"
        return dict(sym=self.sym or None, act_bits=self.act_bits, act_mode=self.act_mode,
                    act_calibrator=self.act_calibrator if self.act_mode == "static" else None,
                    esc_seed=self.esc_seed if esc else None, esc_budget=self.esc_budget if esc else None)

    def tag(self) -> str:
        """A directory name for the checkpoint, unique per recipe."""
        parts = [f"{k}={v}" for k, v in self.keys().items() if v is not None and k != "calib"]
        calib = hashlib.sha1("+".join(self.calib).encode()).hexdigest()[:6] if self.calibrated else ""
        tag = "-".join(parts + ([f"calib={calib}"] if calib else [])).replace("/", "_").replace(":", "_")
        if len(tag) > 180:  # room for staging and state names beside it within 255 bytes: hash the tail
            tag = f"{tag[:150]}-{hashlib.sha1(tag.encode()).hexdigest()[:12]}"
        return tag

    def quantize_command(self, out: Path) -> list[str]:
        cmd = [sys.executable, "-m", "quasr", "quantize", "--model", self.model, "--method", self.method,
               "--bits", str(self.bits), "--group-size", str(self.group_size or 0), "--n-calib", str(self.n_calib),
               "--seed", str(self.seed or 0), "--encoder-frames", self.encoder_frames,
               "--pad-stride", str(self.pad_stride), "--pad-weight", str(self.pad_weight),
               "--embedding-bits", str(self.embedding_bits), "--percdamp", str(self.percdamp),
               "--layers", self.layers, "--out", str(out), "--no-progress"]
        for c in self.calib:
            cmd += ["--calib", c]
        if self.alpha is not None:
            cmd += ["--alpha", str(self.alpha)]
        if self.variant is not None:
            cmd += ["--variant", self.variant]
        if self.pool != "random":
            cmd += ["--pool", self.pool]
        if self.tail_cost is not None:
            cmd += ["--tail-cost", str(self.tail_cost)]
        if self.sym:
            cmd += ["--sym"]
        if self.act_order:
            cmd += ["--act-order"]
        if self.act_bits is not None:
            cmd += ["--act-bits", str(self.act_bits), "--act-mode", self.act_mode,
                    "--act-calibrator", self.act_calibrator]
            if self.act_calibrator == "esc":
                cmd += ["--esc-seed", str(self.esc_seed)]
                if self.esc_budget is not None:
                    cmd += ["--esc-budget", str(self.esc_budget)]
        return cmd


def parse_data(spec: str, limit: int | None) -> list[tuple[str, int | None]]:
    """"asterisk:test,tts:test@96" -> [(set, utterances or None)]; `limit` overrides every @N."""
    out = []
    for part in spec.split(","):
        name, _, n = part.partition("@")
        out.append((name, limit or (int(n) if n else None)))
    return out


def parse_alphas(spec: str) -> list[float]:
    """"0.25,0.5" -> [0.25, 0.5]: QEP / GPTAQ global strengths, each in [0, 1]; ValueError naming the bad one."""
    out = []
    for part in spec.split(","):
        try:
            a = float(part)
        except ValueError:
            raise ValueError(f"--alphas: {part!r} is not a number (expected e.g. 0.25,0.5)") from None
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"--alphas: {a} lies outside [0, 1]")
        out.append(a)
    return out


def reuse(results: ResultsFile, keys: dict, data: str, decoding: Decoding, sources: list[ResultsFile]) -> bool:
    """Copy the records of a cell measured in another results file of the same directory (same recipe, seed,
    decoding and set) into `results`; True if it was found."""
    key = dict(keys, decoding=decoding.label, data=data, speaker=None)
    for src in sources:
        if src.path.parent != results.path.parent or not src.done(key):
            continue
        k = results.key(key)
        recs = [dict(r, reused_from=src.path.name) for r in src.records
                if results.key(dict(r, speaker=None)) == k]
        results.add(*recs)
        return True
    return False


def measure_fp(results: ResultsFile, model: str, data, decoding: Decoding, batch_size: int = 8,
               sources: list[ResultsFile] = ()) -> None:
    """The full-precision cells of a model on every set (skipping measured ones)."""
    from quasr.models import load_model

    asr = None
    keys = dict(model=model, method="fp", bits=None, group_size=None)
    for d, n in data:
        if results.done(dict(keys, decoding=decoding.label, data=d, speaker=None)) or \
                reuse(results, keys, d, decoding, list(sources)):
            continue
        asr = asr or load_model(model)
        size = sum(p.numel() * p.element_size() for p in {id(p): p for p in asr.model.parameters()}.values())
        eval_cell(results, asr, d, n, keys, extra={"size_mb": round(size / 1e6, 2), "bits_per_weight": 32},
                  decoding=decoding, batch_size=batch_size)


def measure(results: ResultsFile, cell: Cell, data, decoding: Decoding, batch_size: int = 8,
            sources: list[ResultsFile] = ()) -> None:
    """Quantize `cell` in a subprocess (its wall time and peak RSS are the cost of quantizing) unless every set
    is measured (here, or in one of `sources`, whose records are then copied), and score the reloaded
    checkpoint on each set."""
    import subprocess
    import time

    from quasr import checkpoint
    from quasr.paths import cache_dir

    keys = cell.keys()
    todo = [(d, n) for d, n in data if not results.done(dict(keys, decoding=decoding.label, data=d, speaker=None))
            and not reuse(results, keys, d, decoding, list(sources))]
    if not todo:
        return
    ckpt = cache_dir("bench", results.data["benchmark"]) / cell.tag()
    print(f"== {cell.tag()}: quantizing", flush=True)
    cmd = cell.quantize_command(ckpt)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    info = checkpoint.info(ckpt)
    r = info["recipe"]
    extra = {"quant_seconds": r.get("quant_seconds"), "quant_wall_seconds": round(wall, 1),
             "peak_rss_mb": r.get("peak_rss_mb"), "size_mb": round(info["dir_mb"], 2),
             "weights_mb": round(info["file_mb"], 2), "bits_per_weight": round(info["bits_per_weight"], 3),
             "embedding_bits_per_weight": info["embedding"]["bits_per_weight"],
             "numerics": (r.get("numerics") or {}).get("mode"), "weights_sha256": info["sha256"],
             # fp-stream methods accumulated Σxxᵀ for the asymmetric-error diagnostics until --asym-errors made
             # it optional (None: a checkpoint from before, which did)
             "asym_errors": r.get("asym_errors"),
             "checkpoint": str(ckpt)}
    asr = checkpoint.load(ckpt)
    for d, n in todo:
        eval_cell(results, asr, d, n, keys, extra=extra, decoding=decoding, batch_size=batch_size)


dataset = _dataset  # the name other scripts import

__all__ = ["Cell", "OPTION_KEYS", "SetResult", "dataset", "eval_cell", "measure", "measure_fp", "parse_data",
           "print_records", "reuse"]
