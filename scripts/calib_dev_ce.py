"""Teacher-forced token cross-entropy of models on the held-in calib-dev utterances that none of them calibrated
on: the criterion for choosing a recipe option without looking at the test sets.

    python scripts/calib_dev_ce.py REFERENCE MODEL [MODEL ...] [--sets asterisk:calib-dev,tts:calib-dev]
    python scripts/calib_dev_ce.py CK_W8A8_MSE CK_W8A8_ESC --exclude-draw asterisk:calib+tts:calib:128:0

Each MODEL is a bundled name or a quasr checkpoint directory. The utterances are the calib-dev parts of the sets
(quasr.data.held_out: a fixed quarter of each calibration split) minus every id in any checkpoint's calibration
draw, minus those longer than Whisper's 30 s window. Printed per model: mean cross-entropy per target token
(nats) and, against REFERENCE, the difference with a paired bootstrap 95 % interval over utterances. Every model
reads the same token ids: the text is tokenized once, by REFERENCE's source model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from quasr.data import load_source
from quasr.evaluate import teacher_forced_batches, token_cross_entropy
from quasr.models import load_model
from quasr.models.whisper import WINDOW_SECONDS, quiet_transformers
from quasr.stats import paired_bootstrap


def calib_ids(spec: str) -> set[str]:
    """Every utterance id a checkpoint calibrated anything on: its weights' draw, its activation scales' sample,
    and its ESC search's fitness subset (a bundled model: none)."""
    meta = Path(spec) / "quasr_checkpoint.json"
    if not meta.exists():
        return set()
    rec = json.loads(meta.read_text())
    recipe = rec.get("recipe", rec)
    acts = (recipe.get("method_info") or {}).get("activations") or {}
    return (set(recipe.get("calib_ids") or []) | set(acts.get("calibration_ids") or [])
            | set((acts.get("esc") or {}).get("subset_ids") or []))


def text_model(spec: str) -> str:
    """The bundled or hub model a checkpoint was quantized from (the model itself otherwise)."""
    meta = Path(spec) / "quasr_checkpoint.json"
    if meta.exists():
        rec = json.loads(meta.read_text())
        return rec.get("recipe", rec).get("model") or spec
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--sets", default="asterisk:calib-dev,tts:calib-dev")
    ap.add_argument("--exclude-draw", default=None, metavar="SOURCES:N:SEED",
                    help="also leave out quasr quantize's calibration draw of N utterances from SOURCES with SEED "
                         "(e.g. asterisk:calib+tts:calib:128:0), for checkpoints that did not record it")
    args = ap.parse_args()
    quiet_transformers()
    used = set().union(*(calib_ids(m) for m in args.models))
    if args.exclude_draw:
        from quasr.cli import _calibration

        parts = args.exclude_draw.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].lstrip("-").isdigit():
            raise SystemExit(f"error: --exclude-draw {args.exclude_draw!r}: expected SOURCES:N:SEED, e.g. "
                             "asterisk:calib+tts:calib:128:0")
        used |= {u.id for u in _calibration(parts[0].split("+"), int(parts[1]), int(parts[2]), False)}
    utts = [u for s in args.sets.split(",") for u in load_source(s)
            if u.id not in used and u.seconds <= WINDOW_SECONDS]
    if not utts:
        raise SystemExit(f"error: no utterance of {args.sets} is left outside the calibration draws")
    print(f"{len(utts)} utterances of {args.sets} (not in any calibration draw: {len(used)} ids excluded)")
    # one tokenization for every model: the reference's source model, freshly converted (a checkpoint keeps the
    # tokenizer it was saved with, and whisper-base's lost a merge before converter version 2)
    tm = load_model(text_model(args.models[0]))
    batches = teacher_forced_batches(tm, utts)
    del tm
    ref = None
    for spec in args.models:
        nats, counts = token_cross_entropy(load_model(spec), batches)
        mean = sum(nats) / sum(counts)
        line = f"{mean:.4f} nats/token"
        if ref is None:
            ref = nats
        else:
            iv = paired_bootstrap(nats, ref, counts)
            line += f"   vs reference {iv.diff / 100:+.4f} [{iv.lo / 100:+.4f}, {iv.hi / 100:+.4f}]"
        print(f"{line}   {Path(spec).name[-90:]}", flush=True)


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
