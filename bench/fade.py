"""FADE benchmark: per-layer compensation strength against RTN, GPTQ, QEP at each global α, and GPTAQ.

    python bench/fade.py --select      # choose FADE's default variant and the padding-frame weight on calib-dev
    python bench/fade.py               # the grid on the test sets (tiny.en W4G128/W3G128/W2G64, seeds 0-4;
                                       #   base W4G128/W3G128, seeds 0-2) -> bench/results/fade.json
    python bench/fade.py --models whisper-tiny.en --bits 3 --seeds 0 --limit 20   # a quick look

--select never looks at the test sets: it calibrates on the calib-fit part of the calibration sets and scores
on their held-out calib-dev part (quasr.data.held_out), two seeds per candidate, and writes
bench/results/fade-select.json; the grid then uses the candidates with the lowest mean teacher-forced
cross-entropy there (--criterion wer: the lowest dev WER; both are recorded; the padding weight leaves 1 only on
an interval clear of zero, and not for a weight that makes the chosen FADE variant at W3 worse), or the --variant /
--pad-weight given. Cells that bench/ptq.py measured with the same
recipe, seed, decoding and set are copied from ptq.json instead of measured again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ptq import RESULTS, arguments, cell  # noqa: E402

from quasr.bench import OPTION_KEYS, measure, measure_fp, parse_alphas, parse_data  # noqa: E402
from quasr.decoding import parse_decoding  # noqa: E402
from quasr.methods.fade import DEFAULT_VARIANT, VARIANTS  # noqa: E402
from quasr.models.whisper import quiet_transformers  # noqa: E402
from quasr.results import ResultsFile  # noqa: E402

QEP_ALPHAS = (0.25, 0.5, 1.0)
BITS = {"whisper-tiny.en": [(4, 128), (3, 128), (2, 64)], "whisper-base": [(4, 128), (3, 128)]}
SEEDS = {"whisper-tiny.en": "0,1,2,3,4", "whisper-base": "0,1,2"}
PAD_WEIGHTS = (1.0, 0.25, 0.0)
SELECT_DATA = "asterisk:calib-dev,tts:calib-dev"
SELECT_CALIB = "asterisk:calib-fit,tts:calib-fit"


def dev_wer(results: ResultsFile, **keys) -> float | None:
    """Mean over seeds and dev sets of the WER of the records matching `keys`."""
    recs = [r for r in results.records if r["speaker"] is None and all(r.get(k) == v for k, v in keys.items())]
    return sum(r["wer"] for r in recs) / len(recs) if recs else None


def dev_ce(results: ResultsFile, model: str, tags: list[str], cache) -> tuple[list[float], list[int]] | None:
    """Per calib-dev utterance, the teacher-forced cross-entropy (nats) of the cells `tags` averaged over them
    (the seed-mean model), and its target-token counts; every checkpoint reads the same token ids, tokenized once
    by `model` (quasr.evaluate.token_cross_entropy). Each checkpoint's values are kept in the results file
    ("ce"), so a rerun does not compute them again."""
    from quasr import checkpoint
    from quasr.data import load_source
    from quasr.evaluate import teacher_forced_batches, token_cross_entropy
    from quasr.models import load_model
    from quasr.models.whisper import WINDOW_SECONDS

    store = results.data.setdefault("ce", {})
    tags = [t for t in tags if t in store or (cache / t).is_dir()]
    if not tags:
        return None
    utts = [u for s in SELECT_DATA.split(",") for u in load_source(s) if u.seconds <= WINDOW_SECONDS]
    ids = [u.id for u in utts]
    batches = None
    for t in tags:
        if store.get(t, {}).get("ids") != ids:
            batches = batches or teacher_forced_batches(load_model(model), utts)
            nats, counts = token_cross_entropy(checkpoint.load(cache / t), batches)
            store[t] = {"ids": ids, "nats": [round(x, 5) for x in nats], "counts": counts}
            results.add()
        print(f"   dev cross-entropy {sum(store[t]['nats']) / sum(store[t]['counts']):.4f} nats/token  {t}", flush=True)
    nats = [sum(store[t]["nats"][i] for t in tags) / len(tags) for i in range(len(ids))]
    return nats, store[tags[0]]["counts"]


def ce_mean(ce) -> float | None:
    return None if ce is None else round(sum(ce[0]) / sum(ce[1]), 5)


def ce_vs(ce, ref) -> list[float] | None:
    """[Δ, lo, hi] nats/token of `ce` minus `ref`, paired bootstrap 95 % interval over the utterances."""
    from quasr.stats import paired_bootstrap

    if ce is None or ref is None:
        return None
    iv = paired_bootstrap(ce[0], ref[0], ref[1])  # points of "errors per 100 words": here nats per 100 tokens
    return [round(iv.diff / 100, 5), round(iv.lo / 100, 5), round(iv.hi / 100, 5)]


def choose_pad_weight(scores: dict, vs_one: dict | None, guard: dict | None = None) -> float:
    """The padding weight with the lowest `scores` summed over models ({weight: [score per model]}); with `vs_one`
    ({weight: [[Δ, lo, hi] per model]} against weight 1) it leaves 1 only if its interval lies below zero on some
    model and above zero on none, nor above zero in `guard` ({weight: [Δ, lo, hi]}: FADE at W3; a guard given
    without an interval at that weight keeps 1)."""
    best = min(scores, key=lambda p: sum(x for x in scores[p] if x is not None))
    if vs_one is None or best == 1.0:
        return best
    if guard is not None and not guard.get(best):
        return 1.0  # the guard was asked for and has no interval at this weight: no evidence, the weight stays
    model_ivs = [iv for iv in vs_one[best] if iv]
    guard_ivs = [guard[best]] if guard is not None else []
    return best if any(iv[2] < 0 for iv in model_ivs) and all(iv[1] < 0 for iv in model_ivs + guard_ivs) else 1.0


def select(args) -> dict:
    """Measure the candidates on calib-dev and return the chosen {"variant", "pad_weight"}: by `--criterion`,
    the teacher-forced cross-entropy (default) or the WER of the dev sets, each of the seed-mean model over two
    seeds. The padding weight leaves 1 only for a candidate whose paired cross-entropy interval against 1 lies
    below zero on some model and is not worse on any, nor for the chosen FADE variant at W3 on the first model (a
    default every method and width shares does not move on noise)."""
    from quasr.paths import cache_dir

    args.calib, args.data = SELECT_CALIB, SELECT_DATA
    decoding = parse_decoding(args.decoding)
    data = parse_data(args.data, args.limit)
    out = RESULTS / "fade-select.json"
    results = ResultsFile(out, "fade-select", option_keys=OPTION_KEYS)
    if out.exists():  # the per-utterance cross-entropies measured before (dev_ce)
        results.data["ce"] = json.loads(out.read_text()).get("ce", {})
    cache = cache_dir("bench", "fade-select")
    seeds = [0, 1]
    models = args.models.split(",")
    pw_cells = {(m, p): [] for m in models for p in PAD_WEIGHTS}
    for model in models:
        for pw in PAD_WEIGHTS:  # where calibration looks: GPTQ W4 with padding frames weighted down
            args.pad_weight = pw
            for seed in seeds:
                c = cell(args, model, "gptq", 4, seed=seed)
                measure(results, c, data, decoding, args.batch_size)
                pw_cells[model, pw].append(c.tag())
    args.pad_weight = 1.0
    model = models[0]
    v_cells = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # FADE's variants at W3, where compensation matters most
        for seed in seeds:
            c = cell(args, model, "fade", 3, seed=seed, variant=variant)
            measure(results, c, data, decoding, args.batch_size)
            v_cells[variant].append(c.tag())
    wer = {"pad_weight": {p: [dev_wer(results, model=m, method="gptq", pad_weight=None if p == 1.0 else p)
                              for m in models] for p in PAD_WEIGHTS},
           "variant": {v: dev_wer(results, model=model, method="fade", variant=v, pad_weight=None)
                       for v in VARIANTS}}
    v_ce = {v: dev_ce(results, model, v_cells[v], cache) for v in VARIANTS}
    v_crit = {"ce": {v: ce_mean(v_ce[v]) for v in VARIANTS}, "wer": wer["variant"]}[args.criterion]
    variant = min(VARIANTS, key=lambda v: v_crit[v] if v_crit[v] is not None else 1e9)
    pw_ce = {(m, p): dev_ce(results, m, pw_cells[m, p], cache) for m in models for p in PAD_WEIGHTS}
    ce = {"pad_weight": {p: [ce_mean(pw_ce[m, p]) for m in models] for p in PAD_WEIGHTS},
          "variant": {v: ce_mean(v_ce[v]) for v in VARIANTS}}
    # the padding weight changes every method's default: it moves off 1 (as at inference) only if the lowest
    # candidate's paired interval against 1 excludes zero on some model and is not worse on any model, nor for
    # the chosen FADE variant at W3 on the first model (the guard: measured at that candidate only)
    vs_one = {p: [ce_vs(pw_ce[m, p], pw_ce[m, 1.0]) for m in models] for p in PAD_WEIGHTS if p != 1.0}
    crit = ce if args.criterion == "ce" else wer
    vs = vs_one if args.criterion == "ce" else None
    candidate = choose_pad_weight(crit["pad_weight"], vs)
    fw_cells = {1.0: v_cells[variant]}
    for pw in [candidate] if candidate != 1.0 else []:
        args.pad_weight = pw
        for seed in seeds:
            c = cell(args, model, "fade", 3, seed=seed, variant=variant)
            measure(results, c, data, decoding, args.batch_size)
            fw_cells.setdefault(pw, []).append(c.tag())
    args.pad_weight = 1.0
    fw_ce = {p: dev_ce(results, model, fw_cells[p], cache) for p in fw_cells}
    wer["fade_pad_weight"] = {p: dev_wer(results, model=model, method="fade", variant=variant,
                                         pad_weight=None if p == 1.0 else p) for p in fw_cells}
    ce["fade_pad_weight"] = {p: ce_mean(fw_ce[p]) for p in fw_cells}
    fade_vs_one = {p: ce_vs(fw_ce[p], fw_ce[1.0]) for p in fw_cells if p != 1.0}
    best_pw = choose_pad_weight(crit["pad_weight"], vs, fade_vs_one)
    best_v = min(ce["variant"], key=lambda k: ce["variant"][k] if ce["variant"][k] is not None else 1e9)
    chosen = {"pad_weight": best_pw, "variant": variant,
              "criterion": args.criterion, "models": models,
              "dev_wer": {"pad_weight": {str(p): w for p, w in wer["pad_weight"].items()}, "variant": wer["variant"],
                          "fade_pad_weight": {str(p): w for p, w in wer["fade_pad_weight"].items()}},
              "dev_ce": {"pad_weight": {str(p): w for p, w in ce["pad_weight"].items()}, "variant": ce["variant"],
                         "fade_pad_weight": {str(p): w for p, w in ce["fade_pad_weight"].items()}},
              "dev_ce_vs_pad_weight_1": {str(p): v for p, v in vs_one.items()},
              "fade_dev_ce_vs_pad_weight_1": {str(p): v for p, v in fade_vs_one.items()},
              "dev_ce_vs_best_variant": {v: ce_vs(v_ce[v], v_ce[best_v]) for v in VARIANTS},
              "data": SELECT_DATA, "calib": SELECT_CALIB, "seeds": seeds}
    results.data["chosen"] = chosen
    results.add()
    print(json.dumps(chosen, indent=1))
    return chosen


def chosen_defaults() -> dict:
    path = RESULTS / "fade-select.json"
    if path.exists():
        return json.loads(path.read_text()).get("chosen") or {}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap, seeds="")
    ap.set_defaults(models="whisper-tiny.en,whisper-base", pad_weight=None)  # None: the one --select chose
    ap.add_argument("--select", action="store_true", help="choose the defaults on calib-dev (see above)")
    ap.add_argument("--bits", default=None, help="weight bits (default: per model, see BITS)")
    ap.add_argument("--variant", default=None, help="FADE variant (default: the one --select chose)")
    ap.add_argument("--criterion", choices=("ce", "wer"), default="ce",
                    help="--select: choose by dev cross-entropy (default) or dev WER (both are recorded)")
    ap.add_argument("--methods", default="fade,gptq,gptaq,qep",
                    help="calibrated recipes measured per seed, always in the order fade, gptq, gptaq, qep "
                         "(RTN and FP32 are always measured)")
    ap.add_argument("--alphas", default=None,
                    help=f"QEP's global strengths to measure (default: {','.join(map(str, QEP_ALPHAS))})")
    args = ap.parse_args()
    quiet_transformers()
    if args.select:
        select(args)
        return
    chosen = chosen_defaults()
    variant = args.variant or chosen.get("variant") or DEFAULT_VARIANT
    given = args.pad_weight is not None  # --pad-weight given (1 included) wins over the selection
    if not given:
        args.pad_weight = chosen.get("pad_weight", 1.0)
    where = f"chosen on the calib-dev sets of {', '.join(chosen.get('models', []))}"  # --select's models only
    print(f"FADE variant {variant} ({'given' if args.variant else where if chosen else 'default'}), "
          f"padding-frame weight {args.pad_weight} ({'given' if given else where if chosen else 'default'})",
          flush=True)
    methods = args.methods.split(",")
    unknown = set(methods) - {"fade", "gptq", "gptaq", "qep"}
    if unknown:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))} (choose from fade, gptq, gptaq, qep)")
    try:
        alphas = parse_alphas(args.alphas) if args.alphas else list(QEP_ALPHAS)
    except ValueError as e:
        ap.error(str(e))
    decoding = parse_decoding(args.decoding)
    out = args.out or RESULTS / (f"fade-limit{args.limit}.json" if args.limit else "fade.json")
    results = ResultsFile(out, "fade", fresh=args.fresh, option_keys=OPTION_KEYS)
    sources = [ResultsFile(RESULTS / "ptq.json", "ptq", option_keys=OPTION_KEYS)] if (RESULTS / "ptq.json").exists() \
        else []
    data = parse_data(args.data, args.limit)
    for model in args.models.split(","):
        seeds = [int(s) for s in (args.seeds or SEEDS[model]).split(",")]
        bits_list = [(int(b), 64 if int(b) == 2 else 128) for b in args.bits.split(",")] if args.bits else BITS[model]
        measure_fp(results, model, data, decoding, args.batch_size, sources)
        for bits, group in bits_list:
            measure(results, cell(args, model, "rtn", bits, group_size=group), data, decoding, args.batch_size,
                    sources)
            for seed in seeds:
                recipes = [("fade", None, variant), ("gptq", None, None), ("gptaq", 0.25, None)]
                recipes += [("qep", a, None) for a in alphas]
                for method, alpha, v in recipes:
                    if method not in methods:
                        continue
                    measure(results, cell(args, model, method, bits, alpha, seed, group, v), data, decoding,
                            args.batch_size, sources)


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
