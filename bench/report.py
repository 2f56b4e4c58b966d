"""Markdown tables for the README from the committed results files (no model runs).

    python bench/report.py                     # the ptq, esc and deploy tables
    python bench/report.py --readme            # rewrite them in README.md between the results markers
    python bench/report.py ptq-greedy --decoding greedy   # an archived file

Recipes calibrated with several seeds are one row: WER as mean ± std over seeds, and paired comparisons of the
seed-mean model (per-utterance errors averaged over seeds) with RTN and full precision: the WER difference
with a 95 % paired bootstrap interval over utterances (quasr.stats) and the utterances better / worse.
"""
from __future__ import annotations

import json
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


def baseline(path: Path, decoding: str | None = None) -> str:
    d = json.loads(path.read_text())
    recs = one_decoding(d["records"], path, decoding)
    sets = [r for r in recs if r["speaker"] is None]
    rows = [[r["model"], r["data"], r["n_utts"], r["n_words"], r["wer"], r["n_rare_words"], r["rare_wer"],
             r.get("n_fallback_windows"), r["sec_per_utt"]] for r in sets]
    dec = next(iter({str(r.get("decoding")) for r in recs}), None)
    out = [f"`{d['command']}` (decoding: {dec}, normalizer: {d['normalizer']}, torch threads: "
           f"{d['machine'].get('torch_threads')})", "",
           md(rows, ["model", "set", "utts", "words", "WER %", "rare words", "rare-WER %", "fell back", "s/utt"])]
    spk = [r for r in recs if r["speaker"] is not None and r["data"].startswith("tts")]
    if spk:
        models = sorted({r["model"] for r in spk})
        speakers = list(dict.fromkeys(r["speaker"] for r in spk))
        by = {(r["model"], r["speaker"]): r for r in spk}
        rows = [[s] + [by[(m, s)]["wer"] if (m, s) in by else None for m in models] for s in speakers]
        out += ["", "Per speaker on tts:test (WER %):", "", md(rows, ["voice"] + models)]
    return "\n".join(out)


BUSY_LOAD = 2.5  # a 1-minute load average above this on the 2-core machines means other work shared the CPUs
SEED_KEYS = ("seed",)  # what varies between the records of one recipe
RECIPE_KEYS = ("model", "method", "bits", "group_size", "alpha", "variant", "embedding_bits", "encoder_frames",
               "pad_stride", "pad_weight", "percdamp", "layers", "calib", "n_calib", "decoding", "pool", "tail_cost",
               "runtime", "rtype", "sym", "act_bits", "act_mode", "act_calibrator", "esc_budget", "mse", "act_order")
REFS = {"fade": ("rtn", "gptq"), "tarq": ("gptq", "rtn"), "tarq-swing": ("gptq",),  # default: rtn and fp
        "deploy": ("rtn-runtime", "fp"), "esc": ("act:mse", "fp")}  # act:NAME: the same recipe, another calibrator
RARE_PAIRS = {"tarq", "tarq-swing"}  # benchmarks whose paired table also compares rare-word errors


def timed(x: float | None, busy: bool) -> str | None:
    """A timing, starred when it was measured while other work ran (see BUSY_LOAD)."""
    return None if x is None else f"{x:.2f}" + ("*" if busy else "")


def paired(a: dict[str, int], b: dict[str, int]) -> tuple[int, int]:
    """Per-utterance errors of two models on the same utterances -> (utterances where a has fewer errors than
    b, utterances where it has more). Unlike a WER difference, one runaway utterance counts once."""
    from quasr.stats import better_worse

    if a.keys() != b.keys():
        raise ValueError("paired comparison needs the same utterances on both sides")
    return better_worse([a[k] for k in a], [b[k] for k in a])


METRICS = {"errors": ("errors", "n_ref"), "rare": ("rare_errors", "rare_words")}  # (numerator, denominator)


def utterance_errors(results_dir: Path, rec: dict, metric: str = "errors") -> dict[str, tuple[int, int]] | None:
    """{utterance id: (errors, reference words)} from the transcript file a record names, or None if it names
    none; metric "rare": (rare-word errors, rare reference words)."""
    if not rec.get("transcripts"):
        return None
    num, den = METRICS[metric]
    lines = (results_dir / rec["transcripts"]).read_text().splitlines()
    out = {}
    for u in map(json.loads, lines):
        d = u.get(den, 0)
        out[u["id"]] = (u.get(num, 0), len(d) if isinstance(d, list) else d)
    return out


def one_decoding(recs: list[dict], path: Path, decoding: str | None = None) -> list[dict]:
    """The records of one decoding policy: `decoding` if given, else the file's only one; a file that mixes
    policies needs `decoding` (a table never compares two decodings)."""
    names = sorted({str(r.get("decoding")) for r in recs})
    if decoding is not None:
        if decoding not in names:
            raise SystemExit(f"{path}: no records with decoding {decoding!r} (it has {', '.join(names)})")
        return [r for r in recs if str(r.get("decoding")) == decoding]
    if len(names) > 1:
        raise SystemExit(f"{path}: records mix decodings ({', '.join(names)}); a table compares one decoding: "
                         f"pass --decoding NAME")
    return recs


class Recipe:
    """The records of one recipe on one set, one per calibration seed, and their per-utterance errors."""

    def __init__(self, recs: list[dict], results_dir: Path):
        self.recs = sorted(recs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        self.dir = results_dir
        per_seed = [utterance_errors(results_dir, r) for r in self.recs]
        self.utts = None if any(u is None for u in per_seed) else per_seed

    def metric(self, metric: str) -> "Recipe":
        """The same recipe with its per-utterance counts of another metric (see METRICS)."""
        if metric == "errors":
            return self
        other = Recipe.__new__(Recipe)
        other.recs, other.dir = self.recs, self.dir
        per_seed = [utterance_errors(self.dir, r, metric) for r in self.recs]
        other.utts = None if any(u is None for u in per_seed) else per_seed
        return other

    def mean_std(self, key: str):
        from quasr.stats import mean_std

        return mean_std([r.get(key) for r in self.recs])

    def mean_errors(self) -> dict[str, tuple[float, int]] | None:
        """{id: (errors averaged over seeds, reference words)}: the seed-mean model, for paired comparisons."""
        if not self.utts:
            return None
        ids = list(self.utts[0])
        for u in self.utts[1:]:
            if u.keys() != self.utts[0].keys():
                raise SystemExit("records of one recipe were scored on different utterances")
        return {i: (sum(u[i][0] for u in self.utts) / len(self.utts), self.utts[0][i][1]) for i in ids}


def compare(a: Recipe, b: Recipe | None, resamples: int, metric: str = "errors",
            on_b: bool = False) -> tuple[str | None, str | None]:
    """(Δ WER of a − b with its paired bootstrap 95 % interval over utterances, "better / worse" utterances);
    a dagger marks an interval that excludes zero. metric "rare": the same for rare-WER. `on_b`: b may hold a
    subset of a's utterances (a --limit run against a full one), paired on b's."""
    from quasr.stats import align_utterances, better_worse, paired_bootstrap

    if b is None or a is b:
        return None, None
    ea, eb = a.metric(metric).mean_errors(), b.metric(metric).mean_errors()
    if ea is None or eb is None:
        return None, None
    ids = list(eb) if on_b and eb.keys() <= ea.keys() else align_utterances(ea, eb, "report")
    ci = paired_bootstrap([ea[i][0] for i in ids], [eb[i][0] for i in ids], [eb[i][1] for i in ids],
                          resamples=resamples)
    bw = better_worse([ea[i][0] for i in ids], [eb[i][0] for i in ids])
    return f"{ci}" + (" †" if ci.excludes_zero else ""), f"{bw[0]} / {bw[1]}"


def pm(m, sd) -> str | None:
    if m is None:
        return None
    return f"{m:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def ptq(path: Path, decoding: str | None = None, resamples: int = 10_000, refs: tuple[str, str] | None = None) -> str:
    """Three tables per results file, one row per recipe (its calibration seeds pooled):
    accuracy (WER and rare-WER as mean ± std over seeds, fallback windows), paired comparisons with RTN at the
    same bits, group size, embedding bits and layers and with full precision (Δ WER of the seed-mean model with a
    95 % paired bootstrap interval over utterances, utterances better / worse), and cost."""
    d = json.loads(path.read_text())
    refs = refs or REFS.get(d.get("benchmark"), ("rtn", "fp"))
    rare_pairs = d.get("benchmark") in RARE_PAIRS
    common = any(r.get("common_wer") is not None for r in d["records"])
    recs = one_decoding([r for r in d["records"] if r["speaker"] is None], path, decoding)
    sets = list(dict.fromkeys(r["data"] for r in recs))
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in recs:
        groups.setdefault(tuple(r.get(k) for k in RECIPE_KEYS), {}).setdefault(r["data"], []).append(r)
    recipes = {key: {s: Recipe(rs, path.parent) for s, rs in by_set.items()} for key, by_set in groups.items()}
    main = path.with_name("ptq.json")  # a partial file is compared with the RTN and FP cells of the main grid
    if path.name != main.name and main.exists():
        for r in one_decoding([r for r in json.loads(main.read_text())["records"] if r["speaker"] is None], main,
                              next(iter({str(x.get("decoding")) for x in recs}), None)):
            if r["method"] in ("fp", "rtn"):
                key = tuple(r.get(k) for k in RECIPE_KEYS)
                if key not in groups:
                    recipes.setdefault(key, {}).setdefault(r["data"], Recipe([r], main.parent))

    def ref(key: tuple, method: str, s: str) -> Recipe | None:
        k = dict(zip(RECIPE_KEYS, key))
        if method.startswith("act:"):  # the same weights and activation bits, calibrated by another calibrator
            same = [x for x in RECIPE_KEYS if x not in ("act_calibrator", "esc_budget")]
            for other, by_set in recipes.items():
                o = dict(zip(RECIPE_KEYS, other))
                if o["act_calibrator"] == method[4:] and all(o[x] == k[x] for x in same) and s in by_set:
                    return by_set[s]
            return None
        same = ("bits", "group_size", "embedding_bits", "layers") + (
            ("calib", "n_calib", "encoder_frames", "pad_stride", "pad_weight", "percdamp")
            if method not in ("rtn", "rtn-runtime") else ())
        for other, by_set in recipes.items():
            o = dict(zip(RECIPE_KEYS, other))
            if o["method"] != method or o["model"] != k["model"] or s not in by_set or o["runtime"] != k["runtime"]:
                continue
            if method == "rtn-runtime" and o["rtype"] != k["rtype"]:
                continue
            if method == "fp" or all(o[x] == k[x] for x in same):
                return by_set[s]
        return None

    models = list(dict.fromkeys(r["model"] for r in recs))
    own = [k for k in recipes if k in groups]
    runtime_of = RECIPE_KEYS.index("runtime")
    order = sorted(own, key=lambda k: (models.index(k[0]), str(k[runtime_of] or ""), -(k[2] or 99)))
    acc, pair, cost = [], [], []
    any_partial = False  # a cost cell left out a seed's partial timing: say so under the table
    fp_speed = {(k[0], k[runtime_of], s): rec.mean_std("sec_per_utt")[0] for k, by in recipes.items() if k[1] == "fp"
                for s, rec in by.items()}
    for key in order:
        k = dict(zip(RECIPE_KEYS, key))
        by_set = recipes[key]
        first = next(iter(by_set.values()))
        seed_key = "esc_seed" if k.get("act_calibrator") == "esc" else "seed"  # ESC: the search's seeds
        seeds = sorted({r.get(seed_key) for rec in by_set.values() for r in rec.recs if r.get(seed_key) is not None})
        label = label_of(k)
        weights = k["bits"] and (f"W{k['bits']}G{k['group_size']}" if k["group_size"] else f"W{k['bits']}")
        if k.get("act_bits"):
            weights += f"A{k['act_bits']}"
        head = [k["model"], label, weights]
        acc.append(head + [",".join(map(str, seeds)) or "-"]
                   + [pm(*by_set[s].mean_std("wer")[:2]) if s in by_set else None for s in sets]
                   + [pm(*by_set[s].mean_std("rare_wer")[:2]) if s in by_set else None for s in sets]
                   + ([pm(*by_set[s].mean_std("common_wer")[:2]) if s in by_set else None for s in sets]
                      if common else [])
                   + [pm(*by_set[s].mean_std("n_fallback_windows")[:2]) if s in by_set else None for s in sets])
        if k["method"] != "fp":
            cells = []
            for s in sets:
                rec = by_set.get(s)
                for r in refs:
                    mine = f"act:{k['act_calibrator']}" if r.startswith("act:") else k["method"]
                    c = compare(rec, ref(key, r, s), resamples) if rec and mine != r else (None, None)
                    cells += list(c)
                if rare_pairs:
                    c = compare(rec, ref(key, refs[0], s), resamples, "rare") if rec and k["method"] != refs[0] \
                        else (None, None)
                    cells += list(c)
            pair.append(head + [",".join(map(str, seeds)) or "-"] + cells)
        busy = max(r.get("load_avg") or 0 for rec in by_set.values() for r in rec.recs) > BUSY_LOAD
        speeds = [fp_speed[(k["model"], k["runtime"], s)] / by_set[s].mean_std("sec_per_utt")[0] for s in by_set
                  if fp_speed.get((k["model"], k["runtime"], s)) and by_set[s].mean_std("sec_per_utt")[0]]
        q, partial = quant_seconds(first)
        any_partial = any_partial or bool(partial and q[0] is not None)
        cost.append(head + [(pm(q[0], q[1]) + (" ‡" if partial else "")) if q[0] is not None else None,
                            first.mean_std("peak_rss_mb")[0],
                            first.recs[0].get("size_mb"), first.recs[0].get("bits_per_weight"),
                            timed(sum(speeds) / len(speeds), busy) if speeds else None]
                    + [timed(by_set[s].mean_std("sec_per_utt")[0], busy) if s in by_set else None for s in sets])
    n = {s: next(r["n_utts"] for r in recs if r["data"] == s) for s in sets}
    dec = next(iter({str(r.get("decoding")) for r in recs}), None)
    runaway = runaways({k: recipes[k] for k in order})
    sizes = ", ".join(f"{s}: {n[s]} utterances" for s in sets)
    fmt_int = lambda rows: [[round(c) if isinstance(c, float) and i == 4 else c for i, c in enumerate(r)] for r in rows]  # noqa: E731
    out = [f"Decoding: {dec}; normalizer: {d['normalizer']}; {sizes}. Commands:", "", commands(d), "",
           "Accuracy (mean ± standard deviation over calibration seeds; fell back: windows decoded again at a higher "
           "temperature):", "",
           md(acc, ["model", "method", "weights", "seeds"] + [f"WER {s} %" for s in sets]
              + [f"rare-WER {s} %" for s in sets] + ([f"common-WER {s} %" for s in sets] if common else [])
              + [f"fell back {s}" for s in sets]), "",
           runaway, "",
           "Paired comparisons (Δ WER in points of the seed-mean model, 95 % bootstrap interval over utterances, "
           f"{resamples:,} resamples; † the interval excludes zero; utterances with fewer / more errors):", "",
           md(pair, ["model", "method", "weights", "seeds"]
              + [c for s in sets for c in [x for r in refs for x in (f"Δ vs {ref_name(r)} {s}",
                                                                      f"vs {ref_name(r)} {s}: better / worse")]
                 + ([f"Δ rare-WER vs {refs[0].upper()} {s}", f"rare: better / worse {s}"] if rare_pairs else [])]),
           "",
           "Cost:", "",
           md(fmt_int(cost), ["model", "method", "weights", "quant s", "peak RSS MB", "ckpt MB", "bits/weight",
                              "speed vs fp"] + [f"s/utt {s}" for s in sets]), "",
           f"\\* timed while other work shared the CPUs (load average above {BUSY_LOAD})."
           + (" ‡ the mean leaves out seeds whose record times only part of the quantization (its "
              "`quant_seconds_partial` says which part)." if any_partial else "")]
    return "\n".join(out)


def quant_seconds(rec: Recipe) -> tuple[tuple, int]:
    """(mean, std, n) of the quantization seconds over the seeds whose record times the whole quantization, and
    how many seeds were left out (a record with `quant_seconds_partial`: say, a resumed search's second part)."""
    from quasr.stats import mean_std

    whole = [r.get("quant_seconds") for r in rec.recs if not r.get("quant_seconds_partial")]
    return mean_std(whole), len(rec.recs) - len(whole)


def runaways(recipes: dict[tuple, dict[str, Recipe]]) -> str:
    """Per weight width: how many scored utterances (each seed counted) have more errors than
    factor × reference words + extra (a decode that ran away: quasr.metrics.ran_away), and the worst one."""
    from quasr.metrics import RUNAWAY_EXTRA as extra, RUNAWAY_FACTOR as factor, ran_away

    out = []
    widths = sorted({k[2] for k in recipes if k[2]}, reverse=True)
    for bits in widths:
        n = over = 0
        worst = None
        for key, by_set in recipes.items():
            if key[2] != bits:
                continue
            for rec in by_set.values():
                for r, utts in zip(rec.recs, rec.utts or []):
                    for uid, (e, words) in utts.items():
                        n += 1
                        excess = e - (factor * words + extra)  # how far past the line: the worst is named
                        over += ran_away(e, words)
                        if worst is None or excess > worst[0]:
                            worst = (excess, uid, e, words, f"{label_of(dict(zip(RECIPE_KEYS, key)))} seed {r.get('seed')}")
        if worst:
            out.append(f"W{bits}: {over} of {n} scored utterances have more than {factor}× their reference words + "
                       f"{extra} errors; the worst, {worst[1]} ({worst[4]}), has {worst[2]} errors on {worst[3]} "
                       f"words.")
    return "Runaway decodes: " + " ".join(out) if out else ""


def swing(path: Path, decoding: str | None = None) -> str:
    """Rare-WER of each method calibrated on each pool, and its swing (max − min over pools), per test set."""
    d = json.loads(path.read_text())
    recs = one_decoding([r for r in d["records"] if r["speaker"] is None], path, decoding)
    sets = list(dict.fromkeys(r["data"] for r in recs))
    pools = list(dict.fromkeys((r["calib"], r.get("pool") or "random") for r in recs))
    rows = []
    for model in dict.fromkeys(r["model"] for r in recs):
        for method in dict.fromkeys(r["method"] for r in recs if r["model"] == model):
            for bits in sorted({r["bits"] for r in recs if r["model"] == model and r["method"] == method}):
                row = [model, method, f"W{bits}"]
                for s in sets:
                    vals = {(r["calib"], r.get("pool") or "random"): r["rare_wer"] for r in recs
                            if (r["model"], r["method"], r["bits"], r["data"]) == (model, method, bits, s)}
                    row += [vals.get(p) for p in pools]
                    got = [v for v in vals.values() if v is not None]
                    row.append(max(got) - min(got) if len(got) > 1 else None)
                rows.append(row)
    header = ["model", "method", "weights"] + [c for s in sets for c in
                                                [f"{s} rare-WER, {c} {p}" for c, p in pools] + [f"{s} swing"]]
    return "\n".join([f"Decoding: {next(iter({str(r.get('decoding')) for r in recs}), None)}. Commands:", "",
                      commands(d), "", md(rows, header)])


PQM_COLUMNS = ("fp", "nf4", "nf4+sat", "nf4+speaker-lora", "fp+speaker-lora")


def pqm(path: Path, decoding: str | None = None, resamples: int = 10_000) -> str:
    """Per model: WER of each test speaker under each setting, the mean over speakers, its relative change
    against full precision (stratified bootstrap over each speaker's utterances), sizes and adaptation time;
    then the asterisk speaker's WER against the number of its adaptation utterances."""
    from quasr.stats import speaker_mean_relative

    d = json.loads(path.read_text())
    recs = one_decoding([r for r in d["records"] if r["speaker"] is None], path, decoding)
    out = [f"Decoding: {next(iter({str(r.get('decoding')) for r in recs}), None)}; normalizer: {d['normalizer']}. "
           "Commands:", "", commands(d), ""]
    for model in dict.fromkeys(r["model"] for r in recs):
        main = [r for r in recs if r["model"] == model and r.get("adapter") != "curve"]
        cell = {(r["method"], r["data"].removeprefix("test:")): r for r in main}
        speakers = list(dict.fromkeys(r["data"].removeprefix("test:") for r in main))
        rows = [[s] + [cell[(m, s)]["wer"] if (m, s) in cell else None for m in PQM_COLUMNS] for s in speakers]
        mean = ["mean over speakers"]
        for m in PQM_COLUMNS:
            vals = [cell[(m, s)]["wer"] for s in speakers if (m, s) in cell]
            mean.append(sum(vals) / len(vals) if len(vals) == len(speakers) else None)
        rows.append(mean)
        rel = ["change vs fp (95% CI)"]
        for m in PQM_COLUMNS:
            if m == "fp" or not all((m, s) in cell and ("fp", s) in cell for s in speakers):
                rel.append(None)
                continue
            ea, eb, n, g = [], [], [], []
            for s in speakers:
                ua, ub = utterance_errors(path.parent, cell[(m, s)]), utterance_errors(path.parent, cell[("fp", s)])
                for i in ub:
                    ea.append(ua[i][0])
                    eb.append(ub[i][0])
                    n.append(ub[i][1])
                    g.append(s)
            ci = speaker_mean_relative(ea, eb, n, g, resamples=min(resamples, 2000))
            rel.append(f"{ci.diff:+.1f}% [{ci.lo:+.1f}, {ci.hi:+.1f}]" + (" †" if ci.excludes_zero else ""))
        rows.append(rel)
        out += [f"**{model}** (WER %):", "", md(rows, ["test speaker", *PQM_COLUMNS]), ""]
        info = []
        for m in PQM_COLUMNS:
            rs = [r for r in main if r["method"] == m]
            if not rs:
                continue
            share = next((r.get("adapter_share") for r in rs if r.get("adapter_share")), None)
            mins = [r["adapt_minutes"] for r in rs if r.get("adapt_minutes") is not None]
            info.append([m, rs[0].get("size_mb"), None if share is None else f"{100 * share:.2f}%",
                         f"{sum(mins) / len(mins):.1f}" if mins else None])
        out += [md(info, ["setting", "base MB", "adapter / base parameters", "minutes to adapt a speaker"]), ""]
        curve = sorted((r for r in recs if r["model"] == model and r.get("adapter") == "curve"),
                       key=lambda r: r.get("n_adapt") or 0)
        if curve:
            out += ["Asterisk speaker, NF4 + speaker LoRA, by adaptation utterances (WER %):", "",
                    md([[r.get("n_adapt"), r["wer"], r.get("adapt_minutes")] for r in curve],
                       ["utterances", "WER", "minutes"]), ""]
    return "\n".join(out)


def ref_name(r: str) -> str:
    if r == "rtn-runtime":
        return "the runtime's own rounding"
    return f"{r[4:]} calibrator" if r.startswith("act:") else r.upper()


# quasr's rows each peer is paired with, by the peer's bits: GPTQ (the same algorithm as llm-compressor's), and QEP
# α=0.5 (the compensation strength calib-dev chose for the whisper.cpp files, bench/results/selection/; at W3G128
# it is also the lowest-WER α, a test-set fact, so it is not called "chosen" there); and FADE with the defaults
# calib-dev chose (bench/results/fade-select.json), where fade.json has it: at padding weight 1 (how its grid was
# measured) and, at W3 (five seeds), at 0.25, the toolkit's default since calib-dev chose it
PEER_REFERENCE = {4: (("gptq", 128), ("qep α=0.5", 128), ("fade (split-size-vuln)", 128),
                      ("fade (split-size-vuln), pad weight 0.25", 128)),
                  3: (("gptq", 128), ("qep α=0.5", 128), ("fade (split-size-vuln)", 128),
                      ("fade (split-size-vuln), pad weight 0.25", 128)), 8: (("rtn", 128),)}
# quasr's rows besides ptq.json's: each method benchmark's own method (its other rows are copies of ptq.json's)
METHOD_FILES = {"fade.json": ("fade",), "tarq.json": ("tarq",)}


def peers(path: Path, decoding: str | None = None, resamples: int = 10_000, plot: bool = False) -> str:
    """Each peer's scheme beside quasr's recipes of the same model (from ptq.json): WER, rare-WER, size on disk,
    quantization seconds; and the paired interval of quasr's reference recipe at the peer's bit width (GPTQ G128,
    seed-mean; at 8 bits RTN) against the peer. CTranslate2 runs in its own decoder: it is compared with
    CTranslate2 float32. Failed cells are listed with their error. With `plot`, WER against size on disk goes to
    bench/results/peers.png (`python bench/report.py --readme` writes it)."""
    d = json.loads(path.read_text())
    recs = one_decoding([r for r in d["records"] if r["speaker"] is None], path, decoding)
    dec = next(iter({str(r.get("decoding")) for r in recs}), None)
    failed = [r for r in recs if r.get("error")]
    ok = [r for r in recs if not r.get("error")]
    main = path.with_name("ptq.json")
    ours = one_decoding([r for r in json.loads(main.read_text())["records"] if r["speaker"] is None], main, dec) \
        if main.exists() else []
    for name, methods in METHOD_FILES.items():
        f = path.with_name(name)
        if f.exists():
            rs = [r for r in json.loads(f.read_text())["records"] if r["speaker"] is None and r["method"] in methods
                  and not r.get("error") and str(r.get("decoding")) == str(dec)]
            ours += rs
    sets = list(dict.fromkeys(r["data"] for r in recs))
    models = list(dict.fromkeys(r["model"] for r in recs))

    def group(rs, key):
        out: dict = {}
        for r in rs:
            out.setdefault(key(r), {}).setdefault(r["data"], []).append(r)
        return out

    peer_rows = group(ok, lambda r: (r["model"], r["method"]))
    quasr_rows = group([r for r in ours if r["model"] in models and r.get("act_bits") is None],
                       lambda r: (r["model"], label_of(dict(r, **{k: r.get(k) for k in RECIPE_KEYS})), r.get("bits"),
                                  r.get("group_size")))
    rows, pairs, points = [], [], []
    for model in models:
        for key, by_set in [(k, v) for k, v in quasr_rows.items() if k[0] == model]:
            recipes = {s: Recipe(rs, main.parent) for s, rs in by_set.items()}
            first = next(iter(by_set.values()))[0]
            points.append((model, f"quasr {key[1]} W{key[2] or 32}", first.get("size_mb"),
                           {s: recipes[s].mean_std("wer")[0] for s in recipes}))
            w = f"W{key[2]}G{key[3]}" if key[2] and key[3] else (f"W{key[2]}" if key[2] else "FP32")
            rows.append([model, f"quasr {key[1]}", w]
                        + [pm(*recipes[s].mean_std("wer")[:2]) if s in recipes else None for s in sets]
                        + [pm(*recipes[s].mean_std("rare_wer")[:2]) if s in recipes else None for s in sets]
                        + [first.get("size_mb"), pm(*quant_seconds(next(iter(recipes.values())))[0][:2])])
        for (m, method), by_set in peer_rows.items():
            if m != model:
                continue
            first = next(iter(by_set.values()))[0]
            points.append((model, f"{method} W{first.get('bits') or 32}", first.get("size_mb"),
                           {s: by_set[s][0]["wer"] for s in by_set}))
            rows.append([model, method, f"W{first['bits']}" + (f"G{first['group_size']}" if first.get("group_size")
                                                                 else "") if first.get("bits") else "FP32"]
                        + [by_set[s][0]["wer"] if s in by_set else None for s in sets]
                        + [by_set[s][0]["rare_wer"] if s in by_set else None for s in sets]
                        + [first.get("size_mb"), first.get("quant_seconds")])
            refs = []
            if first.get("peer") == "ctranslate2":
                if method == "ctranslate2:float32":
                    continue
                ref_key = (model, "ctranslate2:float32")
                refs.append(({s: Recipe(rs, path.parent) for s, rs in peer_rows.get(ref_key, {}).items()},
                             "CTranslate2 float32"))
            else:
                for method_ref, g in PEER_REFERENCE.get(first.get("bits"), (("gptq", 128),)):
                    match = [v for k, v in quasr_rows.items() if k[0] == model and k[2] == first.get("bits")
                             and k[3] == g and k[1] == method_ref]
                    refs.append(({s: Recipe(rs, main.parent) for s, rs in match[0].items()} if match else {},
                                 f"quasr {method_ref} W{first.get('bits')}G{g}"))
            for ref, ref_name in refs:
                cells = []
                for s in sets:
                    mine = Recipe(by_set[s], path.parent) if s in by_set else None
                    c = compare(ref[s], mine, resamples, on_b=True) if mine and s in ref else (None, None)
                    cells += list(c)
                pairs.append([model, method, ref_name] + cells)
    out = [f"Decoding: {dec}; normalizer: {d['normalizer']}. Commands:", "", commands(d), "",
           "Every model below was transcribed and scored by quasr (same utterances, decoding and scorer). Sizes: "
           "quasr's checkpoint directory; llm-compressor's compressed save (its safetensors files); the other "
           "peers' state dict as torch.save writes it in the tool's storage (every weight, their FP32 tied "
           "embedding included); CTranslate2: the bundled file (int8 is applied when it loads).", "",
           f"![WER against size on disk, one point per recipe and peer](bench/results/{PEERS_PNG})", "",
           md(rows, ["model", "recipe", "weights"] + [f"WER {s} %" for s in sets] + [f"rare-WER {s} %" for s in sets]
              + ["MB", "quant s"]), "",
           f"Paired: Δ WER of the reference minus the peer (negative: the reference is better), 95 % bootstrap "
           f"interval over utterances, {resamples:,} resamples, † excludes zero; utterances better / worse:", "",
           md(pairs, ["model", "peer", "reference"] + [c for s in sets for c in (f"Δ {s}", f"better / worse {s}")])]
    if plot:
        peers_plot(points, sets, path.with_name(PEERS_PNG))
    if failed:
        out += ["", "Failed cells (their records keep the whole error):", ""]
        out += [f"- {r['model']} {r['method']} on {r['data']}: `{r['error'].strip().splitlines()[-1][:200]}`"
                for r in failed]
    return "\n".join(out)


PEERS_PNG = "peers.png"


def peers_plot(points: list[tuple], sets: list[str], out: Path) -> None:
    """WER against MB on disk, one panel per test set, a point per recipe (quasr: filled, peers: hollow) and a
    marker per model; written atomically."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p[0] for p in points))
    marks = dict(zip(models, "os^Dv"))
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.8), squeeze=False)
    for ax, st in zip(axes[0], sets):
        for model, name, mb, wer in points:
            if mb is None or wer.get(st) is None:
                continue
            ours = name.startswith("quasr")
            ax.scatter(mb, wer[st], marker=marks[model], s=40, facecolors="C0" if ours else "none",
                       edgecolors="C0" if ours else "C3")
            ax.annotate(name.replace("quasr ", ""), (mb, wer[st]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xlabel("MB on disk")
        ax.set_ylabel(f"WER {st} %")
        ax.set_title(st)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=marks[m], ls="", color="k", mfc="none", label=m) for m in models]
    handles += [plt.Line2D([], [], marker="o", ls="", color="C0", label="quasr"),
                plt.Line2D([], [], marker="o", ls="", color="C3", mfc="none", label="peer")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)


def selection(path: Path) -> str:
    """FADE's defaults chosen on calib-dev (bench/fade.py --select): each candidate's dev cross-entropy and dev WER
    (the seed-mean model over the selection's seeds), the paired cross-entropy interval against the incumbent
    (padding weight 1) or the best variant, the chosen one marked."""
    d = json.loads(path.read_text())
    ch = d.get("chosen")
    if not ch:
        return "(the selection has not finished: no choice recorded)"
    crit = ch.get("criterion", "wer")
    models = ch.get("models") or sorted({r["model"] for r in d["records"]})

    def iv(x):
        if x == [0.0, 0.0, 0.0]:
            return "(reference)"
        return "-" if not x else f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]" + (" †" if x[1] > 0 or x[2] < 0 else "")

    rows = []
    vs_one = ch.get("dev_ce_vs_pad_weight_1") or {}
    for p, ces in (ch.get("dev_ce") or {}).get("pad_weight", {}).items():
        wers = ch["dev_wer"]["pad_weight"].get(p) or [None] * len(models)
        mark = " ✓" if float(p) == ch["pad_weight"] else ""
        rows.append([f"GPTQ W4G128, padding weight {p}{mark}"]
                    + [f"{fmt(c, 4)} / {fmt(w)} / {iv(x)}" for c, w, x in
                       zip(ces, wers, vs_one.get(p) or [None] * len(models))])
    vs_best = ch.get("dev_ce_vs_best_variant") or {}
    for v, c in (ch.get("dev_ce") or {}).get("variant", {}).items():
        w = ch["dev_wer"]["variant"].get(v)
        mark = " ✓" if v == ch["variant"] else ""
        rows.append([f"FADE W3G128 `{v}`{mark}"] + [f"{fmt(c, 4)} / {fmt(w)} / {iv(vs_best.get(v))}"]
                    + ["-"] * (len(models) - 1))
    fade_one = ch.get("fade_dev_ce_vs_pad_weight_1") or {}
    for p, c in (ch.get("dev_ce") or {}).get("fade_pad_weight", {}).items():  # the guard: FADE W3 at each weight
        w = ch["dev_wer"]["fade_pad_weight"].get(p)
        x = [0.0, 0.0, 0.0] if float(p) == 1.0 else fade_one.get(p)
        rows.append([f"FADE W3G128 `{ch['variant']}`, padding weight {p}"] + [f"{fmt(c, 4)} / {fmt(w)} / {iv(x)}"]
                    + ["-"] * (len(models) - 1))
    head = [f"candidate (✓ chosen by {'cross-entropy' if crit == 'ce' else 'WER'})"]
    head += [f"{m}: dev nats/token / WER % / Δ nats [95 %]" for m in models]
    note = (f"Calibrated on {ch['calib']}, scored on {ch['data']} (never the test sets); the seed-mean model of "
            f"seeds {', '.join(map(str, ch['seeds']))}; FADE's variants on {models[0]} only. Δ: paired bootstrap "
            "interval over utterances of the candidate's cross-entropy minus padding weight 1's (padding rows) or "
            "the best variant's (variant rows); † excludes zero. The padding weight leaves 1 only for an interval "
            "below zero on some model and not above on any"
            + (", nor above for the chosen FADE variant at W3 (its padding rows)." if fade_one else "."))
    return note + "\n\n" + md(rows, head)


def label_of(k: dict) -> str:
    label = k["method"] + (f" α={k['alpha']}" if k.get("alpha") is not None else "")
    if k.get("act_bits"):
        label += f", inputs {k.get('act_calibrator') or k.get('act_mode')}"
        if k.get("act_calibrator") == "esc" and k.get("esc_budget"):
            label += f" (budget {k['esc_budget']})"
    if k.get("runtime"):
        label = f"{k['runtime']} {k['rtype']}: " + {"rtn-runtime": "its own rounding"}.get(k["method"], label)
    if k.get("variant"):
        label += f" ({k['variant']})"
    if k.get("act_order"):  # GPTQ's columns by decreasing Hessian diagonal (quasr quantize --act-order)
        label += ", act-order"
    if k.get("mse"):  # each group's scale searched (quasr quantize --mse)
        label += ", searched scales"
    if k.get("percdamp") not in (None, 0.01):  # GPTQ's default damping is left unsaid
        label += f" damp={k['percdamp']}"
    if k.get("layers"):  # only the encoder's or only the decoder's Linears quantized
        label += f", {k['layers']} only"
    if k["method"] != "fp" and k.get("embedding_bits") != 8 and not k.get("runtime"):  # 8 bits per row: default
        label += ", emb fp32" if k.get("embedding_bits") is None else f", emb {k['embedding_bits']}"
    frames = k.get("encoder_frames")
    if frames == "speech":
        label += ", speech frames"
    elif frames == "window" and k.get("pad_stride") not in (None, 4):
        label += f", pad stride {k['pad_stride']}"
    if k.get("pad_weight") is not None:
        label += f", pad weight {k['pad_weight']}"
    if k.get("pool") not in (None, "random"):
        label += f", pool {k['pool']}"
    return label


def timing(path: Path) -> str:
    """quasr's GPTQ against llm-compressor's on the same job (bench/peers/time_gptq.py): per model and thread count,
    each tool's quantization seconds over the repetitions, the load average before each run, and the ratio of the
    means (quasr / llm-compressor)."""
    d = json.loads(path.read_text())
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in d["records"]:
        groups.setdefault((r["model"], r["threads"]), {}).setdefault(r["tool"], []).append(r)
    rows = []
    for (model, threads), by_tool in groups.items():
        mean = {t: sum(r["quant_seconds"] for r in rs) / len(rs) for t, rs in by_tool.items()}
        row = [model, threads]
        for tool in ("quasr", "llmcompressor"):
            rs = by_tool.get(tool, [])
            row += [" / ".join(f"{r['quant_seconds']:.1f}" for r in rs) or None,
                    " / ".join(f"{r['load_avg_before']:.2f}" for r in rs) or None]
        row.append(f"{mean['quasr'] / mean['llmcompressor']:.2f}" if len(mean) == 2 else None)
        rows.append(row)
    return (f"Commands:\n\n{commands(d)}\n\nSeconds to quantize a loaded model (calibration audio read), one per "
            "repetition; the load average before each run (above the thread count: other work shared the CPUs).\n\n"
            + md(rows, ["model", "threads", "quasr gptq s", "load before", "llm-compressor gptq s", "load before",
                        "quasr / llm-compressor"]))


def commands(d: dict) -> str:
    """The distinct commands that measured the records of a results file, in order, as a bash block."""
    cmds = list(dict.fromkeys(r.get("command") or d["command"] for r in d["records"]))
    return "```bash\n" + "\n".join(cmds) + "\n```"


TITLES = {"baseline": "Full precision", "ptq": "Weight-only post-training quantization",
          "fade": "FADE: per-layer compensation strength", "fade-select": "FADE: choosing the defaults on calib-dev",
          "tarq": "TARQ: tail-aware calibration", "tarq-swing": "TARQ: the calibration swing",
          "deploy": "In the runtimes: whisper.cpp and faster-whisper",
          "pqm": "PQM: NF4 base with per-speaker LoRA adapters",
          "esc": "ESC: full-integer quantization (weights and activations)",
          "peers": "Side by side with the tools users pick today",
          "gptq-timing": "GPTQ against llm-compressor's GPTQ, timed on the same job"}
START, END = "<!-- results:start -->", "<!-- results:end -->"
DEFAULT = ["ptq", "fade", "fade-select", "tarq", "tarq-swing", "pqm", "esc", "deploy", "peers", "gptq-timing"]


def failures(path: Path, decoding: str | None = None, model: str | None = None, bits: int | None = None) -> str:
    """Failed decodes per recipe (quasr.metrics.failure, each transcript scored again): over the recipe's seeds, the
    utterances that ended early and that ran away, their errors, and their share of all the recipe's errors."""
    from quasr import metrics
    from quasr.results import transcript_failures

    recs = one_decoding([r for r in json.loads(path.read_text())["records"] if r["speaker"] is None
                         and (model is None or r["model"] == model)
                         and (bits is None or r.get("bits") in (bits, None))], path, decoding)
    sets = list(dict.fromkeys(r["data"] for r in recs))
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in recs:
        groups.setdefault(tuple(r.get(k) for k in RECIPE_KEYS), {}).setdefault(r["data"], []).append(r)
    rows = []
    for key, by_set in groups.items():
        k = dict(zip(RECIPE_KEYS, key))
        seeds = sorted({r.get("seed") for rs in by_set.values() for r in rs if r.get("seed") is not None})
        row = [k["model"], label_of(k), f"W{k['bits']}G{k['group_size']}" if k["bits"] else None,
               ",".join(map(str, seeds)) or "-"]
        for s in sets:
            n = {"truncated": [0, 0], "runaway": [0, 0]}
            total = 0
            for r in by_set.get(s, []):
                if not r.get("transcripts"):
                    continue
                errors, failed = transcript_failures(path.parent / r["transcripts"])
                total += errors
                for _, kind, e, _ in failed:
                    n[kind][0] += 1
                    n[kind][1] += e
            row += [f"{n[x][0]} ({n[x][1]})" for x in n] + [f"{100 * (n['truncated'][1] + n['runaway'][1]) / total:.0f} %"
                                                          if total else None]
        rows.append(row)
    head = ["model", "method", "weights", "seeds"] + [c for s in sets for c in (
        f"ended early {s}", f"ran away {s}", f"their share of errors {s}")]
    return ("Failed decodes, summed over seeds: utterances (their word errors). Ended early: a reference of "
            f"{metrics.TRUNCATED_MIN_WORDS}+ words lost at least half of them to deletions; ran away: more errors than "
            f"{metrics.RUNAWAY_FACTOR} × its reference words + {metrics.RUNAWAY_EXTRA} (quasr.metrics.failure).\n\n"
            + md(rows, head))


def report(names: list[str], required: bool = True, decoding: str | None = None, resamples: int = 10_000,
           plot: bool = False) -> str:
    """The tables of bench/results/NAME.json for each name; a missing file is an error unless not required."""
    out = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.exists() and required:
            raise SystemExit(f"{path}: no such results file (run its benchmark first)")
        if path.exists():
            title = TITLES.get(name) or TITLES.get(name.split("-")[0], name)
            if name.startswith("baseline"):
                body = baseline(path, decoding)
            elif name.startswith("tarq-swing"):
                body = swing(path, decoding)
            elif name.startswith("pqm"):
                body = pqm(path, decoding, resamples)
            elif name.startswith("peers"):
                body = peers(path, decoding, resamples, plot)
            elif name == "gptq-timing":
                body = timing(path)
            elif name == "fade-select":
                body = selection(path)
            else:
                body = ptq(path, decoding, resamples)
            out += [f"### {title}: `bench/results/{name}.json`", "", body, ""]
    return "\n".join(out)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"results files by name (default: {' '.join(DEFAULT)})")
    ap.add_argument("--readme", action="store_true", help="rewrite the tables in README.md between the markers")
    ap.add_argument("--decoding", default=None, help="the decoding policy to report, for files that hold several")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of each paired interval")
    ap.add_argument("--failures", action="store_true", help="instead: the failed decodes (ended early, ran away) of "
                    "each recipe, from its transcripts (--model, --bits narrow it)")
    ap.add_argument("--model", default=None, help="--failures: one model")
    ap.add_argument("--bits", type=int, default=None, help="--failures: one weight width (full precision kept)")
    args = ap.parse_args()
    if args.failures:
        if args.readme:
            raise SystemExit("--failures prints a table; it does not go into the README")
        for name in args.names or DEFAULT:
            path = RESULTS / f"{name}.json"
            if not path.exists():
                raise SystemExit(f"{path}: no such results file (run its benchmark first)")
            print(f"### {name}\n\n{failures(path, args.decoding, args.model, args.bits)}\n")
        return
    if args.resamples <= 0:
        raise SystemExit(f"--resamples must be a positive number, got {args.resamples}")
    text = report(args.names or DEFAULT, required=bool(args.names), decoding=args.decoding, resamples=args.resamples,
                  plot=args.readme)
    if not args.readme:
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
