"""Built-in `asterisk` set: Debian's asterisk-core-sounds-en prompts, one female speaker (Allison), 8 kHz.

Audio: package asterisk-core-sounds-en-wav (/usr/share/asterisk/sounds/en_US_f_Allison/NAME.wav).
Text: package asterisk-core-sounds-en (core-sounds-en.txt.gz, lines `NAME: text`). License CC-BY-SA-3.0.

Of the 569 text lines, 5 are non-speech markers in brackets ("[ascending tones]") and one (pls-try-call-later)
has no audio file: both are excluded and counted, leaving 563 prompts. Bracketed annotations after spoken
text ("dollar [$]") are removed from the reference.

Split (fixed, documented): a prompt is in `test` when the first byte of sha1(NAME) is even, else in `calib`.
This gives 300 test and 263 calibration prompts, independent of file order and stable across machines.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TEXTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SPEAKER = "allison"
SPLITS = ("test", "calib", "all")


def split_of(name: str) -> str:
    return "test" if hashlib.sha1(name.encode()).digest()[0] % 2 == 0 else "calib"


def asterisk_entries(split: str = "test") -> tuple[list[dict], dict[str, int]]:
    """Manifest-style entries for a split, and the counts of excluded lines by reason."""
    from quasr.errors import DataError

    if split not in SPLITS:
        raise DataError(f"asterisk: unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if not TEXTS.exists() or not SOUNDS.is_dir():
        raise DataError(f"asterisk: needs Debian packages asterisk-core-sounds-en and asterisk-core-sounds-en-wav "
                        f"({TEXTS} / {SOUNDS} not found); scripts/setup.sh installs them")
    entries, excluded = [], {"non_speech_marker": 0, "no_audio_file": 0}
    for line in gzip.open(TEXTS, "rt", encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith(";") or ": " not in line:
            continue
        name, text = line.split(": ", 1)
        spoken = re.sub(r"\[[^\]]*\]", " ", text).strip()
        if not spoken:
            excluded["non_speech_marker"] += 1
            continue
        wav = SOUNDS / f"{name}.wav"
        if not wav.exists():
            excluded["no_audio_file"] += 1
            continue
        if split in ("all", split_of(name)):
            entries.append({"id": f"asterisk/{name}", "audio": str(wav), "text": " ".join(spoken.split()),
                            "speaker": SPEAKER})
    return entries, excluded
