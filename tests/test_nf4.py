"""NF4 as a storage format of the core: codes equal bitsandbytes' NF4 for the same tensor, packed modules and
checkpoints hold it, exports refuse it."""
from __future__ import annotations

import pytest
import torch

from quasr.quant.formats import NF4, NF4_LEVELS, dq_decode, dq_encode, nf4_quantize
from quasr.quant.modules import QuantizedLinear


def test_codes_equal_bitsandbytes_nf4():
    bnb = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 384, generator=g) * 0.05
    W[3, 17] = 1.5  # an outlier in one block
    ours = nf4_quantize(W, 64)
    packed, state = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4")
    b = packed.reshape(-1)
    theirs = torch.stack([b >> 4, b & 0x0F], dim=1).reshape(W.shape)  # bitsandbytes: first code in the high nibble
    assert torch.equal(ours.codes, theirs.to(torch.uint8))
    assert torch.allclose(ours.absmax.reshape(-1), state.absmax, rtol=0, atol=0)
    assert torch.allclose(NF4_LEVELS, state.code[:16].float())
    assert torch.equal(ours.dequantize(), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_module_and_double_quant(double_quant):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 256, generator=g)
    qw = nf4_quantize(W, 64, double_quant)
    lin = QuantizedLinear.from_weight(qw, torch.zeros(64))
    assert lin.fmt == NF4(64, double_quant)
    assert torch.equal(lin.dequantize(), qw.dequantize())
    x = torch.randn(3, 256, generator=g)
    assert torch.allclose(lin(x), x @ qw.dequantize().T, atol=1e-5)
    assert torch.equal(lin._dequantize_rows(10, 20, torch.float32), qw.dequantize()[10:20])  # also across DQ blocks
    bpw = lin.bits_per_weight()
    assert (4.12 < bpw < 4.14) if double_quant else bpw == pytest.approx(4.5)


def test_double_quant_error_is_small():
    absmax = torch.rand(1000) * 0.2 + 0.01
    codes, scale, offset = dq_encode(absmax)
    back = dq_decode(codes, scale, offset, 1000)
    assert codes.dtype == torch.uint8 and len(scale) == 4
    assert (back - absmax).abs().max() <= scale.max() / 2 + 1e-7


@pytest.mark.slow
def test_nf4_checkpoint_round_trip_and_exports_refuse_it(tmp_path):
    from quasr import checkpoint
    from quasr.data import load_source
    from quasr.deploy.ggml import GgmlError, export_ggml
    from quasr.models import load_model
    from quasr.quantize import QuantConfig, quantize_

    asr = load_model("whisper-tiny.en")
    quantize_(asr, QuantConfig(method="nf4", bits=4, group_size=64, options={"double_quant": True}), progress=False)
    audio = [u.audio for u in load_source("asterisk:test", limit=2).utterances]
    text = asr.transcribe(audio, progress=False)
    out = checkpoint.save(asr, tmp_path / "nf4", asr.recipe)
    info = checkpoint.info(out)
    assert 4.1 < info["bits_per_weight"] < 4.2  # NF4 with 8-bit absmax; the embedding stays 8-bit affine
    loaded = checkpoint.load(out)
    fc1 = loaded.model.model.encoder.layers[0].fc1
    assert fc1.fmt == NF4(64, True)
    assert loaded.transcribe(audio, progress=False) == text
    fp32 = 4 * sum(p.numel() for p in load_model("whisper-tiny.en").model.parameters())
    assert info["dir_mb"] * 1e6 < fp32 / 3.5  # the tied 8-bit embedding keeps it above 1/6 (README)
    with pytest.raises(GgmlError, match="stored as nf4"):
        export_ggml(loaded, tmp_path / "x.bin", "q4_0")
