"""Where a quantized encoder errs: each encoder Linear's output error on the speech frames and on the padding
frames of Whisper's 30 s window, for quasr checkpoints of one model, on held-in calib-dev utterances.

    python scripts/frame_errors.py CKPT [CKPT ...] [--sets asterisk:calib-dev,tts:calib-dev] [--n 16]

Every Linear is fed the full-precision model's own inputs, so what is measured is the rounding of its weight
alone (not what earlier layers pass on): per layer, e = Σ‖(W − Ŵ)x‖² / Σ‖Wx‖² over the speech frames (the audio
plus the margin calibration gives it) and over the padding frames after them. The calibrated solvers (GPTQ and
its kin) minimize the same error summed over every frame of their calibration draw, in which padding frames
are most of the mass; this shows what that buys on each kind. Printed: per layer, e on speech and on padding for
each checkpoint; then, against the first checkpoint, the geometric mean over layers of the error ratio on each
kind with a bootstrap 95 % interval over utterances (the same utterances and inputs for all). The utterances are
calib-dev (quasr.data.held_out) minus every id any checkpoint calibrated on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calib_dev_ce import calib_ids  # noqa: E402


def _recipe(ckpt: str) -> dict:
    meta = Path(ckpt) / "quasr_checkpoint.json"
    if not meta.is_file():
        raise SystemExit(f"error: {ckpt}: not a quasr checkpoint (no quasr_checkpoint.json)")
    rec = json.loads(meta.read_text())
    return rec.get("recipe", rec)


def _source_model(ckpts: list[str]) -> str:
    models = {_recipe(c).get("model") or "?" for c in ckpts}
    if len(models) != 1:
        raise SystemExit(f"error: the checkpoints come from different models ({', '.join(sorted(models))})")
    return models.pop()


def _label(ckpt: str) -> str:
    r = _recipe(ckpt)
    alpha = f" α={r['alpha']}" if r.get("alpha") is not None else ""
    seed = f" s{r['seed']}" if r.get("seed") is not None else ""
    pad = f" pad_weight={r['pad_weight']:g}" if r.get("pad_weight", 1.0) != 1.0 else ""
    return f"{r['method']}{alpha} W{r['bits']}G{r.get('group_size') or 0}{seed}{pad}"


def main() -> None:
    from quasr import checkpoint
    from quasr.data import load_source
    from quasr.models import load_model
    from quasr.models.whisper import WINDOW_SECONDS, quiet_transformers
    from quasr.progress import progress_bar

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="quasr checkpoint directories of one model")
    ap.add_argument("--sets", default="asterisk:calib-dev,tts:calib-dev")
    ap.add_argument("--n", type=int, default=16, help="utterances per set (spread evenly)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = ap.parse_args()
    quiet_transformers()
    torch.set_grad_enabled(False)

    ref = load_model(_source_model(args.ckpts))
    used = set().union(*(calib_ids(c) for c in args.ckpts))
    utts = []
    for spec in args.sets.split(","):
        pool = [u for u in load_source(spec).utterances if u.id not in used and u.seconds <= WINDOW_SECONDS]
        step = max(1, len(pool) // args.n)
        utts += pool[::step][: args.n]
    enc = ref.model.model.encoder
    names = [f"model.encoder.{n}" for n, m in enc.named_modules() if isinstance(m, torch.nn.Linear)]
    W = {n: ref.model.get_submodule(n).weight.detach().double() for n in names}
    D = {}  # checkpoint -> layer -> W − Ŵ
    for c in args.ckpts:
        q = checkpoint.load(c)
        D[c] = {n: W[n] - q.model.get_submodule(n).dequantize().double() for n in names}
        del q

    cal = ref.calibration("window")
    items = cal.prepare(utts)
    # per utterance and layer: ‖Wx‖² and ‖(W − Ŵ)x‖² of each checkpoint, on speech and on padding frames
    den = np.zeros((len(items), len(names), 2))
    num = np.zeros((len(args.ckpts), len(items), len(names), 2))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [ref.model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0][0].double())) for n in names]
    with progress_bar(True) as bar:
        task = bar.add_task("frame errors", total=len(items))
        for i, it in enumerate(items):
            inputs.clear()
            enc(it["features"])
            s = it["speech_frames"]
            for j, n in enumerate(names):
                x = inputs[n]
                for k, rows in enumerate((slice(0, s), slice(s, None))):
                    den[i, j, k] = float((x[rows] @ W[n].T).pow(2).sum())
                    for ci, c in enumerate(args.ckpts):
                        num[ci, i, j, k] = float((x[rows] @ D[c][n].T).pow(2).sum())
            bar.advance(task)
    for h in hooks:
        h.remove()

    kinds = ("speech", "padding")
    e = num.sum(1) / den.sum(0)[None]  # [ckpt, layer, kind]
    short = [_label(c) for c in args.ckpts]
    print(f"{len(items)} utterances ({args.sets}); mean speech frames {np.mean([it['speech_frames'] for it in items]):.0f}"
          f" of {items[0]['frames']}")
    print("layer | " + " | ".join(f"{s} {k}" for s in short for k in kinds))
    for j, n in enumerate(names):
        print(n.replace("model.encoder.", "") + " | " + " | ".join(f"{e[ci, j, k]:.3e}" for ci in range(len(short))
                                                                     for k in range(2)))
    rng = np.random.default_rng(0)
    out = {"command": "python scripts/frame_errors.py " + " ".join(sys.argv[1:]), "sets": args.sets,
           "n_utts": len(items), "utterances": [it["id"] for it in items], "checkpoints": args.ckpts, "labels": short,
           "frames": "speech: the audio plus the calibration margin; padding: the rest of the 30 s window",
           "layers": names,
           "err": e.tolist(), "against_first": {}}

    def gmean_ratio(ci: int, k: int, idx) -> float:
        r = num[ci, idx, :, k].sum(0) / num[0, idx, :, k].sum(0)
        return float(np.exp(np.mean(np.log(r))))

    for ci in range(1, len(args.ckpts)):
        row = {}
        for k, kind in enumerate(kinds):
            point = gmean_ratio(ci, k, np.arange(len(items)))
            boot = [gmean_ratio(ci, k, rng.integers(0, len(items), len(items))) for _ in range(args.resamples)]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            row[kind] = {"ratio": point, "ci95": [float(lo), float(hi)]}
        out["against_first"][args.ckpts[ci]] = row
        print(f"{short[ci]} / {short[0]}: speech {row['speech']['ratio']:.3f} [{row['speech']['ci95'][0]:.3f}, "
              f"{row['speech']['ci95'][1]:.3f}], padding {row['padding']['ratio']:.3f} "
              f"[{row['padding']['ci95'][0]:.3f}, {row['padding']['ci95'][1]:.3f}] (geometric mean over "
              f"{len(names)} layers of the error ratio)")
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
