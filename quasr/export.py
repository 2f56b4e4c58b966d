"""Export a quantized model in compressed-tensors' "pack-quantized" format (what vLLM and transformers read).

    export_compressed_tensors(path_or_asr, out_dir, embedding="dense")

Per quantized Linear `<name>` the safetensors file holds (as compressed-tensors 0.20 writes them):
    <name>.weight_packed       int32 [out, ceil(in*bits/32)]: 32 codes densely in `bits` int32 words, code i at
                               bits [i*bits, (i+1)*bits) of the row (little-endian), stored unsigned
                               (= signed value + 2**(bits-1), which is exactly quasr's code)
    <name>.weight_scale        [out, n_groups] (group) or [out, 1] (channel), the scale dtype
    <name>.weight_zero_point   asymmetric only: int32 [ceil(out*bits/32), n_groups], zero points packed the same
                               way along the output dimension (packed_dim=0)
    <name>.weight_shape        int64 [2] = (out, in)
    <name>.bias                as is
and config.json gets a `quantization_config` (quant_method "compressed-tensors", format "pack-quantized", one
config group per distinct (bits, group size, symmetry), targets = exact module names).

The export moves the stored codes from quasr's planar layout to a bit stream (quasr.quant.pack.pack_stream,
which read as little-endian int32 words is compressed-tensors' layout) and never requantizes:
compressed-tensors' decompression gives back exactly quasr's dequantized weights (same codes, same scales).

The tied token embedding (QuantizedEmbedding + TiedQuantizedHead) is written, by default, dequantized
("dense": `model.decoder.embed_tokens.weight`, the head tied to it by config.tie_word_embeddings), since
inference engines quantize Linear layers only; embedding="quantized" writes it as its own pack-quantized
channel-wise group instead (smaller; decompressible with compressed-tensors, loader support varies).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from quasr.errors import QuasrError
from quasr.results import staged_dir
from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, quantized_modules
from quasr.quant.pack import pack_stream, unpack, unpack_stream

FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"


class ExportError(QuasrError, ValueError):
    pass


def _to_int32_words(stream: torch.Tensor, n_codes: int, bits: int) -> torch.Tensor:
    """uint8 [rows, nbytes] bit streams (pack_stream) -> int32 [rows, ceil(n_codes*bits/32)] words, as
    compressed-tensors' pack_to_int32 lays them out (little-endian: word w holds stream bits [32w, 32w+32))."""
    rows, nb = stream.shape
    n_words = -(-n_codes * bits // 32)
    if nb < 4 * n_words:
        stream = torch.nn.functional.pad(stream, (0, 4 * n_words - nb))
    stream = stream[:, :4 * n_words].contiguous()  # bytes past the last word hold padding bits only
    if sys.byteorder == "big":  # words are numbers to compressed-tensors; our streams are little-endian bytes
        stream = stream.view(rows, n_words, 4).flip(-1).contiguous().view(rows, 4 * n_words)
    return stream.view(torch.int32).contiguous()


def _scheme_args(bits: int, group_size: int | None, sym: bool) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": group_size,
            "strategy": "channel" if group_size is None else "group", "dynamic": False}


def _compress(m, scale_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors (local names) of a QuantizedLinear or QuantizedEmbedding."""
    codes = unpack(m.weight_packed.cpu(), m.bits, m.cols)
    out = {"weight_packed": _to_int32_words(pack_stream(codes, m.bits), m.cols, m.bits),
           "weight_scale": m.weight_scale.detach().cpu().to(scale_dtype or m.weight_scale.dtype).contiguous(),
           "weight_shape": torch.tensor([m.rows, m.cols], dtype=torch.int64)}
    if m.weight_zero is not None:
        zeros = unpack_stream(m.weight_zero.cpu(), m.bits, m.n_groups)  # [out, n_groups]
        zp = _to_int32_words(pack_stream(zeros.t().contiguous(), m.bits), m.rows, m.bits)  # packed along rows
        out["weight_zero_point"] = zp.t().contiguous()
    if isinstance(m, QuantizedLinear) and m.bias is not None:
        out["bias"] = m.bias.detach().cpu().contiguous()
    return out


def export_compressed_tensors(path_or_asr, out_dir: str | Path, embedding: str = "dense",
                              scale_dtype: torch.dtype | None = None, dense_dtype: torch.dtype | None = None) -> Path:
    """Write a quasr checkpoint (a directory, or an AsrModel with quantized modules in memory) in
    compressed-tensors pack-quantized format to `out_dir` (replaced atomically); returns `out_dir`.

    embedding: "dense" (default) or "quantized", for a tied QuantizedEmbedding (see the module docstring).
    scale_dtype: dtype of weight_scale (default: as stored, float16). dense_dtype: dtype of the tensors that are
    not quantized (default: as in memory)."""
    from safetensors.torch import save_file

    if embedding not in ("dense", "quantized"):
        raise ExportError(f"embedding must be 'dense' or 'quantized', got {embedding!r}")
    if isinstance(path_or_asr, (str, Path)):
        from quasr.checkpoint import load

        asr = load(path_or_asr)
    else:
        asr = path_or_asr
    from quasr.deploy import refuse_quantized_inputs

    refuse_quantized_inputs(asr, "the compressed-tensors export", ExportError)
    model = asr.model
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / "config.json").exists())):
        raise ExportError(f"{out_dir}: exists and is not a model directory; refusing to replace it")

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    handled: set[str] = set()
    tied = False
    for name, m in quantized_modules(model):
        handled.add(name)
        if isinstance(m, TiedQuantizedHead):
            tied = True
            continue
        if isinstance(m, QuantizedEmbedding) and embedding == "dense":
            w = m.dequantize(dense_dtype or m.output_dtype)
            tensors[f"{name}.weight"] = w.contiguous()
            continue
        from quasr.quant.formats import Affine

        if not isinstance(m.fmt, Affine):
            raise ExportError(f"{name}: stored as {m.fmt.name}; compressed-tensors' pack-quantized format holds "
                              f"affine integer codes only")
        for k, t in _compress(m, scale_dtype).items():
            tensors[f"{name}.{k}"] = t
        groups.setdefault((m.bits, m.group_size, m.sym), []).append(name)

    seen: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in handled:
            continue
        if id(t) in seen:  # tied: written once (transformers re-ties from the config)
            continue
        seen[id(t)] = key
        t = t.detach().cpu()
        if dense_dtype is not None and t.is_floating_point():
            t = t.to(dense_dtype)
        tensors[key] = t.contiguous()

    quantized_names = {n for names in groups.values() for n in names}
    ignore = sorted(n for n, mod in model.named_modules()
                    if isinstance(mod, (torch.nn.Linear, TiedQuantizedHead)) and n not in quantized_names)
    config_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": _scheme_args(bits, gs, sym),
                                       "input_activations": None, "output_activations": None, "format": FORMAT}
    qconfig = {
        "quant_method": "compressed-tensors",
        "version": _ct_version(),
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }

    with staged_dir(out_dir) as tmp:
        config = copy.deepcopy(model.config)
        if tied:
            config.tie_word_embeddings = True
        config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        asr.processor.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return out_dir


def _ct_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:
        return None
