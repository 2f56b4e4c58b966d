"""TARQ benchmark: tail-aware calibration judged on rare words, against GPTQ.

    python bench/tarq.py            # tiny.en and base, W4G128 and W3G128: fp, rtn, gptq, tarq, tarq-rarebal,
                                    #   tarq-residual over seeds 0,1,2 -> bench/results/tarq.json
    python bench/tarq.py --swing    # the calibration swing: GPTQ and TARQ calibrated on four pools (asterisk:calib,
                                    #   tts:calib, and the r-top of each), W4G128, seed 0 -> tarq-swing.json
    python bench/tarq.py --models whisper-tiny.en --bits 4 --seeds 0 --limit 20     # a quick look

Records carry WER, rare-WER and common-WER per set; `python bench/report.py tarq` adds paired intervals of
the WER and of the rare-word errors against GPTQ. Cells bench/ptq.py measured with the same recipe, seed,
decoding and set (fp, rtn, gptq) are copied from ptq.json.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ptq import RESULTS, arguments, cell  # noqa: E402

from quasr.bench import OPTION_KEYS, measure, measure_fp, parse_data  # noqa: E402
from quasr.decoding import parse_decoding  # noqa: E402
from quasr.models.whisper import quiet_transformers  # noqa: E402
from quasr.results import ResultsFile  # noqa: E402

METHODS = ("gptq", "tarq", "tarq-rarebal", "tarq-residual")
POOLS = [("asterisk:calib", "random"), ("tts:calib", "random"), ("asterisk:calib", "r-top"), ("tts:calib", "r-top")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap)
    ap.set_defaults(models="whisper-tiny.en,whisper-base")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--swing", action="store_true", help="measure the calibration swing (see above)")
    args = ap.parse_args()
    quiet_transformers()
    decoding = parse_decoding(args.decoding)
    data = parse_data(args.data, args.limit)
    sources = [ResultsFile(RESULTS / "ptq.json", "ptq", option_keys=OPTION_KEYS)] if (RESULTS / "ptq.json").exists() \
        else []
    if args.swing:
        out = args.out or RESULTS / (f"tarq-swing-limit{args.limit}.json" if args.limit else "tarq-swing.json")
        results = ResultsFile(out, "tarq-swing", fresh=args.fresh, option_keys=OPTION_KEYS)
        for model in args.models.split(","):
            for source, pool in POOLS:
                args.calib = source
                for method in ("gptq", "tarq"):
                    c = replace(cell(args, model, method, 4, seed=0), pool=pool)
                    measure(results, c, data, decoding, args.batch_size)
        return
    out = args.out or RESULTS / (f"tarq-limit{args.limit}.json" if args.limit else "tarq.json")
    results = ResultsFile(out, "tarq", fresh=args.fresh, option_keys=OPTION_KEYS)
    seeds = [int(s) for s in args.seeds.split(",")]
    for model in args.models.split(","):
        measure_fp(results, model, data, decoding, args.batch_size, sources)
        for bits in map(int, args.bits.split(",")):
            measure(results, cell(args, model, "rtn", bits), data, decoding, args.batch_size, sources)
            for seed in seeds:
                for method in args.methods.split(","):
                    measure(results, cell(args, model, method, bits, seed=seed), data, decoding, args.batch_size,
                            sources)


if __name__ == "__main__":
    from quasr.errors import QuasrError

    try:
        main()
    except QuasrError as e:
        raise SystemExit(f"error: {e}") from None
