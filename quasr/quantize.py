"""The layer-wise quantization engine: `quantize_(asr, QuantConfig(...), calibration_utterances)`.

Walks the model block by block in execution order (encoder blocks on the calibration audio, then decoder
blocks teacher-forced on the calibration transcripts) with two streams of activations: X̂ through the model
whose earlier layers are already quantized, and, for methods that need it, X through the full-precision
model. Each Linear gets streamed statistics only (H = Σ x̂x̂ᵀ, H_Δ = Σ (x − x̂)x̂ᵀ, Σ xxᵀ; O(d²) per layer,
never all activations), then its method's solver runs and the layer's weight is replaced by its quantized
value before later layers are calibrated. With `true_sequential` the Linears of a block are solved group by
group (q/k/v, then out, then fc1, then fc2...), each group seeing the already quantized groups before it.
At the end quantized layers become packed low-bit modules (quasr.quant.modules).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from quasr import numerics
from quasr.memory import fixed_mmap_threshold
from quasr.methods import LayerStats, get_method
from quasr.quant.gptq import asym_errors
from quasr.quant.grid import QuantConfigError, QuantGrid, QuantizedWeight, check_finite, rtn
from quasr.progress import progress_bar

MIN_CALIB = 2


@dataclass
class Block:
    name: str                 # dotted module path, e.g. "model.encoder.layers.0"
    module: torch.nn.Module
    groups: list[list[str]]   # Linear names inside the block, grouped in execution order
    stage: str                # "encoder" | "decoder"


@dataclass
class Stage:
    """One part of a block's forward, cut at a Linear group (an adapter's explicit block walk).

    `inputs(module, state)` is the input shared by the group's Linears; `advance(module, state)` is the state
    after the group (None: unchanged), computed once the group is quantized. States are tuples of tensors.
    """
    names: list[str]
    inputs: Callable
    advance: Callable | None
    frames: bool = False      # the input's rows are encoder frames (an adapter may subsample padding frames)


@dataclass
class QuantConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    mse: bool = False
    signed_max: bool = False             # symmetric grids (weights and embedding): ggml's q4_0/q5_0 scale rule
    act_order: bool = False
    alpha: float | None = None           # QEP / GPTAQ strength (method default when None)
    percdamp: float = 0.01
    embedding_bits: int | None = 8       # tied token embedding / output head; None keeps it FP
    embedding_group_size: int | None = None  # the embedding's groups (None: one per row)
    embedding_sym: bool = True
    embedding_format: str = "affine"         # affine (embedding_bits, groups) | nf4 (blocks of embedding_group_size
    #                                          or 64)
    layers: str = "all"                  # all | encoder | decoder
    true_sequential: bool = True
    encoder_frames: str = "window"       # window (full 30 s, as at inference) | speech (cut after the audio)
    pad_stride: int = 4                  # window mode: statistics from every k-th frame after the speech, weight k
    pad_weight: float = 0.25             # window mode: weight of padding frames against speech frames in the
    #                                      statistics (1: as at inference; 0: speech frames only; 0.25 chosen on
    #                                      calib-dev of tiny.en and base, docs/methods/fade.md)
    variant: str | None = None           # a method's variant (None: its default; see Method.variants)
    act_bits: int | None = None          # quantize every Linear's (and the conv stem's) input: 8 or 4 bits
    act_mode: str = "static"             # static (one calibrated scale a tensor) | dynamic (per token)
    act_calibrator: str = "mse"          # max | percentile | mse | entropy | output-mse | esc
    esc: dict = field(default_factory=dict)  # ESC's search settings (quasr.methods.esc.EscOptions)
    options: dict = field(default_factory=dict)  # a method's own settings (its Method.options dataclass)

    def grid(self) -> QuantGrid:
        return QuantGrid(self.bits, self.group_size, self.sym, self.mse, self.signed_max and self.sym)

    def check(self) -> None:
        """Fail on any setting that cannot work, naming it, before any work is done."""
        import math

        def bad(option: str, message: str):
            raise QuantConfigError(message, option=option)

        try:
            get_method(self.method)
        except QuantConfigError as e:
            bad("method", str(e))
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            bad("bits", f"weight bits must be between 2 and 8, got {self.bits}")
        fixed = get_method(self.method).fixed_bits
        if fixed is not None and self.bits != fixed:
            bad("bits", f"{self.method} stores {fixed} bits a weight; got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            bad("group_size", f"the group size must be a positive number of columns (None: one group per output "
                              f"channel), got {self.group_size}")
        if self.embedding_bits is not None and (not isinstance(self.embedding_bits, int)
                                                or not 2 <= self.embedding_bits <= 8):
            bad("embedding_bits", f"embedding bits must be between 2 and 8 (None keeps the embedding in full "
                                  f"precision), got {self.embedding_bits}")
        if self.embedding_format not in ("affine", "nf4"):
            bad("embedding_format", f"the embedding's format must be affine or nf4, got {self.embedding_format!r}")
        if self.embedding_group_size is not None and (not isinstance(self.embedding_group_size, int)
                                                      or self.embedding_group_size <= 0):
            bad("embedding_group_size", f"the embedding's group size must be a positive number of columns (None: "
                                        f"one group per row), got {self.embedding_group_size}")
        if not (isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp >= 0):
            bad("percdamp", f"damping must be a finite number >= 0, got {self.percdamp}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            bad("alpha", f"the compensation strength alpha must lie in [0, 1], got {self.alpha}")
        if self.layers not in ("all", "encoder", "decoder"):
            bad("layers", f"layers must be all, encoder or decoder, got {self.layers!r}")
        if self.encoder_frames not in ("window", "speech"):
            bad("encoder_frames", f"encoder frames must be window or speech, got {self.encoder_frames!r}")
        if not isinstance(self.pad_stride, int) or self.pad_stride < 1:
            bad("pad_stride", f"the padding-frame stride must be a positive integer, got {self.pad_stride}")
        if not (isinstance(self.pad_weight, (int, float)) and math.isfinite(self.pad_weight) and self.pad_weight >= 0):
            bad("pad_weight", f"the padding-frame weight must be a finite number >= 0, got {self.pad_weight}")
        if self.act_bits is not None:
            from quasr.quant.activations import CALIBRATORS, check_bits

            check_bits(self.act_bits)
            if self.layers != "all":
                bad("act_bits", f"activation quantization covers the whole model (the conv stem and every Linear); "
                                f"it cannot be combined with --layers {self.layers}")
            if self.act_mode not in ("static", "dynamic"):
                bad("act_mode", f"activation mode must be static or dynamic, got {self.act_mode!r}")
            if self.act_calibrator not in CALIBRATORS + ("esc",):
                bad("act_calibrator", f"unknown activation calibrator {self.act_calibrator!r} (choose from "
                                      f"{', '.join(CALIBRATORS + ('esc',))})")
            if self.act_calibrator == "esc":
                from quasr.methods.esc import EscOptions

                EscOptions.from_dict(self.esc).check()
        method = get_method(self.method)
        if self.options and method.options is None:
            bad(next(iter(self.options)), f"{self.method} takes no such option (got {', '.join(self.options)})")
        if method.options is not None:
            self.method_options()
        if self.variant is not None and self.variant not in method.variants:
            bad("variant", f"{self.method} has no variant {self.variant!r}"
                           + (f" (choose from {', '.join(method.variants)})" if method.variants else
                              " (it has no variants)"))

    def method_options(self):
        """The method's settings (its Method.options dataclass, checked), or None if it has none."""
        import dataclasses

        cls = get_method(self.method).options
        if cls is None:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        for k in self.options:
            if k not in known:
                raise QuantConfigError(f"{self.method} has no option {k!r} (it has {', '.join(sorted(known))})",
                                       option=k)
        opts = cls(**self.options)
        if hasattr(opts, "check"):
            opts.check()
        return opts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["esc"] = {k: v for k, v in d["esc"].items() if k != "state"}  # where a search is saved is not the recipe
        return d


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[dict] = field(default_factory=list)   # per layer: name, shape, errors, solver info
    seconds: float = 0.0
    n_calib: int = 0
    calib_ids: list[str] = field(default_factory=list)
    method_info: dict = field(default_factory=dict)    # what the method's prepare_items step reported


@dataclass
class _Run:
    """What every step of one quantize_ call shares."""
    method: object
    cfg: QuantConfig
    quantized: dict
    report: QuantReport
    on_layer: Callable | None
    ctx: object = None        # the method's prepare() result
    asym_errors: bool = False  # also accumulate Σxxᵀ for each layer's asymmetric error (fp-stream methods)
    bar: object = None
    task: object = None


class _Stop(Exception):
    """Raised by a hook once every Linear of the current group has run: the rest of the block is skipped."""


def _rel_err(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ) X̂‖² / ‖W X̂‖², from H = X̂X̂ᵀ alone."""
    d = W - W_hat
    den = ((W @ H) * W).sum().clamp(min=1e-12)
    return float(((d @ H) * d).sum() / den)


def _asym_errs(W: torch.Tensor, W_hat: torch.Tensor, s: LayerStats) -> tuple[float, float]:
    """‖W X − W X̂‖² / ‖W X‖² (inherited: the unquantized W on shifted inputs) and ‖W X − Ŵ X̂‖² / ‖W X‖², from
    Σxxᵀ, Σx̂x̂ᵀ and Σxx̂ᵀ = H_Δ + H (float64: the terms nearly cancel)."""
    norm, (inherited, err) = asym_errors(W, [W, W_hat], s.XX, s.H, s.H_delta + s.H)
    return inherited / max(norm, 1e-12), err / max(norm, 1e-12)


def _new_stats(linears: dict, need_fp: bool, need_xx: bool = False) -> dict[str, LayerStats]:
    """Empty statistics: H always, H_Δ with the full-precision stream, Σxxᵀ (XX) only for the asymmetric-error
    diagnostics (it is one more [in, in] product per utterance, which no solver uses)."""
    stats = {n: LayerStats(torch.zeros(m.in_features, m.in_features)) for n, m in linears.items()}
    if need_fp:
        for n, m in linears.items():
            stats[n].H_delta = torch.zeros(m.in_features, m.in_features)
            if need_xx:
                stats[n].XX = torch.zeros(m.in_features, m.in_features)
    return stats


def _accumulate(s: LayerStats, xh: torch.Tensor, x: torch.Tensor | None, method, item, rows: str | None = None) -> None:
    """Add one utterance's inputs of one Linear (rows are positions) to its statistics; `rows` says what the
    rows are ("tokens": decoder positions, "frames": encoder frames, None: not known)."""
    s.H.addmm_(xh.T, xh)
    s.n += xh.shape[0]
    if x is not None:
        s.H_delta.addmm_((x - xh).T, xh)
        if s.XX is not None:
            s.XX.addmm_(x.T, x)
    if method.accumulate is not None:
        method.accumulate(s, xh, x, item, rows)


def _collect(cal, block: Block, fp_block, names: list[str], items, hq, hf, ctx_q, ctx_f, need_fp: bool,
             method, need_xx: bool = False) -> dict[str, LayerStats]:
    """Run the group's part of the block on every calibration item, accumulating each Linear's statistics."""
    lin_q = {n: block.module.get_submodule(n) for n in names}
    stats = _new_stats(lin_q, need_fp, need_xx)
    fp_inputs: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    current: dict = {}

    def fp_hook(name):
        def hook(mod, inp, out):
            fp_inputs[name] = inp[0].detach().reshape(-1, mod.in_features).float()
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop
        return hook

    def q_hook(name):
        def hook(mod, inp, out):
            xh = inp[0].detach().reshape(-1, mod.in_features).float()
            _accumulate(stats[name], xh, fp_inputs.get(name), method, current["item"])
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop
        return hook

    handles = [m.register_forward_hook(q_hook(n)) for n, m in lin_q.items()]
    if need_fp:
        handles += [fp_block.get_submodule(n).register_forward_hook(fp_hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for i, item in enumerate(items):
                current["item"] = item
                if need_fp:
                    seen.clear()
                    try:
                        cal.run_block(block, fp_block, hf[i], ctx_f[i])
                    except _Stop:
                        pass
                seen.clear()
                try:
                    cal.run_block(block, block.module, hq[i], ctx_q[i])
                except _Stop:
                    pass
                fp_inputs.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def _check_layers(asr, blocks: list[Block], grid: QuantGrid) -> None:
    """Fail before any work on shapes the grid cannot take or on NaN/inf weights, naming the layer."""
    for b in blocks:
        for group in b.groups:
            for n in group:
                w = b.module.get_submodule(n).weight
                try:
                    grid.check(tuple(w.shape), f"{b.name}.{n}")
                except QuantConfigError as e:
                    raise QuantConfigError(str(e), option="group_size") from None
                check_finite(w.detach(), f"{b.name}.{n}")


def quantize_(asr, cfg: QuantConfig, calib=(), progress: bool = True, on_layer=None,
              asym_errors: bool = False) -> QuantReport:
    """Quantize `asr` (an AsrModel) in place and return a per-layer report.

    `calib` is a sequence of Utterances (teacher-forced: audio and reference text). RTN needs none.
    Quantized layers end up as packed low-bit modules; `asr.recipe` records the configuration.
    `asym_errors` (methods with a full-precision stream: qep, gptaq, fade, tarq) adds to every layer's report
    its asymmetric errors ‖WX − WX̂‖² and ‖WX − ŴX̂‖² relative to ‖WX‖² (err_asym_fp, err_asym), at the cost of
    accumulating Σxxᵀ as well: diagnostics only, the weights are the same either way.
    """
    t0 = time.perf_counter()
    fixed_mmap_threshold()
    cfg.check()
    method = get_method(cfg.method)
    grid = cfg.grid()
    cal = asr.calibration(cfg.encoder_frames, cfg.pad_stride, cfg.pad_weight)
    blocks = [b for b in cal.blocks if cfg.layers in ("all", b.stage)]
    _check_layers(asr, blocks, grid)
    if cfg.embedding_bits:
        from quasr.quant.modules import tied_embedding_names

        QuantGrid(cfg.embedding_bits, cfg.embedding_group_size, cfg.embedding_sym).check(
            tuple(asr.model.get_input_embeddings().weight.shape), "token embedding")
        if tied_embedding_names(asr.model) is None:
            raise QuantConfigError(f"{type(asr.model).__name__}: embedding_bits={cfg.embedding_bits} needs an output "
                                   "projection tied to the token embedding; this model's is not tied (use "
                                   "embedding_bits=None, --embedding-bits 0)")
    calib = list(calib)
    need = max(MIN_CALIB, method.min_calib)
    if method.needs_calibration and len(calib) < need:
        raise QuantConfigError(f"{cfg.method} needs calibration utterances: got {len(calib)}, need at least "
                               f"{need} (use --calib and --n-calib)", option="n_calib")
    # the draw is recorded whenever anything calibrated on it: the weights, or static activation scales (and ESC)
    uses_calib = method.needs_calibration or (cfg.act_bits is not None and cfg.act_mode == "static")
    report = QuantReport(cfg, n_calib=len(calib) if uses_calib else 0,
                         calib_ids=[u.id for u in calib] if uses_calib else [])
    quantized: dict[str, QuantizedWeight] = {}
    run = _Run(method, cfg, quantized, report, on_layer, asym_errors=asym_errors)
    if method.prepare is not None:
        run.ctx = method.prepare({f"{b.name}.{n}": b.module.get_submodule(n).weight.detach().float()
                                  for b in blocks for n in sum(b.groups, [])}, cfg)

    embed = asr.model.get_input_embeddings()
    fp_embed = embed.weight.detach().clone()
    if cfg.embedding_bits:
        name = "model.decoder.embed_tokens"
        check_finite(fp_embed, name)
        if cfg.embedding_format == "nf4":
            from quasr.quant.formats import nf4_quantize

            qe = nf4_quantize(fp_embed, cfg.embedding_group_size or 64, name=name)
        else:
            qe = rtn(fp_embed, QuantGrid(cfg.embedding_bits, cfg.embedding_group_size, cfg.embedding_sym, cfg.mse,
                                         signed_max=cfg.signed_max and cfg.embedding_sym), name)
        with torch.no_grad():
            embed.weight.copy_(qe.dequantize())  # tied: the output head sees the quantized rows too
        quantized[name] = qe
        report.layers.append({"name": name, "shape": list(fp_embed.shape), "bits": cfg.embedding_bits,
                              "group_size": cfg.embedding_group_size, "format": cfg.embedding_format,
                              "method": "rtn", "seconds": 0.0})

    n_linears = sum(len(g) for b in blocks for g in b.groups)
    with progress_bar(progress) as bar:
        run.bar, run.task = bar, bar.add_task(f"{cfg.method} W{cfg.bits}" + (f"G{cfg.group_size}" if cfg.group_size
                                                                              else ""), total=n_linears)
        if not method.needs_calibration:
            for b in blocks:
                for n in sum(b.groups, []):
                    _solve_layer(run, b, n, None)
                    bar.advance(run.task)
        else:
            _walk(asr, cal, blocks, calib, run, fp_embed)

    pack_model(asr.model, quantized)
    if cfg.act_bits is not None:
        report.method_info["activations"] = calibrate_inputs(asr, cfg, calib, progress)
    report.seconds = time.perf_counter() - t0
    asr.method, asr.bits, asr.group_size = cfg.method, cfg.bits, cfg.group_size
    asr.recipe = {**cfg.to_dict(), "alpha": cfg.alpha if cfg.alpha is not None else method.default_alpha,
                  "variant": cfg.variant or method.default_variant,
                  "n_calib": report.n_calib, "calib_ids": report.calib_ids, "numerics": numerics.state(),
                  "asym_errors": asym_errors,  # diagnostics only (and their cost in quant_seconds)
                  **({"method_info": report.method_info} if report.method_info else {})}
    return report


ACT_CALIB_UTTS = 32  # calibration utterances whose activations set the static scales (a seeded subset)


def input_quant_modules(asr) -> dict[str, torch.nn.Module]:
    """Every module whose input is quantized: the packed Linears and the conv stem (wrapped on first call)."""
    from quasr.quant.modules import QuantizedInput, QuantizedLinear, replace_module

    enc = asr.model.model.encoder
    for name in ("conv1", "conv2"):
        m = getattr(enc, name)
        if not isinstance(m, QuantizedInput):
            replace_module(asr.model, f"model.encoder.{name}", QuantizedInput(m, 8))
    return {n: m for n, m in asr.model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedInput))}


def collect_inputs(asr, utts, modules: dict, capacity: int = 1024, seed: int = 0, progress: bool = True):
    """RowSamplers of each module's input over teacher-forced forward passes on `utts`."""
    from quasr.quant.activations import RowSampler

    samplers = {n: RowSampler(capacity, seed) for n in modules}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            samplers[name].add(x.transpose(1, 2) if x.dim() == 3 and name.endswith(("conv1", "conv2")) else x)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.inference_mode(), progress_bar(progress) as bar:
            task = bar.add_task("activations", total=len(utts))
            for i in range(0, len(utts), 4):
                batch = asr.training_batch(utts[i:i + 4])
                asr.model(**{k: v for k, v in batch.items() if k != "labels"})
                bar.advance(task, len(utts[i:i + 4]))
    finally:
        for h in handles:
            h.remove()
    return samplers


def calibrate_inputs(asr, cfg: QuantConfig, calib, progress: bool = True) -> dict:
    """Quantize every Linear's and the conv stem's input to cfg.act_bits (symmetric): dynamic per-token
    scales, or static scales from a calibrator over the calibration set's activations (ESC searches them
    further). Returns what was done (stored in the recipe)."""
    import random

    from quasr.quant.activations import calibrate
    from quasr.quant.modules import QuantizedInput

    modules = input_quant_modules(asr)
    for m in modules.values():
        if isinstance(m, QuantizedInput):
            m.act_bits, m.act_mode = cfg.act_bits, cfg.act_mode
        else:
            m.set_input_quant(None)
    info = {"bits": cfg.act_bits, "mode": cfg.act_mode, "modules": len(modules)}
    if cfg.act_mode == "dynamic":
        for m in modules.values():
            if not isinstance(m, QuantizedInput):
                m.set_input_quant(cfg.act_bits, "dynamic")
        return info
    calib = list(calib)
    if not calib:
        raise QuantConfigError("static activation scales need calibration utterances (use --calib, or "
                               "--act-mode dynamic)", option="n_calib")
    sample = sorted(random.Random(0).sample(calib, min(ACT_CALIB_UTTS, len(calib))), key=lambda u: u.id)
    samplers = _collect_float(asr, sample, modules, progress)  # every input unquantized while it is observed
    local = "output-mse" if cfg.act_calibrator == "esc" else cfg.act_calibrator
    scales = {}
    for n, m in modules.items():
        w = m.dequantize() if not isinstance(m, QuantizedInput) else None
        # the conv stem has no Linear weight: its output-MSE scale falls back to the input's own MSE
        scales[n] = calibrate(samplers[n], n, cfg.act_bits, "mse" if w is None and local == "output-mse" else local,
                              weight=w)
    apply_scales(modules, scales, cfg.act_bits)
    info.update(calibrator=cfg.act_calibrator, calibration_utterances=len(sample),
                calibration_ids=[u.id for u in sample])
    if cfg.act_calibrator == "esc":
        from quasr.methods.esc import EscOptions, search

        info["esc"] = search(asr, modules, scales, calib, EscOptions.from_dict(cfg.esc), cfg, progress)
    return info


def _collect_float(asr, utts, modules, progress):
    """Input statistics with every input unquantized (conv stem wrappers pass through)."""
    from quasr.quant.modules import QuantizedInput

    saved = {}
    for n, m in modules.items():
        if isinstance(m, QuantizedInput):
            saved[n] = m.forward
            m.forward = (lambda mm: (lambda x: mm.inner(x)))(m)
    try:
        return collect_inputs(asr, utts, modules, progress=progress)
    finally:
        for n, f in saved.items():
            del modules[n].forward


def apply_scales(modules: dict, scales: dict[str, float], bits: int) -> None:
    from quasr.quant.modules import QuantizedInput

    for n, m in modules.items():
        if isinstance(m, QuantizedInput):
            m.act_bits, m.act_mode = bits, "static"
            m.input_scale.fill_(float(scales[n]))
        else:
            m.set_input_quant(bits, "static", scales[n])


def pack_model(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Replace each quantized layer by its packed low-bit module (the tied embedding and head by one copy)."""
    from quasr.quant.modules import QuantizedLinear, replace_module, replace_tied_embedding, tied_embedding_names

    tied = tied_embedding_names(model)
    for name, qw in quantized.items():
        if tied and name == tied[0]:
            replace_tied_embedding(model, qw)
        elif isinstance(model.get_submodule(name), torch.nn.Linear):
            replace_module(model, name, QuantizedLinear.from_linear(model.get_submodule(name), qw))
        else:
            raise QuantConfigError(f"{name}: cannot pack a {type(model.get_submodule(name)).__name__}")


def _solve_layer(run: _Run, block: Block, n: str, stats: LayerStats | None):
    method, cfg = run.method, run.cfg
    lin = block.module.get_submodule(n)
    full = f"{block.name}.{n}"
    W = lin.weight.detach().float().clone()
    t = time.perf_counter()
    qw, info = method.solve(W, stats, cfg, full, run.ctx)
    W_hat = qw.dequantize()
    row = {"name": full, "shape": list(W.shape), "bits": cfg.bits, "group_size": cfg.group_size,
           "method": cfg.method, "seconds": round(time.perf_counter() - t, 3),
           **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}}
    if stats is not None:
        row["err_rtn"] = _rel_err(W, rtn(W, cfg.grid(), full).dequantize(), stats.H)
        row["err"] = _rel_err(W, W_hat, stats.H)
        if stats.XX is not None:
            row["err_asym_fp"], row["err_asym"] = _asym_errs(W, W_hat, stats)
    with torch.no_grad():
        lin.weight.copy_(W_hat.to(lin.weight.dtype))
    run.quantized[full] = qw
    run.report.layers.append(row)
    if run.on_layer:
        run.on_layer(row)


def _walk(asr, cal, blocks, calib, run: _Run, fp_embed):
    method, cfg, bar, task = run.method, run.cfg, run.bar, run.task
    need_fp = method.needs_fp_stream
    items = cal.prepare(calib)
    for i, item in enumerate(items):
        item["index"] = i  # its place in the calibration set (methods may split the set by it)
    if method.prepare_items is not None:
        run.report.method_info = method.prepare_items(items, cfg) or {}
    stage = None
    hq = hf = ctx_q = ctx_f = None
    for block in blocks:
        with torch.inference_mode():
            if block.stage != stage:
                if block.stage == "encoder":
                    hq = [cal.encoder_input(it) for it in items]
                    hf = list(hq) if need_fp else None
                    ctx_q = ctx_f = [None] * len(items)
                else:
                    if stage is None:  # decoder only: the encoder stays full precision
                        enc = asr.model.model.encoder
                        hq = [cal.encoder_input(it) for it in items]
                        for layer in enc.layers:
                            hq = [layer(h, None) for h in hq]
                        hf = hq
                    ctx_q = [cal.encoder_output(h) for h in hq]
                    ctx_f = [cal.encoder_output(h) for h in hf] if need_fp else ctx_q
                    hq = [cal.decoder_input(it) for it in items]
                    hf = [cal.decoder_input(it, fp_embed) for it in items] if need_fp else None
                stage = block.stage
        fp_block = copy.deepcopy(block.module) if need_fp else None
        stages = cal.stages(block) if cfg.true_sequential and hasattr(cal, "stages") else None
        if stages:
            hq, hf = _walk_stages(cal, block, fp_block, stages, items, hq, hf, ctx_q, ctx_f, run)
            continue
        groups = block.groups if cfg.true_sequential else [sum(block.groups, [])]
        for group in groups:
            bar.update(task, description=f"{cfg.method} {block.name}.{group[0].split('.')[0]}")
            stats = _collect(cal, block, fp_block, group, items, hq, hf, ctx_q, ctx_f, need_fp, method,
                             run.asym_errors)
            for n in group:
                _solve_layer(run, block, n, stats[n])
                bar.advance(task)
            del stats
        with torch.inference_mode():
            hq = [cal.run_block(block, block.module, h, c) for h, c in zip(hq, ctx_q)]
            if need_fp:
                hf = [cal.run_block(block, fp_block, h, c) for h, c in zip(hf, ctx_f)]


def _walk_stages(cal, block, fp_block, stages, items, hq, hf, ctx_q, ctx_f, run: _Run):
    """Sequential calibration of one block through its adapter's stages: each part of the forward runs once per
    stream (instead of re-running the block up to every group), keeping only the per-utterance stage state."""
    method, cfg, bar, task = run.method, run.cfg, run.bar, run.task
    need_fp = fp_block is not None
    sq = [(h,) if c is None else (h, c) for h, c in zip(hq, ctx_q)]
    sf = [(h,) if c is None else (h, c) for h, c in zip(hf, ctx_f)] if need_fp else None
    hq.clear()  # the states own the block inputs now: each is freed once its stage has moved past it
    if need_fp:
        hf.clear()
    for st in stages:
        bar.update(task, description=f"{cfg.method} {block.name}.{st.names[0].split('.')[0]}")
        stats = _new_stats({n: block.module.get_submodule(n) for n in st.names}, need_fp, run.asym_errors)
        with torch.inference_mode():
            for i, item in enumerate(items):
                xh = st.inputs(block.module, sq[i])
                xh = xh.reshape(-1, xh.shape[-1]).float()
                x = st.inputs(fp_block, sf[i]).reshape(xh.shape).float() if need_fp else None
                rows = cal.frame_rows(item) if st.frames else None
                if rows is not None:  # weighted subsample: Σ w·x x̂ᵀ over the kept rows, w = rows each stands for
                    idx, sw = rows
                    xh = xh[idx] * sw[:, None]
                    x = x[idx] * sw[:, None] if x is not None else None
                # the group's Linears share one input: accumulate once
                _accumulate(stats[st.names[0]], xh, x, method, item, "frames" if st.frames else "tokens")
        for n in st.names[1:]:
            stats[n] = copy.deepcopy(stats[st.names[0]])
        for n in st.names:
            _solve_layer(run, block, n, stats[n])
            bar.advance(task)
        del stats
        if st.advance is not None:
            with torch.inference_mode():
                for i in range(len(items)):
                    sq[i] = st.advance(block.module, sq[i])
                    if need_fp:
                        sf[i] = st.advance(fp_block, sf[i])
    return [s[0] for s in sq], ([s[0] for s in sf] if need_fp else None)
