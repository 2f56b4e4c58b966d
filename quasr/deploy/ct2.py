"""CTranslate2 (faster-whisper) model directories from quasr models.

    export_ct2(src, out, "int8")    a directory faster-whisper loads: CTranslate2's own converter writes the
                                    layout (model.bin, config.json, vocabulary), then, for a quasr checkpoint
                                    quantized on CTranslate2's int8 grid (`--target ct2-int8`: 8 bits, symmetric,
                                    one scale per row), quasr's calibrated codes replace the converter's rounding

CTranslate2 stores an int8 weight as q (int8) and a float32 `weight_scale` per row, w = q / scale. quasr's
8-bit symmetric per-row grid stores w = s·(code − 128): q = code − 128 and scale = 1/s, the same weights up to
the float32 rounding of 1/s. Fused layers (self-attention q/k/v, cross-attention k/v) are rows of the parts
stacked, so per-row codes stack the same way. Types: int8 and int8_float32 (int8 weights, the other tensors as
their source's float type or float32; faster-whisper's compute type picks the arithmetic), float16 and float32
(dequantized weights).
"""
from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from quasr.errors import QuasrError

TYPES = ("int8", "int8_float32", "float16", "float32")
_DTYPE_SIZE = {0: 4, 1: 1, 2: 2, 3: 4, 4: 2}


class Ct2Error(QuasrError, ValueError):
    pass


def variable_offsets(path: Path) -> dict[str, tuple[int, int, tuple[int, ...], int]]:
    """{name: (byte offset of its data, dtype code, shape, byte count)} of a CTranslate2 model.bin (version 6)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    def string():
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    if take("I") != 6:
        raise Ct2Error(f"{path}: not a CTranslate2 version 6 model")
    string()
    take("I")
    out = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        dims = tuple(take("I") for _ in range(rank))
        dtype = take("B")
        nbytes = take("I")
        out[name] = (pos, dtype, dims, nbytes)
        pos += nbytes
    return out


def _ct2_groups(n_enc: int, n_dec: int) -> dict[str, list[str]]:
    """CTranslate2 variable prefix -> the transformers Linears (or embedding) whose rows it stacks."""
    g = {"decoder/embeddings": ["model.decoder.embed_tokens"]}
    for i in range(n_enc):
        p, m = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        g[f"{p}/self_attention/linear_0"] = [f"{m}.self_attn.{x}_proj" for x in "qkv"]
        g[f"{p}/self_attention/linear_1"] = [f"{m}.self_attn.out_proj"]
        g[f"{p}/ffn/linear_0"] = [f"{m}.fc1"]
        g[f"{p}/ffn/linear_1"] = [f"{m}.fc2"]
    for i in range(n_dec):
        p, m = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        g[f"{p}/self_attention/linear_0"] = [f"{m}.self_attn.{x}_proj" for x in "qkv"]
        g[f"{p}/self_attention/linear_1"] = [f"{m}.self_attn.out_proj"]
        g[f"{p}/attention/linear_0"] = [f"{m}.encoder_attn.q_proj"]
        g[f"{p}/attention/linear_1"] = [f"{m}.encoder_attn.{x}_proj" for x in "kv"]
        g[f"{p}/attention/linear_2"] = [f"{m}.encoder_attn.out_proj"]
        g[f"{p}/ffn/linear_0"] = [f"{m}.fc1"]
        g[f"{p}/ffn/linear_1"] = [f"{m}.fc2"]
    return g


def _int8_rows(module) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 q [rows, cols], float32 CTranslate2 scale [rows]) of a module on CTranslate2's int8 grid, else None."""
    from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear

    from quasr.quant.formats import Affine

    if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)) or not isinstance(module.fmt, Affine):
        return None
    if (module.bits, module.group_size, module.sym) != (8, None, True):
        return None
    qw = module.quantized_weight()
    q = (qw.codes.to(torch.int16) - 128).to(torch.int8).numpy()
    s = qw.scales.to(torch.float16).to(torch.float32)[:, 0].numpy()
    return q, (1.0 / s).astype(np.float32)


def _plain_copy(asr, tmp: Path) -> Path:
    """A transformers directory of the model with its quantized modules dequantized (the converter's input)."""
    import copy

    from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, replace_module

    model = copy.deepcopy(asr.model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            replace_module(model, name, lin)
        elif isinstance(m, QuantizedEmbedding):
            emb = torch.nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
            with torch.no_grad():
                emb.weight.copy_(m.dequantize(torch.float32))
            replace_module(model, name, emb)
    for name, m in list(model.named_modules()):
        if isinstance(m, TiedQuantizedHead):
            head = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            head.weight = model.get_input_embeddings().weight
            replace_module(model, name, head)
    model.config.tie_word_embeddings = True
    out = tmp / "hf"
    model.save_pretrained(out)
    asr.processor.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return out


def export_ct2(src, out: str | Path, type_name: str = "int8") -> dict:
    """Write a CTranslate2 Whisper directory (see the module docstring); returns what was written."""
    from quasr.models import load_model
    from quasr.models.whisper import WhisperAsr
    from quasr.results import staged_dir

    if type_name not in TYPES:
        raise Ct2Error(f"unknown CTranslate2 type {type_name!r} (choose from {', '.join(TYPES)})")
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as e:
        raise Ct2Error("exporting to CTranslate2 needs the ctranslate2 package (pip install 'quasr[deploy]')") from e
    asr = src if hasattr(src, "model") else load_model(str(src))
    from quasr.deploy import refuse_quantized_inputs

    refuse_quantized_inputs(asr, "CTranslate2's format", Ct2Error)
    if not isinstance(asr, WhisperAsr):
        raise Ct2Error(f"{getattr(asr, 'name', src)}: only Whisper models can be exported to CTranslate2 here")
    cfg = asr.model.config
    modules = dict(asr.model.named_modules())
    groups = _ct2_groups(cfg.encoder_layers, cfg.decoder_layers)
    codes = {}
    if type_name.startswith("int8"):
        for prefix, names in groups.items():
            parts = [_int8_rows(modules[n]) for n in names]
            if all(p is not None for p in parts):
                codes[prefix] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    with tempfile.TemporaryDirectory(prefix="quasr-ct2-") as tmp, staged_dir(out) as stage:
        hf = _plain_copy(asr, Path(tmp))
        conv = Path(tmp) / "ct2"
        TransformersConverter(str(hf)).convert(str(conv), quantization=type_name, force=True)
        if codes:
            path = conv / "model.bin"
            offsets = variable_offsets(path)
            raw = bytearray(path.read_bytes())
            for prefix, (q, scale) in codes.items():
                for var, arr in ((f"{prefix}/weight", q), (f"{prefix}/weight_scale", scale)):
                    if var not in offsets:
                        raise Ct2Error(f"{var}: CTranslate2's converter wrote no such variable")
                    pos, dtype, dims, nbytes = offsets[var]
                    if dims != arr.shape or nbytes != arr.nbytes:
                        raise Ct2Error(f"{var}: shape {dims} in the converted file, {arr.shape} from quasr")
                    raw[pos:pos + nbytes] = np.ascontiguousarray(arr).tobytes()
            path.write_bytes(bytes(raw))
        for f in conv.iterdir():
            shutil.copy2(f, stage / f.name)
        if (hf / "tokenizer.json").exists():
            shutil.copy2(hf / "tokenizer.json", stage / "tokenizer.json")
    out = Path(out)
    return {"path": str(out), "type": type_name, "from_quasr_codes": len(codes), "layers": len(groups),
            "mb": sum(p.stat().st_size for p in out.iterdir()) / 1e6}
