"""The analysis scripts whose numbers the README quotes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _transcripts(path: Path, errors: list[int], ids=None) -> None:
    ids = ids or [f"u{i}" for i in range(len(errors))]
    path.write_text("".join(json.dumps({"id": i, "errors": e, "n_ref": 10}) + "\n" for i, e in zip(ids, errors)))


def test_paired_seed_means_averages_each_utterance_over_seeds(tmp_path, monkeypatch, capsys):
    """A's seeds disagree (0 and 2 errors: mean 1), B has 3 errors on every utterance: A − B is −20 points on
    every resample, A better on all; a mismatch of utterances between the recipes is refused."""
    mod = _script("paired_seed_means")
    n = 40
    for s in ("asterisk_test", "tts_test"):
        _transcripts(tmp_path / f"a-seed=0-{s}.jsonl", [0] * n)
        _transcripts(tmp_path / f"a-seed=1-{s}.jsonl", [2] * n)
        _transcripts(tmp_path / f"b-seed=0-{s}.jsonl", [3] * n)
    monkeypatch.setattr("sys.argv", ["x", str(tmp_path / "a-seed=?-{set}.jsonl"),
                                     str(tmp_path / "b-seed=?-{set}.jsonl")])
    mod.main()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("A (2 seeds) − B (1 seeds)" in line for line in out)
    assert all("-20.00 [-20.00, -20.00]" in line and f"{n} / 0 utterances" in line for line in out)
    _transcripts(tmp_path / "b-seed=0-asterisk_test.jsonl", [3] * n, ids=[f"v{i}" for i in range(n)])
    with pytest.raises(SystemExit, match="different utterances"):
        mod.main()
    _transcripts(tmp_path / "a-seed=1-asterisk_test.jsonl", [2] * (n - 1))
    with pytest.raises(SystemExit, match="hold different utterances"):
        mod.main()


def test_paired_seed_means_by_speaker_splits_the_comparison_by_voice(tmp_path, monkeypatch, capsys):
    """--by-speaker: A is 2 errors better on every utterance of voice x and 1 worse on every one of voice y, so the
    set's difference (−0.5 errors an utterance on average, −5 points) splits into −20 and +10 points; a transcript
    without a speaker field is refused by name."""
    mod = _script("paired_seed_means")
    n = 20
    for s in ("asterisk_test", "tts_test"):
        for name, errs in (("a", [1] * n + [4] * n), ("b", [3] * n + [3] * n)):
            lines = [{"id": f"u{i}", "speaker": "x" if i < n else "y", "errors": e, "n_ref": 10}
                     for i, e in enumerate(errs)]
            (tmp_path / f"{name}-seed=0-{s}.jsonl").write_text("".join(json.dumps(u) + "\n" for u in lines))
    monkeypatch.setattr("sys.argv", ["x", "--by-speaker", str(tmp_path / "a-seed=?-{set}.jsonl"),
                                     str(tmp_path / "b-seed=?-{set}.jsonl")])
    mod.main()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6
    assert "-5.00 [" in out[0] and out[1].startswith("  x (20 utterances, 200 words): -20.00 [-20.00, -20.00]")
    assert out[2].startswith("  y (20 utterances, 200 words): +10.00 [+10.00, +10.00]") and "0 / 20" in out[2]
    _transcripts(tmp_path / "a-seed=0-asterisk_test.jsonl", [1] * (2 * n))  # no speaker field
    _transcripts(tmp_path / "b-seed=0-asterisk_test.jsonl", [1] * (2 * n))
    with pytest.raises(SystemExit, match="a-seed=0-asterisk_test.jsonl: utterance u0 has no speaker"):
        mod.main()


def test_paired_seed_means_reads_records_a_results_file_names(tmp_path, monkeypatch, capsys):
    """`FILE.json?key=value&...` picks records by their keys (null for an absent padding weight, numbers parsed),
    whatever their transcript file names hide; `seeds=` keeps some; two records of one seed are refused."""
    mod = _script("paired_seed_means")
    n, recs = 30, []
    (tmp_path / "transcripts").mkdir()
    for pw, errs in ((None, [3, 5]), (0.25, [1, 1])):
        for seed, e in enumerate(errs):
            for s, data in (("asterisk_test", "asterisk:test"), ("tts_test", "tts:test")):
                name = f"transcripts/x-{seed}-{pw}-{s}.jsonl"
                _transcripts(tmp_path / name, [e] * n)
                recs.append({"method": "fade", "bits": 3, "seed": seed, "pad_weight": pw, "speaker": None,
                             "data": data, "transcripts": name})
                recs.append({**recs[-1], "speaker": "spk1"})  # per-speaker rows are not the set's record
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"records": recs}))
    q = f"{results}?method=fade&bits=3"
    monkeypatch.setattr("sys.argv", ["x", q + "&pad_weight=0.25", q + "&pad_weight=null"])
    mod.main()
    out = capsys.readouterr().out.splitlines()
    assert all("A (2 seeds) − B (2 seeds)" in line and "-30.00 [-30.00, -30.00]" in line for line in out)
    monkeypatch.setattr("sys.argv", ["x", q + "&pad_weight=0.25", q + "&pad_weight=null&seeds=1"])
    mod.main()
    assert all("B (1 seeds)" in line and "-40.00" in line for line in capsys.readouterr().out.splitlines())
    monkeypatch.setattr("sys.argv", ["x", q, q + "&pad_weight=null"])
    with pytest.raises(SystemExit, match="more than one record of seed 0"):
        mod.main()
    (tmp_path / recs[0]["transcripts"]).unlink()  # a record whose transcript is gone: named, not a traceback
    monkeypatch.setattr("sys.argv", ["x", q + "&pad_weight=null", q + "&pad_weight=0.25"])
    with pytest.raises(SystemExit, match="not there: .*x-0-None-asterisk_test.jsonl"):
        mod.main()


def test_calib_dev_ce_excludes_every_utterance_a_checkpoint_calibrated_on(tmp_path):
    """Weights' draw, the activation scales' sample and the ESC fitness subset are all in-sample for a checkpoint:
    a held-out cross-entropy must leave out each of them."""
    mod = _script("calib_dev_ce")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "quasr_checkpoint.json").write_text(json.dumps({"recipe": {
        "model": "whisper-tiny.en", "calib_ids": ["w1", "w2"],
        "method_info": {"activations": {"calibration_ids": ["a1"], "esc": {"subset_ids": ["e1", "w1"]}}}}}))
    assert mod.calib_ids(str(ck)) == {"w1", "w2", "a1", "e1"}
    assert mod.calib_ids("whisper-tiny.en") == set() and mod.text_model(str(ck)) == "whisper-tiny.en"


def test_frame_errors_splits_speech_from_padding(tmp_path, monkeypatch, capsys, asterisk_files):
    """Two round-to-nearest checkpoints of tiny.en: W3's output error is above W4's on every layer and on both
    kinds of frames, so its geometric-mean ratio to W4 and its whole interval lie above 1; a checkpoint of
    another model is refused."""
    from quasr import checkpoint
    from quasr.models import load_model
    from quasr.quantize import QuantConfig, quantize_

    mod = _script("frame_errors")
    ckpts = []
    for bits in (4, 3):
        asr = load_model("whisper-tiny.en")
        quantize_(asr, QuantConfig(method="rtn", bits=bits), progress=False)
        ckpts.append(str(checkpoint.save(asr, tmp_path / f"w{bits}", dict(asr.recipe, model="whisper-tiny.en"))))
    out = tmp_path / "fe.json"
    monkeypatch.setattr("sys.argv", ["x", *ckpts, "--sets", "asterisk:calib-dev", "--n", "2", "--resamples", "200",
                                     "--out", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert res["n_utts"] == 2 and len(res["layers"]) == 24  # tiny.en's encoder: 4 layers x 6 Linears
    w4, w3 = res["err"]
    assert all(0 < a < b for la, lb in zip(w4, w3) for a, b in zip(la, lb))
    r = res["against_first"][ckpts[1]]
    assert r["speech"]["ci95"][0] > 1 and r["padding"]["ci95"][0] > 1
    assert "speech" in capsys.readouterr().out
    meta = Path(ckpts[1]) / "quasr_checkpoint.json"
    rec = json.loads(meta.read_text())
    rec["recipe"]["model"] = "whisper-base"
    meta.write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match="different models"):
        mod.main()
    monkeypatch.setattr("sys.argv", ["x", ckpts[0], str(tmp_path)])
    with pytest.raises(SystemExit, match="not a quasr checkpoint"):
        mod.main()


def test_failures_script_classifies_committed_transcripts(tmp_path, capsys):
    """The script scores each line again (it does not trust a stored error count) and names the failed decodes."""
    mod = _script("failures")
    ref = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    rows = [{"id": "long", "ref": ref, "hyp": "alpha bravo", "errors": 0, "n_ref": 10},
            {"id": "short", "ref": "hello", "hyp": "hello " + "no " * 14, "errors": 0, "n_ref": 1},
            {"id": "fine", "ref": ref, "hyp": ref, "errors": 0, "n_ref": 10}]
    (tmp_path / "x-asterisk_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = mod.summarize(str(tmp_path / "x-asterisk_test.jsonl"))
    assert s["errors"] == 22 and s["truncated"] == [("long", 8, 10)] and s["runaway"] == [("short", 14, 1)]
    mod.main([str(tmp_path / "*-asterisk_test.jsonl"), "--list"])
    out = capsys.readouterr().out
    assert "truncated 1 (8 errors, 36 %); runaway 1 (14 errors, 64 %)" in out and "long: 8 errors on 10 words" in out
    with pytest.raises(SystemExit, match="no transcripts match"):
        mod.main([str(tmp_path / "nothing-*.jsonl")])
    (tmp_path / "y-asterisk_test.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(SystemExit, match=r"y-asterisk_test.jsonl: line 2 is not a transcript line"):
        mod.main([str(tmp_path / "y-*.jsonl")])


def test_early_stops_risk_reads_end_of_text_along_the_reference(tiny):
    """Real tiny.en on a real sentence: a head biased towards <|endoftext|> gives it probability near 1 before the
    last position, the plain model far less; audio longer than one window has no teacher-forced pass (None)."""
    import copy

    import numpy as np
    import torch

    from quasr.data.utterance import Utterance
    from quasr.data import load_source

    mod = _script("early_stops")
    u = next(x for x in load_source("asterisk:test").utterances if len(x.text.split()) >= 8 and x.seconds < 20)
    long = Utterance("long", np.zeros(31 * 16000, dtype=np.float32), "a b c")
    plain = mod.eot_risk(tiny, [u, long], tiny)
    biased = copy.deepcopy(tiny)
    eot = tiny.model.config.eos_token_id
    head = biased.model.proj_out
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[eot] = 50.0
    [risky] = mod.eot_risk(biased, [u], tiny)
    assert plain[1] is None and plain[0] < 0.5 and risky > 0.99
