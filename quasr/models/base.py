"""What every model family adapter offers the rest of quasr."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch


class AsrModel(ABC):
    """A speech recognition model: a torch module, its processor, and batched transcription.

    One subclass per model family holds all knowledge of that family (how to transcribe, which layers are
    quantizable, how to run a calibration forward). `spec` is what the user asked for; `name` is a short
    label for tables and results files.
    """

    name: str
    spec: str
    model: torch.nn.Module
    processor: object

    @abstractmethod
    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 8, decoding=None,
                   progress: bool = True, desc: str = "transcribe") -> list[str]:
        """Transcribe 16 kHz mono float32 arrays with a decoding policy (quasr.decoding.Decoding, default
        standard); returns one text per input, in input order."""

    def transcribe_detailed(self, audios: Sequence[np.ndarray], batch_size: int = 8, decoding=None,
                            progress: bool = True, desc: str = "transcribe") -> list:
        """Like `transcribe`, one Transcript (text, windows, fallbacks, skipped windows) per input. Families
        without a fallback loop report one window and no fallback."""
        from quasr.decoding import Transcript

        return [Transcript(t) for t in self.transcribe(audios, batch_size, decoding, progress, desc)]

    def num_parameters(self) -> int:
        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n
