"""Relative weight error of 4-bit round-to-nearest in groups of 32 on a model's Linears, per grid rule.

    python scripts/ggml_grid_error.py [MODEL]      # default whisper-tiny.en

quasr's plain symmetric grid (scale 2·max|w|/15, zero 8), ggml's q4_0 rule (QuantGrid.signed_max: d = m/−8, m the
group's signed largest weight), the same with the MSE search of each group's d (`--mse`), and the asymmetric grid
(q4_1's) without and with the search: mean over Linears of ||Q(W) − W||² / ||W||².
docs/deploy.md quotes its output for whisper-tiny.en.
"""
from __future__ import annotations

import sys

import torch

from quasr.models import load_model
from quasr.quant.grid import QuantGrid, rtn

GRIDS = {"quasr symmetric": QuantGrid(4, 32, sym=True), "ggml q4_0 (signed_max)": QuantGrid(4, 32, sym=True, signed_max=True),
         "ggml q4_0 + MSE search": QuantGrid(4, 32, sym=True, mse=True, signed_max=True),
         "asymmetric (q4_1)": QuantGrid(4, 32, sym=False),
         "asymmetric + MSE search": QuantGrid(4, 32, sym=False, mse=True)}


def main() -> None:
    asr = load_model(sys.argv[1] if len(sys.argv) > 1 else "whisper-tiny.en")
    total, n = dict.fromkeys(GRIDS, 0.0), 0
    for name, m in asr.model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight.shape[1] % 32 == 0 and "proj_out" not in name:
            W = m.weight.detach().float()
            for k, g in GRIDS.items():
                total[k] += float(((rtn(W, g).dequantize() - W) ** 2).sum() / (W ** 2).sum())
            n += 1
    for k, v in total.items():
        print(f"{k:24s} {v / n:.5f}")
    print(f"({n} Linears)")


if __name__ == "__main__":
    main()
