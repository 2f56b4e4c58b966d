"""Shared fixtures: real bundled models and real asterisk speech, loaded once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

ASTERISK_WAV = Path("/usr/share/asterisk/sounds/en_US_f_Allison")


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from quasr.models.whisper import quiet_transformers

    quiet_transformers()


@pytest.fixture(scope="session")
def tiny():
    from quasr.models import load_model

    return load_model("whisper-tiny.en")


@pytest.fixture(scope="session")
def asterisk_files():
    if not ASTERISK_WAV.is_dir():
        pytest.skip("Debian asterisk-core-sounds-en-wav is not installed (scripts/setup.sh installs it)")
    return sorted(ASTERISK_WAV.glob("*.wav"))
