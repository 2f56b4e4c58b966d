"""PQM benchmark: an NF4 base with per-speaker LoRA adapters (speaker adaptive training), against full precision.

    python bench/pqm.py                                   # tiny.en and base -> bench/results/pqm.json
    python bench/pqm.py --models whisper-tiny.en --limit 8 --max-adapt 8 --epochs 1   # a quick look

Protocol: every tts voice and the asterisk speaker is a test speaker once. The speakers are split in two folds;
for the test speakers of one fold, a shared SAT adapter is trained on the other fold's speakers, then each test
speaker gets an adapter initialized from it and trained on that speaker's adaptation utterances (its calib
split; up to --max-adapt of them, spread evenly), and is scored on its test split (no sentence shared). Then the
folds swap. The same is done on the full-precision model as a reference. Per model and speaker: full precision,
NF4, NF4 + SAT, NF4 + speaker LoRA, full precision + speaker LoRA; and for the asterisk speaker the WER with 10,
25, 50 and all adaptation utterances. Adapters are about 1 % of the base's parameters (rank from --share).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ptq import RESULTS  # noqa: E402

from quasr import adapt  # noqa: E402
from quasr.bench import eval_cell  # noqa: E402
from quasr.data import Dataset, load_source, spread  # noqa: E402
from quasr.decoding import parse_decoding  # noqa: E402
from quasr.models.whisper import quiet_transformers  # noqa: E402
from quasr.paths import cache_dir  # noqa: E402
from quasr.results import ResultsFile  # noqa: E402

FOLDS = [["hibari", "festival-slt-hts", "flite-awb", "flite-kal16", "allison"],
         ["piper-joe", "flite-rms", "flite-slt", "espeak-ng"]]
KEYS = ("adapter", "n_adapt", "fold")


def speaker_sets(split: str) -> dict[str, list]:
    """Utterances by speaker: the tts voices and the asterisk speaker (allison)."""
    out: dict[str, list] = {}
    for spec in (f"tts:{split}", f"asterisk:{split}"):
        for u in load_source(spec).utterances:
            out.setdefault(u.speaker, []).append(u)
    return out


def take(utts: list, n: int | None) -> list:
    return utts if n is None else [utts[i] for i in spread(len(utts), n)]


def base_model(kind: str, model: str):
    """("nf4" | "fp", model) -> a loaded AsrModel (the NF4 checkpoint is made once, in a subprocess)."""
    import subprocess

    from quasr import checkpoint
    from quasr.models import load_model

    if kind == "fp":
        return load_model(model)
    out = cache_dir("bench", "pqm") / f"{model}-nf4"
    if not (out / "quasr_checkpoint.json").exists():
        cmd = [sys.executable, "-m", "quasr", "quantize", "--model", model, "--method", "nf4", "--embedding-format",
               "nf4", "--double-quant", "--fp-dtype", "float16", "--out", str(out), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"quantize failed ({' '.join(cmd)}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return checkpoint.load(out)


def train_adapter(kind: str, model: str, utts: list, out: Path, init: Path | None, speaker, args) -> dict:
    """Train (or resume, or reuse) one adapter; returns its metadata."""
    if (out / adapt.META).exists():
        return adapt.read_meta(out)
    asr = base_model(kind, model)
    if init is not None:
        m0 = adapt.read_meta(init)
        rank, targets = m0["rank"], tuple(m0["targets"])
    else:
        targets = adapt.TARGETS
        rank = adapt.rank_for(asr, args.share, targets)
    pm = adapt.attach(asr, rank, targets, seed=args.seed)
    if init is not None:
        adapt._load_adapter_weights(pm, init)
    n_base = adapt.base_parameters(asr)
    meta = {"fingerprint": adapt.fingerprint(asr), "base": f"{model} {kind}", "speaker": speaker, "rank": rank,
            "targets": list(targets), "init": str(init) if init else None,
            "adapter_parameters": sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad),
            "base_parameters": n_base, "utterances": [u.id for u in utts]}
    meta["share"] = round(meta["adapter_parameters"] / n_base, 5)
    cfg = adapt.TrainConfig(epochs=args.sat_epochs if speaker is None else args.epochs, lr=args.lr,
                            batch_size=args.batch_size, seed=args.seed)
    return adapt.train(asr, pm, utts, out, cfg, meta, progress=True)


def score(results, model, kind, adapter_dir: Path | None, utts_by_spk: dict, keys: dict, decoding, limit,
          extra: dict | None = None) -> None:
    """Score each test speaker's utterances (one record per speaker) with the base and, if given, the adapters
    in adapter_dir (routed by speaker)."""
    todo = {s: u for s, u in utts_by_spk.items()
            if not results.done(dict(keys, decoding=decoding.label, data=f"test:{s}", speaker=None))}
    if not todo:
        return
    asr = base_model(kind, model)
    aset = adapt.AdapterSet(asr, adapter_dir) if adapter_dir else None
    for spk, utts in todo.items():
        ds = Dataset(f"test:{spk}", take(utts, limit))
        if aset is not None:
            aset.use(spk)
        eval_cell(results, asr, ds.name, None, keys, extra=extra, decoding=decoding, dataset=ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base")
    ap.add_argument("--limit", type=int, default=None, help="test utterances per speaker (spread evenly)")
    ap.add_argument("--max-adapt", type=int, default=50, help="adaptation utterances per speaker, at most")
    ap.add_argument("--max-sat", type=int, default=40, help="SAT utterances per training speaker, at most")
    ap.add_argument("--share", type=float, default=0.01, help="adapter size as a share of the base's parameters")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of a speaker adapter")
    ap.add_argument("--sat-epochs", type=int, default=2, help="epochs of the SAT adapter")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoding", default="standard")
    ap.add_argument("--curve", default="10,25,50,all", help="adaptation utterances of the asterisk speaker")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quiet_transformers()
    decoding = parse_decoding(args.decoding)
    out = args.out or RESULTS / (f"pqm-limit{args.limit}.json" if args.limit else "pqm.json")
    results = ResultsFile(out, "pqm", option_keys=KEYS)
    adapt_utts, test_utts = speaker_sets("calib"), speaker_sets("test")
    for model in args.models.split(","):
        root = cache_dir("bench", "pqm", "adapters") / f"{model}-s{args.seed}-a{args.max_adapt}-e{args.epochs}"
        base = dict(model=model, bits=None, group_size=None)
        fp_mb = 4 * sum(p.numel() for p in {id(p): p for p in base_model("fp", model).model.parameters()}.values())
        score(results, model, "fp", None, test_utts, dict(base, method="fp"), decoding, args.limit,
              {"size_mb": round(fp_mb / 1e6, 2)})
        from quasr import checkpoint

        base_model("nf4", model)
        ck = checkpoint.info(cache_dir("bench", "pqm") / f"{model}-nf4")
        score(results, model, "nf4", None, test_utts, dict(base, method="nf4", bits=4, group_size=64), decoding,
              args.limit, {"size_mb": round(ck["dir_mb"], 2), "weights_mb": round(ck["file_mb"], 2),
                           "bits_per_weight": round(ck["bits_per_weight"], 3)})
        for kind, label in (("nf4", "nf4"), ("fp", "fp")):
            for f, fold in enumerate(FOLDS):
                train_spk = [s for s in sum(FOLDS, []) if s not in fold]
                sat_utts = [u for s in train_spk for u in take(adapt_utts[s], args.max_sat)]
                sat = train_adapter(kind, model, sat_utts, root / kind / f"fold{f}" / "sat", None, None, args)
                sat_dir = root / kind / f"fold{f}" / "sat"
                served = root / kind / f"fold{f}" / "serve"
                served.mkdir(parents=True, exist_ok=True)
                if kind == "nf4":  # NF4 + SAT: the fold's test speakers through the shared adapter
                    only_sat = root / kind / f"fold{f}" / "sat-only"
                    only_sat.mkdir(parents=True, exist_ok=True)
                    _link(sat_dir, only_sat / "sat")
                    score(results, model, kind, only_sat, {s: test_utts[s] for s in fold},
                          dict(base, method="nf4+sat", bits=4, group_size=64, adapter="sat", fold=f), decoding,
                          args.limit, {"sat_seconds": sat.get("seconds"), "rank": sat["rank"],
                                       "adapter_share": sat["share"]})
                minutes = {}
                for spk in fold:
                    t = time.perf_counter()
                    m = train_adapter(kind, model, take(adapt_utts[spk], args.max_adapt), served / spk, sat_dir, spk,
                                      args)
                    minutes[spk] = round(m.get("seconds", time.perf_counter() - t) / 60, 2)
                method = f"{label}+speaker-lora"
                for spk in fold:
                    score(results, model, kind, served, {spk: test_utts[spk]},
                          dict(base, method=method, bits=4 if kind == "nf4" else None,
                               group_size=64 if kind == "nf4" else None, adapter="speaker", fold=f,
                               n_adapt=min(args.max_adapt, len(adapt_utts[spk]))),
                          decoding, args.limit, {"adapt_minutes": minutes[spk], "rank": m["rank"],
                                                 "adapter_share": m["share"]})
        # how WER moves with the number of the asterisk speaker's adaptation utterances (NF4 + speaker LoRA)
        f = next(i for i, fold in enumerate(FOLDS) if "allison" in fold)
        sat_dir = root / "nf4" / f"fold{f}" / "sat"
        for n in [None if c == "all" else int(c) for c in args.curve.split(",") if c]:
            d = root / "nf4" / "curve" / f"n{n or 'all'}"
            d.mkdir(parents=True, exist_ok=True)
            m = train_adapter("nf4", model, take(adapt_utts["allison"], n), d / "allison", sat_dir, "allison", args)
            score(results, model, "nf4", d, {"allison": test_utts["allison"]},
                  dict(base, method="nf4+speaker-lora", bits=4, group_size=64, adapter="curve",
                       n_adapt=n or m["n_utts"], fold=f), decoding, args.limit,  # all: those that can train
                  {"adapt_minutes": round(m["seconds"] / 60, 2), "adapt_skipped": m.get("skipped", [])})
    print(json.dumps({"wrote": str(out)}))


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src, target_is_directory=True)


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
