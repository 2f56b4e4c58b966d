"""Where a quantized model's early stops come from: its encoder or its decoder, and how likely end-of-text was.

    python scripts/early_stops.py CHECKPOINT [--data asterisk:test] [--min-words 20]

For every utterance of the set with at least --min-words reference words, four models transcribe it with the
standard decoding: full precision, the checkpoint, the checkpoint's encoder under the full-precision decoder
("enc q"), and the full-precision encoder under the checkpoint's decoder and head ("dec q"). Teacher-forced on the
reference (utterances up to 30 s), each model's largest probability of <|endoftext|> at a position before the last
(where it would end the transcript early) is printed beside its word errors; an early stop (quasr.metrics.failure)
is marked "E".
"""
from __future__ import annotations

from quasr import numerics

numerics.pin()  # before torch is imported: the kernels `quasr quantize` and the benchmarks use

import argparse  # noqa: E402
import copy  # noqa: E402

import torch  # noqa: E402

from quasr import metrics  # noqa: E402
from quasr.data import load_source  # noqa: E402
from quasr.decoding import Decoding
from quasr.models import load_model


def eot_risk(asr, utts, text_model) -> list[float | None]:
    """Per utterance: the largest teacher-forced P(<|endoftext|>) over the target positions before the last (None
    for audio longer than one 30 s window, which has no single teacher-forced pass)."""
    eot = text_model.model.config.eos_token_id
    out = []
    with torch.inference_mode():
        for u in utts:
            if text_model.training_problem(u):
                out.append(None)
                continue
            b = text_model.training_batch([u])
            logits = asr.model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()[0]
            lab = b["labels"][0]
            pos = (lab != -100).nonzero().flatten()[:-1]  # text positions; the last target is <|endoftext|> itself
            out.append(float(torch.softmax(logits[pos], -1)[:, eot].max()) if len(pos) else 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="asterisk:test")
    ap.add_argument("--min-words", type=int, default=20)
    args = ap.parse_args()
    fp, q = load_model("whisper-tiny.en"), load_model(args.checkpoint)
    if q.model.config.d_model != fp.model.config.d_model:
        raise SystemExit(f"{args.checkpoint}: not a whisper-tiny.en checkpoint")
    enc_q = copy.deepcopy(fp)
    enc_q.model.model.encoder = q.model.model.encoder
    dec_q = copy.deepcopy(q)
    dec_q.model.model.encoder = fp.model.model.encoder
    models = {"fp": fp, "quantized": q, "enc q": enc_q, "dec q": dec_q}
    ds = load_source(args.data)
    utts = [u for u in ds.utterances if len(metrics.normalize(u.text).split()) >= args.min_words]
    print(f"{len(utts)} utterances of {args.data} with {args.min_words}+ words")
    rows = {u.id: [] for u in utts}
    for name, m in models.items():
        hyps = m.transcribe([u.audio for u in utts], batch_size=8, decoding=Decoding(), progress=False)
        risk = eot_risk(m, utts, fp)
        for u, h, r in zip(utts, hyps, risk):
            c = metrics.score_utterance(u.text, h)["counts"]
            mark = "E" if metrics.failure(c) == "truncated" else " "
            rows[u.id].append(f"{c.errors:4d}{mark} " + ("    -" if r is None else f"{r:5.3f}"))
    print(f"{'utterance':32s} {'words':>5s}  " + "  ".join(f"{n:>11s}" for n in models))
    print(f"{'':32s} {'':5s}  " + "  ".join(f"{'err  P(eot)':>11s}" for _ in models))
    for u in utts:
        n = len(metrics.normalize(u.text).split())
        print(f"{u.id:32s} {n:5d}  " + "  ".join(rows[u.id]))


if __name__ == "__main__":
    main()
