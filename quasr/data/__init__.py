"""Speech sources behind one spec string.

    load_source("asterisk:test")             # built-in Debian telephone prompts (also :calib, :all)
    load_source("tts:test")                  # built-in multi-speaker synthetic set (also :calib)
    load_source("asterisk:calib-dev")        # the held-out quarter of a calibration split (and :calib-fit,
                                             # the rest): for choosing defaults without the test sets
    load_source("path/to/manifest.jsonl")    # JSON Lines manifest (see quasr.data.manifest)
    load_source("hf:NAME[:SPLIT][?config=C&audio=COL&text=COL&speaker=COL]")  # Hugging Face datasets

A bare `asterisk` or `tts` means the test split. `limit` keeps N utterances spread evenly over the set
(every k-th), so quick runs still cover every speaker. Bad items (unreadable, empty or too short audio,
missing text, invalid JSON) raise a DataError naming the file and line; with `skip_bad=True` they are
skipped, counted and listed in `Dataset.skipped` instead.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

from quasr.data.utterance import SAMPLE_RATE, Utterance
from quasr.errors import DataError


@dataclass
class Dataset:
    name: str
    utterances: list[Utterance]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    excluded: dict[str, int] = field(default_factory=dict)         # by design (e.g. non-speech markers)
    meta: dict = field(default_factory=dict)                       # facts results should carry (see tts)

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self):
        return iter(self.utterances)


def spread(n: int, limit: int | None) -> list[int]:
    """Indices of `limit` items spread evenly over n (all of them when limit is None or >= n)."""
    if limit is None or limit <= 0 or limit >= n:
        return list(range(n))
    return sorted({int(i * n / limit) for i in range(limit)})


def _materialize(name: str, items: list[tuple[str, Callable[[], Utterance]]], limit: int | None,
                 skip_bad: bool, excluded: dict | None = None) -> Dataset:
    utts, skipped = [], []
    for i in spread(len(items), limit):
        label, make = items[i]
        try:
            utts.append(make())
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append((label, str(e)))
    if not utts:
        raise DataError(f"{name}: no usable utterances ({len(skipped)} skipped)")
    return Dataset(name, utts, skipped, excluded or {})


def _manifest_items(path: Path, entries: list[tuple[int, dict]]) -> list:
    from quasr.data.manifest import entry_to_utterance

    return [(f"{path}:{ln}", (lambda ln=ln, o=o: entry_to_utterance(path, ln, o))) for ln, o in entries]


def load_manifest(path: str | Path, limit: int | None = None, skip_bad: bool = False,
                  name: str | None = None) -> Dataset:
    from quasr.data.manifest import read_manifest_entries

    path = Path(path)
    entries, skipped = read_manifest_entries(path, skip_bad)
    ds = _materialize(name or str(path), _manifest_items(path, entries), limit, skip_bad)
    ds.skipped[:0] = skipped
    return ds


def held_out(uid: str) -> bool:
    """The fixed quarter of a calibration split kept for choosing defaults (its `-dev` part): sha1(id)'s
    second byte is divisible by 4. The other three quarters are its `-fit` part."""
    return hashlib.sha1(uid.encode()).digest()[1] % 4 == 0


def _part(split: str) -> tuple[str, Callable[[str], bool] | None]:
    """calib-dev / calib-fit -> ("calib", filter on ids); other splits unfiltered."""
    for suffix, keep in (("-dev", held_out), ("-fit", lambda uid: not held_out(uid))):
        if split.endswith(suffix):
            return split[: -len(suffix)], keep
    return split, None


def load_source(spec: str, limit: int | None = None, skip_bad: bool = False) -> Dataset:
    """Load a speech source from its spec string (see the module docstring)."""
    spec = str(spec)
    head, _, rest = spec.partition(":")
    if head in ("asterisk", "tts") and not Path(spec).exists():
        split, keep = _part(rest or "test")
        if keep is not None and split != "calib":
            raise DataError(f"{spec}: only the calibration split has -dev and -fit parts (calib-dev, calib-fit)")
        name = f"{head}:{rest or 'test'}"
        if head == "asterisk":
            from quasr.data.asterisk import asterisk_entries

            from quasr.data.audio import read_audio

            entries, excluded = asterisk_entries(split)
            items = [(e["id"], (lambda e=e: Utterance(e["id"], read_audio(e["audio"]), e["text"], e["speaker"])))
                     for e in entries if keep is None or keep(e["id"])]
            return _materialize(name, items, limit, skip_bad, excluded)
        from quasr.data.manifest import read_manifest_entries
        from quasr.data.tts import ensure_tts

        from quasr.data.tts import reference_check

        path = ensure_tts(split)
        entries, skipped = read_manifest_entries(path, skip_bad)
        entries = [(ln, o) for ln, o in entries if keep is None or keep(o["id"])]
        ds = _materialize(name, _manifest_items(path, entries), limit, skip_bad)
        ds.skipped[:0] = skipped
        ds.meta["audio_differs"] = reference_check(path, split)["differ"]  # from the reference set's bytes
        return ds
    if head == "hf":
        return _load_hf_source(spec, rest, limit, skip_bad)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        return load_manifest(path, limit, skip_bad)
    raise DataError(f"unknown speech source {spec!r}: use a manifest .jsonl path, asterisk[:test|:calib|:all], "
                    f"tts[:test|:calib] or hf:NAME[:SPLIT]")


def _load_hf_source(spec: str, rest: str, limit: int | None, skip_bad: bool) -> Dataset:
    from quasr.data.hf import decode_hf_audio, load_hf

    body, _, query = rest.partition("?")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"config", "audio", "text", "speaker"}
    if unknown:
        raise DataError(f"{spec}: unknown option(s) {', '.join(sorted(unknown))} (use config, audio, text, speaker)")
    name, _, split = body.rpartition(":") if body.count(":") else (body, "", "test")
    name, split = (name or body), (split or "test")
    ds, cols = load_hf(name, split, **opts)

    def make(i: int) -> Utterance:
        row = ds[i]
        where = f"hf:{name}:{split}[{i}]"
        text = row[cols["text"]]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: missing transcript")
        uid = str(row[cols["id"]]) if cols["id"] else f"{Path(name).name}-{split}-{i}"
        speaker = row[cols["speaker"]] if cols["speaker"] else None
        return Utterance(uid, decode_hf_audio(row[cols["audio"]], where), text.strip(),
                         None if speaker is None else str(speaker))

    items = [(f"hf:{name}:{split}[{i}]", (lambda i=i: make(i))) for i in range(len(ds))]
    return _materialize(f"hf:{name}:{split}", items, limit, skip_bad)


__all__ = ["Dataset", "SAMPLE_RATE", "Utterance", "load_manifest", "load_source", "spread"]
