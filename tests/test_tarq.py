"""TARQ: rare-word tagging of calibration positions, rareBAL's balance, the closed-form step, pools."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quasr.data import Utterance
from quasr.methods import LayerStats
from quasr.methods.tarq import TarqOptions, rare_word, rarebal, residual, tag
from quasr.quant.grid import QuantConfigError
from quasr.quantize import QuantConfig, quantize_


def test_rare_words_are_those_below_the_zipf_threshold():
    assert rare_word("Okonkwo") and rare_word("levetiracetam,") and rare_word("Dr. Zbigniew's".split()[1])
    assert not rare_word("doctor") and not rare_word("the.") and not rare_word("472") and not rare_word(None)
    assert not rare_word("Okonkwo", zipf=0.5)


def test_tagging_marks_the_positions_that_predict_a_rare_word(tiny):
    cal = tiny.calibration("speech")
    [it] = cal.prepare([Utterance("u", np.full(16000, 0.01, np.float32), "Call Doctor Okonkwo at nine.", None)])
    info = tag([it], TarqOptions())
    tok = tiny.processor.tokenizer
    ids = it["tokens"][0].tolist()
    predicted = [tok.decode([ids[p + 1]]) for p in range(len(ids) - 1) if it["tail"][p]]
    assert "".join(predicted).strip() == "Okonkwo"  # exactly the positions whose next token spells the name
    assert info["rare_words"] == 1 and info["tail_positions"] == len(predicted) and len(it["tail"]) == len(ids)


def _stats(seed=0, n=400, d=32, tail_share=0.1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    tail = torch.zeros(n, dtype=torch.bool)
    tail[: int(n * tail_share)] = True
    X[tail] *= 0.5
    Xh = X + 0.05 * torch.randn(n, d, generator=g)
    s = LayerStats(Xh.T @ Xh, n=n, H_delta=(X - Xh).T @ Xh, XX=X.T @ X)
    s.extra = {"H_tail": Xh[tail].T @ Xh[tail], "tokens": True}
    return s, g


def test_rarebal_gives_the_tail_the_mass_of_the_common_positions():
    s, _ = _stats()
    H_rB, info = rarebal(s, TarqOptions(tail_cost=1.0))
    H_tail = s.extra["H_tail"]
    H_common = s.H - H_tail
    assert float((H_rB - H_common).trace()) == pytest.approx(float(H_common.trace()), rel=1e-5)
    assert info["rarebal"] == 1 and 0 < info["tail_mass"] < 0.1
    H2, _ = rarebal(s, TarqOptions(tail_cost=2.0))
    assert float((H2 - H_common).trace()) == pytest.approx(2 * float(H_common.trace()), rel=1e-5)
    s.extra = {}  # encoder frames: no labels, the plain H
    assert rarebal(s, TarqOptions())[0] is s.H


def test_residual_step_is_the_projection_of_the_pilot_error_and_is_clipped():
    s, g = _stats()
    W = torch.randn(16, 32, generator=g)
    cfg = QuantConfig(method="tarq", bits=3, group_size=None)
    target, info = residual(W, s.H, s, cfg, TarqOptions(), "l")
    assert 0 <= info["alpha"] <= 1 and (info["alpha"] == info["alpha_raw"] or not 0 <= info["alpha_raw"] <= 1)
    assert torch.allclose(target, W, atol=1.0) and info["d_rel"] > 0


@pytest.mark.parametrize("options, message", [
    (dict(tail_cost=-1), "tail cost must be a finite number >= 0"),
    (dict(tail_lang="xx"), "no frequency list for language 'xx'"),
    (dict(nonsense=1), "tarq has no option 'nonsense'"),
])
def test_bad_options_fail_before_any_work(tiny, options, message):
    utts = [Utterance(f"u{i}", np.full(16000, 0.01, np.float32), "hello there", None) for i in range(2)]
    with pytest.raises(QuantConfigError, match=message) as e:
        quantize_(tiny, QuantConfig(method="tarq", options=options), utts, progress=False)
    assert e.value.option == next(iter(options))
    with pytest.raises(QuantConfigError, match="gptq takes no such option"):
        quantize_(tiny, QuantConfig(method="gptq", options={"tail_cost": 1.0}), utts, progress=False)


@pytest.mark.slow
def test_tarq_on_tiny_balances_decoder_layers_and_falls_back_without_rare_words(capsys):
    from quasr.data import load_source
    from quasr.models import load_model

    asr = load_model("whisper-tiny.en")
    utts = load_source("tts:calib", limit=4).utterances
    report = quantize_(asr, QuantConfig(method="tarq", bits=4, encoder_frames="speech"), utts, progress=False)
    assert report.method_info["tail_positions"] > 0 and asr.recipe["method_info"]["rare_words"] > 0
    rows = {r["name"]: r for r in report.layers if "alpha" in r}
    assert rows["model.decoder.layers.0.fc1"]["rarebal"] == 1  # token rows: balanced
    assert rows["model.decoder.layers.0.encoder_attn.k_proj"]["rarebal"] == 0  # encoder frames: plain H
    assert rows["model.encoder.layers.1.fc1"]["rarebal"] == 0
    assert all(0 <= r["alpha"] <= 1 for r in rows.values())

    plain = [Utterance(u.id, u.audio, "the man said that it was good", u.speaker) for u in utts]
    asr = load_model("whisper-tiny.en")
    report = quantize_(asr, QuantConfig(method="tarq-rarebal", bits=4, encoder_frames="speech"), plain, progress=False)
    assert report.method_info["tail_positions"] == 0 and "no rare word" in capsys.readouterr().err
    assert all(r.get("rarebal") == 0 for r in report.layers if "rarebal" in r)


def test_pools_choose_by_rare_word_density():
    from quasr.data.pools import choose, rare_density

    pool = [Utterance(f"u{i}", np.zeros(10, np.float32), t, None) for i, t in enumerate(
        ["the cat sat", "Okonkwo met Zbigniew", "call Okonkwo now", "a good day", "levetiracetam dose", "it is fine"])]
    assert rare_density("Okonkwo met Zbigniew") == pytest.approx(2 / 3)
    top = choose(pool, 2, 0, "r-top")
    assert {u.id for u in top} == {"u1", "u4"}  # densities 2/3 and 1/2 (u2 is 1/3)
    mix = choose(pool, 4, 0, "r-mix")
    assert {"u1", "u4"} <= {u.id for u in mix} and len(mix) == 4
    assert choose(pool, 3, 1, "random") == choose(pool, 3, 1, "random")
    with pytest.raises(Exception, match="unknown calibration pool"):
        choose(pool, 2, 0, "best")


def test_pools_redraw_utterances_longer_than_the_window():
    import random

    from quasr.data.pools import choose

    sr = 16000
    pool = [Utterance(f"u{i:02d}", np.zeros(sr * (31 if i in (3, 7) else 1), np.float32), "a b", None)
            for i in range(20)]
    for seed in range(30):
        plain = sorted(random.Random(seed).sample(pool, 6), key=lambda u: u.id)
        rejected = []
        got = choose(pool, 6, seed, max_seconds=30.0, rejected=rejected)
        assert len(got) == 6 and len({u.id for u in got}) == 6
        assert all(u.seconds <= 30 for u in got)
        if any(u.id in ("u03", "u07") for u in plain):
            assert {u.id for u in plain} & {"u03", "u07"} <= set(rejected) <= {"u03", "u07"}
            assert {u.id for u in plain} - {"u03", "u07"} <= {u.id for u in got}  # the fitting draws are kept
        else:  # a draw with nothing too long is exactly the seed's old draw
            assert got == plain and rejected == []
    with pytest.raises(Exception, match="only 18 no longer than 30 s"):
        choose(pool, 19, 0, max_seconds=30.0)
