"""Portable numerics: the same recipe gives the same checkpoint on any x86-64 CPU with AVX2.

torch chooses its kernels by the CPU it runs on, in three places: ATen's vectorized kernels (AVX2 or AVX-512,
`ATEN_CPU_CAPABILITY`), MKL's BLAS code path (`MKL_CBWR`) and oneDNN's instruction set (`ONEDNN_MAX_CPU_ISA`).
Each choice changes the last bits of the calibration activations; GPTQ's rounding decisions are sensitive to
them, and one flipped code changes the compensation of every later column and layer. Measured on whisper-tiny.en
GPTQ W4G128 (README, "Run to run"): forcing any one of the three to AVX2 on an AVX-512 machine changes about 8 %
of the codes, and the same recipe scored 11.7 % and 7.9 % WER on two machines. On one machine with the same
settings the result is bit-identical, also under CPU contention.

`pin()` fixes all three to AVX2 (MKL in its strict conditional-numerical-reproducibility mode) before torch is
imported, so a machine with AVX-512 computes what an AVX2-only machine computes. `quasr quantize` calls it
first thing (quantizing tiny.en with GPTQ W4 then takes about 1.3x as long on an AVX-512 machine), and so does
`quasr compare`, so that it compares the checkpoint `quasr quantize` writes (its scoring then runs on the pinned
kernels too: 7 min 14 s against 6 min 25 s unpinned for the default job here); from Python, call
`quasr.numerics.pin()` before importing torch. `quasr eval` and the benchmarks' scoring do not pin: transcribing is 1.5-2x
slower with AVX2 kernels there, and a transcript that differs in the last bits is within what the paired
intervals measure. `QUASR_NUMERICS=native` leaves torch's own choices for quantization too. Values the user
has set in the environment are kept. `state()` says what is in effect; every results record and checkpoint
stores it.
"""
from __future__ import annotations

import os
import sys
import warnings

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MODES = ("portable", "native")


def requested_mode() -> str:
    mode = os.environ.get("QUASR_NUMERICS", "portable").strip().lower() or "portable"
    if mode not in MODES:
        from quasr.errors import UsageError

        raise UsageError(f"QUASR_NUMERICS={mode!r}: use portable or native")
    return mode


def pin(warn: bool = True) -> dict:
    """Pin the kernel choices (see the module docstring) unless QUASR_NUMERICS=native; returns `state()`.
    Has no effect (with a warning unless `warn` is False) once torch is imported: its choices are made at import;
    `state()`, which every record stores, then says "native"."""
    if requested_mode() == "portable":
        if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in PINS.items()):
            if warn:
                warnings.warn("quasr.numerics.pin(): torch is already imported, so its kernels stay as chosen for this "
                              "CPU; results may differ from other machines (call pin() before importing torch)",
                              stacklevel=2)
        else:
            for k, v in PINS.items():
                os.environ.setdefault(k, v)
    return state()


def state() -> dict:
    """What decides the floating-point results here: the mode and the three kernel settings in effect."""
    cap = None
    if "torch" in sys.modules:
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
    env = {k: os.environ.get(k) for k in PINS}
    portable = all(env[k] == v for k, v in PINS.items()) and (cap is None or cap.lower() == "avx2")
    return {"mode": "portable" if portable else "native", "cpu_capability": cap, **env}


__all__ = ["MODES", "PINS", "pin", "requested_mode", "state"]
