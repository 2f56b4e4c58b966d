"""Read a CTranslate2 Whisper model (faster-whisper layout) and convert it to transformers.

A CTranslate2 model directory holds `model.bin` (every tensor, see `read_model_bin`), `config.json`
(alignment heads, suppressed tokens) and `tokenizer.json` (a Hugging Face tokenizer). The conversion is an
exact tensor mapping: fused q/k/v and cross-attention k/v projections are split, the (all-zero) key
biases are dropped, everything else is renamed. Float16 weights become float32 losslessly.
Int8-quantized CTranslate2 models are refused (their scales would otherwise be lost).
"""
from __future__ import annotations

import json
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from quasr.errors import ModelError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_model_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 `model.bin` (format version 6) into {name: array}, aliases resolved.

    Layout: uint32 version; string spec name; uint32 revision; uint32 count; per variable: string name,
    uint8 rank, uint32 dims[rank], uint8 dtype, uint32 byte count, bytes; then uint32 alias count and
    (alias, target) string pairs. Strings are uint16 length (with a trailing NUL) then bytes.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(data):
            raise ModelError(f"{path}: truncated CTranslate2 model (ends at byte {len(data)})")
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += size
        return out[0] if len(out) == 1 else out

    def string() -> str:
        nonlocal pos
        n = take("H")
        raw = bytes(data[pos:pos + n])
        if len(raw) != n:
            raise ModelError(f"{path}: truncated CTranslate2 model (in a name)")
        pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    version = take("I")
    if version != 6:
        raise ModelError(f"{path}: CTranslate2 model format version {version}; only version 6 is supported")
    spec = string()
    if spec != "WhisperSpec":
        raise ModelError(f"{path}: model spec is {spec!r}, not a Whisper model (WhisperSpec)")
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        dims = [take("I") for _ in range(rank)]
        dtype = _DTYPES.get(take("B"))
        nbytes = take("I")
        if dtype is None:
            raise ModelError(f"{path}: variable {name} has an unknown dtype code")
        if pos + nbytes > len(data):
            raise ModelError(f"{path}: truncated CTranslate2 model (in variable {name})")
        arr = np.frombuffer(data[pos:pos + nbytes], dtype=dtype).reshape(dims).copy()
        pos += nbytes
        variables[name] = arr
    for _ in range(take("I")):
        alias, target = string(), string()
        if target not in variables:
            raise ModelError(f"{path}: alias {alias} points to {target}, which the file does not hold")
        variables[alias] = variables[target]
    return variables


def _split_rows(w: np.ndarray, n: int) -> list[np.ndarray]:
    return np.split(w, n, axis=0)


def ct2_state_dict(v: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """Map CTranslate2 Whisper variables to a transformers `WhisperForConditionalGeneration` state dict.

    Returns (state dict in float32, dims) where dims holds the architecture read off the tensors.
    """
    quantized = sorted(k for k in v if k.endswith("/weight_scale"))
    if quantized:
        raise ModelError(f"int8-quantized CTranslate2 model ({len(quantized)} layers, e.g. {quantized[0]}): quasr "
                         "needs the float weights; convert with ct2-transformers-converter without --quantization "
                         "(or --quantization float16)")
    sd: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str):
        sd[f"{dst}.weight"] = v[f"{src}/weight"]
        sd[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(src: str, dst: str):
        sd[f"{dst}.weight"] = v[f"{src}/gamma"]
        sd[f"{dst}.bias"] = v[f"{src}/beta"]

    def fused(src: str, dsts: list[str]):
        ws = _split_rows(v[f"{src}/weight"], len(dsts))
        bs = _split_rows(v[f"{src}/bias"], len(dsts))
        for dst, w, b in zip(dsts, ws, bs):
            sd[f"{dst}.weight"] = w
            if dst.endswith("k_proj"):
                if np.abs(b.astype(np.float32)).max() != 0:
                    raise ModelError(f"{src}: key bias is not zero; transformers Whisper has no key bias")
            else:
                sd[f"{dst}.bias"] = b

    def n_layers(stack: str) -> int:
        return len({m.group(1) for k in v if (m := re.match(rf"{stack}/layer_(\d+)/", k))})

    enc_layers, dec_layers = n_layers("encoder"), n_layers("decoder")
    for i in range(enc_layers):
        s, d = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.q_proj", f"{d}.self_attn.k_proj", f"{d}.self_attn.v_proj"])
        linear(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        norm(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{d}.fc1")
        linear(f"{s}/ffn/linear_1", f"{d}.fc2")
    for i in range(dec_layers):
        s, d = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.q_proj", f"{d}.self_attn.k_proj", f"{d}.self_attn.v_proj"])
        linear(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        norm(f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
        linear(f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
        fused(f"{s}/attention/linear_1", [f"{d}.encoder_attn.k_proj", f"{d}.encoder_attn.v_proj"])
        linear(f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
        norm(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{d}.fc1")
        linear(f"{s}/ffn/linear_1", f"{d}.fc2")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    sd["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")

    emb = v["decoder/embeddings/weight"]
    dims = dict(
        vocab_size=emb.shape[0],
        d_model=emb.shape[1],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a)).float() for k, a in sd.items()}
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ModelError(f"CTranslate2 model: tensor {k} has NaN or infinite values")
    return tensors, dims


def _special_ids(tokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    names = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
             "<|startofprev|>", "<|startoflm|>", "<|nocaptions|>", "<|notimestamps|>"]
    missing = [n for n in names if n not in vocab]
    if missing:
        raise ModelError(f"tokenizer.json lacks Whisper special tokens {missing}")
    return {n: vocab[n] for n in names}


def _merge_pair(m) -> tuple[str, str]:
    return tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1])


def repair_bpe_merges(tok: dict) -> list[str]:
    """Put back the merges a byte-level BPE tokenizer.json lost, in place; returns them ("a b").

    In GPT-2/Whisper byte-level BPE the token of id 256 + r is made by the merge of rank r. A token of that range
    that no merge makes can never be produced, and every word that contains it tokenizes differently from what the
    model was trained on. whisper-base's bundled tokenizer.json lacks rank 0, "Ġ t": " the", " to", " that" came
    out as two tokens ("Ġ", "the"), which leaves decoding alone (ids -> text) but poisons every teacher-forced
    use of text: calibration, cross-entropy, adapters. The lost merge is found as BPE itself would make the
    token: encode its characters with the merges of lower rank; the two pieces left are the merge. Tokens whose
    pieces are not two (or not in the vocabulary) are left alone."""
    model = tok.get("model", {})
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        return []
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    ordinary = sorted((i, t) for t, i in vocab.items() if i >= 256 and t not in special and not t.startswith("<|"))
    if len(merges) >= len(ordinary):
        return []
    made = {"".join(_merge_pair(m)) for m in merges}
    added = []
    for i, t in ordinary:
        if t in made or len(t) < 2:
            continue
        rank = i - 256
        ranks = {_merge_pair(m): r for r, m in enumerate(merges[:rank])}
        parts = list(t)
        while len(parts) > 2:
            pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, k = min(pairs)
            if best == 1 << 30:
                break
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        if len(parts) != 2 or any(p not in vocab for p in parts):
            continue
        m = f"{parts[0]} {parts[1]}" if isinstance(merges[0] if merges else "", str) else [parts[0], parts[1]]
        merges.insert(min(rank, len(merges)), m)
        made.add(t)
        added.append(f"{parts[0]} {parts[1]}")
    return added


def load_tokenizer(path: str | Path):
    """A CTranslate2 model's tokenizer.json as a transformers WhisperTokenizer, with lost BPE merges put back:
    (tokenizer, the merges repaired)."""
    from transformers import WhisperTokenizer

    path = Path(path)
    try:
        tok_json = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable tokenizer ({e})") from None
    repaired = repair_bpe_merges(tok_json)
    with tempfile.TemporaryDirectory() as tdir:
        (Path(tdir) / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
        return WhisperTokenizer(tokenizer_file=str(Path(tdir) / "tokenizer.json")), repaired


def convert_ct2_whisper(src: str | Path, out_dir: str | Path, model_bin: str | Path | None = None) -> Path:
    """Convert a CTranslate2 Whisper directory into a transformers model directory (written atomically).

    `model_bin` overrides `src/model.bin` (for models shipped in parts). The output holds the model
    (safetensors in the source's float16 or float32, so lossless), a complete generation config
    (no-timestamps token, suppressed tokens, alignment heads, languages and tasks for multilingual models),
    the tokenizer with timestamp tokens, and the feature extractor.
    """

    from quasr.results import staged_dir

    from tokenizers import AddedToken
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    src, out_dir = Path(src), Path(out_dir)
    model_bin = Path(model_bin) if model_bin else src / "model.bin"
    for need in (model_bin, src / "config.json", src / "tokenizer.json"):
        if not need.exists():
            raise ModelError(f"{src}: not a CTranslate2 Whisper directory ({need.name} is missing)")
    try:
        ct2_config = json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    variables = read_model_bin(model_bin)
    # keep the source precision: float16 weights are stored as float16, float32 ones as float32
    fp16 = all(a.dtype != np.float32 for k, a in variables.items() if k.endswith("/weight"))
    tensors, dims = ct2_state_dict(variables)
    del variables

    tokenizer, repaired = load_tokenizer(src / "tokenizer.json")
    ids = _special_ids(tokenizer)
    multilingual = dims["vocab_size"] >= 51865
    n_timestamps = 1501
    first_ts = ids["<|notimestamps|>"] + 1
    if len(tokenizer) == first_ts:  # CTranslate2's tokenizer.json lacks the timestamp tokens
        tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False)
                              for i in range(n_timestamps)])
    if len(tokenizer) != dims["vocab_size"]:
        raise ModelError(f"{src}: tokenizer has {len(tokenizer)} tokens, model has {dims['vocab_size']}")

    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(**dims, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                           decoder_start_token_id=sot, tie_word_embeddings=True,
                           suppress_tokens=None, begin_suppress_tokens=None)  # they live in `gen` below
    model = WhisperForConditionalGeneration(config)
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if m != "proj_out.weight"]:
        raise ModelError(f"{src}: tensor mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()

    gen = GenerationConfig(
        alignment_heads=ct2_config.get("alignment_heads"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=multilingual, max_initial_timestamp_index=50, max_length=dims["max_target_positions"],
        return_timestamps=False,
    )
    if multilingual:
        # language tokens sit between <|startoftranscript|> and <|translate|>
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in range(sot + 1, ids["<|translate|>"])}
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.generation_config = gen

    feature_extractor = WhisperFeatureExtractor(feature_size=dims["num_mel_bins"])
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    with staged_dir(out_dir) as tmp:
        model.to(torch.float16 if fp16 else torch.float32).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "quasr_source.json").write_text(json.dumps({"converted_from": str(src), "format": "ctranslate2",
                                                           "repaired_merges": repaired}))
    return out_dir
