"""JSON Lines manifests: one object per line, `{"id", "audio", "text", "speaker"}`.

`audio` is a path relative to the manifest file (absolute paths work too); `id` and `speaker` are optional
(the id defaults to the audio path without its extension). Blank lines are ignored.

    {"id": "spk1-001", "audio": "wavs/001.wav", "text": "Call Doctor Okonkwo at nine.", "speaker": "spk1"}
"""
from __future__ import annotations

import json
from pathlib import Path

from quasr.data.audio import read_audio
from quasr.data.utterance import Utterance
from quasr.errors import DataError


def parse_line(path: Path, lineno: int, line: str) -> dict:
    """One manifest line to an entry dict; DataError naming the file and line if it is not usable."""
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("audio"), str) or not obj["audio"]:
        raise DataError(f"{where}: missing \"audio\" (a path relative to the manifest)")
    text = obj.get("text")
    if "text" not in obj or text is None:
        raise DataError(f"{where}: missing transcript (no \"text\") for {obj['audio']}")
    if not isinstance(text, str):
        raise DataError(f"{where}: \"text\" must be a string, got a {type(text).__name__} ({json.dumps(text)[:40]}) "
                        f"for {obj['audio']}")
    if not text.strip():
        raise DataError(f"{where}: empty transcript (\"text\" is blank) for {obj['audio']}")
    obj["id"] = str(obj.get("id") or Path(obj["audio"]).with_suffix(""))
    return obj


def read_manifest_entries(path: str | Path, skip_bad: bool = False) -> tuple[list[tuple[int, dict]], list]:
    """Parse and check every line (no audio decoding).

    Returns ((line number, entry) pairs, skipped) where skipped lists (file:line, reason) for lines that were
    invalid JSON, not an object, lacked `audio` or `text`, or repeated an id. Without `skip_bad` the first
    such line raises DataError instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    entries, skipped, seen = [], [], {}
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None
            obj = parse_line(path, lineno, line)
            if obj["id"] in seen:
                raise DataError(f"{path}:{lineno}: duplicate id {obj['id']!r} (first on line {seen[obj['id']]})")
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append((f"{path}:{lineno}", str(e)))
            continue
        seen[obj["id"]] = lineno
        entries.append((lineno, obj))
    return entries, skipped


def entry_to_utterance(manifest: Path, lineno: int, obj: dict) -> Utterance:
    audio_path = Path(obj["audio"])
    if not audio_path.is_absolute():
        audio_path = manifest.parent / audio_path
    try:
        audio = read_audio(audio_path)
    except DataError as e:
        raise DataError(f"{manifest}:{lineno}: {e}") from e
    speaker = obj.get("speaker")
    return Utterance(id=obj["id"], audio=audio, text=obj["text"].strip(),
                     speaker=None if speaker is None else str(speaker))
