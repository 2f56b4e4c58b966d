"""Decoding policies: names and their errors, transformers' temperature fallback as quasr logs it, seeded
sampled fallbacks, openai-whisper's features and compression ratio."""
from __future__ import annotations

import numpy as np
import pytest

from quasr.decoding import (OPENAI_TEMPERATURES, Decoding, DecodingError, parse_decoding, parse_temperatures,
                            text_compression_ratio)


def test_named_policies():
    std = parse_decoding("standard")
    assert std.temperatures == OPENAI_TEMPERATURES == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert (std.compression_ratio_threshold, std.logprob_threshold, std.no_speech_threshold) == (2.4, -1.0, 0.6)
    assert std.timestamps and std.openai_features and std.fallback and std.label == "standard"
    g = parse_decoding("greedy")
    assert g.temperatures == (0.0,) and not g.fallback and g.compression_ratio_threshold is None
    assert not g.timestamps and not g.openai_features and g.label == "greedy"
    b = parse_decoding("beam5")
    assert b.beams == 5 and b.temperatures == OPENAI_TEMPERATURES and b.label == "beam5"
    assert parse_decoding("standard", "0,0.5", seed=3).label == "standard[t=0/0.5,seed=3]"


@pytest.mark.parametrize("name, temps, message", [
    ("nucleus", None, "unknown decoding 'nucleus'"),
    ("beam0", None, "at least 1"),
    ("standard", "", "empty"),
    ("standard", "0,-1", ">= 0"),
    ("standard", "0,x", "not a comma-separated list"),
    ("standard", "nan", ">= 0"),
])
def test_bad_policies_are_clear_errors(name, temps, message):
    with pytest.raises(DecodingError, match=message):
        parse_decoding(name, temps)


def test_dataclass_checks_too():
    with pytest.raises(DecodingError, match="empty"):
        Decoding(temperatures=())
    with pytest.raises(DecodingError, match="beam width"):
        Decoding(beams=0)
    assert parse_temperatures([0, 0.5]) == (0.0, 0.5)


def test_compression_ratio_is_openai_whispers():
    assert text_compression_ratio("") == 0.0
    looped = "thank you " * 40
    assert text_compression_ratio(looped) > 2.4 > text_compression_ratio("Call Doctor Okonkwo at nine tomorrow.")


@pytest.fixture(scope="module")
def audios():
    from quasr.data import load_source

    return [u.audio for u in load_source("asterisk:test", limit=6).utterances]


@pytest.mark.slow
@pytest.mark.parametrize("second_round_falls_back", [True, False])
def test_fallback_log_maps_every_decision_to_its_utterance(tiny, audios, monkeypatch, second_round_falls_back):
    """Whatever transformers' loop does, each fallback verdict is attributed to the right input: inputs 1 and 3
    (recognized by their text at temperature 0) fall back; at 0.5 all re-decoded inputs fall back again (or
    none do); the others never."""
    d = Decoding(temperatures=(0.0, 0.5, 1.0), compression_ratio_threshold=None, logprob_threshold=None,
                 no_speech_threshold=None)
    plain = tiny.transcribe(audios, batch_size=6, decoding=d, progress=False)  # no thresholds: no fallback
    targets = [plain[1][:12], plain[3][:12]]
    assert all(sum(t in p for p in plain) == 1 for t in targets)  # each identifies one input
    cls = type(tiny.model)
    real = cls._need_fallback
    calls = []

    def fake(self, seek_sequence, seek_outputs, index, logits_processor, generation_config, vocab_size, temperature):
        real(self, seek_sequence, seek_outputs, index, logits_processor, generation_config, vocab_size, temperature)
        text = tiny.processor.tokenizer.decode(seek_sequence, skip_special_tokens=True)
        calls.append(temperature)
        if temperature == 0.0:
            return any(t in text for t in targets), False
        return second_round_falls_back and temperature == 0.5, False

    monkeypatch.setattr(cls, "_need_fallback", fake)
    out = tiny.transcribe_detailed(audios, batch_size=6, decoding=d, progress=False)
    got = [(t.fallbacks, t.fallback_windows, t.temperature) for t in out]
    fell = (2, 1, 1.0) if second_round_falls_back else (1, 1, 0.5)
    assert got == [fell if i in (1, 3) else (0, 0, 0.0) for i in range(len(audios))]
    assert calls.count(0.0) == len(audios) and calls.count(0.5) == 2
    assert all(not k.startswith(("_need", "generate_with", "_retrieve")) for k in vars(tiny.model))  # uninstalled


@pytest.mark.slow
def test_forced_fallbacks_are_counted_and_seeded(tiny, audios):
    """A log-prob threshold of 0 sends every window through every temperature; the sampled decodes repeat with
    the same seed."""
    d = Decoding(temperatures=(0.0, 0.6, 1.0), logprob_threshold=0.0, compression_ratio_threshold=None,
                 no_speech_threshold=None, seed=7)
    a = tiny.transcribe_detailed(audios[:4], decoding=d, progress=False)
    assert [(t.windows, t.fallbacks, t.fallback_windows, t.temperature) for t in a] == [(1, 2, 1, 1.0)] * 4
    b = tiny.transcribe_detailed(audios[:4], decoding=d, progress=False)
    assert [t.text for t in a] == [t.text for t in b]


@pytest.mark.slow
def test_standard_features_are_openai_whispers(tiny, audios):
    """The log-mel of the audio, then zeros (not the log-mel of silent audio) up to 3000 frames."""
    std, greedy = parse_decoding("standard"), parse_decoding("greedy")
    a = audios[0]
    f = tiny._features([a], std)[0]
    g = tiny._features([a], greedy)[0]
    n = len(a) // 160
    assert f.shape == g.shape == (80, 3000)
    assert float(f[:, n:].abs().max()) == 0.0 and float(g[:, n + 5:].abs().min()) > 0
    np.testing.assert_allclose(f[:, : n - 2].numpy(), g[:, : n - 2].numpy(), atol=1e-5)  # the same speech frames


@pytest.mark.slow
def test_silence_is_skipped_and_fallback_rounds_read_their_own_no_speech_probability(tiny, audios):
    """openai-whisper's no-speech check: a silent window is skipped (empty text), speech is not. With every
    spoken window forced to fall back (log-prob threshold 0), the second round decodes only the speech, and
    must read the speech's own no-speech probability, not the silent input's that came first in the batch."""
    silence = np.zeros(3 * 16000, dtype=np.float32)
    out = tiny.transcribe_detailed([silence, audios[1], silence], decoding=parse_decoding("standard"), progress=False)
    assert [(t.text == "", t.skipped_windows) for t in out] == [(True, 1), (False, 0), (True, 1)]
    forced = Decoding(temperatures=(0.0, 0.5), logprob_threshold=0.0, compression_ratio_threshold=None)
    out = tiny.transcribe_detailed([silence, audios[1]], decoding=forced, progress=False)
    assert (out[0].skipped_windows, out[0].fallbacks, out[0].text) == (1, 0, "")
    assert (out[1].skipped_windows, out[1].fallbacks) == (0, 1) and out[1].text


def test_labels_tell_every_setting_apart():
    assert Decoding(logprob_threshold=-2.0).label == "standard[logprob_threshold=-2.0]"
    assert Decoding(no_speech_threshold=None, seed=2).label == "standard[no_speech_threshold=None,seed=2]"
    assert parse_decoding("greedy").label == "greedy" and parse_decoding("beam3").label == "beam3"


@pytest.mark.slow
def test_beam_search_reads_each_inputs_no_speech_probability(tiny, audios):
    """With beam search each input has several rows in the first step; silence is still skipped, speech not."""
    silence = np.zeros(3 * 16000, dtype=np.float32)
    out = tiny.transcribe_detailed([silence, audios[1]], decoding=parse_decoding("beam3"), progress=False)
    assert (out[0].text, out[0].skipped_windows) == ("", 1) and out[1].text and out[1].skipped_windows == 0
