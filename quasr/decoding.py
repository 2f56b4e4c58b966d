"""Decoding policies: how a model turns a window of audio into text, as a named, recorded choice.

    standard   openai-whisper's `transcribe()` defaults, the way people run Whisper (also faster-whisper's):
               temperatures 0.0, 0.2, ..., 1.0; a window is decoded again at the next temperature when its text
               is too repetitive (gzip compression ratio of the text > 2.4) or too unlikely (mean log-probability
               of its tokens < -1.0), unless the model judges the window silent (no-speech probability > 0.6 with
               a low log-probability: the window is then skipped); timestamp tokens on; later windows of long
               audio are conditioned on the previous text; sampled fallbacks draw from a seeded generator.
    greedy     plain greedy decoding, one pass at temperature 0, no timestamps, no fallback (quasr's decoding
               before the evaluation issue; kept for comparison).
    beamN      standard with beam search of width N at temperature 0 (openai-whisper's command line uses
               beam 5); the sampled fallbacks are as in standard.

A `Decoding` is a small frozen dataclass; `parse_decoding("standard")` builds one from its name, and every
results record stores `decoding.label` (and the whole policy in the file's recipe).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

from quasr.errors import QuasrError

OPENAI_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
NAMES = "standard, greedy or beamN (e.g. beam5)"


class DecodingError(QuasrError, ValueError):
    """A decoding policy that does not exist or cannot work (empty or negative temperatures, ...)."""


@dataclass(frozen=True)
class Decoding:
    name: str = "standard"
    temperatures: tuple[float, ...] = OPENAI_TEMPERATURES
    compression_ratio_threshold: float | None = 2.4   # on the text's UTF-8 bytes, as openai-whisper
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    beams: int = 1                                    # beam width at temperature 0
    timestamps: bool = True
    condition_on_previous_text: bool = True
    openai_features: bool = True   # log-mel of the audio, then zeros to 30 s (openai-whisper, faster-whisper);
    #                                False: the feature extractor's own padding (30 s of silent audio)
    seed: int = 0                  # of the sampled fallbacks

    def __post_init__(self):
        if not self.temperatures:
            raise DecodingError("decoding: the temperature list is empty (give at least one, e.g. 0)")
        for t in self.temperatures:
            if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise DecodingError(f"decoding: temperatures must be finite and >= 0, got {t!r}")
        if not isinstance(self.beams, int) or self.beams < 1:
            raise DecodingError(f"decoding: the beam width must be a positive integer, got {self.beams!r}")

    @property
    def fallback(self) -> bool:
        return len(self.temperatures) > 1

    @property
    def label(self) -> str:
        """The name stored in results records; every setting that differs from the named policy is appended, so
        two different policies never share a label."""
        from dataclasses import fields

        ref = parse_decoding(self.name)
        extra = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(ref, f.name)
            if f.name == "name" or mine == theirs:
                continue
            if f.name == "temperatures":
                extra.append("t=" + "/".join(f"{t:g}" for t in mine))
            else:
                extra.append(f"{f.name}={mine}")
        return self.name + ("[" + ",".join(extra) + "]" if extra else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        d["label"] = self.label
        return d


def parse_decoding(name: str = "standard", temperatures: str | list | tuple | None = None,
                   seed: int | None = None) -> Decoding:
    """A decoding policy by name (standard | greedy | beamN), optionally with other temperatures or seed."""
    name = (name or "").strip()
    if name == "standard":
        d = Decoding()
    elif name == "greedy":
        d = Decoding("greedy", (0.0,), None, None, None, 1, timestamps=False, condition_on_previous_text=False,
                     openai_features=False)
    elif m := re.fullmatch(r"beam(\d+)", name):
        if int(m.group(1)) < 1:
            raise DecodingError(f"decoding {name!r}: the beam width must be at least 1")
        d = Decoding(name, beams=int(m.group(1)))
    else:
        raise DecodingError(f"unknown decoding {name!r} (choose {NAMES})")
    if temperatures is not None:
        d = replace(d, temperatures=parse_temperatures(temperatures))
    if seed is not None:
        d = replace(d, seed=int(seed))
    return d


def parse_temperatures(spec: str | list | tuple) -> tuple[float, ...]:
    """"0,0.2,0.4" (or a sequence of numbers) -> (0.0, 0.2, 0.4); empty or negative is an error."""
    if isinstance(spec, str):
        parts = [p for p in (s.strip() for s in spec.split(",")) if p]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise DecodingError(f"--temperatures {spec!r}: not a comma-separated list of numbers") from None
    else:
        values = tuple(float(v) for v in spec)
    if not values:
        raise DecodingError(f"--temperatures {spec!r}: the list is empty (give at least one, e.g. 0)")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise DecodingError(f"--temperatures {spec!r}: temperatures must be finite and >= 0 (got {bad[0]:g})")
    return values


def text_compression_ratio(text: str) -> float:
    """openai-whisper's `compression_ratio`: UTF-8 bytes of the text over their zlib-compressed bytes."""
    import zlib

    b = text.encode("utf-8")
    return len(b) / len(zlib.compress(b))


@dataclass
class Transcript:
    """One utterance's text and what decoding it took (see FallbackLog)."""

    text: str
    windows: int = 1            # 30 s windows decoded (more than one only for long audio or a resumed window)
    fallbacks: int | None = 0          # decodes at a higher temperature, summed over windows
    fallback_windows: int | None = 0   # windows decoded again at least once
    skipped_windows: int | None = 0    # windows judged silent (no-speech check) and left out of the text
    # (None: the model or runtime does not report it, e.g. whisper.cpp and faster-whisper)
    temperature: float | None = None  # the temperature of the last window's final decode

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["Decoding", "DecodingError", "Transcript", "OPENAI_TEMPERATURES", "parse_decoding", "parse_temperatures",
           "text_compression_ratio"]
