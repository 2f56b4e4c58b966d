"""A short probe of what quasr's calibration computes, as hashes: run it on two machines (or under
`qemu-x86_64 -cpu Haswell` to emulate an AVX2-only CPU) and compare the lines.

    python scripts/numerics_probe.py            # portable numerics (quasr.numerics.pin)
    QUASR_NUMERICS=native python scripts/numerics_probe.py
    qemu-x86_64 -cpu Haswell .venv/bin/python scripts/numerics_probe.py --small   # an emulated AVX2 CPU

It loads whisper-tiny.en, computes the log-mel features of three asterisk prompts, runs the conv stem and all
encoder layers on their speech frames (MKL GEMMs, oneDNN convolutions, ATen layer norm / GELU / attention),
accumulates H = Σ x xᵀ at the last layer's fc1 and quantizes that layer with GPTQ W4G128 (MKL Cholesky). Each
stage prints a sha256 of its bytes: identical lines mean bit-identical results.
"""
from __future__ import annotations

import hashlib
import sys

from quasr import numerics

state = numerics.pin()

import torch  # noqa: E402

from quasr.data import load_source  # noqa: E402
from quasr.models import load_model  # noqa: E402
from quasr.quant.gptq import gptq  # noqa: E402
from quasr.quant.grid import QuantGrid  # noqa: E402


def h(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    small = "--small" in sys.argv  # one prompt, 100 frames, the first layer: minutes under CPU emulation
    print("numerics", numerics.state())
    asr = load_model("whisper-tiny.en")
    utts = load_source("asterisk:calib", limit=1 if small else 3).utterances
    fe = asr.processor.feature_extractor
    feats = fe([u.audio for u in utts], sampling_rate=16000, return_tensors="pt").input_features
    print("features", h(feats))
    enc = asr.model.model.encoder
    last = enc.layers[0] if small else enc.layers[-1]
    H = torch.zeros(last.fc1.in_features, last.fc1.in_features)
    with torch.inference_mode():
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        print("conv stem", h(x))
        x = (x + enc.embed_positions.weight[: x.shape[1]])[:, :100 if small else 400]
        layers = enc.layers[:1] if small else enc.layers
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:
                a = layer.final_layer_norm(x + 0)  # the fc1 input of the last layer, before the layer runs
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        a = a.reshape(-1, a.shape[-1]).float()
        H.addmm_(a.T, a)
        print("encoder output", h(x))
        print("H", h(H))
    qw, _ = gptq(last.fc1.weight.detach().float(), H, QuantGrid(4, 128))
    print("gptq codes", h(qw.codes), "scales", h(qw.scales))


if __name__ == "__main__":
    main()
