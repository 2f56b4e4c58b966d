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
    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 8, num_beams: int = 1,
                   progress: bool = True, desc: str = "transcribe") -> list[str]:
        """Transcribe 16 kHz mono float32 arrays; returns one text per input, in input order."""

    def num_parameters(self) -> int:
        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n
