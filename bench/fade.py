"""FADE benchmark: per-layer compensation strength against RTN, GPTQ, QEP at each global α, and GPTAQ.

    python bench/fade.py --select      # choose FADE's default variant and the padding-frame weight on calib-dev
    python bench/fade.py               # the grid on the test sets (tiny.en W4G128/W3G128/W2G64, seeds 0-4;
                                       #   base W4G128/W3G128, seeds 0-2) -> bench/results/fade.json
    python bench/fade.py --models whisper-tiny.en --bits 3 --seeds 0 --limit 20   # a quick look

--select never looks at the test sets: it calibrates on the calib-fit part of the calibration sets and scores
on their held-out calib-dev part (quasr.data.held_out), two seeds per candidate, and writes
bench/results/fade-select.json; the grid then uses the candidates with the lowest mean WER there (or the
--variant / --pad-weight given). Cells that bench/ptq.py measured with the same recipe, seed, decoding and
set are copied from ptq.json instead of measured again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ptq import RESULTS, arguments, cell  # noqa: E402

from quasr.bench import OPTION_KEYS, measure, measure_fp, parse_data  # noqa: E402
from quasr.decoding import parse_decoding  # noqa: E402
from quasr.methods.fade import VARIANTS  # noqa: E402
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


def select(args) -> dict:
    """Measure the candidates on calib-dev and return the chosen {"variant", "pad_weight"}."""
    args.calib, args.data = SELECT_CALIB, SELECT_DATA
    decoding = parse_decoding(args.decoding)
    data = parse_data(args.data, args.limit)
    out = RESULTS / "fade-select.json"
    results = ResultsFile(out, "fade-select", option_keys=OPTION_KEYS)
    seeds = [0, 1]
    for model in args.models.split(","):
        for pw in PAD_WEIGHTS:  # where calibration looks: GPTQ W4 with padding frames weighted down
            args.pad_weight = pw
            for seed in seeds:
                measure(results, cell(args, model, "gptq", 4, seed=seed), data, decoding, args.batch_size)
    args.pad_weight = 1.0
    model = args.models.split(",")[0]
    for variant in VARIANTS:  # FADE's variants at W3, where compensation matters most
        for seed in seeds:
            measure(results, cell(args, model, "fade", 3, seed=seed, variant=variant), data, decoding,
                    args.batch_size)
    pw = {p: [dev_wer(results, model=m, method="gptq", pad_weight=None if p == 1.0 else p)
              for m in args.models.split(",")] for p in PAD_WEIGHTS}
    fv = {v: dev_wer(results, model=model, method="fade", variant=v) for v in VARIANTS}
    chosen = {"pad_weight": min(pw, key=lambda p: sum(x for x in pw[p] if x is not None)),
              "variant": min(fv, key=lambda v: fv[v] if fv[v] is not None else 1e9),
              "dev_wer": {"pad_weight": {str(p): w for p, w in pw.items()}, "variant": fv},
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
    ap.set_defaults(models="whisper-tiny.en,whisper-base")
    ap.add_argument("--select", action="store_true", help="choose the defaults on calib-dev (see above)")
    ap.add_argument("--bits", default=None, help="weight bits (default: per model, see BITS)")
    ap.add_argument("--variant", default=None, help="FADE variant (default: the one --select chose)")
    args = ap.parse_args()
    quiet_transformers()
    if args.select:
        select(args)
        return
    chosen = chosen_defaults()
    variant = args.variant or chosen.get("variant") or VARIANTS[0]
    if args.pad_weight == 1.0 and chosen.get("pad_weight") is not None:
        args.pad_weight = chosen["pad_weight"]
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
                recipes += [("qep", a, None) for a in QEP_ALPHAS]
                for method, alpha, v in recipes:
                    measure(results, cell(args, model, method, bits, alpha, seed, group, v), data, decoding,
                            args.batch_size, sources)


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
