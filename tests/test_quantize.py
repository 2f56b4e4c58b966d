"""The layer-wise engine on the real whisper-tiny.en and real asterisk speech (small calibration sets)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quasr.data import Utterance, load_source
from quasr.models import load_model
from quasr.quant.grid import QuantConfigError
from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead
from quasr.quantize import QuantConfig, quantize_


@pytest.fixture(scope="module")
def calib(asterisk_files):
    return load_source("asterisk:calib", limit=4).utterances


@pytest.fixture
def fresh_tiny():
    return load_model("whisper-tiny.en")


def test_block_walk_reproduces_the_model(tiny, calib):
    """Walking encoder and decoder blocks by hand (window mode) gives the model's own logits."""
    cal = tiny.calibration("window")
    [item] = cal.prepare(calib[:1])
    with torch.inference_mode():
        h = cal.encoder_input(item)
        for b in cal.blocks:
            if b.stage == "encoder":
                h = cal.run_block(b, b.module, h, None)
        ctx = cal.encoder_output(h)
        d = cal.decoder_input(item)
        for b in cal.blocks:
            if b.stage == "decoder":
                d = cal.run_block(b, b.module, d, ctx)
        ours = cal.logits(d)
        ref = tiny.model(input_features=item["features"], decoder_input_ids=item["tokens"]).logits
    assert torch.allclose(ours, ref, atol=1e-4)
    # teacher forcing: prompt, the reference's tokens, end of text
    tok = tiny.processor.tokenizer
    assert item["tokens"][0, 0] == tok.convert_tokens_to_ids("<|startoftranscript|>")
    assert item["tokens"][0, -1] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.decode(item["tokens"][0, item["n_prompt"]:-1]).strip() == calib[0].text


def test_stages_compose_to_the_layer_forward(tiny, calib):
    """The staged walk (each part run once) is the transformers layer, cut at its Linear groups."""
    cal = tiny.calibration("window")
    [item] = cal.prepare(calib[:1])
    enc, dec = cal.blocks[1], cal.blocks[-1]
    with torch.inference_mode():
        h = cal.encoder_input(item)
        ctx = torch.randn(1, 1500, h.shape[-1])
        d = cal.decoder_input(item)
        for block, state, ref in [(enc, (h,), enc.module(h, None)),
                                  (dec, (d, ctx), cal.run_block(dec, dec.module, d, ctx))]:
            stages = cal.stages(block)
            assert [s.names for s in stages] == block.groups
            for st in stages:
                x = st.inputs(block.module, state)
                assert x.shape[-1] == block.module.get_submodule(st.names[0]).in_features
                state = st.advance(block.module, state) if st.advance else state
            assert torch.allclose(state[0], ref, atol=1e-5)
        # causal: changing the last token leaves earlier positions alone
        d2 = d.clone()
        d2[:, -1] += 1
        state = (d2, ctx)
        for st in cal.stages(dec):
            state = st.advance(dec.module, state) if st.advance else state
        assert torch.allclose(state[0][:, :-1], ref[:, :-1], atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "qep"])
def test_staged_and_hooked_walks_agree(calib, method, monkeypatch):
    """Both ways of walking the encoder give the same statistics, hence the same quantized weights."""
    cfg = QuantConfig(method=method, bits=3, encoder_frames="speech", embedding_bits=None)
    staged = load_model("whisper-tiny.en")
    quantize_(staged, cfg, calib[:3], progress=False)
    from quasr.models.whisper import WhisperCalibration
    monkeypatch.setattr(WhisperCalibration, "stages", lambda self, block: None)
    hooked = load_model("whisper-tiny.en")
    quantize_(hooked, cfg, calib[:3], progress=False)
    a = dict(staged.model.named_buffers())
    b = dict(hooked.model.named_buffers())
    codes = [k for k in a if k.endswith("weight_packed")]
    assert len(codes) == 64
    same = sum(torch.equal(a[k], b[k]) for k in codes)
    close = sum((a[k] != b[k]).float().mean() < 0.002 for k in codes)  # float summation order may flip a code
    assert close == len(codes) and same >= 32, same


def test_rtn_packs_every_linear_and_the_tied_embedding(fresh_tiny, calib):
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in fresh_tiny.model.modules()) - 1  # minus proj_out
    report = quantize_(fresh_tiny, QuantConfig(method="rtn", bits=4, group_size=128), progress=False)
    m = fresh_tiny.model
    assert sum(isinstance(x, QuantizedLinear) for x in m.modules()) == n_linear == 64
    assert not any(type(x) is torch.nn.Linear for x in m.modules())
    assert isinstance(m.model.decoder.embed_tokens, QuantizedEmbedding)
    assert isinstance(m.proj_out, TiedQuantizedHead) and m.proj_out.embedding is m.model.decoder.embed_tokens
    assert len(report.layers) == 65 and fresh_tiny.recipe["method"] == "rtn"
    stored = sum(b.numel() * b.element_size() for b in m.buffers()) + sum(
        p.numel() * p.element_size() for p in m.parameters())
    assert stored < 40e6  # FP32 tiny.en is 151 MB
    text = fresh_tiny.transcribe([calib[0].audio], progress=False)[0]
    assert len(text.split()) >= 1


def test_gptq_beats_rtn_on_the_calibration_objective(fresh_tiny, calib):
    report = quantize_(fresh_tiny, QuantConfig(method="gptq", bits=3, encoder_frames="speech"), calib,
                       progress=False)
    rows = [r for r in report.layers if "err" in r]
    assert len(rows) == 64
    better = sum(r["err"] < r["err_rtn"] for r in rows)
    assert better >= 60, [(r["name"], r["err"], r["err_rtn"]) for r in rows if r["err"] >= r["err_rtn"]]
    assert np.median([r["err"] / r["err_rtn"] for r in rows]) < 0.7


def test_qep_sees_inherited_error_only_after_the_first_layer(fresh_tiny, calib):
    cfg = QuantConfig(method="qep", bits=4, alpha=0.5, encoder_frames="speech", embedding_bits=None)
    report = quantize_(fresh_tiny, cfg, calib, progress=False, asym_errors=True)
    by_name = {r["name"]: r for r in report.layers}
    first = by_name["model.encoder.layers.0.self_attn.q_proj"]
    assert first["err_asym_fp"] == pytest.approx(0, abs=1e-9)  # both streams see the same input there
    later = by_name["model.encoder.layers.2.fc1"]
    assert later["err_asym_fp"] > 1e-5  # the quantized layers before it shifted its input
    assert later["alpha"] == 0.5
    assert fresh_tiny.recipe["alpha"] == 0.5 and fresh_tiny.recipe["n_calib"] == len(calib)

    # without the diagnostics (the default) Σxxᵀ is not accumulated: no asymmetric errors, the same weights
    plain = load_model("whisper-tiny.en")
    report2 = quantize_(plain, cfg, calib, progress=False)
    assert not any("err_asym" in r for r in report2.layers)
    assert [r["err"] for r in report2.layers if "err" in r] == [r["err"] for r in report.layers if "err" in r]
    a, b = fresh_tiny.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_decoder_only_leaves_the_encoder_alone(fresh_tiny, calib):
    before = fresh_tiny.model.model.encoder.layers[0].fc1.weight.clone()
    quantize_(fresh_tiny, QuantConfig(method="gptq", layers="decoder", encoder_frames="speech"), calib,
              progress=False)
    enc_fc1 = fresh_tiny.model.model.encoder.layers[0].fc1
    assert type(enc_fc1) is torch.nn.Linear and torch.equal(enc_fc1.weight, before)
    assert isinstance(fresh_tiny.model.model.decoder.layers[0].fc1, QuantizedLinear)


@pytest.mark.parametrize("cfg, message", [
    (dict(bits=9), "bits must be between 2 and 8"),
    (dict(group_size=100), r"model.encoder.layers.0.self_attn.q_proj: group size 100 does not divide"),
    (dict(group_size=-5), "group size must be a positive number of columns"),
    (dict(method="magic"), "unknown method 'magic'"),
    (dict(layers="middle"), "layers must be all, encoder or decoder"),
    (dict(encoder_frames="all"), "encoder frames must be window or speech"),
    (dict(pad_stride=0), "padding-frame stride must be a positive integer"),
    (dict(percdamp=-0.1), "damping must be a finite number >= 0"),
    (dict(percdamp=float("nan")), "damping must be a finite number >= 0"),
    (dict(embedding_bits=1), "embedding bits must be between 2 and 8"),
    (dict(method="qep", alpha=1.5), r"alpha must lie in \[0, 1\]"),
])
def test_bad_configs_fail_before_any_work(fresh_tiny, calib, cfg, message):
    with pytest.raises(QuantConfigError, match=message) as e:
        quantize_(fresh_tiny, QuantConfig(**cfg), calib, progress=False)
    assert e.value.option == list(cfg)[-1]  # the setting is named (the CLI shows it as --option)
    packed = (QuantizedLinear, QuantizedEmbedding, TiedQuantizedHead)
    assert not any(isinstance(m, packed) for m in fresh_tiny.model.modules())  # nothing was quantized


def test_untied_head_with_embedding_bits_fails_before_any_work(fresh_tiny, calib):
    m = fresh_tiny.model
    m.proj_out.weight = torch.nn.Parameter(m.proj_out.weight.detach().clone())  # untie
    before = m.model.encoder.layers[0].fc1.weight.detach().clone()
    with pytest.raises(QuantConfigError, match="not tied"):
        quantize_(fresh_tiny, QuantConfig(method="rtn", embedding_bits=8), progress=False)
    assert torch.equal(m.model.encoder.layers[0].fc1.weight, before)


def test_nan_weight_is_named(fresh_tiny, calib):
    with torch.no_grad():
        fresh_tiny.model.model.decoder.layers[1].fc2.weight[3, 5] = float("nan")
    with pytest.raises(QuantConfigError, match=r"model.decoder.layers.1.fc2: weight has 1 NaN"):
        quantize_(fresh_tiny, QuantConfig(method="gptq"), calib, progress=False)


def test_calibration_input_errors(fresh_tiny, calib):
    from quasr.errors import DataError

    with pytest.raises(QuantConfigError, match="needs calibration utterances: got 1"):
        quantize_(fresh_tiny, QuantConfig(method="gptq"), calib[:1], progress=False)
    long = Utterance("too-long", np.zeros(16000 * 31, np.float32), "words", None)
    with pytest.raises(DataError, match="calibration utterance too-long: 31.0 s is longer"):
        quantize_(fresh_tiny, QuantConfig(method="gptq", encoder_frames="speech"), [calib[0], long],
                  progress=False)


@pytest.mark.slow
def test_cli_quantize_info_eval_roundtrip(tmp_path, asterisk_files):
    """quasr quantize writes a checkpoint that `quasr info` describes and `quasr eval` transcribes exactly
    as the in-memory quantized model does."""
    from typer.testing import CliRunner

    from quasr.cli import app
    from quasr.data.audio import read_audio

    runner = CliRunner()
    out = tmp_path / "ckpt"
    r = runner.invoke(app, ["quantize", "--method", "gptq", "--bits", "4", "--calib", "asterisk:calib",
                            "--n-calib", "3", "--encoder-frames", "speech", "--percdamp", "0.05", "--out", str(out),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "quasr_checkpoint.json").read_text())["recipe"]
    assert recipe["method"] == "gptq" and recipe["bits"] == 4 and recipe["n_calib"] == 3
    assert recipe["percdamp"] == 0.05
    assert len(recipe["calib_ids"]) == 3 and recipe["seed"] == 0
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and '"bits_per_weight"' in r.output

    manifest = tmp_path / "m.jsonl"
    files = asterisk_files[:3]
    manifest.write_text("".join(json.dumps({"audio": str(f), "text": "x"}) + "\n" for f in files))
    res = tmp_path / "res.json"
    r = runner.invoke(app, ["eval", "--model", str(out), "--data", str(manifest), "--out", str(res), "--no-progress"])
    assert r.exit_code == 0, r.output
    got = json.loads(res.read_text())
    hyps = [u["hyp"] for u in got["utterances"][str(manifest)]]
    rec = got["records"][0]
    assert rec["method"] == "gptq" and rec["bits"] == 4
    assert (rec["calib"], rec["n_calib"], rec["seed"], rec["embedding_bits"]) == ("asterisk:calib", 3, 0, 8)

    # the same recipe in memory, on the same calibration sample, transcribes identically
    from quasr.cli import _calibration

    asr = load_model("whisper-tiny.en")
    quantize_(asr, QuantConfig(method="gptq", bits=4, encoder_frames="speech", percdamp=0.05),
              _calibration(["asterisk:calib"], 3, 0, False), progress=False)
    assert asr.transcribe([read_audio(f) for f in files], progress=False) == hyps


def test_cli_errors_are_clear(tmp_path):
    from typer.testing import CliRunner

    from quasr.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["quantize", "--method", "gptq", "--calib", "asterisk:calib", "--n-calib", "5000",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "has only 263" in r.output
    assert not (tmp_path / "x").exists()
    r = runner.invoke(app, ["eval", "--model", "no-such-model", "--data", "asterisk:test", "--limit", "1"])
    assert r.exit_code == 2 and "unknown model" in r.output
    r = runner.invoke(app, ["eval", "--data", "asterisk:test", "--limit", "0"])
    assert r.exit_code == 2 and "--limit must be a positive" in r.output
    r = runner.invoke(app, ["eval", "--data", "asterisk:test", "--data", "asterisk:test", "--limit", "1"])
    assert r.exit_code == 2 and "more than once" in r.output


def test_cli_compare_scores_both_models_on_the_same_speech(tmp_path, asterisk_files):
    from typer.testing import CliRunner

    from quasr.cli import app

    out = tmp_path / "cmp.json"
    r = CliRunner().invoke(app, ["compare", "--method", "rtn", "--bits", "4", "--limit", "3", "--out", str(out),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    recs = [x for x in json.loads(out.read_text())["records"] if x["speaker"] is None]
    assert [x["method"] for x in recs] == ["fp", "rtn"]
    assert all(x["n_utts"] == 3 and x["data"] == "asterisk:test" for x in recs)
    assert recs[1]["bits"] == 4 and recs[1]["calib"] is None
