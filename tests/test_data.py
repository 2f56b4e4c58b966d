"""Speech sources: the manifest format, bad input, the asterisk split, HF datasets offline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from quasr.data import load_source, spread
from quasr.data.audio import read_audio
from quasr.errors import DataError


def tone(seconds=1.0, sr=16000, channels=1, freq=220.0):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture
def manifest_dir(tmp_path):
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "a.wav", tone(1.0, 16000), 16000)
    sf.write(tmp_path / "wavs" / "b.flac", tone(0.5, 44100, channels=2), 44100)
    sf.write(tmp_path / "wavs" / "c.wav", tone(2.0, 8000), 8000)
    lines = [
        {"id": "u1", "audio": "wavs/a.wav", "text": "hello there", "speaker": "s1"},
        {"audio": "wavs/b.flac", "text": "second one", "speaker": 7},
        {"id": "u3", "audio": "wavs/c.wav", "text": "third"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return tmp_path


def test_manifest_format_relative_paths_resampling_and_mono(manifest_dir):
    ds = load_source(str(manifest_dir / "m.jsonl"))
    assert [u.id for u in ds] == ["u1", "wavs/b", "u3"]
    assert [u.speaker for u in ds] == ["s1", "7", None]
    for u, secs in zip(ds, (1.0, 0.5, 2.0)):
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1
        assert abs(len(u.audio) - secs * 16000) <= 2  # resampled to 16 kHz, duration kept
    # 8 kHz -> 16 kHz keeps the tone: its spectrum peaks at 220 Hz
    spec = np.abs(np.fft.rfft(ds.utterances[2].audio))
    assert abs(np.argmax(spec) * 16000 / len(ds.utterances[2].audio) - 220) < 2


@pytest.mark.parametrize("line, message", [
    ("{not json", r"m.jsonl:2: not valid JSON"),
    ('["a list"]', r"m.jsonl:2: expected a JSON object"),
    ('{"audio": "wavs/a.wav"}', r"m.jsonl:2: missing transcript"),
    ('{"audio": "wavs/a.wav", "text": "   "}', r"m.jsonl:2: empty transcript"),
    ('{"audio": "wavs/a.wav", "text": 123}', r"m.jsonl:2: \"text\" must be a string, got a int \(123\)"),
    ('{"text": "no audio"}', r"m.jsonl:2: missing \"audio\""),
    ('{"id": "u1", "audio": "wavs/a.wav", "text": "dup"}', r"m.jsonl:2: duplicate id 'u1'"),
])
def test_bad_manifest_lines_name_file_and_line(manifest_dir, line, message):
    good = json.dumps({"id": "u1", "audio": "wavs/a.wav", "text": "fine"})
    (manifest_dir / "m.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_source(str(manifest_dir / "m.jsonl"))
    ds = load_source(str(manifest_dir / "m.jsonl"), skip_bad=True)
    assert [u.id for u in ds] == ["u1"] and len(ds.skipped) == 1
    assert "m.jsonl:2" in ds.skipped[0][1]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"RIFF garbage that is not a wav"), "cannot decode audio"),
    (lambda p: sf.write(p, np.zeros(0, np.float32), 16000), "empty"),
    (lambda p: sf.write(p, tone(0.02), 16000), "too short"),
    (lambda p: None, "not found"),
])
def test_bad_audio_is_named_and_skippable(manifest_dir, make, message):
    make(manifest_dir / "wavs" / "bad.wav")
    lines = [{"id": "ok", "audio": "wavs/a.wav", "text": "fine"}, {"id": "bad", "audio": "wavs/bad.wav", "text": "x"}]
    (manifest_dir / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(DataError, match=rf"m.jsonl:2: .*bad.wav.*{message}"):
        load_source(str(manifest_dir / "m.jsonl"))
    ds = load_source(str(manifest_dir / "m.jsonl"), skip_bad=True)
    assert [u.id for u in ds] == ["ok"]
    assert ds.skipped[0][0].endswith("m.jsonl:2") and message in ds.skipped[0][1]


def test_nothing_usable_is_an_error(manifest_dir):
    (manifest_dir / "m.jsonl").write_text('{"audio": "missing.wav", "text": "x"}\n')
    with pytest.raises(DataError, match="no usable utterances"):
        load_source(str(manifest_dir / "m.jsonl"), skip_bad=True)


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="unknown speech source"):
        load_source("nonsense-source")
    with pytest.raises(DataError, match="unknown split"):
        load_source("asterisk:train")


def test_spread_covers_the_set():
    assert spread(10, None) == list(range(10))
    assert spread(10, 4) == [0, 2, 5, 7]
    assert spread(3, 10) == [0, 1, 2]


def test_asterisk_split_is_fixed_and_disjoint(asterisk_files):
    from quasr.data.asterisk import asterisk_entries

    test, excluded = asterisk_entries("test")
    calib, _ = asterisk_entries("calib")
    every, _ = asterisk_entries("all")
    assert excluded == {"non_speech_marker": 5, "no_audio_file": 1}
    assert len(every) == 563 and len(test) == 300 and len(calib) == 263
    assert not {e["id"] for e in test} & {e["id"] for e in calib}
    assert all("[" not in e["text"] for e in every)  # bracketed annotations removed
    ds = load_source("asterisk:test", limit=5)
    assert len(ds) == 5 and all(u.speaker == "allison" for u in ds)
    assert ds.utterances[0].audio.dtype == np.float32


def test_hf_dataset_offline_saved_to_disk(manifest_dir):
    datasets = pytest.importorskip("datasets")
    wavs = [str(manifest_dir / "wavs" / n) for n in ("a.wav", "c.wav")]
    ds = datasets.Dataset.from_dict({"audio": wavs, "sentence": ["hello there", "third"],
                                     "speaker_id": [11, 12]}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(manifest_dir / "hfds"))
    got = load_source(f"hf:{manifest_dir / 'hfds'}:test")
    assert [u.text for u in got] == ["hello there", "third"]
    assert [u.speaker for u in got] == ["11", "12"]
    assert abs(len(got.utterances[1].audio) - 32000) <= 2  # 8 kHz file decoded and resampled
    with pytest.raises(DataError, match="no split 'train'"):
        load_source(f"hf:{manifest_dir / 'hfds'}:train")
    with pytest.raises(DataError, match="no text column 'words'"):
        load_source(f"hf:{manifest_dir / 'hfds'}:test?text=words")


def test_hf_hub_name_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as a machine without the internet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf:nobody/no-such-dataset: cannot load split 'test'"):
        load_source("hf:nobody/no-such-dataset:test")


def test_read_audio_downmixes_stereo(tmp_path):
    x = np.stack([tone(1.0), -tone(1.0)], axis=1)  # channels cancel when averaged
    sf.write(tmp_path / "s.wav", x, 16000)
    assert np.abs(read_audio(tmp_path / "s.wav")).max() < 1e-4


def test_calibration_splits_have_a_fixed_held_out_quarter(asterisk_files):
    """calib-dev (for choosing defaults) and calib-fit (for calibrating while choosing) split calib in two."""
    from quasr.data import held_out

    whole = {u.id for u in load_source("asterisk:calib")}
    dev = {u.id for u in load_source("asterisk:calib-dev")}
    fit = {u.id for u in load_source("asterisk:calib-fit")}
    assert dev | fit == whole and not dev & fit and 0.15 < len(dev) / len(whole) < 0.35
    assert all(held_out(i) for i in dev) and load_source("asterisk:calib-dev").name == "asterisk:calib-dev"
    with pytest.raises(DataError, match="only the calibration split"):
        load_source("asterisk:test-dev")
