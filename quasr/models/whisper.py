"""Whisper (transformers `WhisperForConditionalGeneration`) adapter."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from quasr.data.utterance import SAMPLE_RATE
from quasr.decoding import Decoding, DecodingError, Transcript
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

        from quasr.errors import ModelError

        model, loading = WhisperForConditionalGeneration.from_pretrained(path_or_id, dtype=torch.float32,
                                                                         output_loading_info=True, **kwargs)
        missing = sorted(set(loading.get("missing_keys") or []))
        mismatched = [k for k, *_ in loading.get("mismatched_keys") or []]
        if missing or mismatched:  # transformers would leave these at their random initial values
            packed = any(str(k).endswith(".weight_packed") for k in loading.get("unexpected_keys") or [])
            hint = ("; it holds quasr's packed low-bit tensors: a quasr checkpoint whose quasr_checkpoint.json is "
                    "missing (restore it, or quantize again)") if packed else ""
            bad = missing or mismatched
            raise ModelError(f"{path_or_id}: {len(bad)} weight(s) {'missing' if missing else 'of the wrong shape'} "
                             f"(e.g. {', '.join(bad[:3])}); refusing a model with randomly initialized weights{hint}")
        processor = WhisperProcessor.from_pretrained(path_or_id, **kwargs)
        return cls(model, processor, spec=spec or str(path_or_id), name=name)

    def calibration(self, encoder_frames: str = "window", pad_stride: int = 1,
                    pad_weight: float = 1.0) -> "WhisperCalibration":
        """What the layer-wise quantization engine needs to walk this model block by block."""
        return WhisperCalibration(self, encoder_frames, pad_stride, pad_weight)

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    @torch.inference_mode()
    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 8, decoding: Decoding | None = None,
                   progress: bool = True, desc: str = "transcribe") -> list[str]:
        """One text per input (see `transcribe_detailed`)."""
        return [t.text for t in self.transcribe_detailed(audios, batch_size, decoding, progress, desc)]

    @torch.inference_mode()
    def transcribe_detailed(self, audios: Sequence[np.ndarray], batch_size: int = 8, decoding: Decoding | None = None,
                            progress: bool = True, desc: str = "transcribe") -> list[Transcript]:
        """Decode 16 kHz audio with a policy (default: `standard`, see quasr.decoding) through transformers'
        Whisper `generate`, which implements the temperature fallback, the no-speech check and long-form
        seeking. Audio up to 30 s is batched; longer audio is decoded long-form (sequential 30 s windows with
        timestamp tokens), never truncated. Two details follow openai-whisper instead of transformers' defaults:
        the compression ratio is computed on the text, not on the token ids, and (for standard and beam) the
        features are the log-mel of the audio followed by zeros up to 30 s, not the log-mel of 30 s of padded
        audio. Each Transcript records how many windows were decoded, fell back or were skipped as silent."""
        decoding = decoding or Decoding()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DecodingError(f"batch size must be a positive integer, got {batch_size!r}")
        limit = int(WINDOW_SECONDS * SAMPLE_RATE)
        short = [i for i, a in enumerate(audios) if len(a) <= limit]
        long = [i for i, a in enumerate(audios) if len(a) > limit]
        out: list[Transcript | None] = [None] * len(audios)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{desc} ({self.name}, {decoding.label})", total=len(audios))
            for start in range(0, len(short), batch_size):
                idx = short[start:start + batch_size]
                feats = self._features([audios[i] for i in idx], decoding)
                for i, t in zip(idx, self._decode(feats, None, decoding, seed=start)):
                    out[i] = t
                bar.advance(task, len(idx))
            for i in long:
                feats, mask = self._long_features(audios[i], decoding)
                [out[i]] = self._decode(feats, mask, decoding, seed=limit + i)
                bar.advance(task, 1)
        return out  # type: ignore[return-value]

    def _features(self, audios: list[np.ndarray], decoding: Decoding) -> torch.Tensor:
        """[batch, mels, 3000] log-mel features of audio up to 30 s."""
        fe = self.processor.feature_extractor
        if not decoding.openai_features:  # the extractor pads the audio to 30 s, then takes its log-mel
            return fe(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.to(self.model.dtype)
        return torch.stack([self._openai_features(a, pad_to=fe.nb_max_frames) for a in audios]).to(self.model.dtype)

    def _openai_features(self, audio: np.ndarray, pad_to: int | None = None) -> torch.Tensor:
        """openai-whisper's `transcribe` features: the log-mel spectrogram of the audio followed by 30 s of zero
        samples (so normalization and the last frames see what openai-whisper's do), cut to the audio's own
        len // hop frames, then (pad_to) zeros in feature space up to the window length, as its `pad_or_trim`."""
        fe = self.processor.feature_extractor
        n = len(audio) // fe.hop_length
        padded = np.concatenate([np.asarray(audio, dtype=np.float32), np.zeros(fe.n_samples, dtype=np.float32)])
        f = fe(padded, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
               padding="longest").input_features[0, :, :n]
        if pad_to is not None and n < pad_to:
            f = torch.nn.functional.pad(f, (0, pad_to - n))
        return f

    def _long_features(self, audio: np.ndarray, decoding: Decoding):
        """Features of audio longer than 30 s, for long-form decoding: [1, mels, frames] and their mask."""
        if decoding.openai_features:
            f = self._openai_features(audio)[None]
            return f.to(self.model.dtype), torch.ones(f.shape[0], f.shape[-1], dtype=torch.long)
        inputs = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                  truncation=False, padding="longest", return_attention_mask=True)
        return inputs.input_features.to(self.model.dtype), inputs.attention_mask

    def _decode(self, feats: torch.Tensor, mask, decoding: Decoding, seed: int) -> list[Transcript]:
        """One `generate` call under the policy, with its fallback decisions logged per input."""
        import copy

        gc = copy.deepcopy(self.model.generation_config)
        # set every threshold explicitly (None included), so that a hub model's generation config adds nothing
        gc.compression_ratio_threshold = decoding.compression_ratio_threshold
        gc.logprob_threshold = decoding.logprob_threshold
        gc.no_speech_threshold = None  # FallbackLog makes the no-speech check (see there)
        gc.condition_on_prev_tokens = decoding.condition_on_previous_text
        timestamps = decoding.timestamps or feats.shape[-1] > self._window_frames
        kw = dict(generation_config=gc, temperature=tuple(decoding.temperatures), num_beams=decoding.beams,
                  return_timestamps=timestamps)
        for k in ("compression_ratio_threshold", "logprob_threshold"):
            if getattr(decoding, k) is not None:  # as arguments too: generate asks for the scores it needs then
                kw[k] = getattr(decoding, k)
        if mask is not None:
            kw["attention_mask"] = mask
        if self.multilingual:
            kw.update(language=self.language, task="transcribe")
        # the prompt ends with <|startoftranscript|> [language, task] [<|notimestamps|>]
        sot_from_end = 1 + (2 if self.multilingual else 0) + (0 if timestamps else 1)
        log = FallbackLog(self.model, self.processor.tokenizer, len(feats), decoding, sot_from_end)
        with log, torch.random.fork_rng(devices=[]):
            torch.manual_seed(decoding.seed * 1_000_003 + seed)  # the sampled fallbacks of this call
            ids = self.model.generate(input_features=feats, **kw)
        # transformers pads an input whose every window was skipped as silent with a float tensor, which turns
        # the whole batch to float (token ids are exact in float32)
        texts = self.processor.batch_decode(ids.round().long(), skip_special_tokens=True)
        return [log.transcript(i, text.strip(), decoding) for i, text in enumerate(texts)]

    @property
    def _window_frames(self) -> int:
        return self.processor.feature_extractor.nb_max_frames

    def training_problem(self, u) -> str | None:
        """Why utterance `u` cannot be a teacher-forced training example (None when it can): audio longer than
        the input window, or a transcript with more tokens than the decoder's positions."""
        if len(u.audio) > WINDOW_SECONDS * SAMPLE_RATE:
            return f"{u.seconds:.1f} s is longer than Whisper's {WINDOW_SECONDS:.0f} s window"
        n = len(self.calibration("speech").prompt_ids()) + len(
            self.processor.tokenizer(" " + u.text.strip(), add_special_tokens=False).input_ids) + 1
        limit = self.model.config.max_target_positions
        return f"{n} tokens exceed the decoder's {limit}" if n > limit else None

    def training_batch(self, utts, decoding: Decoding | None = None) -> dict:
        """A teacher-forced batch for fine-tuning (adapters): the features the decoding policy transcribes with,
        decoder inputs <|startoftranscript|> [language, task] <|notimestamps|> text, and labels shifted by one with
        the prompt and padding masked (-100), so the loss covers the text tokens and <|endoftext|>."""
        from quasr.errors import DataError

        decoding = decoding or Decoding()
        tok = self.processor.tokenizer
        prompt = self.calibration("speech").prompt_ids()
        eot = self.model.config.eos_token_id
        seqs = []
        for u in utts:
            why = self.training_problem(u)
            if why:
                raise DataError(f"training utterance {u.id}: {why}")
            seqs.append(prompt + tok(" " + u.text.strip(), add_special_tokens=False).input_ids + [eot])
        n = max(len(s) for s in seqs) - 1
        inputs = torch.full((len(seqs), n), eot, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, ids in enumerate(seqs):
            inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(ids[len(prompt):])
        return {"input_features": self._features([u.audio for u in utts], decoding), "decoder_input_ids": inputs,
                "labels": labels}


class FallbackLog:
    """Records, per input of one `generate` call, transformers' temperature-fallback decisions, and makes two of
    its checks openai-whisper's:

    - the compression ratio is computed on the decoded text (transformers computes it on the token ids, where the
      threshold 2.4 means something else);
    - the no-speech check (a window is skipped as silent when P(<|nospeech|>) at the <|startoftranscript|>
      position exceeds the threshold and the mean log-probability is below its threshold) takes that probability
      from the logits of the first decoding step, as openai-whisper does. transformers' own check runs the whole
      model again for multilingual prompts, and in a fallback round it reads the probability of the wrong input
      (it keeps the full batch's while the round decodes only the inputs that fell back);
    - which windows are skipped: transformers records a round's verdicts by position in that round, so a later
      round overwrites the skip of the input that held the position in the first round (a silent window then
      comes back as text); the log returns each input's own verdict.

    It wraps, for the duration of the call (`with log:`), three methods of the model instance:
    `generate_with_fallback` (once per window round: which batch entries are active), `_need_fallback` (once per
    decode: its temperature and verdict) and `_retrieve_compression_ratio`; and it hooks the output projection to
    read the first step's logits. The decodes of a round come in batch order; a later temperature re-decodes
    exactly the entries that needed a fallback, in order, which maps each verdict to its input.
    tests/test_decoding.py checks this against forced fallbacks, so a change in transformers' loop shows there.
    """

    def __init__(self, model, tokenizer, n: int, decoding: Decoding | None = None, sot_from_end: int = 1):
        self.model, self.tokenizer = model, tokenizer
        self.decoding = decoding or Decoding()
        self.sot_from_end = sot_from_end
        self.windows: list[list[dict]] = [[] for _ in range(n)]
        self._active: list[int] = []
        self._round: list[tuple[int, bool]] = []
        self._temperature = None
        self._first_step = True
        self._no_speech: torch.Tensor | None = None
        self._hook = None

    def __enter__(self):
        cls, model, d = type(self.model), self.model, self.decoding
        ts_begin = self.model.generation_config.no_timestamps_token_id + 1
        no_speech_id = self.model.generation_config.no_timestamps_token_id - 1  # <|nospeech|> (<|nocaptions|>)

        def generate_with_fallback(*args, **kw):
            batch = [int(b) for b in kw["batch_idx_map"][:kw["cur_bsz"]]]
            self._active, self._round, self._temperature, self._first_step = batch, [], None, True
            for b in batch:
                self.windows[b].append({"temperatures": [], "fallback": False, "skipped": False})
            seqs, outs, _, condition, kind = cls.generate_with_fallback(model, *args, **kw)
            # transformers fills its skip list by each round's position, so a later round overwrites the verdict
            # of whichever input held that position in the first round; the log keeps each input's own
            return seqs, outs, [self.windows[b][-1]["skipped"] for b in batch], condition, kind

        def first_step_logits(module, inputs, output):
            if self._first_step:  # [rows, prompt length, vocab] (beam search: num_beams rows per input)
                self._no_speech = output[:, -self.sot_from_end].float().softmax(dim=-1)[:, no_speech_id]
                self._first_step = False

        def need_fallback(seek_sequence, seek_outputs, index, logits_processor, generation_config, vocab_size,
                          temperature):
            needs, skip = cls._need_fallback(model, seek_sequence, seek_outputs, index, logits_processor,
                                             generation_config, vocab_size, temperature)
            self._first_step = True  # the next forward pass is the first step of the next decode
            if d.no_speech_threshold is not None and self._no_speech is not None:
                per_input = max(1, len(self._no_speech) // max(1, len(seek_outputs)))  # beams of this decode
                silent = float(self._no_speech[index * per_input]) > d.no_speech_threshold
                if silent and d.logprob_threshold is not None:
                    if hasattr(seek_outputs[0], "sequences_scores"):
                        logprob = float(seek_outputs[index]["sequences_scores"])
                    else:
                        logprob = float(model._retrieve_avg_logprobs(seek_outputs[index]["scores"], seek_sequence,
                                                                     temperature))
                    silent = logprob < d.logprob_threshold
                if silent:
                    needs, skip = False, True
            if temperature != self._temperature:  # a new round: the entries that needed a fallback, in order
                if self._temperature is not None:
                    self._active = [b for b, n in self._round if n]
                self._round, self._temperature = [], temperature
            b = self._active[index]
            w = self.windows[b][-1]
            w["temperatures"].append(float(temperature or 0.0))
            w["fallback"] = w["fallback"] or needs
            w["skipped"] = bool(skip)
            self._round.append((b, bool(needs)))
            return needs, skip

        def compression_ratio(tokens, vocab_size):
            from quasr.decoding import text_compression_ratio

            ids = [t for t in tokens.tolist() if t < ts_begin]
            return text_compression_ratio(self.tokenizer.decode(ids, skip_special_tokens=True).strip())

        model.generate_with_fallback = generate_with_fallback
        model._need_fallback = need_fallback
        model._retrieve_compression_ratio = compression_ratio
        self._hook = model.get_output_embeddings().register_forward_hook(first_step_logits)
        return self

    def __exit__(self, *exc):
        for name in ("generate_with_fallback", "_need_fallback", "_retrieve_compression_ratio"):
            self.model.__dict__.pop(name, None)
        if self._hook is not None:
            self._hook.remove()
        return False

    def transcript(self, i: int, text: str, decoding: Decoding) -> Transcript:
        ws = self.windows[i]
        if not ws:  # transformers decoded this input without its fallback loop (should not happen)
            return Transcript(text, temperature=decoding.temperatures[0])
        return Transcript(text, windows=len(ws), fallbacks=sum(len(w["temperatures"]) - 1 for w in ws),
                          fallback_windows=sum(len(w["temperatures"]) > 1 for w in ws),
                          skipped_windows=sum(w["skipped"] for w in ws),
                          temperature=ws[-1]["temperatures"][-1] if ws[-1]["temperatures"] else None)


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


def _attention_core(attn, x: torch.Tensor, kv: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """WhisperAttention up to (not including) out_proj, as transformers computes it for one unpadded sequence:
    queries from x, keys and values from kv (x itself, or the encoder output for cross-attention)."""
    def heads(t):
        return t.view(*t.shape[:-1], attn.num_heads, attn.head_dim).transpose(1, 2)

    q = heads(attn.q_proj(x) * attn.scaling)
    o = torch.nn.functional.scaled_dot_product_attention(q, heads(attn.k_proj(kv)), heads(attn.v_proj(kv)),
                                                         is_causal=causal, scale=1.0)
    return o.transpose(1, 2).reshape(*x.shape[:-1], -1)


def encoder_layer_stages():
    """`WhisperEncoderLayer.forward` cut at its Linear groups, so that sequential calibration runs each part once.

    The state between stages is what the rest of the layer needs: (h,) → (h, attention core) → (h₂,) →
    (h₂, FFN hidden) → (output,). Stage i gives the shared input of ENCODER_GROUPS[i] and, once that group is quantized, the next
    state. Composing the advances equals the module's forward (checked in tests/test_quantize.py).
    """
    from quasr.quantize import Stage

    def ffn_hidden(m, s):
        return m.activation_fn(m.fc1(m.final_layer_norm(s[0])))

    def attend(m, s):
        x = m.self_attn_layer_norm(s[0])
        return (s[0], _attention_core(m.self_attn, x, x))

    return [
        Stage(ENCODER_GROUPS[0], lambda m, s: m.self_attn_layer_norm(s[0]), attend, frames=True),
        Stage(ENCODER_GROUPS[1], lambda m, s: s[1], lambda m, s: (s[0] + m.self_attn.out_proj(s[1]),), frames=True),
        Stage(ENCODER_GROUPS[2], lambda m, s: m.final_layer_norm(s[0]), lambda m, s: (s[0], ffn_hidden(m, s)),
              frames=True),
        Stage(ENCODER_GROUPS[3], lambda m, s: s[1], lambda m, s: (s[0] + m.fc2(s[1]),), frames=True),
    ]


def decoder_layer_stages():
    """`WhisperDecoderLayer.forward` (teacher-forced, causal self-attention, no cache) cut at DECODER_GROUPS.

    States carry the encoder output: (h, ctx) → (h, ctx, self-attention core) → (h₂, ctx) → ... → (output, ctx).
    """
    from quasr.quantize import Stage

    def self_attend(m, s):
        x = m.self_attn_layer_norm(s[0])
        return (s[0], s[1], _attention_core(m.self_attn, x, x, causal=True))

    def cross_attend(m, s):
        return (s[0], s[1], _attention_core(m.encoder_attn, m.encoder_attn_layer_norm(s[0]), s[1]))

    def ffn_hidden(m, s):
        return m.activation_fn(m.fc1(m.final_layer_norm(s[0])))

    return [
        Stage(DECODER_GROUPS[0], lambda m, s: m.self_attn_layer_norm(s[0]), self_attend),
        Stage(DECODER_GROUPS[1], lambda m, s: s[2], lambda m, s: (s[0] + m.self_attn.out_proj(s[2]), s[1])),
        Stage(DECODER_GROUPS[2], lambda m, s: m.encoder_attn_layer_norm(s[0]), None),
        Stage(DECODER_GROUPS[3], lambda m, s: s[1], cross_attend, frames=True),
        Stage(DECODER_GROUPS[4], lambda m, s: s[2], lambda m, s: (s[0] + m.encoder_attn.out_proj(s[2]), s[1])),
        Stage(DECODER_GROUPS[5], lambda m, s: m.final_layer_norm(s[0]), None),
        Stage(DECODER_GROUPS[6], ffn_hidden, lambda m, s: (s[0] + m.fc2(ffn_hidden(m, s)), s[1])),
    ]


def _whisper_blocks(asr: "WhisperAsr"):
    from quasr.quantize import Block

    m = asr.model.model
    enc = [Block(f"model.encoder.layers.{i}", layer, ENCODER_GROUPS, "encoder") for i, layer in enumerate(m.encoder.layers)]
    dec = [Block(f"model.decoder.layers.{i}", layer, DECODER_GROUPS, "decoder") for i, layer in enumerate(m.decoder.layers)]
    return enc + dec


def _token_words(text: str, offsets) -> list[str | None]:
    """The word (a whitespace-separated run of `text`) each token belongs to, from the tokenizer's character
    offsets: the word holding the token's first non-space character (None for a token of spaces only)."""
    import re

    spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", text)]
    out = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        out.append(next((w for a, b, w in spans if a <= start < b), None) if start < end else None)
    return out


class WhisperCalibration:
    """Teacher-forced calibration inputs and block-by-block forward for Whisper.

    Encoder: the log-mel window of each utterance through the conv stem and positions. In "speech" mode the
    sequence is cut after the audio's last frame plus a 1 s margin (much cheaper; attention then spans the
    speech frames only); in "window" mode every utterance keeps the full 30 s window, exactly as at
    inference. Decoder: the prompt (<|startoftranscript|> [language, task] <|notimestamps|>), the reference
    text's tokens and <|endoftext|>, with the cross-attention fed by the matching stream's encoder output.
    One utterance per forward call, so no padding masks are needed.
    """

    def __init__(self, asr: "WhisperAsr", encoder_frames: str = "window", pad_stride: int = 1,
                 pad_weight: float = 1.0):
        from quasr.quant.grid import QuantConfigError

        if encoder_frames not in ("speech", "window"):
            raise QuantConfigError(f"encoder_frames must be 'speech' or 'window', got {encoder_frames!r}")
        if not isinstance(pad_stride, int) or pad_stride < 1:
            raise QuantConfigError(f"pad_stride must be a positive integer, got {pad_stride!r}")
        self.pad_stride = pad_stride
        self.pad_weight = float(pad_weight)
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
            text = " " + u.text.strip()
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            text_ids = enc.input_ids
            ids = prompt + text_ids + [eot]
            if len(ids) > max_tokens:
                raise DataError(f"calibration utterance {u.id}: {len(ids)} tokens exceed the decoder's {max_tokens}")
            frames = int(np.ceil(len(u.audio) / SAMPLE_RATE * 50)) + SPEECH_MARGIN_FRAMES
            n_frames = self.asr.model.config.max_source_positions
            items.append({"id": u.id, "features": feats.to(self.asr.model.dtype),
                          "frames": n_frames if self.encoder_frames == "window" else min(frames, n_frames),
                          "speech_frames": min(frames, n_frames),
                          "tokens": torch.tensor([ids]), "n_prompt": len(prompt), "text": u.text,
                          # for each position, the word of the token it predicts (the next one); None for
                          # the prompt's tokens and <|endoftext|>
                          "next_word": (len(prompt) - 1) * [None] + _token_words(text, enc.offset_mapping)
                          + [None, None]})
        return items

    def encoder_input(self, item: dict) -> torch.Tensor:
        enc = self.asr.model.model.encoder
        x = torch.nn.functional.gelu(enc.conv1(item["features"]))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        return x[:, : item["frames"]]

    def frame_rows(self, item: dict):
        """Rows of an encoder-frame input that feed the statistics, with the square root of their weights, or
        None for all rows. In window mode with pad_stride k > 1: every speech frame (weight 1), then every k-th
        frame of the padding after it, weighted by the frames it stands for, so H keeps its scale and Σ weights
        is the window length. Padding frames are near copies of their neighbours (silence plus positions).
        pad_weight scales the padding frames' weights against the speech frames' (0: speech frames only)."""
        if item["frames"] <= item["speech_frames"] or (self.pad_stride == 1 and self.pad_weight == 1.0):
            return None
        if "rows" not in item:
            s, n, k = item["speech_frames"], item["frames"], self.pad_stride
            pad = torch.arange(s, n, k) if self.pad_weight > 0 else torch.arange(0)
            w = torch.cat([torch.ones(s), torch.clamp(n - pad, max=k).float() * self.pad_weight])
            item["rows"] = (torch.cat([torch.arange(s), pad]), w.sqrt())
        return item["rows"]

    def encoder_output(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.asr.model.model.encoder.layer_norm(hidden)

    def decoder_input(self, item: dict, embed_weight: torch.Tensor | None = None) -> torch.Tensor:
        dec = self.asr.model.model.decoder
        ids = item["tokens"]
        emb = dec.embed_tokens(ids) if embed_weight is None else torch.nn.functional.embedding(ids, embed_weight)
        return emb + dec.embed_positions.weight[: ids.shape[1]]

    def stages(self, block):
        """Staged forward of a block (see encoder_layer_stages) or None to run the block whole with hooks."""
        if self.asr.model.dtype != torch.float32 or self.asr.model.config._attn_implementation not in ("sdpa", "eager"):
            return None
        return encoder_layer_stages() if block.stage == "encoder" else decoder_layer_stages()

    def run_block(self, block, module, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if block.stage == "encoder":
            return module(hidden, None)
        return module(hidden, attention_mask=None, encoder_hidden_states=context, use_cache=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.asr.model.proj_out(self.asr.model.model.decoder.layer_norm(hidden))
