"""Speaker adaptation (PQM): LoRA adapters over a frozen base (NF4 or full precision), trained with peft.

    attach(asr, rank, targets)              wrap the attention and feed-forward Linears with LoRA (peft), the base
                                            frozen; quasr's packed Linears stay packed (peft's custom-module hook)
    rank_for(asr, share=0.01, targets)      the rank that makes an adapter about `share` of the base's parameters
    train(asr, peft_model, utts, out, ...)  teacher-forced training with a checkpoint per epoch; a killed run
                                            resumes from its last complete epoch and ends where an uninterrupted
                                            run would (data order and initialization depend only on the seed)
    AdapterSet(asr, dir)                    every speaker's adapter in one model, switched per utterance

An adapter directory is peft's format (adapter_config.json, adapter_model.safetensors) plus
quasr_adapter.json: the fingerprint of the base it was trained on, the speaker, rank, targets, data and
training settings. Loading an adapter onto another base, or with other ranks or targets, is an error.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quasr.errors import QuasrError

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
META = "quasr_adapter.json"
STATE = "training_state.json"


class AdapterError(QuasrError, ValueError):
    pass


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0

    def check(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise AdapterError(f"--epochs must be a positive integer, got {self.epochs}")
        if not self.lr > 0:
            raise AdapterError(f"--lr must be positive, got {self.lr}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise AdapterError(f"--batch-size must be a positive integer, got {self.batch_size}")


def _lora_class():
    """peft's LoRA Linear, registered for quasr's packed Linears (merging into packed weights is refused)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class LoraQuantizedLinear(LoraLinear):
        def merge(self, *a, **k):  # noqa: D102
            raise AdapterError("a LoRA adapter is not merged into a packed low-bit weight (it stays separate)")

    return LoraQuantizedLinear


def base_parameters(asr) -> int:
    """Weights of the base model, quantized ones counted by their matrix size (the tied head once)."""
    from quasr.quant.modules import QuantizedEmbedding, QuantizedLinear

    n = sum(p.numel() for p in {id(p): p for p in asr.model.parameters()}.values())
    for m in asr.model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            n += m.rows * m.cols + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    return n


def _target_modules(asr, targets) -> list:
    from quasr.quant.modules import QuantizedLinear

    names = [n for n, m in asr.model.named_modules()
             if isinstance(m, (torch.nn.Linear, QuantizedLinear)) and n.split(".")[-1] in targets
             and ".layers." in n]
    if not names:
        raise AdapterError(f"no Linear named {', '.join(targets)} in {asr.name}")
    return names


def rank_for(asr, share: float = 0.01, targets=TARGETS) -> int:
    """The LoRA rank whose adapter has about `share` of the base's parameters (at least 1)."""
    if not 0 < share < 1:
        raise AdapterError(f"the adapter's share of the base must lie in (0, 1), got {share}")
    per_rank = 0
    for n in _target_modules(asr, targets):
        m = asr.model.get_submodule(n)
        i, o = (m.in_features, m.out_features)
        per_rank += i + o
    return max(1, int(share * base_parameters(asr) / per_rank))


def attach(asr, rank: int, targets=TARGETS, alpha: float | None = None, seed: int = 0):
    """Wrap the target Linears with a LoRA adapter named "default" (B = 0: the model is unchanged); returns the
    peft model. The base is frozen; quasr's packed Linears keep their packed storage."""
    from peft import LoraConfig, get_peft_model

    from quasr.quant.modules import QuantizedLinear

    if rank < 1:
        raise AdapterError(f"the LoRA rank must be positive, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0,
                     bias="none")
    cfg._register_custom_module({QuantizedLinear: _lora_class()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft's initialization of A
        pm = get_peft_model(asr.model, cfg)
    return pm


def fingerprint(asr) -> str:
    """What identifies the base: a quasr checkpoint's weight sha256, else a hash of every tensor."""
    manifest = getattr(asr, "checkpoint", None)
    if manifest:
        return "ckpt:" + manifest["files"]["model.safetensors"]["sha256"]
    h = hashlib.sha256()
    for k, t in sorted((k.replace(".base_layer.", "."), t) for k, t in asr.model.state_dict().items()):
        if "lora_" in k:  # the same with or without adapters attached
            continue
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes()[:4096])
        h.update(str(tuple(t.shape)).encode())
    return "fp:" + h.hexdigest()


def _epoch_dirs(out: Path) -> list[Path]:
    return sorted((p for p in out.glob("epoch-*") if (p / STATE).exists()), key=lambda p: int(p.name.split("-")[1]))


def trainable(asr, utts, speaker: str | None = None) -> tuple[list, list[dict]]:
    """The utterances `asr` can train on, and the skipped ones ({"item", "reason"}), reported on the console: an
    utterance longer than the input window or with too long a transcript is left out, counted and named, before
    any training step; none left is an error."""
    from quasr.progress import console

    keep, skipped = [], []
    for u in utts:
        why = asr.training_problem(u) if hasattr(asr, "training_problem") else None
        if why:
            skipped.append({"item": u.id, "reason": why})
        else:
            keep.append(u)
    if skipped:
        console.print(f"[yellow]skipped[/] {len(skipped)} of {len(utts)} adaptation utterance(s)"
                      + (f" of {speaker}" if speaker else "") + ": "
                      + "; ".join(f"{s['item']} ({s['reason']})" for s in skipped[:5])
                      + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""), highlight=False)
    if not keep:
        raise AdapterError(f"none of the {len(utts)} adaptation utterance(s)" + (f" of {speaker}" if speaker else "")
                           + " can train: " + "; ".join(f"{s['item']}: {s['reason']}" for s in skipped[:3]))
    return keep, skipped


def train(asr, pm, utts, out: str | Path, cfg: TrainConfig, meta: dict, progress: bool = True) -> dict:
    """Train the "default" adapter of `pm` on `utts` (teacher forcing, cross-entropy on the text tokens), saving
    out/epoch-K after every epoch and the final adapter in `out`. A run that finds complete epochs in `out`
    resumes after the last one (same data order, same optimizer state)."""
    from quasr.decoding import Decoding
    from quasr.progress import progress_bar
    from quasr.results import atomic_write_text

    cfg.check()
    utts, skipped = trainable(asr, utts, meta.get("speaker"))
    meta = dict(meta, utterances=[u.id for u in utts], skipped=skipped)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = 0, []
    done = _epoch_dirs(out)
    if done:
        last = done[-1]
        state = json.loads((last / STATE).read_text())
        if state.get("fingerprint") != meta["fingerprint"] or state.get("config") != asdict(cfg):
            raise AdapterError(f"{out}: holds a training run of another base or settings; give a new directory")
        _load_adapter_weights(pm, last)
        opt.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        start, history = state["epoch"], state["history"]
    decoding = Decoding()
    pm.train()
    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"adapt {meta.get('speaker') or 'sat'}", total=cfg.epochs * len(utts),
                            completed=start * len(utts))
        for epoch in range(start, cfg.epochs):
            order = list(utts)
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)  # depends on the seed and epoch only
            losses = []
            for i in range(0, len(order), cfg.batch_size):
                batch = asr.training_batch(order[i:i + cfg.batch_size], decoding)
                loss = pm(**batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update(task, advance=len(batch["labels"]),
                           description=f"adapt {meta.get('speaker') or 'sat'} epoch {epoch + 1} loss {losses[-1]:.3f}")
            history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses)})
            ep = out / f"epoch-{epoch + 1}"
            tmp = out / f".epoch-{epoch + 1}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            pm.save_pretrained(tmp)
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            atomic_write_text(tmp / STATE, json.dumps({"epoch": epoch + 1, "history": history, "config": asdict(cfg),
                                                       "fingerprint": meta["fingerprint"]}))
            shutil.rmtree(ep, ignore_errors=True)
            tmp.rename(ep)
    pm.eval()
    meta = dict(meta, history=history, train=asdict(cfg), n_utts=len(utts),
                seconds=round(time.perf_counter() - t0, 1))
    save_adapter(pm, out, meta)
    return meta


def _load_adapter_weights(pm, path: Path, name: str = "default") -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(pm, load_file(str(path / "adapter_model.safetensors")), adapter_name=name)


def save_adapter(pm, out: Path, meta: dict) -> None:
    """The adapter in peft's format plus quasr_adapter.json, in `out` (written last: a directory with it is
    complete)."""
    from quasr.results import write_json

    pm.save_pretrained(out)
    write_json(out / META, meta)


def read_meta(path: Path) -> dict:
    f = Path(path) / META
    if not f.exists():
        raise AdapterError(f"{path}: not a quasr adapter (no {META}; an interrupted training leaves only epoch-* "
                           f"directories: run it again to resume)")
    return json.loads(f.read_text())


@dataclass
class AdapterSet:
    """Adapters by speaker over one base model, switched without reloading the base: load(dir) reads every
    sub-directory that holds a quasr adapter (its name is the speaker; "sat" serves unknown speakers)."""

    asr: object
    path: Path
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        from peft import PeftModel

        self.path = Path(self.path)
        dirs = sorted(p for p in self.path.iterdir() if (p / META).exists()) if self.path.is_dir() else []
        if not dirs:
            raise AdapterError(f"{self.path}: holds no adapter directories (each needs {META})")
        fp = fingerprint(self.asr)
        first = None
        for d in dirs:
            meta = read_meta(d)
            if meta.get("fingerprint") != fp:
                raise AdapterError(f"{d}: trained on another base ({meta.get('fingerprint', '?')[:20]}...), not "
                                   f"{getattr(self.asr, 'name', '')} ({fp[:20]}...)")
            shape = (meta.get("rank"), tuple(meta.get("targets") or ()))
            if first is None:
                first = shape
            elif shape != first:
                raise AdapterError(f"{d}: rank {shape[0]} / targets {shape[1]} differ from the other adapters' "
                                   f"{first[0]} / {first[1]}")
        # peft needs to know quasr's packed Linears when it injects the first adapter
        attach_cfg = json.loads((dirs[0] / "adapter_config.json").read_text())
        self.pm = attach(self.asr, attach_cfg["r"], attach_cfg["target_modules"], attach_cfg.get("lora_alpha"))
        for d in dirs:
            self.pm.load_adapter(str(d), adapter_name=d.name)
            self.names.append(d.name)
        self.pm.set_adapter(self.names[0])
        self.pm.delete_adapter("default")  # the empty one attach() made
        self.pm.eval()
        assert isinstance(self.pm, PeftModel)

    def transcribe(self, utts, batch_size: int = 8, decoding=None, progress: bool = True, desc: str = "") -> list:
        """Transcripts (quasr.decoding.Transcript) of utterances, each with its speaker's adapter, in input
        order."""
        out: list = [None] * len(utts)
        by_speaker: dict = {}
        for i, u in enumerate(utts):
            by_speaker.setdefault(u.speaker, []).append(i)
        for spk, idx in by_speaker.items():
            name = self.use(spk)
            hyps = self.asr.transcribe_detailed([utts[i].audio for i in idx], batch_size, decoding, progress,
                                                f"{desc} {spk} [{name}]")
            for i, h in zip(idx, hyps):
                out[i] = h
        return out

    def use(self, speaker: str | None) -> str:
        """Activate the speaker's adapter (the "sat" one for an unknown speaker); returns its name."""
        name = speaker if speaker in self.names else ("sat" if "sat" in self.names else None)
        if name is None:
            raise AdapterError(f"no adapter for speaker {speaker!r} and no 'sat' adapter in {self.path}")
        self.pm.set_adapter(name)
        return name
