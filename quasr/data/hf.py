"""Hugging Face `datasets` as a speech source (LibriSpeech, TED-LIUM, any set with audio and text columns).

Audio is read with `Audio(decode=False)` and decoded by quasr (soundfile + soxr), so no torchcodec or
ffmpeg is needed. NAME is a hub id (needs the internet or a warm HF cache), a directory written by
`Dataset.save_to_disk`, or a local directory `datasets.load_dataset` understands (audiofolder, parquet...).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from quasr.data.audio import to_mono_16k
from quasr.errors import DataError

TEXT_COLUMNS = ("text", "sentence", "transcript", "transcription", "normalized_text", "raw_text")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")
ID_COLUMNS = ("id", "segment_id", "file", "path")


def _pick(columns, wanted: str | None, candidates: tuple[str, ...], what: str, name: str, required=True):
    if wanted:
        if wanted not in columns:
            raise DataError(f"hf:{name}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise DataError(f"hf:{name}: cannot find a {what} column among {', '.join(columns)}; "
                        f"name it with {what}=COLUMN")
    return None


def load_hf(name: str, split: str = "test", config: str | None = None, audio: str | None = None,
            text: str | None = None, speaker: str | None = None) -> tuple[object, dict[str, str | None]]:
    """Open the dataset with audio left undecoded; returns (dataset, chosen column names)."""
    import datasets

    path = Path(name).expanduser()
    try:
        if any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"hf:{name}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(path) if path.exists() else name, config, split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"hf:{name}: cannot load split {split!r} ({type(e).__name__}: {e})") from e
    cols = ds.column_names
    chosen = {
        "audio": _pick(cols, audio, ("audio",), "audio", name),
        "text": _pick(cols, text, TEXT_COLUMNS, "text", name),
        "speaker": _pick(cols, speaker, SPEAKER_COLUMNS, "speaker", name, required=False),
        "id": _pick(cols, None, ID_COLUMNS, "id", name, required=False),
    }
    if isinstance(ds.features.get(chosen["audio"]), datasets.Audio):
        ds = ds.cast_column(chosen["audio"], datasets.Audio(decode=False))
    return ds, chosen


def decode_hf_audio(value, where: str) -> np.ndarray:
    """An undecoded Audio value ({"bytes", "path"}) or a decoded one ({"array", "sampling_rate"})."""
    import soundfile as sf

    if isinstance(value, dict) and value.get("array") is not None:
        return to_mono_16k(np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]), where)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        try:
            audio, sr = sf.read(src, dtype="float32", always_2d=True)
        except Exception as e:
            raise DataError(f"{where}: cannot decode audio ({e})") from e
        return to_mono_16k(audio, sr, where)
    if isinstance(value, str):
        from quasr.data.audio import read_audio

        return read_audio(value)
    raise DataError(f"{where}: unsupported audio value of type {type(value).__name__}")
