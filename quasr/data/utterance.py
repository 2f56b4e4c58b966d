"""The unit of speech data every part of quasr passes around."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000


@dataclass
class Utterance:
    """One utterance: 16 kHz mono float32 audio, its reference text and (optionally) its speaker."""

    id: str
    audio: np.ndarray
    text: str
    speaker: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE
