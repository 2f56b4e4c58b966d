"""Speaker adaptation (PQM): LoRA over a frozen NF4 base with peft; deterministic, resumable training; adapters
bound to their base; per-speaker routing."""
from __future__ import annotations

import json

import pytest
import torch

from quasr import adapt
from quasr.data import load_source

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("pqm") / "nf4"
    r = subprocess.run([sys.executable, "-m", "quasr", "quantize", "--method", "nf4", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def utts():
    return load_source("tts:calib", limit=32).utterances[:4]


def _lora_state(pm) -> dict:
    return {k: v.detach().clone() for k, v in pm.state_dict().items() if "lora_" in k}


def test_rank_makes_an_adapter_about_one_percent(nf4):
    from quasr import checkpoint

    asr = checkpoint.load(nf4)
    r = adapt.rank_for(asr, 0.01)
    pm = adapt.attach(asr, r)
    n = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert 0.006 < n / adapt.base_parameters(asr) <= 0.0101
    assert all(not p.requires_grad for n_, p in pm.named_parameters() if "lora_" not in n_)  # the base is frozen
    fc1 = pm.base_model.model.model.encoder.layers[0].fc1
    assert type(fc1.base_layer).__name__ == "QuantizedLinear" and fc1.base_layer.fmt.name == "nf4"  # still packed


def test_training_is_deterministic_and_a_killed_run_resumes_where_it_would_have_been(nf4, utts, tmp_path,
                                                                                      monkeypatch):
    from quasr import checkpoint

    cfg = adapt.TrainConfig(epochs=2, batch_size=2, lr=1e-3, seed=3)

    def run(out, kill_after=None):
        asr = checkpoint.load(nf4)
        pm = adapt.attach(asr, 2, seed=3)
        meta = {"fingerprint": adapt.fingerprint(asr), "speaker": "x", "rank": 2, "targets": list(adapt.TARGETS)}
        if kill_after is not None:
            real = torch.optim.AdamW.step
            steps = {"n": 0}

            def step(self, *a, **k):
                steps["n"] += 1
                if steps["n"] > kill_after:
                    raise KeyboardInterrupt
                return real(self, *a, **k)

            monkeypatch.setattr(torch.optim.AdamW, "step", step)
            with pytest.raises(KeyboardInterrupt):
                adapt.train(asr, pm, utts, out, cfg, meta, progress=False)
            monkeypatch.setattr(torch.optim.AdamW, "step", real)
            assert [p.name for p in adapt._epoch_dirs(out)] == ["epoch-1"] and not (out / adapt.META).exists()
            asr = checkpoint.load(nf4)  # a fresh process, as after a kill
            pm = adapt.attach(asr, 2, seed=3)
        m = adapt.train(asr, pm, utts, out, cfg, meta, progress=False)
        return _lora_state(pm), m

    straight, m1 = run(tmp_path / "a")
    resumed, m2 = run(tmp_path / "b", kill_after=3)  # 2 steps an epoch: killed in epoch 2
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [h["loss"] for h in m1["history"]] == [h["loss"] for h in m2["history"]]
    assert any(float(v.abs().sum()) > 0 for k, v in straight.items() if "lora_B" in k)  # it did learn


def test_utterances_that_cannot_train_are_skipped_named_and_counted_before_any_step(nf4, utts, tmp_path,
                                                                                      monkeypatch):
    from dataclasses import replace

    import numpy as np

    from quasr import checkpoint

    asr = checkpoint.load(nf4)
    long = replace(utts[0], id="x/long", audio=np.tile(utts[0].audio, int(31 * 16000 / len(utts[0].audio)) + 1))
    wordy = replace(utts[1], id="x/wordy", text=" ".join(["word"] * 600))
    pm = adapt.attach(asr, 2, seed=0)
    meta = {"fingerprint": adapt.fingerprint(asr), "speaker": "x", "rank": 2, "targets": list(adapt.TARGETS)}
    real, seen = torch.optim.AdamW.step, []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(1), real(self, *a, **k))[1])
    m = adapt.train(asr, pm, [long, *utts[:2], wordy], tmp_path / "a", adapt.TrainConfig(epochs=1, batch_size=2),
                    meta, progress=False)
    assert m["n_utts"] == 2 and m["utterances"] == [u.id for u in utts[:2]] and len(seen) == 1
    assert [s["item"] for s in m["skipped"]] == ["x/long", "x/wordy"]
    assert "longer than Whisper's 30 s window" in m["skipped"][0]["reason"]
    assert "tokens exceed the decoder's 448" in m["skipped"][1]["reason"]
    assert json.loads((tmp_path / "a" / adapt.META).read_text())["skipped"] == m["skipped"]  # kept with the adapter
    seen.clear()
    with pytest.raises(adapt.AdapterError, match="none of the 2 adaptation utterance.*x/long"):
        adapt.train(asr, pm, [long, wordy], tmp_path / "b", adapt.TrainConfig(epochs=1), meta, progress=False)
    assert not seen and not (tmp_path / "b").exists()  # refused before any step or directory


def test_adapters_switch_per_speaker_and_refuse_another_base(nf4, utts, tmp_path):
    from quasr import checkpoint
    from quasr.models import load_model

    root = tmp_path / "adapters"
    for spk, seed in (("sat", 0), (utts[0].speaker, 1)):
        asr = checkpoint.load(nf4)
        pm = adapt.attach(asr, 2, seed=seed)
        meta = {"fingerprint": adapt.fingerprint(asr), "speaker": spk, "rank": 2, "targets": list(adapt.TARGETS)}
        adapt.train(asr, pm, utts[:2], root / spk, adapt.TrainConfig(epochs=1, batch_size=2, lr=5e-3, seed=seed),
                    meta, progress=False)
    asr = checkpoint.load(nf4)
    aset = adapt.AdapterSet(asr, root)
    assert sorted(aset.names) == sorted(["sat", utts[0].speaker])
    assert aset.use(utts[0].speaker) == utts[0].speaker and aset.use("nobody") == "sat"
    audio = [utts[0].audio]
    aset.use("sat")
    a = asr.transcribe(audio, progress=False)
    out = aset.transcribe([utts[0]], progress=False)
    assert len(out) == 1 and isinstance(out[0].text, str) and isinstance(a[0], str)
    with pytest.raises(adapt.AdapterError, match="trained on another base"):
        adapt.AdapterSet(load_model("whisper-tiny.en"), root)
    meta = json.loads((root / "sat" / adapt.META).read_text())
    meta["rank"] = 5
    (root / "sat" / adapt.META).write_text(json.dumps(meta))
    with pytest.raises(adapt.AdapterError, match="rank 5"):
        adapt.AdapterSet(checkpoint.load(nf4), root)


def test_cli_names_bad_adaptation_input(nf4, tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "quasr", "adapt", *args], capture_output=True, text=True)

    r = run("speaker", "--base", str(nf4), "--speaker", "nobody", "--data", "tts:calib", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no utterances of nobody" in r.stdout + r.stderr
    r = run("speaker", "--base", str(nf4), "--speaker", "hibari", "--data", "tts:calib", "--limit", "1",
            "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "need at least 2" in r.stdout + r.stderr
    r = run("sat", "--base", str(nf4), "--data", "tts:calib", "--epochs", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--epochs must be a positive" in r.stdout + r.stderr
    assert not (tmp_path / "x").exists()


def test_a_full_precision_base_keeps_its_fingerprint_with_adapters_attached():
    from quasr.models import load_model

    asr = load_model("whisper-tiny.en")
    before = adapt.fingerprint(asr)
    adapt.attach(asr, 2)
    assert adapt.fingerprint(asr) == before and before.startswith("fp:")
