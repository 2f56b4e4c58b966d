"""Transcribe in the runtimes people deploy Whisper with, scored by quasr's own metrics.

    WhisperCppAsr(path)                     whisper.cpp through pywhispercpp, on a ggml model file
    FasterWhisperAsr(path, compute_type)    CTranslate2 through faster-whisper, on a CTranslate2 directory

Both take a quasr decoding policy and translate it into the runtime's own settings as closely as the runtime
allows (`settings(decoding)`, recorded with every result). What cannot be matched:
- whisper.cpp decides a fallback by the entropy of the last tokens (`entropy_thold`, default 2.4), not by the
  gzip compression ratio of the text; quasr passes the ratio threshold as the entropy threshold, as
  whisper.cpp's own defaults do, and says so in the settings.
- Each fallback draws one sample (best_of 1) in both, as quasr's standard policy does; the runtimes' command
  lines default to 5.
Both runtimes decode one utterance at a time here (batch_size is not used).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from quasr.decoding import Decoding
from quasr.errors import QuasrError
from quasr.models.base import AsrModel
from quasr.progress import progress_bar

RUNTIMES = ("whispercpp", "ctranslate2")


class RuntimeError_(QuasrError, ValueError):
    pass


def _threads() -> int:
    """OMP_NUM_THREADS when set (so a runtime shares the machine as torch does), else every CPU we may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class _RuntimeAsr(AsrModel):
    """A runtime falls back and skips silent windows inside its own code and does not report it: the
    transcripts say None (not reported), not 0."""

    def transcribe_detailed(self, audios, batch_size: int = 8, decoding=None, progress: bool = True,
                            desc: str = "transcribe") -> list:
        from quasr.decoding import Transcript

        return [Transcript(t, fallbacks=None, fallback_windows=None, skipped_windows=None)
                for t in self.transcribe(audios, batch_size, decoding, progress, desc)]


class WhisperCppAsr(_RuntimeAsr):
    family = "whisper.cpp"

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            from pywhispercpp.model import Model
        except ImportError as e:
            raise RuntimeError_("--runtime whispercpp needs pywhispercpp (pip install 'quasr[deploy]', or "
                                "bash scripts/setup.sh)") from e
        path = Path(path)
        if not path.is_file():
            raise RuntimeError_(f"{path}: not a whisper.cpp model file (write one with quasr export --format ggml)")
        self.path, self.threads = path, threads or _threads()
        self.spec, self.name = str(path), path.stem
        self._models: dict = {}
        self._Model = Model

    def _model(self, beams: int):
        if beams not in self._models:  # the sampling strategy is fixed when the context is made
            self._models[beams] = self._Model(str(self.path), params_sampling_strategy=0 if beams == 1 else 1,
                                              redirect_whispercpp_logs_to=None, n_threads=self.threads,
                                              print_progress=False, print_realtime=False)
        return self._models[beams]

    def settings(self, d: Decoding) -> dict:
        temps = d.temperatures
        inc = round(temps[1] - temps[0], 6) if len(temps) > 1 else 0.0
        return {"runtime": "whisper.cpp (pywhispercpp)", "temperature": temps[0], "temperature_inc": inc,
                "entropy_thold": d.compression_ratio_threshold if d.compression_ratio_threshold is not None else 9e9,
                "logprob_thold": d.logprob_threshold if d.logprob_threshold is not None else -9e9,
                "no_speech_thold": d.no_speech_threshold if d.no_speech_threshold is not None else 1.0,
                # whisper.cpp keeps the past text in its state across calls unless no_context (its default): the
                # previous file's text would prompt the next file. Every file is decoded on its own; a file
                # longer than one window is then not conditioned on its earlier windows either.
                "no_context": True, "no_timestamps": not d.timestamps,
                "greedy": {"best_of": 1}, "beam_search": {"beam_size": d.beams, "patience": -1.0},
                "language": "en", "n_threads": self.threads,
                "note": "fallback by token entropy (entropy_thold), not by the text's compression ratio; "
                        "no conditioning on previous text (whisper.cpp's default)"}

    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 8, decoding: Decoding | None = None,
                   progress: bool = True, desc: str = "transcribe") -> list[str]:
        d = decoding or Decoding()
        p = {k: v for k, v in self.settings(d).items() if k not in ("runtime", "note")}
        model = self._model(d.beams)
        out = []
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{desc} ({self.name}, whisper.cpp, {d.label})", total=len(audios))
            for a in audios:
                segs = model.transcribe(np.asarray(a, dtype=np.float32), **p)
                out.append(" ".join(s.text.strip() for s in segs).strip())
                bar.advance(task)
        return out


class FasterWhisperAsr(_RuntimeAsr):
    family = "ctranslate2"

    def __init__(self, path: str | Path, compute_type: str = "default", threads: int | None = None):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise RuntimeError_("--runtime ctranslate2 needs faster-whisper (pip install 'quasr[deploy]', or "
                                "bash scripts/setup.sh)") from e
        path = Path(path)
        if not (path / "model.bin").exists():
            raise RuntimeError_(f"{path}: not a CTranslate2 model directory (no model.bin; write one with quasr "
                                f"export --format ct2)")
        self.path, self.threads, self.compute_type = path, threads or _threads(), compute_type
        self.spec, self.name = str(path), path.name
        self.model = WhisperModel(str(path), device="cpu", compute_type=compute_type, cpu_threads=self.threads)

    def settings(self, d: Decoding) -> dict:
        return {"runtime": "CTranslate2 (faster-whisper)", "compute_type": self.compute_type,
                "temperature": list(d.temperatures), "beam_size": d.beams, "best_of": 1,
                "compression_ratio_threshold": d.compression_ratio_threshold, "log_prob_threshold": d.logprob_threshold,
                "no_speech_threshold": d.no_speech_threshold,
                "condition_on_previous_text": d.condition_on_previous_text, "without_timestamps": not d.timestamps,
                "language": "en", "vad_filter": False, "cpu_threads": self.threads}

    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 8, decoding: Decoding | None = None,
                   progress: bool = True, desc: str = "transcribe") -> list[str]:
        d = decoding or Decoding()
        p = {k: v for k, v in self.settings(d).items() if k not in ("runtime", "compute_type", "cpu_threads")}
        out = []
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{desc} ({self.name}, faster-whisper {self.compute_type}, {d.label})",
                                total=len(audios))
            for a in audios:
                segs, _ = self.model.transcribe(np.asarray(a, dtype=np.float32), **p)
                out.append(" ".join(s.text.strip() for s in segs).strip())
                bar.advance(task)
        return out


def load_runtime(runtime: str, spec: str, compute_type: str = "default") -> AsrModel:
    if runtime == "whispercpp":
        return WhisperCppAsr(spec)
    if runtime == "ctranslate2":
        return FasterWhisperAsr(spec, compute_type)
    raise RuntimeError_(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)}, or none for transformers)")
