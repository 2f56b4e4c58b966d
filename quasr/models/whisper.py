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

    def calibration(self, encoder_frames: str = "speech") -> "WhisperCalibration":
        """What the layer-wise quantization engine needs to walk this model block by block."""
        return WhisperCalibration(self, encoder_frames)

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


# -- calibration: what the layer-wise engine needs to walk Whisper block by block -----------------------------

ENCODER_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"],
                  ["fc1"], ["fc2"]]
DECODER_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"],
                  ["encoder_attn.q_proj"], ["encoder_attn.k_proj", "encoder_attn.v_proj"],
                  ["encoder_attn.out_proj"], ["fc1"], ["fc2"]]
SPEECH_MARGIN_FRAMES = 50  # encoder frames (1 s) kept after the end of the audio in "speech" mode


def _whisper_blocks(asr: "WhisperAsr"):
    from quasr.quantize import Block

    m = asr.model.model
    enc = [Block(f"model.encoder.layers.{i}", layer, ENCODER_GROUPS, "encoder") for i, layer in enumerate(m.encoder.layers)]
    dec = [Block(f"model.decoder.layers.{i}", layer, DECODER_GROUPS, "decoder") for i, layer in enumerate(m.decoder.layers)]
    return enc + dec


class WhisperCalibration:
    """Teacher-forced calibration inputs and block-by-block forward for Whisper.

    Encoder: the log-mel window of each utterance through the conv stem and positions. In "speech" mode the
    sequence is cut after the audio's last frame plus a 1 s margin (much cheaper; attention then spans the
    speech frames only); in "window" mode every utterance keeps the full 30 s window, exactly as at
    inference. Decoder: the prompt (<|startoftranscript|> [language, task] <|notimestamps|>), the reference
    text's tokens and <|endoftext|>, with the cross-attention fed by the matching stream's encoder output.
    One utterance per forward call, so no padding masks are needed.
    """

    def __init__(self, asr: "WhisperAsr", encoder_frames: str = "speech"):
        if encoder_frames not in ("speech", "window"):
            raise ValueError(f"encoder_frames must be 'speech' or 'window', got {encoder_frames!r}")
        self.asr = asr
        self.encoder_frames = encoder_frames
        self.blocks = _whisper_blocks(asr)

    def prompt_ids(self) -> list[int]:
        g = self.asr.model.generation_config
        ids = [self.asr.model.config.decoder_start_token_id]
        if self.asr.multilingual:
            ids += [g.lang_to_id[f"<|{self.asr.language}|>"], g.task_to_id["transcribe"]]
        return ids + [g.no_timestamps_token_id]

    def prepare(self, utts) -> list[dict]:
        """Features, frame count and token ids of each calibration utterance."""
        from quasr.errors import DataError

        fe, tok = self.asr.processor.feature_extractor, self.asr.processor.tokenizer
        max_tokens = self.asr.model.config.max_target_positions
        prompt, eot = self.prompt_ids(), self.asr.model.config.eos_token_id
        items = []
        for u in utts:
            if len(u.audio) > WINDOW_SECONDS * SAMPLE_RATE:
                raise DataError(f"calibration utterance {u.id}: {u.seconds:.1f} s is longer than Whisper's "
                                f"{WINDOW_SECONDS:.0f} s window; use shorter calibration audio")
            feats = fe(u.audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            text_ids = tok(" " + u.text.strip(), add_special_tokens=False).input_ids
            ids = prompt + text_ids + [eot]
            if len(ids) > max_tokens:
                raise DataError(f"calibration utterance {u.id}: {len(ids)} tokens exceed the decoder's {max_tokens}")
            frames = int(np.ceil(len(u.audio) / SAMPLE_RATE * 50)) + SPEECH_MARGIN_FRAMES
            n_frames = self.asr.model.config.max_source_positions
            items.append({"id": u.id, "features": feats.to(self.asr.model.dtype),
                          "frames": n_frames if self.encoder_frames == "window" else min(frames, n_frames),
                          "tokens": torch.tensor([ids]), "n_prompt": len(prompt), "text": u.text})
        return items

    def encoder_input(self, item: dict) -> torch.Tensor:
        enc = self.asr.model.model.encoder
        x = torch.nn.functional.gelu(enc.conv1(item["features"]))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        return x[:, : item["frames"]]

    def encoder_output(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.asr.model.model.encoder.layer_norm(hidden)

    def decoder_input(self, item: dict, embed_weight: torch.Tensor | None = None) -> torch.Tensor:
        dec = self.asr.model.model.decoder
        ids = item["tokens"]
        emb = dec.embed_tokens(ids) if embed_weight is None else torch.nn.functional.embedding(ids, embed_weight)
        return emb + dec.embed_positions.weight[: ids.shape[1]]

    def run_block(self, block, module, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if block.stage == "encoder":
            return module(hidden, None)
        return module(hidden, attention_mask=None, encoder_hidden_states=context, use_cache=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.asr.model.proj_out(self.asr.model.model.decoder.layer_norm(hidden))
