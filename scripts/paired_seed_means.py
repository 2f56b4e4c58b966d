"""Paired bootstrap between two recipes' seed-mean models, from their committed transcripts (no model runs).

    python scripts/paired_seed_means.py \
        'bench/results/transcripts/ptq-whisper-tiny.en-qep-bits=3-*seed=?-decoding=standard-alpha=0.25-*-{set}.jsonl' \
        'bench/results/transcripts/ptq-whisper-tiny.en-gptq-bits=3-*seed=?-decoding=standard-encoder*-{set}.jsonl'

    python scripts/paired_seed_means.py \
        'bench/results/fade.json?model=whisper-tiny.en&method=fade&bits=3&pad_weight=0.25' \
        'bench/results/fade.json?model=whisper-tiny.en&method=fade&bits=3&pad_weight=null'

Each pattern (with {set} replaced by asterisk_test and tts_test) matches one transcript file per seed, or a
results file with `?key=value&...` names its records (values read as JSON where they parse: null, numbers; a key
`seeds=0,1` keeps those seeds) and their transcripts, which tells apart what a file name's hash hides (the padding
weight, say); each utterance's errors are averaged over seeds, and A − B is reported in WER points with a 95 %
paired bootstrap interval over utterances (quasr.stats.paired_bootstrap), as `bench/report.py` does against RTN
and FP32. With `--by-speaker` (first argument) the same comparison is made again within each speaker of each set
(the transcripts' "speaker" field): which voices a recipe's loss or gain comes from.
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

from quasr.stats import better_worse, paired_bootstrap


SETS = {"asterisk_test": "asterisk:test", "tts_test": "tts:test"}


def transcript_files(spec: str, set_name: str) -> list[str]:
    """The transcript files of one set named by `spec`: a glob ({set} filled in), or RESULTS.json?key=value&..."""
    path, _, query = spec.partition("?")  # a glob's own "?" stays a glob unless a .json file comes before it
    if not (path.endswith(".json") and Path(path).is_file()):
        return sorted(glob.glob(spec.format(set=set_name)))
    want, seeds = {}, None
    for kv in query.split("&"):
        k, _, v = kv.partition("=")
        if k == "seeds":
            seeds = {int(x) for x in v.split(",")}
            continue
        try:
            want[k] = json.loads(v)
        except ValueError:
            want[k] = v
    recs = [r for r in json.loads(Path(path).read_text())["records"]
            if r.get("speaker") is None and r.get("data") == SETS[set_name] and r.get("transcripts")
            and all(r.get(k) == v for k, v in want.items()) and (seeds is None or r.get("seed") in seeds)]
    by_seed = {}
    for r in recs:
        if r.get("seed") in by_seed:
            raise SystemExit(f"error: {spec} names more than one record of seed {r.get('seed')} on {SETS[set_name]}; "
                             "add keys to tell them apart")
        by_seed[r.get("seed")] = str(Path(path).parent / r["transcripts"])
    return [by_seed[k] for k in sorted(by_seed, key=lambda x: (x is None, x))]


def seed_mean(pattern: str, set_name: str = "asterisk_test"):
    files = transcript_files(pattern, set_name)
    if not files:
        raise SystemExit(f"error: no transcripts match {pattern}")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"error: {pattern} names transcripts that are not there: {', '.join(missing)}")
    try:
        per = [{u["id"]: (u["errors"], u["n_ref"]) for u in map(json.loads, open(f))} for f in files]
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {pattern}: a transcript line without id, errors and n_ref ({e!r})") from None
    ids = list(per[0])
    if any(p.keys() != per[0].keys() for p in per):
        raise SystemExit(f"error: the files of {pattern} hold different utterances")
    return ids, [sum(p[i][0] for p in per) / len(per) for i in ids], [per[0][i][1] for i in ids], len(files)


def speakers(pattern: str, set_name: str) -> dict[str, str]:
    """utterance id → speaker, from the first transcript file `pattern` names (all its seeds share the audio)."""
    first = transcript_files(pattern, set_name)[0]
    out = {}
    for line in open(first):
        u = json.loads(line)
        if not u.get("speaker"):
            raise SystemExit(f"error: {first}: utterance {u.get('id')} has no speaker; --by-speaker needs one on "
                             "every line")
        out[u["id"]] = u["speaker"]
    return out


def main() -> None:
    args = sys.argv[1:]
    by_speaker = bool(args) and args[0] == "--by-speaker"
    args = args[1:] if by_speaker else args
    if len(args) != 2:
        raise SystemExit(__doc__)
    for s in ("asterisk_test", "tts_test"):
        ia, a, n, ka = seed_mean(args[0], s)
        ib, b, _, kb = seed_mean(args[1], s)
        if ia != ib:
            raise SystemExit(f"error: {s}: the two recipes were scored on different utterances")
        bw = better_worse(a, b)
        print(f"{s}: A ({ka} seeds) − B ({kb} seeds): {paired_bootstrap(a, b, n)} WER points; "
              f"A better / worse on {bw[0]} / {bw[1]} utterances")
        if not by_speaker:
            continue
        who = speakers(args[0], s)
        for spk in sorted(set(who.values())):
            keep = [j for j, i in enumerate(ia) if who.get(i) == spk]
            sa, sb, sn = ([x[j] for j in keep] for x in (a, b, n))
            bw = better_worse(sa, sb)
            print(f"  {spk} ({len(keep)} utterances, {sum(sn)} words): {paired_bootstrap(sa, sb, sn)} WER points; "
                  f"A better / worse on {bw[0]} / {bw[1]}")


if __name__ == "__main__":
    main()
