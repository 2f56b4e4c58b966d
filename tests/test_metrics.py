import random
import re
import shutil
import subprocess

import pytest

from quasr.metrics import (
    WordCounts,
    align,
    failure,
    is_rare,
    mean_over_sets,
    normalize,
    score,
    score_by,
    score_utterance,
)


def test_normalize_whisper_english():
    assert normalize("Mr. Smith's colour, 25 percent!") == "mister smith is color 25%"
    assert normalize("Dr. Jones paid twenty five dollars.") == "doctor jones paid $25"
    assert normalize("The Organisation's CENTRE [laughs]") == "the organization is center"
    assert normalize("Um, I won't go") == "i will not go"


def test_is_rare():
    assert is_rare("zbigniew") and is_rare("levetiracetam")
    assert not is_rare("the") and not is_rare("doctor")
    assert not is_rare("zbigniew", threshold=1.0)


def _ops(ref, hyp):
    return [op for op, _, _ in align(ref.split(), hyp.split())]


def test_align_basic():
    assert align("a b c d".split(), "a x c d e".split()) == [
        ("C", 0, 0), ("S", 1, 1), ("C", 2, 2), ("C", 3, 3), ("I", None, 4)
    ]
    assert _ops("a b c d", "b c x d") == ["D", "C", "C", "I", "C"]


def test_align_empty():
    assert align([], []) == []
    assert align([], ["a", "b"]) == [("I", None, 0), ("I", None, 1)]
    assert align(["a", "b"], []) == [("D", 0, None), ("D", 1, None)]


def test_align_uses_sclite_weights():
    # sub=4, ins=del=3: a 3-word shift is cheaper (18) than 5 substitutions (20)
    assert _ops("p q r a b", "a b s t u") == ["D", "D", "D", "C", "C", "I", "I", "I"]
    # ties go to substitution, so the extra word becomes a leading insertion
    assert _ops("a b c", "d e f g") == ["I", "S", "S", "S"]


def test_rare_wer_charging():
    u = score_utterance(
        "The doctor gave levetiracetam to Zbigniew.",
        "doctor gave leviticus to well zbigniew yes",
    )
    assert u["rare_words"] == ["levetiracetam", "zbigniew"]
    c = u["counts"]
    # D the (common), S levetiracetam (rare), I well -> charged to zbigniew (next ref word),
    # I yes at the end -> charged to zbigniew (last ref word)
    assert (c.n_ref, c.sub, c.dele, c.ins) == (6, 1, 1, 2)
    assert (c.n_rare_ref, c.rare_errors) == (2, 3)
    assert c.rare_wer == pytest.approx(150.0)
    assert c.wer == pytest.approx(100 * 4 / 6)
    assert c.common_errors == 1 and c.common_wer == pytest.approx(100 / 4)  # the deleted "the"
    assert u["rare_pairs"] == [("levetiracetam", "leviticus")]
    d = score_utterance("call zbigniew now", "call now yes")
    assert d["rare_pairs"] == [("zbigniew", None)]  # a deletion
    assert (d["counts"].rare_errors, d["counts"].common_errors) == (1, 1)  # "yes" goes to the last word, now


def test_rare_wer_insertion_goes_to_following_word():
    # "well" sits after the rare word but before "left": charged to "left", not rare
    c = score_utterance("zbigniew left", "zbigniew well left yes")["counts"]
    assert (c.ins, c.n_rare_ref, c.rare_errors, c.rare_wer) == (2, 1, 0, 0.0)
    c = score_utterance("levetiracetam", "yes levetiracetam")["counts"]
    assert (c.ins, c.rare_errors, c.errors) == (1, 1, 1)


def test_empty_reference_and_aggregation():
    c = score_utterance("", "hello there")["counts"]
    assert (c.n_ref, c.ins, c.rare_errors, c.wer, c.rare_wer) == (0, 2, 0, None, None)
    total = score(["", "a cat sat", "Zbigniew"], ["hello there", "a cat sat", "big new"])
    # "zbigniew" -> "big new": S + I, both charged to the rare word
    assert (total.n_ref, total.errors, total.n_rare_ref, total.rare_errors) == (4, 4, 1, 2)
    assert total.wer == 100.0 and total.rare_wer == 200.0
    assert WordCounts(1, 1, 0, 0, 0, 0) + WordCounts(3, 0, 1, 1, 1, 1) == WordCounts(4, 1, 1, 1, 1, 1)
    by = score_by(["s1", "s2", "s1"], ["a b", "c", "d"], ["a", "c", "d e"])
    assert list(by) == ["s1", "s2"]
    assert (by["s1"].n_ref, by["s1"].dele, by["s1"].ins, by["s2"].errors) == (3, 1, 1, 0)
    assert mean_over_sets([10.0, None, 20.0]) == 15.0
    assert mean_over_sets([None]) is None


def _sclite():
    return shutil.which("sclite") or shutil.which("sclite", path="/usr/lib/sctk/bin")


N_RANDOM = 100  # random pairs; 30 is too few to tell sclite weights from 2-1-1


def _pairs():
    rng = random.Random(1234)
    vocab = "the a cat dog sat on mat red big levetiracetam zbigniew ran".split()
    pairs = []
    for _ in range(N_RANDOM):
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 12))]
        hyp = []
        for w in ref:
            r = rng.random()
            if r < 0.12:
                continue  # deletion
            hyp.append(rng.choice(vocab) if r < 0.3 else w)
            if rng.random() < 0.12:
                hyp.append(rng.choice(vocab))  # insertion
        pairs.append((" ".join(ref), " ".join(hyp)))
    pairs += [
        ("", "hello there"),
        ("just deleted", ""),
        ("", ""),
        ("p q r a b", "a b s t u"),
        ("a b c", "d e f g"),
        ("Mr. Smith's colour, 25 percent!", "mister smith's color twenty five percent"),
    ]
    return pairs


@pytest.mark.skipif(_sclite() is None, reason="NIST sclite (Debian package sctk) not installed")
def test_matches_sclite(tmp_path):
    pairs = [(normalize(r), normalize(h)) for r, h in _pairs()]
    ids = [f"spk{k % 3}_utt{k}" for k in range(len(pairs))]
    for name, col in (("ref", 0), ("hyp", 1)):
        (tmp_path / f"{name}.trn").write_text("".join(f"{p[col]} ({i})\n" for p, i in zip(pairs, ids)))
    out = subprocess.run(
        [_sclite(), "-r", "ref.trn", "trn", "-h", "hyp.trn", "trn", "-i", "rm", "-o", "rsum", "pra", "stdout"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout

    # per utterance: "id: (spk0_utt3)\nScores: (#C #S #D #I) 4 1 0 2"
    utt = {
        m[0]: tuple(map(int, m[1:]))
        for m in re.findall(r"id: \((\S+)\)\nScores: \(#C #S #D #I\) (\d+) (\d+) (\d+) (\d+)", out)
    }
    assert len(utt) == len(pairs)
    for (ref, hyp), i in zip(pairs, ids):
        c = score_utterance(ref, hyp)["counts"]
        assert (c.n_ref - c.sub - c.dele, c.sub, c.dele, c.ins) == utt[i], (i, ref, hyp)

    # rsum rows: "| spk0 |   12     71 |   50     12      9      6     27     10 |"
    rows = {
        m[0]: tuple(map(int, m[1:]))
        for m in re.findall(r"\|\s*(\S+)\s*\|\s*\d+\s+(\d+)\s*\|\s*\d+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", out)
    }
    refs, hyps = zip(*pairs)
    expect = {"Sum": score(refs, hyps), **score_by([i.split("_")[0] for i in ids], refs, hyps)}
    assert rows.keys() == expect.keys()
    for name, c in expect.items():
        assert rows[name] == (c.n_ref, c.sub, c.dele, c.ins, c.errors), name


def test_token_cross_entropy_is_per_utterance_and_sees_the_text(tiny):
    """Teacher-forced cross-entropy (the held-in selection criterion): each utterance's sum does not depend on
    what it is batched with, agrees with the model's own loss, and the true transcript scores far better than
    another utterance's text on the same audio (labels aligned with the audio they belong to)."""
    from dataclasses import replace

    from quasr.data import load_source
    from quasr.evaluate import teacher_forced_batches, token_cross_entropy

    utts = list(load_source("asterisk:calib", limit=3))
    nats, counts = token_cross_entropy(tiny, teacher_forced_batches(tiny, utts, batch_size=3))
    for u, n, c in zip(utts, nats, counts):
        (alone,), (count,) = token_cross_entropy(tiny, teacher_forced_batches(tiny, [u]))
        assert count == c == len(tiny.processor.tokenizer(" " + u.text.strip(), add_special_tokens=False).input_ids) + 1
        assert alone == pytest.approx(n, rel=1e-3, abs=1e-3)
    batch = teacher_forced_batches(tiny, utts[:1])[0]
    (first,), (count,) = token_cross_entropy(tiny, [batch])
    assert first / count == pytest.approx(float(tiny.model(**batch).loss), rel=1e-5)
    swapped = [replace(u, text=utts[(i + 1) % 3].text) for i, u in enumerate(utts)]
    wrong, wcounts = token_cross_entropy(tiny, teacher_forced_batches(tiny, swapped))
    for n, c, w, wc in zip(nats, counts, wrong, wcounts):
        assert n / c + 1.0 < w / wc


def test_failure_names_early_stops_and_runaways_only():
    """A long reference that keeps 4 of its 10 words ended early; keeping 6 is ordinary errors; a short reference
    losing everything is not an early stop; a one-word prompt ran away with 14 extra words (more than 3 x 1 + 10
    errors), not with 13."""
    ref = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    counts = lambda r, h: score_utterance(r, h)["counts"]  # noqa: E731
    assert failure(counts(ref, "alpha bravo charlie delta")) == "truncated"
    assert failure(counts(ref, "alpha bravo charlie delta echo foxtrot")) is None
    assert failure(counts("hello there friend", "")) is None
    assert failure(counts("hello", "hello " + "at " * 14)) == "runaway"
    assert failure(counts("hello", "hello " + "at " * 13)) is None
    assert failure(counts(ref, "alpha bravo charlie x y z")) is None  # 4 deleted, 3 substituted
    assert failure(counts(ref, "")) == "truncated"


def test_set_results_count_failed_decodes_and_their_errors():
    import numpy as np

    from quasr.data import Dataset
    from quasr.data.utterance import Utterance
    from quasr.evaluate import score_set, to_records

    ref = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    audio = np.zeros(16000, dtype=np.float32)
    data = Dataset("toy", [Utterance("a", audio, ref), Utterance("b", audio, "hello"), Utterance("c", audio, ref)])
    res = score_set(data, ["alpha bravo", "hello " + "no " * 15, ref])
    assert [u["failure"] for u in res.utterances] == ["truncated", "runaway", None]
    assert res.failures() == {"n_truncated": 1, "truncated_errors": 8, "n_runaway": 1, "runaway_errors": 15}
    [rec] = to_records([res], model="m")
    assert rec["n_truncated"] == 1 and rec["runaway_errors"] == 15 and rec["wer"] == round(100 * 23 / 21, 3)
