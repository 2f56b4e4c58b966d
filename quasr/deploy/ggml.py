"""whisper.cpp model files (the legacy "ggml" Whisper format that whisper.cpp and pywhispercpp load).

    export_ggml(src, out, "q4_0")   write OUT.bin from a quasr checkpoint whose grid is q4_0's (4-bit, symmetric,
                                    groups of 32: the codes are written as they are), or from a full-precision
                                    model (then rounded as ggml's reference quantizer does, for comparison)
    read_ggml(path)                 header, hyperparameters and every tensor dequantized (for tests and checks)

Layout (whisper.cpp `whisper_model_load`, models/convert-h5-to-ggml.py): int32 magic 0x67676d6c; 11 int32
hyperparameters (n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx, n_text_state,
n_text_head, n_text_layer, n_mels, ftype + 1000·GGML_QNT_VERSION); the mel filters (int32 n_mel, n_fft,
float32 data); the byte-level BPE vocabulary (int32 count, then per token int32 length and its bytes); then per
tensor int32 n_dims, name length, ggml type, the dims fastest first, the name and the data. Every 2-D weight,
the token embedding included, has the file's weight type; conv kernels are f16; biases, layer norms and
positional embeddings f32. Quantized tensors are rows of blocks of 32 weights:

    q4_0  f16 d, 16 bytes of nibbles (weight j and j+16 share a byte)       w = d·(q − 8)      18 bytes
    q4_1  f16 d, f16 m, 16 bytes of nibbles                                  w = d·q + m        20 bytes
    q5_0  f16 d, 4 bytes of fifth bits, 16 bytes of nibbles                  w = d·(q − 16)     22 bytes
    q5_1  f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles           w = d·q + m        24 bytes
    q8_0  f16 d, 32 int8                                                     w = d·q            34 bytes

quasr's symmetric grid stores w = scale·(code − 2^(bits−1)) with a float16 scale per group: exactly q4_0, q5_0
and q8_0 with d = scale. Its asymmetric grid, w = scale·(code − zero), becomes q4_1 / q5_1 with d = scale and
m = −scale·zero rounded to float16: the one inexact step (m's rounding, at most 2⁻¹¹ of |m|). `--target
ggml-q4_0` / `ggml-q5_0` also fit each block's scale by ggml's rule (QuantGrid.signed_max: d = m / −2^(bits−1),
m the block's signed largest weight, so that weight is exact; quasr's plain symmetric grid clips it when it is
positive); quasr's round-to-nearest on that grid writes ggml's own blocks except at rounding ties, and GPTQ
chooses the codes on the same grid.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quasr.errors import QuasrError

MAGIC = 0x67676D6C
QNT_VERSION, QNT_VERSION_FACTOR = 2, 1000
BLOCK = 32


class GgmlError(QuasrError, ValueError):
    pass


@dataclass(frozen=True)
class GgmlType:
    name: str
    type_id: int          # ggml_type
    ftype: int            # ggml_ftype of a file whose weights have this type
    bits: int | None
    sym: bool
    block_bytes: int      # bytes per block of BLOCK weights (per weight for f16 / f32)


TYPES = {t.name: t for t in [
    GgmlType("f32", 0, 0, None, True, 4), GgmlType("f16", 1, 1, None, True, 2),
    GgmlType("q4_0", 2, 2, 4, True, 18), GgmlType("q4_1", 3, 3, 4, False, 20),
    GgmlType("q5_0", 6, 8, 5, True, 22), GgmlType("q5_1", 7, 9, 5, False, 24),
    GgmlType("q8_0", 8, 7, 8, True, 34)]}
BY_ID = {t.type_id: t for t in TYPES.values()}

# transformers' Whisper names -> whisper.cpp's (openai-whisper's), as models/convert-h5-to-ggml.py maps them
_LAYER = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
          "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln", "encoder_attn.q_proj": "cross_attn.query",
          "encoder_attn.k_proj": "cross_attn.key", "encoder_attn.v_proj": "cross_attn.value",
          "encoder_attn.out_proj": "cross_attn.out", "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0",
          "fc2": "mlp.2", "final_layer_norm": "mlp_ln"}
_TOP = {"encoder.layer_norm.weight": "encoder.ln_post.weight", "encoder.layer_norm.bias": "encoder.ln_post.bias",
        "encoder.embed_positions.weight": "encoder.positional_embedding",
        "decoder.embed_positions.weight": "decoder.positional_embedding",
        "decoder.layer_norm.weight": "decoder.ln.weight", "decoder.layer_norm.bias": "decoder.ln.bias",
        "decoder.embed_tokens.weight": "decoder.token_embedding.weight"}


def ggml_name(hf: str) -> str | None:
    """whisper.cpp's name of a transformers Whisper parameter; None for the tied head (proj_out)."""
    if hf == "proj_out.weight":
        return None
    parts = hf.removeprefix("model.").split(".")
    if len(parts) > 3 and parts[1] == "layers":
        return ".".join([parts[0], "blocks", parts[2], _LAYER[".".join(parts[3:-1])], parts[-1]])
    name = ".".join(parts)
    return _TOP.get(name, name)


# -- blocks -----------------------------------------------------------------------------------------------------


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes < 16 (low nibbles) -> [n, 16] bytes: weight j in the low, j + 16 in the high nibble."""
    q = q.astype(np.uint8) & np.uint8(0x0F)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def encode_blocks(codes: np.ndarray, d: np.ndarray, zeros: np.ndarray | None, t: GgmlType) -> np.ndarray:
    """quasr codes [rows, cols] (uint8), float16 scales d [rows, cols/32] and zero points (None: symmetric) ->
    ggml blocks [rows, cols/32 · block_bytes] (uint8)."""
    rows, cols = codes.shape
    if cols % BLOCK:
        raise GgmlError(f"{cols} columns are not a multiple of ggml's block of {BLOCK}")
    n = rows * cols // BLOCK
    q = codes.reshape(n, BLOCK).astype(np.uint8)
    dd = d.astype(np.float16).reshape(n, 1).view(np.uint8)
    parts = [dd]
    if not t.sym:
        m = (-(d.astype(np.float32) * zeros.astype(np.float32))).astype(np.float16).reshape(n, 1).view(np.uint8)
        parts.append(m)
    if t.bits == 8:
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if t.bits == 5:
            parts.append(np.packbits(q >> np.uint8(4), axis=-1, bitorder="little").reshape(n, 4))
        parts.append(_nibbles(q))
    out = np.concatenate(parts, axis=-1)
    assert out.shape[1] == t.block_bytes
    return out.reshape(rows, -1)


def decode_blocks(raw: np.ndarray, t: GgmlType, rows: int, cols: int) -> np.ndarray:
    """ggml blocks (uint8) -> float32 [rows, cols]: the inverse of encode_blocks, as ggml dequantizes."""
    if t.name in ("f32", "f16"):
        return raw.view(np.float32 if t.name == "f32" else np.float16).astype(np.float32).reshape(rows, cols)
    n = rows * cols // BLOCK
    b = raw.reshape(n, t.block_bytes)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    off = 2
    m = None
    if not t.sym:
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        off = 4
    if t.bits == 8:
        q = b[:, off:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(rows, cols)
    high = None
    if t.bits == 5:
        high = np.unpackbits(b[:, off:off + 4], axis=-1, bitorder="little").astype(np.float32) * 16
        off += 4
    qs = b[:, off:off + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    if high is not None:
        q += high
    if t.sym:
        w = d * (q - (1 << (t.bits - 1)))
    else:
        w = d * q + m
    return w.reshape(rows, cols)


def reference_blocks(W: np.ndarray, t: GgmlType) -> np.ndarray:
    """ggml's own reference rounding of a full-precision [rows, cols] weight (the `gguf` package's port of
    ggml-quants.c, the rounding whisper.cpp's quantize tool applies)."""
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError as e:
        raise GgmlError("rounding a full-precision model to a ggml type needs the gguf package "
                        "(pip install 'quasr[deploy]')") from e
    return quants.quantize(np.ascontiguousarray(W, dtype=np.float32), GGMLQuantizationType[t.name.upper()])


# -- the file ---------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> unicode table (the byte-level BPE vocabulary's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab(tokenizer) -> list[bytes]:
    """The base vocabulary's tokens as bytes, by id (whisper.cpp adds the special tokens itself)."""
    decoder = {v: k for k, v in _bytes_to_unicode().items()}
    n = tokenizer.vocab_size
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [bytes(decoder[c] for c in tok) if all(c in decoder for c in tok) else tok.encode() for tok in toks]


def _tensor(name: str, data: np.ndarray, t: GgmlType, shape: tuple[int, ...]) -> bytes:
    """One tensor record: shape is numpy's (slowest first); ggml lists the dims fastest first."""
    nb = name.encode()
    head = struct.pack("<iii", len(shape), len(nb), t.type_id) + struct.pack(f"<{len(shape)}i", *reversed(shape))
    return head + nb + np.ascontiguousarray(data).tobytes()


def _weights(asr, t: GgmlType, name: str, module) -> tuple[np.ndarray, bool]:
    """A 2-D weight's ggml data: quasr's codes when the module is quantized on t's grid, else the full-precision
    weight (f16, or ggml's reference rounding). Returns (data, whether quasr's codes were used)."""
    from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear

    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        from quasr.quant.formats import Affine

        if t.bits is None:  # f16 / f32 of a quantized model: its dequantized weights
            w = module.dequantize(torch.float32).numpy()
            return (w.astype(np.float16) if t.name == "f16" else w), False
        if not isinstance(module.fmt, Affine):
            raise GgmlError(f"{name}: stored as {module.fmt.name}, which ggml's {t.name} cannot hold; quantize with "
                            f"--target ggml-{t.name} (or export --type f16)")
        if (module.bits, module.group_size, module.sym) != (t.bits, BLOCK, t.sym):
            kind = "symmetric" if t.sym else "asymmetric"
            raise GgmlError(f"{name}: quantized W{module.bits}G{module.group_size} "
                            f"{'symmetric' if module.sym else 'asymmetric'}, which {t.name} cannot hold ({t.name} "
                            f"is {t.bits}-bit {kind} in groups of {BLOCK}); quantize with --target ggml-{t.name} "
                            f"(or export --type f16)")
        qw = module.quantized_weight()
        zeros = None if t.sym else qw.zeros.numpy()
        if t.sym and not bool((qw.zeros == (1 << (t.bits - 1))).all()):
            raise GgmlError(f"{name}: symmetric codes with a zero point other than {1 << (t.bits - 1)}")
        return encode_blocks(qw.codes.numpy(), qw.scales.to(torch.float16).numpy(), zeros, t), True
    w = module.weight.detach().float().numpy()
    if t.bits is None:
        return (w.astype(np.float16) if t.name == "f16" else w), False
    return reference_blocks(w, t), False


def export_ggml(src, out: str | Path, type_name: str) -> dict:
    """Write a whisper.cpp model file (see the module docstring); returns what was written. `src` is a loaded
    Whisper AsrModel, a quasr checkpoint directory or any model spec quasr loads. The file appears only when
    complete."""
    from quasr.models import load_model
    from quasr.models.whisper import WhisperAsr
    from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear
    from quasr.results import atomic_write_bytes

    if type_name not in TYPES:
        raise GgmlError(f"unknown ggml type {type_name!r} (choose from {', '.join(TYPES)})")
    t = TYPES[type_name]
    asr = src if hasattr(src, "model") else load_model(str(src))
    from quasr.deploy import refuse_quantized_inputs

    refuse_quantized_inputs(asr, "whisper.cpp's ggml format", GgmlError)
    if not isinstance(asr, WhisperAsr):
        raise GgmlError(f"{getattr(asr, 'name', src)}: a {getattr(asr, 'family', type(asr).__name__)} model; the "
                        f"ggml format holds Whisper models only")
    model, cfg = asr.model, asr.model.config
    fe, tok = asr.processor.feature_extractor, asr.processor.tokenizer
    ftype = t.ftype + (QNT_VERSION * QNT_VERSION_FACTOR if t.bits is not None else 0)
    hp = [cfg.vocab_size, cfg.max_source_positions, cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_layers,
          cfg.max_target_positions, cfg.d_model, cfg.decoder_attention_heads, cfg.decoder_layers, cfg.num_mel_bins,
          ftype]
    chunks = [struct.pack("<i", MAGIC), struct.pack("<11i", *hp)]
    filters = np.asarray(fe.mel_filters, dtype=np.float32).T  # [n_mels, n_fft/2 + 1]
    chunks += [struct.pack("<ii", *filters.shape), np.ascontiguousarray(filters).tobytes()]
    vocab = _vocab(tok)
    chunks.append(struct.pack("<i", len(vocab)))
    chunks += [struct.pack("<i", len(v)) + v for v in vocab]

    modules = dict(model.named_modules())
    weight_modules = (torch.nn.Linear, QuantizedLinear, QuantizedEmbedding)
    written = from_codes = 0
    for key, tensor in model.state_dict().items():
        if key.endswith((".weight_scale", ".weight_zero")):
            continue
        name = key.removesuffix("_packed")  # a quantized module's codes stand for its weight
        gname = ggml_name(name)
        if gname is None:
            continue
        owner = modules.get(name.rsplit(".", 1)[0])
        if name.endswith(".weight") and (isinstance(owner, weight_modules) or name.endswith("embed_tokens.weight")):
            rows, cols = (owner.rows, owner.cols) if hasattr(owner, "rows") else tuple(owner.weight.shape)
            data, used = _weights(asr, t, name, owner)
            chunks.append(_tensor(gname, data, t, (rows, cols)))
            from_codes += used
        else:
            data = tensor.detach().float().numpy()
            shape, tt = data.shape, TYPES["f32"]
            if data.ndim == 3 and t.name != "f32":  # conv kernels
                tt, data = TYPES["f16"], data.astype(np.float16)
            elif data.ndim == 1 and ".conv" in name:
                shape = (data.shape[0], 1)  # conv biases are [n, 1]
            chunks.append(_tensor(gname, data, tt, shape))
        written += 1
    out = Path(out)
    atomic_write_bytes(out, b"".join(chunks))
    return {"path": str(out), "type": t.name, "tensors": written, "from_quasr_codes": from_codes,
            "mb": out.stat().st_size / 1e6}


def read_ggml(path: str | Path) -> dict:
    """Parse a whisper.cpp model file: {"hparams", "filters", "vocab", "tensors": {name: (type, float32 array)}}."""
    raw = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return vals

    (magic,) = take("<i")
    if magic != MAGIC:
        raise GgmlError(f"{path}: not a ggml Whisper file (magic {magic:#x})")
    keys = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_text_ctx",
            "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype")
    hparams = dict(zip(keys, take("<11i")))
    n_mel, n_fft = take("<ii")
    filters = np.frombuffer(raw, np.float32, n_mel * n_fft, pos).reshape(n_mel, n_fft)
    pos += 4 * n_mel * n_fft
    (n_vocab,) = take("<i")
    vocab = []
    for _ in range(n_vocab):
        (ln,) = take("<i")
        vocab.append(raw[pos:pos + ln])
        pos += ln
    tensors = {}
    while pos < len(raw):
        n_dims, ln, type_id = take("<iii")
        ne = take(f"<{n_dims}i")
        name = raw[pos:pos + ln].decode()
        pos += ln
        t = BY_ID[type_id]
        shape = tuple(reversed(ne))
        count = int(np.prod(shape))
        nbytes = count * t.block_bytes // (BLOCK if t.bits else 1)
        data = np.frombuffer(raw, np.uint8, nbytes, pos)
        pos += nbytes
        rows, cols = (int(np.prod(shape[:-1])), shape[-1])
        tensors[name] = (t.name, decode_blocks(data, t, rows, cols).reshape(shape))
    return {"hparams": hparams, "filters": filters, "vocab": vocab, "tensors": tensors}
