"""Markdown tables for the README from the committed results files (no model runs).

    python bench/report.py                     # baseline, ptq and ptq-rerun tables
    python bench/report.py --readme            # rewrite them in README.md between the results markers
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from quasr.results import atomic_write_text

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def md(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def baseline(path: Path) -> str:
    d = json.loads(path.read_text())
    recs = d["records"]
    sets = [r for r in recs if r["speaker"] is None]
    rows = [[r["model"], r["data"], r["n_utts"], r["n_words"], r["wer"], r["n_rare_words"], r["rare_wer"],
             r["sec_per_utt"]] for r in sets]
    out = [f"`{d['command']}` (normalizer: {d['normalizer']}, torch threads: {d['machine'].get('torch_threads')})", "",
           md(rows, ["model", "set", "utts", "words", "WER %", "rare words", "rare-WER %", "s/utt"])]
    spk = [r for r in recs if r["speaker"] is not None and r["data"].startswith("tts")]
    if spk:
        models = sorted({r["model"] for r in spk})
        speakers = list(dict.fromkeys(r["speaker"] for r in spk))
        by = {(r["model"], r["speaker"]): r for r in spk}
        rows = [[s] + [by[(m, s)]["wer"] if (m, s) in by else None for m in models] for s in speakers]
        out += ["", "Per speaker on tts:test (WER %):", "", md(rows, ["voice"] + models)]
    return "\n".join(out)


BUSY_LOAD = 2.5  # a 1-minute load average above this on the 2-core machines means other work shared the CPUs


def timed(x: float | None, busy: bool) -> str | None:
    """A timing, starred when it was measured while other work ran (see BUSY_LOAD)."""
    return None if x is None else f"{x:.2f}" + ("*" if busy else "")


def paired(a: dict[str, int], b: dict[str, int]) -> tuple[int, int]:
    """Per-utterance errors of two models on the same utterances -> (utterances where a has fewer errors than
    b, utterances where it has more). Unlike a WER difference, one runaway utterance counts once."""
    if a.keys() != b.keys():
        raise ValueError("paired comparison needs the same utterances on both sides")
    return sum(a[k] < b[k] for k in a), sum(a[k] > b[k] for k in a)


def utterance_errors(results_dir: Path, rec: dict) -> dict[str, int] | None:
    """{utterance id: errors} from the transcript file a record names, or None if it names none."""
    if not rec.get("transcripts"):
        return None
    lines = (results_dir / rec["transcripts"]).read_text().splitlines()
    return {u["id"]: u["errors"] for u in map(json.loads, lines)}


def ptq(path: Path) -> str:
    """One row per recipe: WER and rare-WER on each test set side by side, cost and size, and a paired
    per-utterance comparison with RTN at the same bits, group size, embedding bits and layers."""
    d = json.loads(path.read_text())
    recs = [r for r in d["records"] if r["speaker"] is None]
    sets = list(dict.fromkeys(r["data"] for r in recs))
    fp = {(r["model"], r["data"]): r for r in recs if r["method"] == "fp"}
    main = path.with_name("ptq.json")  # a partial rerun file is compared with the RTN cells of the main grid
    pool = recs + ([r for r in json.loads(main.read_text())["records"] if r["speaker"] is None]
                   if path.name != main.name and main.exists() else [])
    rtn: dict[tuple, dict] = {}
    for r in pool:  # the file's own RTN cells first
        if r["method"] == "rtn":
            rtn.setdefault((r["model"], r["bits"], r["group_size"], r.get("embedding_bits"), r.get("layers"), r["data"]), r)

    def vs_rtn(r: dict) -> str | None:
        base = rtn.get((r["model"], r["bits"], r["group_size"], r.get("embedding_bits"), r.get("layers"), r["data"]))
        if r["method"] in ("fp", "rtn") or base is None:
            return None
        a, b = utterance_errors(path.parent, r), utterance_errors(path.parent, base)
        return None if a is None or b is None else "%d / %d" % paired(a, b)

    keys = ("model", "method", "bits", "group_size", "alpha", "embedding_bits", "encoder_frames", "pad_stride", "percdamp", "layers",
            "calib", "n_calib", "seed")
    rows: dict[tuple, dict] = {}
    for r in recs:
        rows.setdefault(tuple(r.get(k) for k in keys), {})[r["data"]] = r
    models = list(dict.fromkeys(r["model"] for r in recs))
    out = []
    # per model: full precision, then the widest weights first; run order within (the sort is stable)
    for key, by_set in sorted(rows.items(), key=lambda kv: (models.index(kv[0][0]), -(kv[0][2] or 99))):
        r = next(iter(by_set.values()))
        busy = max(x.get("load_avg") or 0 for x in by_set.values()) > BUSY_LOAD
        speeds = [fp[(r["model"], s)]["sec_per_utt"] / by_set[s]["sec_per_utt"] for s in by_set
                  if (r["model"], s) in fp and by_set[s].get("sec_per_utt")]
        label = r["method"] + (f" α={r['alpha']}" if r.get("alpha") is not None else "")
        if r.get("percdamp") not in (None, 0.01):  # GPTQ's default damping is left unsaid
            label += f" damp={r['percdamp']}"
        if r.get("seed"):  # another draw of the calibration utterances (seed 0 is left unsaid)
            label += f" seed={r['seed']}"
        if r.get("layers"):  # only the encoder's or only the decoder's Linears quantized
            label += f", {r['layers']} only"
        frames = r.get("encoder_frames")
        if frames == "window" and r.get("pad_stride"):
            frames += f"/{r['pad_stride']}"
        out.append([r["model"], label, r["bits"] and f"W{r['bits']}G{r['group_size']}", r.get("embedding_bits"), frames]
                   + [by_set[s]["wer"] if s in by_set else None for s in sets]
                   + [by_set[s]["rare_wer"] if s in by_set else None for s in sets]
                   + [vs_rtn(by_set[s]) if s in by_set else None for s in sets]
                   + [timed(r.get("quant_seconds"), busy), r.get("peak_rss_mb"), r.get("size_mb"), r.get("bits_per_weight"),
                      timed(sum(speeds) / len(speeds), busy) if speeds else None])
    n = {s: next(r["n_utts"] for r in recs if r["data"] == s) for s in sets}
    header = (["model", "method", "weights", "emb bits", "calib frames"] + [f"WER {s} %" for s in sets]
              + [f"rare-WER {s} %" for s in sets]
              + [f"vs RTN {s}: utts better / worse" for s in sets]
              + ["quant s", "peak RSS MB", "ckpt MB", "bits/weight", "speed vs fp"])
    sizes = ", ".join(f"{s}: {n[s]} utterances" for s in sets)
    return "\n".join([f"Normalizer: {d['normalizer']}; {sizes}. Commands:", "", commands(d), "", md(out, header), "",
                      f"\\* timed while other work shared the CPUs (load average above {BUSY_LOAD}); "
                      "vs RTN: utterances with fewer / more errors than RTN at the same bits, embedding bits and layers"
                      + ("" if path.name == "ptq.json" else " (RTN of ptq.json where this file has none)") + "."])


def commands(d: dict) -> str:
    """The distinct commands that measured the records of a results file, in order, as a bash block."""
    cmds = list(dict.fromkeys(r.get("command") or d["command"] for r in d["records"]))
    return "```bash\n" + "\n".join(cmds) + "\n```"


TITLES = {"baseline": "Full precision", "ptq": "Weight-only post-training quantization",
          "ptq-rerun": "The same GPTQ cells again, on another machine"}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def report(names: list[str], required: bool = True) -> str:
    """The tables of bench/results/NAME.json for each name; a missing file is an error unless not required."""
    out = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.exists() and required:
            raise SystemExit(f"{path}: no such results file (run its benchmark first)")
        if path.exists():
            title = TITLES.get(name) or TITLES.get(name.split("-")[0], name)
            out += [f"### {title}: `bench/results/{name}.json`", "", baseline(path) if name.startswith("baseline") else ptq(path), ""]
    return "\n".join(out)


def main() -> None:
    args = sys.argv[1:]
    readme = "--readme" in args
    names = [a for a in args if a != "--readme"]
    text = report(names or ["baseline", "ptq", "ptq-rerun"], required=bool(names))
    if not readme:
        print(text)
        return
    path = README
    doc = path.read_text()
    if doc.count(START) != 1 or doc.count(END) != 1 or doc.index(START) > doc.index(END):
        raise SystemExit(f"{path}: needs one {START} line before one {END} line")
    head, rest = doc.split(START)
    atomic_write_text(path, head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    print(f"rewrote the tables in {path}")


if __name__ == "__main__":
    main()
