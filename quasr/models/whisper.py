"""Whisper (transformers `WhisperForConditionalGeneration`) adapter."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from quasr.data.utterance import SAMPLE_RATE
from quasr.models.base import AsrModel
from quasr.progress import progress_bar

WINDOW_SECONDS = 30.0


class WhisperAsr(AsrModel):
    family = "whisper"

    def __init__(self, model, processor, spec: str, name: str | None = None, language: str = "en"):
        self.model = model.eval()
        self.processor = processor
        self.spec = spec
        self.name = name or spec
        self.language = language

    @classmethod
    def from_pretrained(cls, path_or_id: str, spec: str | None = None, name: str | None = None, **kwargs):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        model = WhisperForConditionalGeneration.from_pretrained(path_or_id, dtype=torch.float32, **kwargs)
        processor = WhisperProcessor.from_pretrained(path_or_id, **kwargs)
        return cls(model, processor, spec=spec or str(path_or_id), name=name)

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    def _generate_kwargs(self, num_beams: int) -> dict:
        kw = dict(num_beams=num_beams, do_sample=False)
        if self.multilingual:
            kw.update(language=self.language, task="transcribe")
        return kw

    @torch.inference_mode()
    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 8, num_beams: int = 1,
                   progress: bool = True, desc: str = "transcribe") -> list[str]:
        """Greedy (or beam) decoding. Audio up to 30 s is batched; longer audio is decoded long-form
        (sequential 30 s windows with timestamp tokens, as transformers implements it), never truncated."""
        limit = int(WINDOW_SECONDS * SAMPLE_RATE)
        short = [i for i, a in enumerate(audios) if len(a) <= limit]
        long = [i for i, a in enumerate(audios) if len(a) > limit]
        out: list[str | None] = [None] * len(audios)
        fe = self.processor.feature_extractor
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{desc} ({self.name})", total=len(audios))
            for start in range(0, len(short), batch_size):
                idx = short[start:start + batch_size]
                feats = fe([audios[i] for i in idx], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
                ids = self.model.generate(input_features=feats.to(self.model.dtype), **self._generate_kwargs(num_beams))
                for i, text in zip(idx, self.processor.batch_decode(ids, skip_special_tokens=True)):
                    out[i] = text.strip()
                bar.advance(task, len(idx))
            for i in long:
                inputs = fe(audios[i], sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
                            padding="longest", return_attention_mask=True)
                ids = self.model.generate(input_features=inputs.input_features.to(self.model.dtype),
                                          attention_mask=inputs.attention_mask, return_timestamps=True,
                                          condition_on_prev_tokens=False, **self._generate_kwargs(num_beams))
                out[i] = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
                bar.advance(task, 1)
        return out  # type: ignore[return-value]


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advice; quasr shows its own progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
