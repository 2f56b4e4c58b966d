"""Results files: standard keys, resumable cells, several writers, atomic writes."""
from __future__ import annotations

import json

import pytest

from quasr.results import RECORD_KEYS, ResultsFile, record, write_json


def test_cells_are_resumable_and_option_keys_tell_them_apart(tmp_path):
    path = tmp_path / "r.json"
    res = ResultsFile(path, "ptq", command="python bench/ptq.py", option_keys=("alpha",))
    res.add(record(model="m", method="qep", bits=4, data="asterisk:test", alpha=0.5, wer=9.0))
    assert res.done(record(model="m", method="qep", bits=4, data="asterisk:test", alpha=0.5))
    assert not res.done(record(model="m", method="qep", bits=4, data="asterisk:test", alpha=1.0))
    again = ResultsFile(path, "ptq", option_keys=("alpha",))  # a rerun sees what was measured
    assert again.done(record(model="m", method="qep", bits=4, data="asterisk:test", alpha=0.5))
    saved = json.loads(path.read_text())
    assert saved["normalizer"] == "whisper-english" and saved["command"] == "python bench/ptq.py"
    assert set(RECORD_KEYS) <= set(saved["records"][0])
    with pytest.raises(ValueError, match="holds benchmark 'ptq'"):
        ResultsFile(path, "baseline")


def test_two_writers_keep_each_others_records(tmp_path):
    path = tmp_path / "r.json"
    a, b = ResultsFile(path, "x"), ResultsFile(path, "x")
    a.add(record(model="m", data="one", wer=1.0))
    b.add(record(model="m", data="two", wer=2.0))
    a.add(record(model="m", data="one", wer=3.0))  # same cell: replaced, not duplicated
    got = {r["data"]: r["wer"] for r in json.loads(path.read_text())["records"]}
    assert got == {"one": 3.0, "two": 2.0}


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_fresh_starts_over_and_keeps_the_old_file_aside(tmp_path):
    path = tmp_path / "r.json"
    ResultsFile(path, "x").add(record(model="m", method="rtn", bits=4, data="a", wer=1.0))
    fresh = ResultsFile(path, "x", fresh=True)
    assert not fresh.done(record(model="m", method="rtn", bits=4, data="a"))
    fresh.add(record(model="m", method="gptq", bits=4, data="a", wer=2.0))
    assert [r["method"] for r in json.loads(path.read_text())["records"]] == ["gptq"]  # the old cell is not merged back
    assert json.loads((tmp_path / ".r.json.prev").read_text())["records"][0]["method"] == "rtn"


def test_each_record_keeps_the_command_that_measured_it(tmp_path):
    path = tmp_path / "r.json"
    ResultsFile(path, "x", command="python bench/ptq.py --bits 4").add(record(model="m", bits=4, data="a", wer=1.0))
    ResultsFile(path, "x", command="python bench/ptq.py --bits 3").add(record(model="m", bits=3, data="a", wer=2.0))
    saved = json.loads(path.read_text())
    assert {r["bits"]: r["command"] for r in saved["records"]} == {4: "python bench/ptq.py --bits 4",
                                                                  3: "python bench/ptq.py --bits 3"}
    assert saved["command"] == "python bench/ptq.py --bits 3"  # the file-level command is the latest run
    for r in saved["records"]:  # and the machine: results can differ between CPUs
        assert r["machine"]["cpus"] >= 1 and r["machine"]["cpu_capability"] and "torch" in r["machine"]


def _load_report():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[1] / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cells(tmp_path, results, cells, keys=()):
    """Write transcripts and records: cells are (method, seed, errors[, layers]) with 10 reference words each."""
    (tmp_path / "transcripts").mkdir(exist_ok=True)
    for method, seed, errs, *rest in cells:
        layers = rest[0] if rest else None
        t = f"transcripts/{method}-{seed}-{layers}.jsonl"
        (tmp_path / t).write_text("".join(json.dumps({"id": f"u{i}", "errors": e, "n_ref": 10}) + "\n"
                                          for i, e in enumerate(errs)))
        q = method != "fp"
        results.add(record(model="m", method=method, bits=4 if q else None, group_size=128 if q else None,
                           embedding_bits=8 if q else None, seed=seed, layers=layers, decoding="standard", data="s",
                           wer=100 * sum(errs) / (10 * len(errs)), rare_wer=0.0, n_utts=len(errs), transcripts=t))


def _rows(text: str, table: int) -> dict[str, str]:
    """{method label: row} of the table-th markdown table of a report."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return {line.split("|")[2].strip(): line for line in tables[table][2:]}


def test_report_pools_seeds_and_compares_with_rtn_per_utterance(tmp_path):
    """One runaway utterance makes GPTQ's WER worse than RTN's; the paired columns still show GPTQ better on
    two utterances of three; seeds pool into one row, as mean ± std and as the seed-mean model."""
    report = _load_report()
    path = tmp_path / "ptq.json"
    results = ResultsFile(path, "ptq", option_keys=("embedding_bits", "layers"))
    _cells(tmp_path, results, [("fp", None, [0, 0, 0]), ("rtn", None, [2, 3, 1]),
                               ("gptq", 0, [1, 1, 40]), ("gptq", 1, [1, 1, 40]), ("gptq", 2, [1, 1, 40])])
    text = report.ptq(path, resamples=2000)
    acc, pair = _rows(text, 0), _rows(text, 1)
    assert "| 0,1,2 |" in acc["gptq"] and "140.00 ± 0.00" in acc["gptq"]
    assert " 2 / 1 " in pair["gptq"]  # vs RTN, per utterance
    diff = 100 * (42 - 6) / 30
    assert f"+{diff:.2f} [" in pair["gptq"]  # Δ vs RTN of the seed-mean model
    assert "fp" not in pair  # nothing to compare full precision with
    assert report.paired({"a": 1, "b": 2}, {"a": 1, "b": 5}) == (1, 0)
    with pytest.raises(ValueError):
        report.paired({"a": 1}, {"b": 1})


def test_report_intervals_flag_a_clear_difference(tmp_path):
    report = _load_report()
    path = tmp_path / "ptq.json"
    results = ResultsFile(path, "ptq", option_keys=("embedding_bits", "layers"))
    n = 60
    _cells(tmp_path, results, [("fp", None, [0] * n), ("rtn", None, [3] * n), ("gptq", 0, [1] * n),
                               ("gptq", 1, [2] * (n // 2) + [1] * (n // 2))])
    pair = _rows(report.ptq(path, resamples=2000), 1)
    assert "†" in pair["gptq"].split("|")[5]  # below RTN everywhere: the interval excludes zero
    assert "1.5" not in pair["gptq"] and "60 / 0" in pair["gptq"]


def test_report_cost_leaves_out_a_seed_that_timed_only_part_of_its_quantization(tmp_path):
    """Seeds timed 100 and 200 s and a resumed run's 5 s marked partial: the cost cell is 150 ± 70.71 over the
    two whole ones, marked ‡ with its footnote; without the mark all three count and no footnote is written."""
    report = _load_report()
    path = tmp_path / "ptq.json"
    results = ResultsFile(path, "ptq", option_keys=("embedding_bits", "layers"))
    _cells(tmp_path, results, [("fp", None, [0] * 4), ("rtn", None, [1] * 4)]
           + [("gptq", s, [1] * 4) for s in range(3)])
    saved = json.loads(path.read_text())
    for r in saved["records"]:
        if r["method"] == "gptq":
            r["quant_seconds"] = (100.0, 200.0, 5.0)[r["seed"]]
            if r["seed"] == 2:
                r["quant_seconds_partial"] = "the second part of a resumed run"
    path.write_text(json.dumps(saved))
    text = report.ptq(path, resamples=200)
    assert "| 150.00 ± 70.71 ‡ |" in _rows(text, 2)["gptq"] and "‡ the mean leaves out seeds" in text
    for r in saved["records"]:
        r.pop("quant_seconds_partial", None)
    path.write_text(json.dumps(saved))
    text = report.ptq(path, resamples=200)
    assert "| 101.67 ± 97.51 |" in _rows(text, 2)["gptq"] and "‡" not in text


def test_report_refuses_mixed_decodings_and_bad_resamples(tmp_path, monkeypatch):
    report = _load_report()
    path = tmp_path / "ptq.json"
    results = ResultsFile(path, "ptq", option_keys=("embedding_bits",))
    _cells(tmp_path, results, [("rtn", None, [1, 2])])
    results.add(record(model="m", method="rtn", bits=4, group_size=128, embedding_bits=8, decoding="greedy", data="s", wer=1.0,
                       n_utts=2))
    with pytest.raises(SystemExit, match="mix decodings"):
        report.ptq(path)
    assert "| m | rtn |" in report.ptq(path, decoding="greedy", resamples=100)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr("sys.argv", ["report.py", "ptq", "--resamples", "0"])
    with pytest.raises(SystemExit, match="--resamples must be a positive"):
        report.main()


def test_report_pairs_a_split_with_the_rtn_of_the_same_layers_and_rewrites_only_the_marked_block(tmp_path,
                                                                                                   monkeypatch):
    report = _load_report()
    path = tmp_path / "ptq.json"
    results = ResultsFile(path, "ptq", option_keys=("embedding_bits", "layers"))
    _cells(tmp_path, results, [("rtn", None, [1, 1, 1]), ("rtn", None, [5, 5, 5], "decoder"),
                               ("gptq", 0, [4, 4, 6], "decoder"), ("gptq", 1, [6, 6, 6], "decoder")])
    pair = _rows(report.ptq(path, resamples=500), 1)
    row = pair["gptq, decoder only"]
    assert " 0 / 1 " in row and "+3.33 [" in row  # seed mean (5, 5, 6) against RTN of the decoder only (5, 5, 5),
    #                                             not of the whole model (1, 1, 1): that would be 0 / 3, +43.33
    rerun = tmp_path / "ptq-rerun.json"  # a partial file is compared with the main file's RTN
    ResultsFile(rerun, "ptq", option_keys=("embedding_bits", "layers")).add(record(
        model="m", method="gptq", bits=4, group_size=128, embedding_bits=8, layers="decoder", seed=0,
        decoding="standard", data="s", wer=1.0, rare_wer=0.0, n_utts=3, transcripts="transcripts/gptq-0-decoder.jsonl"))
    assert " 2 / 1 " in _rows(report.ptq(rerun, resamples=500), 1)["gptq, decoder only"]

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\nprose after\n")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr("sys.argv", ["report.py", "--readme", "ptq", "--resamples", "200"])
    report.main()
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\nprose after\n")
    assert "old table" not in text and "decoder only" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        report.main()
    monkeypatch.setattr("sys.argv", ["report.py", "ptq-typo"])
    with pytest.raises(SystemExit, match="ptq-typo.json: no such results file"):
        report.main()


def test_eval_cell_writes_records_and_transcripts_and_skips_done_cells(tmp_path, monkeypatch):
    """A benchmark cell: one record per set and speaker naming its decoding, a transcript file with the
    per-utterance decoding counts, and a second call that measures nothing."""
    import numpy as np
    import soundfile as sf

    from quasr.bench import eval_cell
    from quasr.decoding import Transcript, parse_decoding
    from quasr.models.base import AsrModel

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.float32) + 0.01, 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": "a.wav", "text": "hello world", "speaker": s})
                                + "\n" for i, s in enumerate(["a", "b", "a"])))

    class Fake(AsrModel):
        name = spec = "fake"
        calls = 0

        def transcribe(self, audios, batch_size=8, decoding=None, progress=True, desc=""):
            return [t.text for t in self.transcribe_detailed(audios, batch_size, decoding, progress, desc)]

        def transcribe_detailed(self, audios, batch_size=8, decoding=None, progress=True, desc=""):
            Fake.calls += 1
            return [Transcript("hello there", fallbacks=1, fallback_windows=1, temperature=0.2),
                    Transcript("hello world"), Transcript("hello world")]

    results = ResultsFile(tmp_path / "ptq.json", "ptq")
    recipe = dict(model="fake", method="fp", bits=None, group_size=None)
    recs = eval_cell(results, Fake(), str(manifest), None, recipe, decoding=parse_decoding("standard"),
                     progress=False)
    whole = recs[0]
    assert whole["decoding"] == "standard" and whole["speaker"] is None and whole["n_utts"] == 3
    assert whole["n_fallback_windows"] == 1 and whole["wer"] == pytest.approx(100 / 6, abs=1e-3)
    assert {r["speaker"] for r in recs[1:]} == {"a", "b"}
    lines = [json.loads(x) for x in (tmp_path / whole["transcripts"]).read_text().splitlines()]
    assert lines[0]["fallbacks"] == 1 and lines[0]["temperature"] == 0.2 and lines[0]["errors"] == 1
    assert eval_cell(results, Fake(), str(manifest), None, recipe, decoding=parse_decoding("standard"),
                     progress=False) is None and Fake.calls == 1
    assert eval_cell(results, Fake(), str(manifest), None, recipe, decoding=parse_decoding("greedy"),
                     progress=False) is not None  # another decoding is another cell


def test_speaker_mean_relative_change():
    from quasr.stats import speaker_mean_relative

    # speaker s1: 10% -> 5%, speaker s2: 20% -> 10%: the mean over speakers halves (-50 %), whatever the sizes
    ea = [1] * 5 + [0] * 5 + [2] * 10
    eb = [1] * 10 + [4] * 10
    n = [10] * 20
    g = ["s1"] * 10 + ["s2"] * 10
    ci = speaker_mean_relative(ea, eb, n, g, resamples=500)
    assert ci.diff == pytest.approx(-50.0) and ci.lo < -50 < ci.hi and ci.excludes_zero


def test_transcript_file_names_stay_short_and_distinct(tmp_path):
    from quasr.bench import OPTION_KEYS, Cell, transcripts_path
    from quasr.results import ResultsFile

    rf = ResultsFile(tmp_path / "esc.json", "esc", option_keys=OPTION_KEYS)
    cells = [Cell("whisper-tiny.en", "rtn", 8, None, sym=True, act_bits=8, act_calibrator="esc", esc_seed=s,
                  esc_budget=100) for s in (0, 1)]
    names = [transcripts_path(rf, dict(c.keys(), decoding="standard"), "asterisk:test").name for c in cells]
    assert all(len(n) < 255 for n in names) and names[0] != names[1]
    assert all(n.endswith("asterisk_test.jsonl") for n in names)
    short = transcripts_path(rf, dict(model="whisper-tiny.en", method="fp", decoding="standard"), "tts:test").name
    assert short == "esc-whisper-tiny.en-fp-decoding=standard-tts_test.jsonl"  # short names unchanged


def test_the_file_on_disk_wins_over_a_writers_stale_memory(tmp_path):
    """Two runs fill one grid. Records another run replaced, and records moved aside while a run is going, are not
    written back by a run that read the file earlier (the grid once resurrected records of a broken calibration
    that had been moved aside, and overwrote their re-measured replacements)."""
    path = tmp_path / "r.json"
    a = ResultsFile(path, "ptq")
    a.add(record(model="m", method="gptq", bits=4, data="x", wer=1.0), record(model="m", method="rtn", bits=4,
                                                                             data="x", wer=3.0))
    b = ResultsFile(path, "ptq")  # a second run, started later
    b.add(record(model="m", method="gptq", bits=4, data="x", wer=2.0))  # measured again: replaces a's record
    d = json.loads(path.read_text())  # someone moves the rtn record aside, under the lock as add() takes it
    d["records"] = [r for r in d["records"] if r["method"] != "rtn"]
    write_json(path, d)
    a.add(record(model="m", method="qep", bits=4, data="x", wer=0.5))  # the first run goes on
    saved = {r["method"]: r["wer"] for r in json.loads(path.read_text())["records"]}
    assert saved == {"gptq": 2.0, "qep": 0.5}
    assert not a.done(record(model="m", method="rtn", bits=4, data="x"))
    write_json(path, {**d, "records": []})  # emptied behind its back: nothing is done any more
    assert not a.done(record(model="m", method="qep", bits=4, data="x"))


def test_selection_report_marks_the_choice_by_its_criterion(tmp_path):
    report = _load_report()
    chosen = {"pad_weight": 0.25, "variant": "split", "criterion": "ce", "models": ["a", "b"],
              "dev_ce": {"pad_weight": {"1.0": [0.61, 0.50], "0.25": [0.60, 0.49]}, "variant": {"split": 0.7, "size": 0.8}},
              "dev_wer": {"pad_weight": {"1.0": [9.0, 8.0], "0.25": [9.5, 8.2]}, "variant": {"split": 20.0, "size": 18.0}},
              "dev_ce_vs_pad_weight_1": {"0.25": [[-0.01, -0.02, -0.001], [-0.01, -0.03, 0.01]]},
              "data": "x:calib-dev", "calib": "x:calib-fit", "seeds": [0, 1]}
    path = tmp_path / "fade-select.json"
    path.write_text(json.dumps({"records": [], "chosen": chosen}))
    text = report.selection(path)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "GPTQ W4G128, padding weight 0.25 ✓" in lines and "GPTQ W4G128, padding weight 1.0" in lines
    assert "0.6000 / 9.50" in lines["GPTQ W4G128, padding weight 0.25 ✓"]
    assert "0.4900 / 8.20" in lines["GPTQ W4G128, padding weight 0.25 ✓"]
    cells = lines["GPTQ W4G128, padding weight 0.25 ✓"].split("|")
    assert cells[2].strip().endswith("-0.0100 [-0.0200, -0.0010] †") and "†" not in cells[3]
    assert "FADE W3G128 `split` ✓" in lines and "FADE W3G128 `size`" in lines
    assert "chosen by cross-entropy" in text
    assert "nor above for the chosen FADE variant" not in text  # no guard measured: the note does not claim one
    chosen["dev_ce"]["fade_pad_weight"] = {"1.0": 0.78, "0.25": 0.79}
    chosen["dev_wer"]["fade_pad_weight"] = {"1.0": 20.0, "0.25": 22.0}
    chosen["fade_dev_ce_vs_pad_weight_1"] = {"0.25": [0.01, 0.002, 0.02]}
    path.write_text(json.dumps({"records": [], "chosen": chosen}))
    text = report.selection(path)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "(reference)" in lines["FADE W3G128 `split`, padding weight 1.0"]
    assert lines["FADE W3G128 `split`, padding weight 0.25"].split("|")[2].strip() == \
        "0.7900 / 22.00 / +0.0100 [+0.0020, +0.0200] †"
    assert "nor above for the chosen FADE variant" in text
    path.write_text(json.dumps({"records": []}))
    assert "not finished" in report.selection(path)


def test_peers_report_pairs_each_peer_with_quasr_and_draws_wer_against_size(tmp_path):
    report = _load_report()
    results = ResultsFile(tmp_path / "ptq.json", "ptq", option_keys=("embedding_bits",))
    _cells(tmp_path, results, [("gptq", 0, [0] * 30), ("gptq", 1, [0] * 30)])
    peers = ResultsFile(tmp_path / "peers.json", "peers", option_keys=("peer", "scheme"))
    t = "transcripts/peer.jsonl"
    (tmp_path / t).write_text("".join(json.dumps({"id": f"u{i}", "errors": 3, "n_ref": 10}) + "\n" for i in range(30)))
    peers.add(record(model="m", method="tool:int4", bits=4, group_size=128, peer="tool", scheme="int4",
                     decoding="standard", data="s", wer=30.0, rare_wer=0.0, n_utts=30, transcripts=t, size_mb=90.0))
    peers.add(record(model="m", method="tool:int3", bits=3, group_size=128, peer="tool", scheme="int3",
                     decoding="standard", data="s", error="Traceback ...\nRuntimeError: no kernel"))
    # a method benchmark's file: its own method joins quasr's rows, its copies of ptq.json's cells do not repeat
    fade = ResultsFile(tmp_path / "fade.json", "fade", option_keys=("embedding_bits", "layers", "variant"))
    _cells(tmp_path, fade, [("gptq", 0, [0] * 30), ("fade", 0, [5] * 30)])
    text = report.peers(tmp_path / "peers.json", resamples=200, plot=True)
    paired = [line for line in text.splitlines() if line.startswith("| m | tool:int4 | quasr gptq W4G128")]
    assert paired and "†" in paired[0] and "30 / 0" in paired[0]  # every utterance better, interval clear of zero
    assert len([line for line in text.splitlines() if line.startswith("| m | quasr gptq |")]) == 1
    assert [line for line in text.splitlines() if line.startswith("| m | quasr fade | W4G128 | 50.00")]
    assert "tool:int3 on s: `RuntimeError: no kernel`" in text  # a failed cell is listed, not dropped
    png = tmp_path / "peers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](bench/results/peers.png)" in text
    assert not list(tmp_path.glob(".peers.png*"))


def test_timing_report_divides_the_mean_seconds_of_the_two_tools_per_thread_count(tmp_path):
    report = _load_report()
    results = ResultsFile(tmp_path / "gptq-timing.json", "gptq-timing", option_keys=("tool", "threads", "rep"))
    for threads, quasr, llmc in ((1, (80.0, 100.0), (200.0, 200.0)), (2, (60.0,), (90.0, 110.0))):
        for tool, secs in (("quasr", quasr), ("llmcompressor", llmc)):
            results.add(*[record(model="m", method=tool, tool=tool, threads=threads, rep=i, quant_seconds=s,
                                 load_avg_before=0.1) for i, s in enumerate(secs)])
    rows = {line.split("|")[2].strip(): line for line in report.timing(tmp_path / "gptq-timing.json").splitlines()
            if line.startswith("| m |")}
    assert rows["1"].rstrip(" |").endswith("0.45") and "80.0 / 100.0" in rows["1"]  # 90 / 200
    assert rows["2"].rstrip(" |").endswith("0.60")  # 60 / 100: the repetitions are averaged, not paired


def test_a_recorded_failure_is_not_a_measurement(tmp_path):
    """A peer's failed cell keeps a record with its error; running the cell again (peers --retry-failed) must
    measure it, not skip it as done (the retry once only re-sized the failure records)."""
    results = ResultsFile(tmp_path / "r.json", "peers", option_keys=("peer",))
    cell = dict(model="m", method="tool:x", peer="tool", decoding="standard", data="s", speaker=None)
    results.add(record(**cell, error="RuntimeError: no kernel"))
    assert not results.done(cell)
    results.add(record(**cell, wer=12.0, n_utts=3))
    assert results.done(cell) and len(results.records) == 1 and "error" not in results.records[0]


def test_failures_report_sums_failed_decodes_over_seeds_from_the_transcripts(tmp_path):
    """Counted from each transcript's texts (not its stored error count): GPTQ seed 0 ends a 10-word utterance
    after two words (8 deletions), seed 1 runs away on a one-word prompt (14 insertions); full precision has none;
    --bits keeps full precision and drops the other width."""
    report = _load_report()
    path = tmp_path / "fade.json"
    results = ResultsFile(path, "fade", option_keys=("embedding_bits",))
    (tmp_path / "transcripts").mkdir()
    long = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    hyps = {("fp", None, None): [long, "hello"], ("gptq", 4, 0): ["alpha bravo", "hello"],
            ("gptq", 4, 1): [long, "hello" + " no" * 14], ("gptq", 3, 0): ["", ""]}
    for (method, bits, seed), (h1, h2) in hyps.items():
        t = f"transcripts/{method}-{bits}-{seed}.jsonl"
        (tmp_path / t).write_text("".join(json.dumps({"id": i, "ref": r, "hyp": h, "errors": 0, "n_ref": 1}) + "\n"
                                          for i, r, h in (("u1", long, h1), ("u2", "hello", h2))))
        results.add(record(model="m", method=method, bits=bits, group_size=bits and 128, embedding_bits=bits and 8,
                           seed=seed, decoding="standard", data="s", transcripts=t))
    rows = _rows(report.failures(path, bits=4), 0)
    assert set(rows) == {"fp", "gptq"}
    assert "| 0,1 | 1 (8) | 1 (14) | 100 % |" in rows["gptq"] and "| 0 (0) | 0 (0) | - |" in rows["fp"]  # no errors: no share


def test_alphas_are_parsed_and_bad_ones_named():
    from quasr.bench import parse_alphas

    assert parse_alphas("0.25,0.5,1") == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_alphas("0.25,x")
    with pytest.raises(ValueError, match=r"1.5 lies outside \[0, 1\]"):
        parse_alphas("1.5")


def test_act_order_is_its_own_cell_and_old_records_keep_matching_the_default():
    from quasr.bench import Cell

    plain, ordered = Cell("m", "gptq", 4), Cell("m", "gptq", 4, act_order=True)
    assert plain.keys()["act_order"] is None  # records from before the option match the plain cell
    assert ordered.keys()["act_order"] is True and ordered.tag() != plain.tag()
    assert "--act-order" in ordered.quantize_command("out") and "--act-order" not in plain.quantize_command("out")
