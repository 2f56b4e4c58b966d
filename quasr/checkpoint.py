"""Quantized checkpoints: a directory that loads and transcribes without the original model.

    save(asr, out_dir, recipe)   write the model as it is in memory (QuantizedLinear / QuantizedEmbedding /
                                 TiedQuantizedHead stored packed, everything else as full-precision tensors)
    load(path) -> WhisperAsr     rebuild it from config.json with no original weights (meta device), verify
                                 and load the tensors strictly
    info(path) -> dict           sizes and bits per weight, from the manifest and the safetensors header only

A checkpoint directory holds
    model.safetensors            `<module>.weight_packed`, `.weight_scale`, `.weight_zero` (asymmetric only),
                                 `.bias` for quantized modules (the tied embedding once, under the embedding's
                                 name); other tensors under their state_dict names, tied tensors once
    config.json, generation_config.json, the processor/tokenizer files (transformers' own formats)
    quasr_checkpoint.json        format version, family, the recipe, each quantized module's kind, shape, bits,
                                 group size and symmetry, tied aliases, and the byte size and sha256 of
                                 model.safetensors (checked before anything is loaded)

The directory is written into a temporary sibling and renamed into place only when complete: an interrupted
save leaves neither a partial `out_dir` nor the temporary directory, and an existing checkpoint at `out_dir` is
replaced only after the new one is complete.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from quasr.errors import ModelError
from quasr.quant.formats import format_from_entry
from quasr.quant.grid import QuantConfigError
from quasr.quant.modules import (QuantizedEmbedding, QuantizedInput, QuantizedLinear, TiedQuantizedHead,
                                 module_name, quantized_modules, replace_module)

FORMAT = "quasr-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "quasr_checkpoint.json"
WEIGHTS = "model.safetensors"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(ModelError):
    """A quantized checkpoint that cannot be written or read: names the file (and tensor) at fault."""


# ---------------------------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _jsonable(obj, where: str = "recipe"):
    """The recipe as plain JSON values (tuples -> lists, tensors/numpy scalars -> numbers, paths -> str)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist(), where)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item(), where)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored in {MANIFEST}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _versions() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        quasr_version = version("quasr")
    except Exception:  # not installed as a distribution
        quasr_version = None
    return {"quasr": quasr_version, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def _module_entry(model, name: str, m) -> dict:
    scale = getattr(m, "weight_scale", None)
    scale_dtype = {"scale_dtype": _dtype_name(scale.dtype)} if scale is not None else {}
    if isinstance(m, QuantizedLinear):
        act = {"act_bits": m.act_bits, "act_mode": m.act_mode} if m.act_bits else {}
        return {"kind": "linear", "shape": [m.out_features, m.in_features], **m.fmt.entry(),
                "bias": m.bias is not None, **scale_dtype, **act}
    if isinstance(m, QuantizedInput):
        return {"kind": "input_quant", "act_bits": m.act_bits, "act_mode": m.act_mode, "inner": type(m.inner).__name__,
                "shape": list(getattr(m.inner, "weight").shape)}
    if isinstance(m, QuantizedEmbedding):
        return {"kind": "embedding", "shape": [m.num_embeddings, m.embedding_dim], **m.fmt.entry(),
                "padding_idx": m.padding_idx, **scale_dtype}
    if isinstance(m, TiedQuantizedHead):
        try:
            emb = module_name(model, m.embedding)
        except KeyError:
            raise CheckpointError(f"{name}: its tied QuantizedEmbedding is not part of the model") from None
        return {"kind": "tied_head", "embedding": emb, "shape": [m.out_features, m.in_features]}
    raise CheckpointError(f"{name}: unknown quantized module {type(m).__name__}")


def _new_module(name: str, spec: dict, modules: dict[str, torch.nn.Module], device):
    kind = spec.get("kind")
    try:
        if kind == "linear":
            out_f, in_f = spec["shape"]
            m = QuantizedLinear(in_f, out_f, bias=spec["bias"], scale_dtype=_DTYPES[spec.get("scale_dtype", "float16")],
                                device=device, fmt=format_from_entry(spec))
            if spec.get("act_bits"):
                m.set_input_quant(spec["act_bits"], spec.get("act_mode", "static"))
            return m
        if kind == "embedding":
            v, d = spec["shape"]
            return QuantizedEmbedding(v, d, padding_idx=spec.get("padding_idx"),
                                      scale_dtype=_DTYPES[spec.get("scale_dtype", "float16")], device=device,
                                      fmt=format_from_entry(spec))
        if kind == "tied_head":
            emb = modules.get(spec["embedding"])
            if not isinstance(emb, QuantizedEmbedding):
                raise CheckpointError(f"{name}: tied to {spec['embedding']!r}, which is not a quantized embedding "
                                      f"of this checkpoint")
            return TiedQuantizedHead(emb)
    except (KeyError, TypeError, ValueError, QuantConfigError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{name}: malformed module entry {spec} ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{name}: unknown module kind {kind!r}")


# ---------------------------------------------------------------------------------------------- save


def check_target(out_dir: str | Path, what: str = "checkpoint") -> Path:
    """Fail now, before any long work, if a checkpoint cannot be written at `out_dir`: an existing file, a
    non-empty directory that is not a quasr checkpoint, or a place that cannot be written (`what` names the
    option in the message)."""
    from quasr.results import check_writable

    out_dir = Path(out_dir).expanduser().absolute()
    try:
        _check_replaceable(out_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{what} {e}") from None
    return check_writable(out_dir, what, kind="dir")


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise CheckpointError(f"{out_dir}: exists, is not empty and is not a quasr checkpoint "
                              f"(no {MANIFEST}); refusing to replace it")


def _collect_tensors(model, fp_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str]]:
    """(tensors to store, aliases {name: stored name} for tied tensors, names of quantized-module tensors)."""
    quant_prefixes = [name + "." for name, m in quantized_modules(model)
                      if not isinstance(m, (TiedQuantizedHead, QuantizedInput))]
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    quant_keys: set[str] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            raise CheckpointError(f"{key}: tensor on the meta device (not materialized); cannot save")
        if id(t) in seen:
            aliases[key] = seen[id(t)]
            continue
        seen[id(t)] = key
        t = t.detach()
        if any(key.startswith(p) for p in quant_prefixes) or key.endswith(".input_scale"):
            quant_keys.add(key)  # an activation scale is part of the quantization: float32, like biases
            if key.endswith((".bias", ".input_scale")):
                t = t.to(torch.float32)
        elif t.is_floating_point() and t.dtype != fp_dtype:
            cast = t.to(fp_dtype)
            if not torch.isfinite(cast).all() and torch.isfinite(t).all():
                raise CheckpointError(f"{key}: values overflow {_dtype_name(fp_dtype)}; save with fp_dtype=float32")
            t = cast
        tensors[key] = t.cpu().contiguous()
    return tensors, aliases, quant_keys


def save(asr, out_dir: str | Path, recipe: dict | None = None, *, fp_dtype: torch.dtype = torch.float32) -> Path:
    """Write `asr` (an AsrModel whose layers may be QuantizedLinear / QuantizedEmbedding / TiedQuantizedHead)
    as a self-contained checkpoint directory; returns its path.

    recipe: free-form JSON-able description (method, bits, group size, sym, calibration set, n_calib, seed,
    per-layer stats...), stored as is and set as `asr.recipe` on load. fp_dtype: on-disk dtype of the tensors
    that are not quantized (loaded back into float32); float32 by default."""
    from safetensors.torch import save_file

    from quasr.results import now, staged_dir

    if fp_dtype not in _DTYPES.values():
        raise CheckpointError(f"fp_dtype must be one of {', '.join(_DTYPES)}, got {fp_dtype}")
    model = asr.model
    family = getattr(asr, "family", None)
    if family != "whisper":
        raise CheckpointError(f"saving a {family!r} model is not supported (supported: whisper)")
    out_dir = Path(out_dir).expanduser().absolute()
    _check_replaceable(out_dir)
    recipe = _jsonable(dict(recipe or getattr(asr, "recipe", None) or {}))

    modules = {name: _module_entry(model, name, m) for name, m in quantized_modules(model)}
    tensors, aliases, _ = _collect_tensors(model, fp_dtype)
    tied_head = any(e["kind"] == "tied_head" for e in modules.values())

    with staged_dir(out_dir) as tmp:
        config = copy.deepcopy(model.config)
        if tied_head:  # the modules hold the tie in memory (see replace_tied_embedding); the architecture is tied
            config.tie_word_embeddings = True
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        asr.processor.save_pretrained(tmp)
        weights = tmp / WEIGHTS
        # one metadata key: safetensors writes several in a random order, and the same weights would then give
        # different file bytes (and sha256) from run to run; the format is recorded in the manifest
        save_file(tensors, str(weights), metadata={"format": "pt"})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": family,
            "name": out_dir.name,
            "source": getattr(asr, "spec", None),
            "created": now(),
            "versions": _versions(),
            "recipe": recipe,
            "fp_dtype": _dtype_name(fp_dtype),
            "modules": modules,
            "aliases": aliases,
            "files": {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": _sha256(weights),
                                "tensors": len(tensors)}},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
    _fsync_dir(out_dir.parent)
    return out_dir


# ---------------------------------------------------------------------------------------------- load


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        raise CheckpointError(f"{path}: not a quasr checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: not a quasr checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mf}: checkpoint format version {manifest.get('format_version')!r}; this quasr "
                              f"reads version {FORMAT_VERSION}")
    for key in ("modules", "files"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{mf}: missing or malformed {key!r}")
    return manifest


def _weights_file(path: Path, manifest: dict, verify: bool) -> Path:
    f = path / WEIGHTS
    expected = manifest["files"].get(WEIGHTS)
    if not isinstance(expected, dict):
        raise CheckpointError(f"{path / MANIFEST}: does not describe {WEIGHTS}")
    if not f.exists():
        raise CheckpointError(f"{f}: missing")
    size = f.stat().st_size
    if size != expected.get("bytes"):
        what = "truncated" if size < expected.get("bytes", 0) else "larger than recorded"
        raise CheckpointError(f"{f}: {what} ({size:,} bytes, {MANIFEST} records {expected.get('bytes'):,}); "
                              f"the file is incomplete or was modified")
    if verify:
        digest = _sha256(f)
        if digest != expected.get("sha256"):
            raise CheckpointError(f"{f}: sha256 {digest[:16]}... does not match {MANIFEST} "
                                  f"({str(expected.get('sha256'))[:16]}...); the file is corrupt or was modified")
    return f


def read_safetensors_header(f: Path) -> dict:
    """The safetensors header of `f` ({name: {dtype, shape, data_offsets}}), checked against the file size."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{f}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors header")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    for name, h in header.items():
        begin, end = h["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{f}: tensor {name!r} lies past the end of the file (truncated)")
    return header


def _build_model(path: Path, manifest: dict):
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: missing")
    try:
        config = WhisperConfig.from_json_file(str(cfg_file))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read the model config ({e})") from e
    if getattr(config, "model_type", None) != "whisper":
        raise CheckpointError(f"{cfg_file}: model_type {config.model_type!r} is not whisper")
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))

    created: dict[str, torch.nn.Module] = {}
    order = {"embedding": 0, "tied_head": 1, "linear": 2}
    entries = sorted(manifest["modules"].items(), key=lambda kv: order.get(kv[1].get("kind"), 3))
    for name, spec in entries:
        if spec.get("kind") == "input_quant":  # wraps the module the config built
            try:
                inner = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{path / MANIFEST}: module {name!r} does not exist in a Whisper model of this "
                                      f"config") from None
            replace_module(model, name, QuantizedInput(inner, spec["act_bits"], spec.get("act_mode", "static")))
            continue
        new = _new_module(name, spec, created, device="meta")
        try:
            old = replace_module(model, name, new)
        except KeyError:
            raise CheckpointError(f"{path / MANIFEST}: module {name!r} does not exist in a Whisper model of this "
                                  f"config") from None
        if tuple(spec["shape"]) != _shape_of(old):
            raise CheckpointError(f"{path / MANIFEST}: module {name!r} has shape {spec['shape']}, the model "
                                  f"expects {list(_shape_of(old))}")
        created[name] = new
    if any(isinstance(m, TiedQuantizedHead) for m in created.values()):
        model.config.tie_word_embeddings = False  # the tie is held by the modules (replace_tied_embedding)
    model.to_empty(device="cpu")  # allocates only what is loaded below: no original weights are created
    return model


def _shape_of(m) -> tuple:
    if isinstance(m, torch.nn.Linear):
        return (m.out_features, m.in_features)
    if isinstance(m, torch.nn.Embedding):
        return (m.num_embeddings, m.embedding_dim)
    w = getattr(m, "weight", None)
    return tuple(w.shape) if w is not None else ()


def _load_tensors(model, f: Path, manifest: dict) -> None:
    from safetensors import safe_open

    aliases = manifest.get("aliases") or {}
    targets = {k: t for k, t in model.state_dict(keep_vars=True).items() if k not in aliases}
    header = read_safetensors_header(f)
    missing = sorted(set(targets) - set(header))
    extra = sorted(set(header) - set(targets))
    if missing:
        raise CheckpointError(f"{f}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        raise CheckpointError(f"{f}: unexpected tensor(s) {', '.join(extra[:5])}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    try:
        fh = safe_open(str(f), framework="pt")
    except Exception as e:
        raise CheckpointError(f"{f}: cannot open as safetensors ({e})") from e
    with fh, torch.no_grad():
        for key, target in targets.items():
            try:
                t = fh.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{f}: tensor {key!r} cannot be read ({e})") from e
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                                      f"{tuple(target.shape)}")
            if t.is_floating_point() != target.is_floating_point() or (
                    not t.is_floating_point() and t.dtype != target.dtype):
                raise CheckpointError(f"{f}: tensor {key!r} has dtype {t.dtype}, expected {target.dtype}")
            target.copy_(t)
            if target.is_floating_point() and not torch.isfinite(target).all():
                raise CheckpointError(f"{f}: tensor {key!r} holds NaN or infinite values")
    for alias, source in aliases.items():  # re-tie (to_empty unties shared parameters)
        owner, _, attr = alias.rpartition(".")
        src = model.get_parameter(source) if source in dict(model.named_parameters()) else model.get_buffer(source)
        setattr(model.get_submodule(owner) if owner else model, attr, src)


def load(path: str | Path, verify: bool = True):
    """Load a checkpoint written by `save` as a WhisperAsr; `verify` checks the sha256 of the weights."""
    from transformers import WhisperProcessor

    from quasr.models.whisper import WhisperAsr

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    if manifest.get("family") != "whisper":
        raise CheckpointError(f"{path / MANIFEST}: family {manifest.get('family')!r} is not supported "
                              f"(supported: whisper)")
    f = _weights_file(path, manifest, verify)
    model = _build_model(path, manifest)
    _load_tensors(model, f, manifest)
    model.eval()
    try:
        processor = WhisperProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the processor/tokenizer files ({e})") from e
    asr = WhisperAsr(model, processor, spec=str(path), name=path.name)
    recipe = dict(manifest.get("recipe") or {})
    lin = [m for m in manifest["modules"].values() if m.get("kind") == "linear"]
    asr.recipe = recipe
    asr.method = recipe.get("method", "quantized")
    asr.bits = recipe.get("bits", _uniform(lin, "bits"))
    asr.group_size = recipe.get("group_size", _uniform(lin, "group_size"))
    asr.checkpoint = manifest
    return asr


def verify(path: str | Path) -> None:
    """Check a checkpoint as `load` does (manifest, sha256 of the weights, every tensor against the config,
    the tokenizer files), without keeping the model; raises CheckpointError naming the file at fault."""
    load(path, verify=True)


def _uniform(entries: list[dict], key: str):
    values = {e.get(key) for e in entries}
    return values.pop() if len(values) == 1 else None


# ---------------------------------------------------------------------------------------------- info


def info(path: str | Path) -> dict:
    """Recipe, sizes and bits per weight of a checkpoint, without loading it.

    bits_per_weight = 8 * (bytes of packed codes + scales + zero points) / weights, for the quantized
    Linears and (separately) the quantized embedding; biases and other tensors are counted under "fp"."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    f = path / WEIGHTS
    header = read_safetensors_header(f) if f.exists() else {}

    def nbytes(key: str) -> int:
        h = header.get(key)
        return 0 if h is None else h["data_offsets"][1] - h["data_offsets"][0]

    groups = {"linear": {"modules": 0, "weights": 0, "bytes": 0, "bits": set()},
              "embedding": {"modules": 0, "weights": 0, "bytes": 0, "bits": set()}}
    counted: set[str] = set()
    for name, spec in manifest["modules"].items():
        kind = spec.get("kind")
        if kind not in groups:
            continue
        g = groups[kind]
        keys = [k for k in header if k.startswith(f"{name}.weight_")]  # codes, scales, zeros, absmax...
        g["modules"] += 1
        g["weights"] += int(spec["shape"][0]) * int(spec["shape"][1])
        g["bytes"] += sum(nbytes(k) for k in keys)
        g["bits"].add(spec.get("bits"))
        counted.update(keys)
    fp_keys = [k for k in header if k not in counted]
    out = {
        "path": str(path),
        "family": manifest.get("family"),
        "recipe": manifest.get("recipe"),
        "n_quantized": groups["linear"]["modules"] + groups["embedding"]["modules"],
        "fp": {"tensors": len(fp_keys), "bytes": sum(nbytes(k) for k in fp_keys), "dtype": manifest.get("fp_dtype")},
        "file_mb": (f.stat().st_size / 1e6) if f.exists() else None,
        "sha256": (manifest["files"].get(WEIGHTS) or {}).get("sha256"),
        "dir_mb": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6,
    }
    for kind, g in groups.items():
        g["bits"] = sorted(b for b in g["bits"] if b is not None)
        g["mb"] = g["bytes"] / 1e6
        g["bits_per_weight"] = (8 * g["bytes"] / g["weights"]) if g["weights"] else None
        out[kind] = g
    out["n_quantized_linear"] = groups["linear"]["modules"]
    out["bits_per_weight"] = groups["linear"]["bits_per_weight"]
    out["activations"] = _activation_scales(f, manifest) if f.exists() else {}
    return out


def _activation_scales(weights: Path, manifest: dict) -> dict[str, dict]:
    """{module: {bits, mode, scale}} of every quantized input (static scales read from the weights file)."""
    from safetensors import safe_open

    acts = {n: {"bits": s["act_bits"], "mode": s.get("act_mode", "static")}
            for n, s in manifest["modules"].items() if s.get("act_bits")}
    if acts:
        with safe_open(str(weights), framework="pt") as fh:
            keys = set(fh.keys())
            for n, a in acts.items():
                key = f"{n}.input_scale"
                a["scale"] = float(fh.get_tensor(key).reshape(-1)[0]) if a["mode"] == "static" and key in keys else None
    return acts
