"""How long the committed single-window hypotheses are, in tokens: does openai-whisper's 224-token cap matter?

    python scripts/window_lengths.py            # every standard-decoding transcript under bench/results
    python scripts/window_lengths.py --over 150 --decoding standard

openai-whisper samples at most `sample_len = n_text_ctx // 2` = 224 tokens per 30 s window; transformers'
`generate`, which quasr decodes with, runs on to the decoder's 448 positions. Only a window that loops reaches
either. This reads the transcripts named by the records of bench/results/*.json with the given decoding, keeps
the utterances of at most 30 s (one window), tokenizes each final hypothesis with tiny.en's tokenizer (text
tokens only: the timestamp tokens of `standard` are not in the transcripts, so a window's real length is a few
tokens per segment longer) and prints how many hypotheses fall in each 50-token bin and the longest ones. No
model runs; the tokenizer and the test sets' durations come from the bundled model and the data cache.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoding", default="standard")
    ap.add_argument("--over", type=int, default=150, help="list the hypotheses longer than this many tokens")
    ap.add_argument("--sets", default="asterisk:test,tts:test", help="where the utterance durations come from")
    args = ap.parse_args()

    from quasr.data import load_source
    from quasr.models import load_model
    from quasr.models.whisper import WINDOW_SECONDS

    tok = load_model("whisper-tiny.en").processor.tokenizer
    seconds = {u.id: u.seconds for s in args.sets.split(",") for u in load_source(s)}
    paths = sorted({RESULTS / r["transcripts"] for f in glob.glob(str(RESULTS / "*.json"))
                    for r in json.loads(Path(f).read_text()).get("records", [])
                    if r.get("decoding") == args.decoding and r.get("transcripts")})
    bins, long, n, missing = collections.Counter(), [], 0, 0
    for p in paths:
        if not p.exists():
            missing += 1
            continue
        for u in map(json.loads, p.read_text().splitlines()):
            if u["id"] not in seconds or seconds[u["id"]] > WINDOW_SECONDS:
                continue
            n += 1
            k = len(tok(" " + u["hyp"], add_special_tokens=False).input_ids)
            bins[k // 50 * 50] += 1
            if k > args.over:
                long.append((k, u["id"], p.name))
    print(f"{len(paths)} transcript files ({missing} missing), {n} hypotheses of utterances up to "
          f"{WINDOW_SECONDS:.0f} s, decoding {args.decoding}")
    for b in sorted(bins):
        print(f"  {b:3d}-{b + 49:3d} tokens: {bins[b]}")
    for k, uid, name in sorted(long, reverse=True):
        print(f"  {k} tokens: {uid} in {name}")


if __name__ == "__main__":
    main()
