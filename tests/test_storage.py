"""Quantized storage: bit packing, packed modules, checkpoints that load without the original model, export."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quasr.quant.grid import QuantGrid, dequantize, rtn
from quasr.quant.modules import (QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, replace_module,
                                 replace_tied_embedding, tied_embedding_names)
from quasr.quant.pack import pack, pack_stream, packed_width, unpack, unpack_stream

PROMPT = "/usr/share/asterisk/sounds/en_US_f_Allison/auth-thankyou.wav"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are small, and on a busy 2-core machine two spinning OpenMP
    threads made this module ~8x slower (78 s instead of 9 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent layout reference: each row a little-endian bit stream, LSB first (numpy.packbits)."""
    rows, cols = codes.shape
    nb = (cols * bits + 7) // 8
    stream = ((codes.numpy()[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(rows, -1)
    stream = np.pad(stream, ((0, 0), (0, 8 * nb - stream.shape[1])))
    return torch.from_numpy(np.packbits(stream.reshape(rows, nb, 8), axis=-1, bitorder="little").reshape(rows, nb))


def _reference_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar = the bit stream of the columns taken in the order i, n+i, 2n+i... with byte j of group i moved
    to plane j (g codes make B bytes)."""
    rows, cols = codes.shape
    g = 8 // math.gcd(8, bits)
    b, n = g * bits // 8, -(-cols // g)
    padded = torch.nn.functional.pad(codes, (0, g * n - cols))
    order = torch.arange(g * n).reshape(g, n).t().reshape(-1)
    return _reference_stream(padded[:, order], bits).reshape(rows, n, b).transpose(1, 2).reshape(rows, -1)
    # (g*n codes make exactly n*b bytes: the stream of the padded row has no partial byte)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_round_trip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    for cols in (1, 3, 7, 8, 13, 33, 129, 384):
        codes = torch.randint(0, 1 << bits, (5, cols), generator=g).to(torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, packed_width(cols, bits))
        assert packed_width(cols, bits) <= (cols * bits + 7) // 8 + 7
        assert torch.equal(packed, _reference_planar(codes, bits)), (bits, cols)
        assert torch.equal(unpack(packed, bits, cols), codes), (bits, cols)
        stream = pack_stream(codes, bits)
        assert stream.shape == (5, (cols * bits + 7) // 8)
        assert torch.equal(stream, _reference_stream(codes, bits)), (bits, cols)
        assert torch.equal(unpack_stream(stream, bits, cols), codes), (bits, cols)
    if cols % 8 == 0:
        assert packed_width(cols, bits) == cols * bits // 8  # exactly bits/8 bytes a code
    if bits == 3:  # 8 codes in 3 bytes
        assert pack(torch.full((1, 8), 7, dtype=torch.uint8), 3).tolist() == [[255, 255, 255]]
    if bits == 4:  # low nibbles: first half of the row, high nibbles: second half
        assert pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4).tolist() == [[0x31, 0x42]]
        assert pack_stream(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x43]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        pack(torch.tensor([[3, 16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bytes a row"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


GRIDS = [QuantGrid(4, 128, False), QuantGrid(3, 128, False), QuantGrid(2, 64, False), QuantGrid(4, None, True),
         QuantGrid(8, None, True), QuantGrid(4, 128, True), QuantGrid(5, 128, False)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g.bits}g{g.group_size}{'s' if g.sym else 'a'}")
def test_quantized_linear_matches_dequantized_weight(grid, monkeypatch):
    from quasr.quant import modules

    torch.manual_seed(0)
    out_f, in_f = 384, 256
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    qw = rtn(w, grid)
    m = QuantizedLinear.from_weight(qw, b)
    # what is stored: float16 scales, so the exact reference rounds the scales the same way
    stored = dequantize(qw.codes, qw.scales.half().float(), qw.zeros, grid.group_size)
    assert torch.equal(m.dequantize(), stored)
    assert torch.equal(m.quantized_weight().codes, qw.codes)
    for chunked in (False, True):  # whole dequantization, and (forced) chunks of output rows for few tokens
        if chunked:
            monkeypatch.setattr(modules, "CHUNK_MIN_BYTES", 0)
            monkeypatch.setattr(modules, "CHUNK_BYTES", 100 * 4 * in_f)
        for shape in [(1, in_f), (3, 2, in_f), (200, in_f)]:  # decoding step, batch, encoder-like
            x = torch.randn(*shape)
            torch.testing.assert_close(m(x), F.linear(x, stored, b), rtol=1e-5, atol=1e-4)
            ref = F.linear(x, qw.dequantize(), b)  # float32 scales: differs by the float16 rounding of scales
            assert (m(x) - ref).abs().max() <= 2e-3 * ref.abs().max()
    monkeypatch.undo()
    # memory: bits/8 bytes a weight + a float16 scale per group (+ packed zero points when asymmetric)
    ng = 1 if grid.group_size is None else in_f // grid.group_size
    expected = out_f * (in_f * grid.bits // 8) + out_f * ng * 2
    if not grid.sym:
        expected += out_f * ((ng * grid.bits + 7) // 8)
    buffers = {n: t.nbytes for n, t in m.named_buffers()}
    assert sum(buffers.values()) - buffers["bias"] == expected == m.storage_nbytes()
    assert not list(m.parameters())
    assert m.bits_per_weight() <= grid.bits_per_weight(in_f) + 0.05
    if grid.sym:
        assert m.weight_zero is None
    # dtype conversions of the model do not re-round the stored scales
    scale = m.weight_scale.clone()
    m.to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float16 and torch.equal(m.weight_scale, scale)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_quantized_linear_odd_width_per_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(37, 101)
    qw = rtn(w, QuantGrid(bits, None, False))
    m = QuantizedLinear.from_weight(qw)
    stored = dequantize(qw.codes, qw.scales.half().float(), qw.zeros, None)
    assert torch.equal(m.dequantize(), stored) and torch.equal(m.quantized_weight().zeros, qw.zeros)
    x = torch.randn(4, 101)
    torch.testing.assert_close(m(x), F.linear(x, stored), rtol=1e-5, atol=1e-4)


class _TiedLM(nn.Module):
    """A transformers-like toy: input embedding tied to the output projection."""

    def __init__(self, vocab=3000, dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(self.embed(ids))


@pytest.mark.parametrize("grid", [QuantGrid(8, None, True), QuantGrid(4, 32, False)], ids=["w8", "w4g32"])
def test_quantized_embedding_and_tied_head_share_one_copy(grid, monkeypatch):
    from quasr.quant import modules

    monkeypatch.setattr(modules, "CHUNK_MIN_BYTES", 0)  # the chunked head, as for a real vocabulary
    monkeypatch.setattr(modules, "CHUNK_BYTES", 700 * 4 * 64)
    torch.manual_seed(0)
    lm = _TiedLM()
    qw = rtn(lm.embed.weight.data, grid)
    qemb = replace_tied_embedding(lm, qw)
    assert isinstance(lm.embed, QuantizedEmbedding) and isinstance(lm.head, TiedQuantizedHead)
    assert lm.head.embedding is lm.embed
    deq = dequantize(qw.codes, qw.scales.half().float(), qw.zeros, grid.group_size)
    assert torch.equal(qemb.dequantize(), deq)
    ids = torch.tensor([[0, 5, 2999], [17, 17, 3]])
    assert torch.equal(lm.embed(ids), deq[ids])
    for n in (1, 6, 100):
        x = torch.randn(n, 64)
        torch.testing.assert_close(lm.head(x), x @ deq.T, rtol=1e-5, atol=1e-4)
    # one copy: the head owns nothing, the model's buffers are the embedding's packed storage only
    assert not list(lm.head.buffers()) and not list(lm.head.parameters()) and not list(lm.parameters())
    assert sum(t.nbytes for t in lm.buffers()) == qemb.storage_nbytes()
    assert set(lm.state_dict()) == {f"embed.{k}" for k, _ in qemb.named_buffers()}
    assert tied_embedding_names(lm) == ("embed", "head")
    assert qemb.bits_per_weight() <= grid.bits_per_weight(64) + 0.1


def test_replace_module_names_what_is_missing():
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3)))
    new = nn.Identity()
    old = replace_module(m, "1.0", new)
    assert isinstance(old, nn.Linear) and m[1][0] is new
    with pytest.raises(KeyError, match="nope"):
        replace_module(m, "1.nope", nn.Identity())


# ---------------------------------------------------------------------------------------------- real model


def quantize_rtn(asr, grid=QuantGrid(4, 128, False), embedding_grid=QuantGrid(8, None, True)):
    """RTN on every encoder/decoder Linear (not the tied head) and the tied token embedding."""
    model = asr.model
    head = tied_embedding_names(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and (head is None or name != head[1]):
            replace_module(model, name, QuantizedLinear.from_linear(mod, rtn(mod.weight.data, grid, name)))
    if embedding_grid is not None:
        replace_tied_embedding(model, rtn(model.get_input_embeddings().weight.data, embedding_grid, "embed"))
    return asr


@pytest.fixture(scope="module")
def quantized_tiny():
    from quasr.models import load_model

    return quantize_rtn(load_model("whisper-tiny.en"))


@pytest.fixture(scope="module")
def prompt_audio():
    from pathlib import Path

    from quasr.data.audio import read_audio

    if not Path(PROMPT).exists():
        pytest.skip("Debian asterisk-core-sounds-en-wav is not installed (scripts/setup.sh installs it)")
    return read_audio(PROMPT)


RECIPE = {"method": "rtn", "bits": 4, "group_size": 128, "sym": False, "calib": None, "n_calib": 0, "seed": 0,
          "embedding": {"bits": 8, "group_size": None, "sym": True}, "layers": {"fc1": {"err": np.float32(0.5)}}}


@pytest.fixture(scope="module")
def saved(quantized_tiny, tmp_path_factory):
    from quasr import checkpoint

    return checkpoint.save(quantized_tiny, tmp_path_factory.mktemp("ck") / "tiny-w4g128", RECIPE)


def _logits(asr, audio):
    feats = asr.processor.feature_extractor([audio], sampling_rate=16000, return_tensors="pt").input_features
    tok = asr.processor.tokenizer
    dec = torch.tensor([tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]) + [1081, 345]])
    with torch.inference_mode():
        return asr.model(input_features=feats, decoder_input_ids=dec).logits


@pytest.mark.slow
def test_checkpoint_round_trip_on_real_model(quantized_tiny, saved, prompt_audio):
    from quasr import checkpoint
    from quasr.models import load_model

    model = quantized_tiny.model
    assert isinstance(model.proj_out, TiedQuantizedHead) and "proj_out.weight" not in model.state_dict()
    model.tie_weights()  # transformers helper: must not recreate a full-precision tied weight
    assert isinstance(model.proj_out, TiedQuantizedHead)

    loaded = load_model(str(saved))  # the quasr_checkpoint.json route
    assert loaded.name == "tiny-w4g128" and loaded.recipe["method"] == "rtn" and loaded.recipe["layers"]
    assert (loaded.method, loaded.bits, loaded.group_size) == ("rtn", 4, 128)
    m2 = loaded.model
    assert isinstance(m2.proj_out, TiedQuantizedHead) and m2.proj_out.embedding is m2.model.decoder.embed_tokens
    assert all(t.device.type == "cpu" for t in list(m2.parameters()) + list(m2.buffers()))
    n_lin = sum(isinstance(m, QuantizedLinear) for m in m2.modules())
    assert n_lin == 64
    # in memory: packed storage, no full-precision copy of any quantized weight
    fp_bytes = sum(p.nbytes for p in m2.parameters())
    assert fp_bytes < 6e6 and sum(b.nbytes for b in m2.buffers()) < 30e6
    assert torch.equal(_logits(quantized_tiny, prompt_audio), _logits(loaded, prompt_audio))
    text = quantized_tiny.transcribe([prompt_audio], progress=False)
    assert loaded.transcribe([prompt_audio], progress=False) == text and text[0].strip()

    info = checkpoint.info(saved)
    dir_mb = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) / 1e6
    print(f"\ntiny.en W4G128 + 8-bit embedding: dir {dir_mb:.1f} MB, weights file {info['file_mb']:.1f} MB, "
          f"linear {info['linear']['bits_per_weight']:.3f} bits/weight, "
          f"embedding {info['embedding']['bits_per_weight']:.3f} bits/weight")
    assert dir_mb <= 40
    assert info["n_quantized_linear"] == 64 and info["linear"]["bits"] == [4]
    assert 4.1 < info["linear"]["bits_per_weight"] < 4.2
    assert 8.0 < info["embedding"]["bits_per_weight"] < 8.1
    assert info["recipe"]["bits"] == 4


def _corrupt_copy(saved, tmp_path, how):
    d = tmp_path / "ck"
    shutil.copytree(saved, d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    return d


@pytest.mark.parametrize("how,message", [("truncate", "truncated"), ("flip", "sha256")])
def test_damaged_checkpoint_is_reported(saved, tmp_path, how, message):
    from quasr import checkpoint
    from quasr.errors import ModelError

    d = _corrupt_copy(saved, tmp_path, how)
    with pytest.raises(ModelError, match=message) as e:
        checkpoint.load(d)
    assert str(d / "model.safetensors") in str(e.value)


def test_missing_or_extra_tensor_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    from quasr import checkpoint
    from quasr.checkpoint import CheckpointError

    d = tmp_path / "ck"
    shutil.copytree(saved, d)
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    manifest = json.loads((d / checkpoint.MANIFEST).read_text())

    def rewrite(ts):
        save_file(ts, str(f))
        manifest["files"]["model.safetensors"].update(bytes=f.stat().st_size, sha256=checkpoint._sha256(f))
        (d / checkpoint.MANIFEST).write_text(json.dumps(manifest))

    gone = "model.decoder.layers.1.fc2.weight_scale"
    rewrite({k: v for k, v in tensors.items() if k != gone})
    with pytest.raises(CheckpointError, match=f"missing tensor.*{gone}"):
        checkpoint.load(d)
    rewrite(dict(tensors, stray=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*stray"):
        checkpoint.load(d)


def test_interrupted_save_leaves_nothing_behind(quantized_tiny, saved, tmp_path, monkeypatch):
    from quasr import checkpoint

    def boom(path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_sha256", boom)  # fails after model.safetensors is written
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(quantized_tiny, out, RECIPE)
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint survives a failed overwrite untouched
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(quantized_tiny, old, RECIPE)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    # and save refuses to replace a directory that is not a checkpoint
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(checkpoint.CheckpointError, match="refusing"):
        checkpoint.save(quantized_tiny, other, RECIPE)
    assert (other / "keep.txt").read_text() == "mine"


def test_compressed_tensors_export_decompresses_to_our_weights(quantized_tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    from quasr.export import export_compressed_tensors

    out = export_compressed_tensors(quantized_tiny, tmp_path / "ct", embedding="quantized")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["format"] == "pack-quantized" and q["quant_method"] == "compressed-tensors"
    assert cfg["tie_word_embeddings"] is True
    tensors = load_file(str(out / "model.safetensors"))
    fc1 = "model.encoder.layers.0.fc1"
    assert tensors[f"{fc1}.weight_packed"].dtype == torch.int32
    assert tensors[f"{fc1}.weight_packed"].shape == (1536, 384 * 4 // 32)
    assert tensors[f"{fc1}.weight_zero_point"].shape == (1536 * 4 // 32, 3)
    assert tensors[f"{fc1}.weight_shape"].tolist() == [1536, 384]
    assert "proj_out.weight" not in tensors and "model.decoder.embed_tokens.weight_packed" in tensors

    # decompress with the compressed-tensors package itself (model-free, from the file and config.json)
    dense = CompressedTensorsDequantizer(str(out), dtype=torch.float32).validate(tensors)
    n = 0
    for name, m in quantized_tiny.model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            # float16 scales: compressed-tensors dequantizes in the scale dtype, one rounding of the same product
            assert torch.equal(dense[f"{name}.weight"], m.dequantize(torch.float32).half().float()), name
            n += 1
    assert n == 65

    # the default keeps the embedding dense (inference engines quantize Linear layers only)
    out = export_compressed_tensors(quantized_tiny, tmp_path / "ct", embedding="dense")
    tensors = load_file(str(out / "model.safetensors"))
    emb = quantized_tiny.model.model.decoder.embed_tokens
    assert torch.equal(tensors["model.decoder.embed_tokens.weight"], emb.dequantize(torch.float32))
    assert not any(k.startswith("model.decoder.embed_tokens.weight_") for k in tensors)


def test_the_same_weights_give_the_same_file_bytes(quantized_tiny, saved, tmp_path):
    """Saving the same model again, in another process, writes the same model.safetensors byte for byte (the
    safetensors header once listed its metadata in a random order, so equal weights had different sha256s)."""
    import subprocess
    import sys

    from quasr import checkpoint

    again = checkpoint.save(quantized_tiny, tmp_path / "again", RECIPE)
    assert (again / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    code = ("import sys; from safetensors.torch import load_file, save_file; "
            "save_file(load_file(sys.argv[1]), sys.argv[2], metadata={'format': 'pt'})")
    other = tmp_path / "other.safetensors"
    subprocess.run([sys.executable, "-c", code, str(saved / "model.safetensors"), str(other)], check=True)
    assert other.read_bytes() == (saved / "model.safetensors").read_bytes()
