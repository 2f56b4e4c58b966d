"""Layer-wise quantization methods: each shapes the metric and the target; the GPTQ solver is shared.

A method is one small file that registers a `Method`:

    register(Method("gptq", solve=solve))

`solve(W, stats, cfg, name, ctx)` gets a layer's full-precision weight [out, in], its calibration statistics
(`LayerStats`: H = Σ x̂x̂ᵀ over the partially quantized model's inputs, and when `needs_fp_stream`,
H_Δ = Σ (x − x̂) x̂ᵀ and Σ x xᵀ from the full-precision model's inputs) and returns (QuantizedWeight, info);
numbers in `info` go into the layer's row of the report and the checkpoint's diagnostics.

Declared steps a method may add (the engine calls them; no other hooks):
    accumulate(stats, xh, x, item, rows)
                                     more statistics of a layer input, per calibration item (rows are positions;
                                     x is None without the full-precision stream; item["index"] is the item's
                                     place in the calibration set; `rows` is "tokens" for decoder positions,
                                     "frames" for encoder frames, None if unknown); kept in stats.extra. The
                                     Linears that read the same input share one accumulation.
    prepare_items(items, cfg) -> dict
                                     once, on the prepared calibration items (e.g. to tag token positions);
                                     what it returns goes into the recipe.
    prepare(weights, cfg) -> ctx     once before the walk, over {layer name: full-precision weight} of every
                                     layer to quantize (for statistics normalized across layers); ctx goes to
                                     every solve call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class LayerStats:
    H: torch.Tensor                       # Σ x̂ x̂ᵀ  [in, in]
    n: int = 0                            # positions summed
    H_delta: torch.Tensor | None = None   # Σ (x − x̂) x̂ᵀ  [in, in]
    XX: torch.Tensor | None = None        # Σ x xᵀ  [in, in] (only for the asym_errors diagnostics)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    solve: Callable
    needs_calibration: bool = True
    needs_fp_stream: bool = False        # H_Δ needs the full-precision model's inputs too
    default_alpha: float | None = None
    doc: str = ""
    min_calib: int = 2                   # calibration utterances it needs at least
    accumulate: Callable | None = None   # see the module docstring
    prepare: Callable | None = None
    prepare_items: Callable | None = None
    options: type | None = None          # a dataclass of the method's own settings (QuantConfig.options)
    fixed_bits: int | None = None        # a format with one width (nf4: 4)
    default_group_size: int = 128        # what the command line uses when --group-size is not given
    variants: tuple[str, ...] = ()       # names accepted by QuantConfig.variant (the first is the default)
    default_variant: str | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    from quasr.methods import fade, gptaq, gptq, nf4, qep, rtn, tarq  # noqa: F401  (registration)
    from quasr.quant.grid import QuantConfigError

    if name not in METHODS:
        raise QuantConfigError(f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]
