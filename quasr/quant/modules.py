"""Quantized modules that keep their weights packed in memory and dequantize on the fly.

    QuantizedLinear     nn.Linear replacement: `bits` bits a weight plus a float16 scale (and a packed zero
                        point when asymmetric) per row and group
    QuantizedEmbedding  nn.Embedding replacement (default 8-bit, one scale per row); a lookup dequantizes only
                        the rows it reads
    TiedQuantizedHead   the output projection of a model whose head is tied to its token embedding
                        (Whisper's proj_out): shares the QuantizedEmbedding's buffers, holds no copy

Buffers (what a checkpoint stores): `weight_packed` uint8 [rows, cols*bits/8] (quasr.quant.pack's planar
layout of the codes, original column order), `weight_scale` [rows, n_groups] (float16 by default),
`weight_zero` uint8 [rows, ceil(n_groups*bits/8)] (pack_stream) or None when symmetric (zero = 2**(bits-1)),
and for the linear an optional float32 `bias`. The weight is w = scale * (code - zero), as in
quasr.quant.grid.

No dequantized weight is cached. For the few-row inputs of autoregressive decoding, a weight larger than
8 MB in float32 (Whisper's tied vocabulary head) is multiplied in chunks of output rows, each dequantized
into a cache-sized buffer, so a step reads the packed bytes once instead of writing and reading a
full-precision copy; smaller weights are dequantized whole. (torch 2.13's CPU low-bit kernels,
_weight_int4pack_mm_for_cpu and _weight_int8pack_mm, were measured slower than this for float32 inputs on
Whisper's shapes and are not used.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quasr.quant.formats import Affine, StorageFormat, format_of
from quasr.quant.grid import QuantConfigError, QuantGrid, QuantizedWeight

CHUNK_BYTES = 1 << 22   # dequantized rows per chunk: about this many bytes of float32
CHUNK_MAX_ROWS = 64     # inputs with at most this many rows (tokens) use the chunked matmul...
CHUNK_MIN_BYTES = 1 << 23  # ...for weights larger than this in float32 (smaller ones dequantize at once)


class _PackedRows(nn.Module):
    """Shared storage of a quantized [rows, cols] matrix (rows: outputs, or the vocabulary), in a storage format
    (quasr.quant.formats: affine codes by default, or NF4) whose buffers it registers and asks to dequantize."""

    def __init__(self, rows: int, cols: int, bits: int | None = None, group_size: int | None = None, sym: bool = False,
                 scale_dtype: torch.dtype = torch.float16, device=None, fmt: StorageFormat | None = None):
        super().__init__()
        fmt = fmt or Affine(int(bits), group_size, bool(sym))
        if isinstance(fmt, Affine):
            QuantGrid(fmt.bits, fmt.group_size, fmt.sym).check((rows, cols), type(self).__name__)
        if fmt.group_size is not None and fmt.group_size > cols:
            raise QuantConfigError(f"group size {fmt.group_size} exceeds the input width {cols}")
        if fmt.group_size is not None and cols % fmt.group_size:
            raise QuantConfigError(f"{type(self).__name__}: group size {fmt.group_size} does not divide {cols}")
        self.fmt = fmt
        self.rows, self.cols = int(rows), int(cols)
        self._buffer_names = []
        for name, t in fmt.buffers(rows, cols, scale_dtype, device).items():
            self.register_buffer(name, t)
            self._buffer_names.append(name)

    # -- construction -------------------------------------------------------------------------------------

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def group_size(self) -> int | None:
        return self.fmt.group_size

    @property
    def sym(self) -> bool:
        return self.fmt.sym

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size is None else self.cols // self.group_size

    # what peft looks for on a quantized layer it wraps with LoRA (its device, and the layer's widths)
    @property
    def qweight(self) -> torch.Tensor:
        return self.weight_packed

    @property
    def input_size(self) -> int:
        return self.cols

    @property
    def output_size(self) -> int:
        return self.rows

    @property
    def grid(self) -> QuantGrid:
        if not isinstance(self.fmt, Affine):
            raise QuantConfigError(f"a {self.fmt.name} matrix has no affine grid")
        return QuantGrid(self.bits, self.group_size, self.sym)

    def _bufs(self) -> dict:
        return {n: getattr(self, n) for n in self._buffer_names}

    def _fill(self, qw) -> None:
        rows, cols = qw.shape
        if (rows, cols) != (self.rows, self.cols):
            raise QuantConfigError(f"quantized weight shape {(rows, cols)} != module shape {(self.rows, self.cols)}")
        if isinstance(self.fmt, Affine):
            if tuple(qw.scales.shape) != (rows, self.n_groups) or tuple(qw.zeros.shape) != (rows, self.n_groups):
                raise QuantConfigError(f"scales/zeros of shape {tuple(qw.scales.shape)}/{tuple(qw.zeros.shape)} "
                                       f"do not match {rows} rows x {self.n_groups} groups")
            if not torch.isfinite(qw.scales).all():
                raise QuantConfigError("quantized weight has NaN or infinite scales")
        dev = self.weight_packed.device
        for name, t in self.fmt.fill(qw).items():
            old = getattr(self, name)
            if t is None or old is None:
                setattr(self, name, t)
                continue
            t = t.detach().to(old.dtype)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise QuantConfigError(f"{name} overflows {old.dtype}")
            setattr(self, name, t.to(dev).contiguous())

    # -- dequantization -----------------------------------------------------------------------------------

    def _dequantize_rows(self, r0: int, r1: int, dtype) -> torch.Tensor:
        return self.fmt.dequantize(self._bufs(), r0, r1, self.cols, dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The full [rows, cols] weight (for tests and export; forward never builds it for few-row inputs)."""
        return self._dequantize_rows(0, self.rows, dtype)

    def quantized_weight(self):
        """Back to the format's quantized-weight form (affine: quasr.quant.grid's QuantizedWeight)."""
        return self.fmt.quantized_weight(self._bufs(), self.rows, self.cols)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T (+ bias) over the last dim of x, W dequantized to x's dtype."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        n_tokens = x.numel() // self.cols if self.cols else 0
        if n_tokens > CHUNK_MAX_ROWS or 4 * self.rows * self.cols <= CHUNK_MIN_BYTES:
            return F.linear(x, self.dequantize(dtype), bias)
        x2 = x.reshape(-1, self.cols)
        out = x2.new_empty(x2.shape[0], self.rows)
        step = max(16, CHUNK_BYTES // (4 * self.cols))
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            out[:, r0:r1] = F.linear(x2, self._dequantize_rows(r0, r1, dtype))
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], self.rows)

    # -- memory -------------------------------------------------------------------------------------------

    def storage_nbytes(self) -> int:
        """Bytes of the quantized weight: every buffer of its format (codes, scales, zeros...; no bias)."""
        return sum(t.nbytes for t in self._bufs().values() if t is not None)

    def bits_per_weight(self) -> float:
        return 8 * self.storage_nbytes() / (self.rows * self.cols)

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bfloat16) would round the stored scales again (lossy for float16 -> bfloat16):
        # device moves apply, dtype conversions do not touch the quantized storage.
        before = {n: t for n, t in self._bufs().items() if t is not None}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                setattr(self, n, old.to(device=new.device))
        return self

    def _spec(self) -> str:
        if not isinstance(self.fmt, Affine):
            return f"{self.fmt.name}, block {self.fmt.group_size}" + (", double quant" if getattr(
                self.fmt, "double_quant", False) else "")
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"bits={self.bits}, {g}, {'sym' if self.sym else 'asym'}"


def int8_codes_t(m: "_PackedRows") -> tuple[torch.Tensor, torch.Tensor]:
    """(signed int8 codes transposed to [in, out], per-row scales as [1, out]) of an 8-bit symmetric per-row
    packed weight: the operands of an int8 matrix product (an extra int8 copy of the weight)."""
    from quasr.quant.pack import unpack

    codes = (unpack(m.weight_packed, 8, m.cols).to(torch.int16) - 128).to(torch.int8)
    return codes.T.contiguous(), m.weight_scale.float().reshape(1, -1)


def int8_matmul(xq: torch.Tensor, wq_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [K, N] -> int32 [M, N] with torch._int_mm (on CUDA it wants more than 16 rows in
    multiples of 8: there the rows are zero-padded and cut again; the CPU kernel takes any number)."""
    if not xq.is_cuda:
        return torch._int_mm(xq, wq_t)
    pad = (-xq.shape[0]) % 8
    if xq.shape[0] + pad <= 16:
        pad += 24 - (xq.shape[0] + pad)
    xp = torch.nn.functional.pad(xq, (0, 0, 0, pad)) if pad else xq
    return torch._int_mm(xp, wq_t)[: xq.shape[0]]


class QuantizedLinear(_PackedRows):
    """A Linear whose weight is stored packed (see the module docstring); forward == F.linear on the
    dequantized weight."""

    def __init__(self, in_features: int, out_features: int, bits: int | None = None, group_size: int | None = None,
                 sym: bool = False, bias: bool = True, scale_dtype: torch.dtype = torch.float16, device=None,
                 fmt: StorageFormat | None = None):
        super().__init__(out_features, in_features, bits, group_size, sym, scale_dtype, device, fmt)
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bias", None)

    @classmethod
    def from_weight(cls, qw, bias: torch.Tensor | None = None,
                    scale_dtype: torch.dtype = torch.float16) -> "QuantizedLinear":
        out_f, in_f = qw.shape
        m = cls(in_f, out_f, bias=bias is not None, scale_dtype=scale_dtype, device=qw.codes.device,
                fmt=format_of(qw))
        m._fill(qw)
        if bias is not None:
            if tuple(bias.shape) != (out_f,):
                raise QuantConfigError(f"bias of shape {tuple(bias.shape)} for {out_f} outputs")
            m.bias = bias.detach().to(torch.float32).clone()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw,
                    scale_dtype: torch.dtype = torch.float16) -> "QuantizedLinear":
        if tuple(qw.shape) != (linear.out_features, linear.in_features):
            raise QuantConfigError(f"quantized weight {qw.shape} does not fit {linear}")
        return cls.from_weight(qw, linear.bias, scale_dtype)

    # -- quantized inputs (activation quantization) -------------------------------------------------------

    act_bits: int | None = None
    act_mode: str = "static"
    int8: bool = False  # run W8A8 as int8 matrix products (see int8_ready)

    def set_input_quant(self, bits: int | None, mode: str = "static", scale: float | None = None) -> None:
        """Quantize this layer's input to `bits` (4 or 8, symmetric): "static" with one scale (a buffer,
        `input_scale`, stored in checkpoints) or "dynamic" per token; None turns it off."""
        from quasr.quant.activations import check_bits

        if bits is None:
            self.act_bits = None
            return
        check_bits(bits)
        if mode not in ("static", "dynamic"):
            raise QuantConfigError(f"activation mode must be static or dynamic, got {mode!r}")
        self.act_bits, self.act_mode = int(bits), mode
        if "input_scale" not in self._buffers:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=self.weight_packed.device))
        if scale is not None:
            self.input_scale.fill_(float(scale))

    def int8_ready(self) -> bool:
        """Whether int8 matrix products compute this layer exactly as its fake-quantized arithmetic: 8-bit
        symmetric per-row weight codes and a static 8-bit input scale."""
        return (isinstance(self.fmt, Affine) and self.fmt.bits == 8 and self.fmt.group_size is None and self.fmt.sym
                and self.act_bits == 8 and self.act_mode == "static")

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        from quasr.quant.activations import dynamic_scale, fake_quant

        if self.act_bits is None:
            return x
        scale = self.input_scale if self.act_mode == "static" else dynamic_scale(x, self.act_bits)
        return fake_quant(x, scale.to(x.dtype), self.act_bits)

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = (round(x / s_x) · (code − 128)ᵀ) · s_x · s_w + b with int8 operands and int32 accumulation."""
        s_x = float(self.input_scale)
        x2 = x.reshape(-1, self.cols)
        xq = x2.div(s_x).round_().clamp_(-127, 127).to(torch.int8)  # in place: half the passes of round(x / s)
        if getattr(self, "_wq_t", None) is None:  # int8 codes [in, out], made once
            self._wq_t, self._w_scale = int8_codes_t(self)
        y = int8_matmul(xq, self._wq_t).to(torch.float32) * (s_x * self._w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 and self.int8_ready():
            return self._int8_forward(x)
        return self._matmul(self._quant_input(x), self.bias)

    def extra_repr(self) -> str:
        act = "" if self.act_bits is None else f", input int{self.act_bits} {self.act_mode}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self._spec()}{act}, "
                f"bias={self.bias is not None}")


class QuantizedEmbedding(_PackedRows):
    """A token embedding stored packed; a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int | None = None,
                 sym: bool = True, padding_idx: int | None = None, scale_dtype: torch.dtype = torch.float16,
                 device=None, dtype: torch.dtype = torch.float32, fmt: StorageFormat | None = None):
        super().__init__(num_embeddings, embedding_dim, bits, group_size, sym, scale_dtype, device, fmt)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.output_dtype = dtype  # follows model.half()/.float()/.to(dtype), see _apply

    @classmethod
    def from_weight(cls, qw, padding_idx: int | None = None,
                    scale_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32):
        v, d = qw.shape
        m = cls(v, d, padding_idx=padding_idx, scale_dtype=scale_dtype, device=qw.codes.device, dtype=dtype,
                fmt=format_of(qw))
        m._fill(qw)
        return m

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qw, scale_dtype: torch.dtype = torch.float16):
        if tuple(qw.shape) != tuple(emb.weight.shape):
            raise QuantConfigError(f"quantized weight {qw.shape} does not fit {emb}")
        return cls.from_weight(qw, emb.padding_idx, scale_dtype, dtype=emb.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.fmt.select_rows(self._bufs(), input_ids.reshape(-1), self.cols, self.output_dtype)
        return rows.reshape(*input_ids.shape, self.cols)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self.output_dtype))
        super()._apply(fn, recurse)
        if probe.is_floating_point():
            self.output_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._spec()}, padding_idx={self.padding_idx}"


class QuantizedInput(nn.Module):
    """A module (the convolution stem) whose input is quantized to a symmetric integer grid first: `inner` is the
    wrapped module, `input_scale` the static scale (or per-token scales with mode "dynamic")."""

    def __init__(self, inner: nn.Module, bits: int, mode: str = "static", scale: float = 1.0):
        from quasr.quant.activations import check_bits

        super().__init__()
        check_bits(bits)
        self.inner, self.act_bits, self.act_mode = inner, int(bits), mode
        self.register_buffer("input_scale", torch.full((1,), float(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from quasr.quant.activations import dynamic_scale, fake_quant

        if self.act_mode == "static":
            scale = self.input_scale
        else:  # per frame: the channel axis is dim 1 of a conv input [batch, channels, frames]
            scale = dynamic_scale(x.transpose(1, 2), self.act_bits).transpose(1, 2)
        return self.inner(fake_quant(x, scale.to(x.dtype), self.act_bits))

    def __getattr__(self, name: str):
        # the wrapped module's attributes (a conv's stride, kernel_size, weight...), which callers read off it
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(super().__getattr__("inner"), name)

    def extra_repr(self) -> str:
        return f"input int{self.act_bits} {self.act_mode}"


class TiedQuantizedHead(nn.Module):
    """Output projection (logits = x @ E.T, no bias) sharing a QuantizedEmbedding's packed rows.

    The embedding is held outside the module tree on purpose: this module has no parameters or buffers of
    its own, so state_dict, named_buffers and memory accounting see one copy only."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        if not isinstance(embedding, QuantizedEmbedding):
            raise TypeError(f"TiedQuantizedHead needs a QuantizedEmbedding, got {type(embedding).__name__}")
        self._tied = (embedding,)  # a tuple: not registered as a submodule

    @property
    def embedding(self) -> QuantizedEmbedding:
        return self._tied[0]

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    int8: bool = False  # logits as an int8 matrix product (see int8_ready)

    def int8_ready(self) -> bool:
        """Whether the tied rows are 8-bit symmetric per row, so the logits can be an int8 product with the
        input quantized per token (dynamic scales: the head has no calibrated input scale)."""
        f = self.embedding.fmt
        return isinstance(f, Affine) and f.bits == 8 and f.group_size is None and f.sym

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 and self.int8_ready():
            e = self.embedding
            if getattr(self, "_wq_t", None) is None:
                self._wq_t, self._w_scale = int8_codes_t(e)
            x2 = x.reshape(-1, e.cols).float()
            s_x = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            xq = x2.div(s_x).round_().clamp_(-127, 127).to(torch.int8)
            y = int8_matmul(xq, self._wq_t).to(torch.float32) * s_x * self._w_scale
            return y.to(x.dtype).reshape(*x.shape[:-1], e.rows)
        return self.embedding._matmul(x, None)

    def extra_repr(self) -> str:
        return f"tied to QuantizedEmbedding({self.out_features}, {self.in_features}, {self.embedding._spec()})"


QUANTIZED_TYPES = (QuantizedLinear, QuantizedEmbedding, TiedQuantizedHead, QuantizedInput)


def enable_int8(model: nn.Module, head: bool = False) -> tuple[int, int]:
    """Run every QuantizedLinear that can (8-bit per-row weights, a static 8-bit input scale) as int8 matrix
    products: the checkpoint's own arithmetic. head=True also runs the tied output head as one, with its input
    quantized per token: that is a different model (the checkpoint's head takes float inputs), so it is opt-in.
    Returns (Linears, heads) switched."""
    n_lin = n_head = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.int8_ready():
            m.int8, n_lin = True, n_lin + 1
        elif head and isinstance(m, TiedQuantizedHead) and m.int8_ready():
            m.int8, n_head = True, n_head + 1
    return n_lin, n_head


def replace_module(model: nn.Module, dotted_name: str, new_module: nn.Module) -> nn.Module:
    """Put `new_module` at `dotted_name` (e.g. "model.decoder.layers.0.fc1"); returns the module it replaces."""
    parent_name, _, child = dotted_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError as e:
        raise KeyError(f"no module {parent_name!r} in {type(model).__name__}") from e
    if child not in parent._modules:
        raise KeyError(f"no module {dotted_name!r} in {type(model).__name__}")
    old = parent._modules[child]
    setattr(parent, child, new_module)
    return old


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return name
    raise KeyError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def tied_embedding_names(model: nn.Module) -> tuple[str, str] | None:
    """(embedding, head) module names of a transformers model whose output projection shares the input
    embedding's weight, else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    emb, head = get_in(), get_out()
    if emb is None or head is None:
        return None
    if isinstance(head, TiedQuantizedHead):
        return module_name(model, head.embedding), module_name(model, head)
    w_in, w_out = getattr(emb, "weight", None), getattr(head, "weight", None)
    if w_in is None or w_out is None or w_in is not w_out:
        return None
    return module_name(model, emb), module_name(model, head)


def replace_tied_embedding(model: nn.Module, qw: QuantizedWeight,
                           scale_dtype: torch.dtype = torch.float16) -> QuantizedEmbedding:
    """Swap a tied input embedding + output projection (Whisper's embed_tokens / proj_out) for one
    QuantizedEmbedding and a TiedQuantizedHead sharing it.

    The in-memory config's `tie_word_embeddings` is then set False: the tie is now held by the modules, and a
    later `model.tie_weights()` (transformers calls it from resize/loading helpers) must not look for the
    `.weight` parameters that no longer exist. `quasr.checkpoint.save` writes the original value."""
    names = tied_embedding_names(model)
    if names is None:
        raise QuantConfigError(f"{type(model).__name__}: its output projection is not tied to its input embedding")
    emb_name, head_name = names
    emb = model.get_submodule(emb_name)
    if isinstance(emb, QuantizedEmbedding):
        raise QuantConfigError(f"{emb_name} is already quantized")
    qemb = QuantizedEmbedding.from_embedding(emb, qw, scale_dtype)
    replace_module(model, emb_name, qemb)
    replace_module(model, head_name, TiedQuantizedHead(qemb))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return qemb


def quantized_modules(model: nn.Module):
    """(name, module) of every QuantizedLinear, QuantizedEmbedding, TiedQuantizedHead and QuantizedInput, in
    module order."""
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZED_TYPES):
            yield name, m
