"""Where quasr keeps converted models and generated speech: $QUASR_CACHE, else ~/.cache/quasr."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("QUASR_CACHE") or Path.home() / ".cache" / "quasr")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
