"""Decode audio files into 16 kHz mono float32 (soundfile to read, soxr to resample)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from quasr.data.utterance import SAMPLE_RATE
from quasr.errors import DataError

MIN_SECONDS = 0.1  # shorter audio cannot hold a word; reject it rather than score noise


def to_mono_16k(audio: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
    """Downmix (frames x channels) to mono, resample to 16 kHz, check it is usable speech audio."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise DataError(f"{name}: audio must be 1-D or (frames, channels), got shape {audio.shape}")
    if sample_rate <= 0:
        raise DataError(f"{name}: invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE and len(audio):
        import soxr

        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if len(audio) == 0:
        raise DataError(f"{name}: audio is empty")
    if len(audio) < MIN_SECONDS * SAMPLE_RATE:
        raise DataError(f"{name}: audio is too short ({len(audio) / SAMPLE_RATE:.3f} s < {MIN_SECONDS} s)")
    if not np.isfinite(audio).all():
        raise DataError(f"{name}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(audio)


def read_audio(path: str | Path) -> np.ndarray:
    """Read any file soundfile understands (wav, flac, ogg, mp3...) as 16 kHz mono float32."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: audio file not found")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise DataError(f"{path}: cannot decode audio ({e})") from e
    return to_mono_16k(audio, sr, name=str(path))
