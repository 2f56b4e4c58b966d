"""The `quasr` command line.

Every command checks what it can before any long work (options, output paths, speech sources, the model
spec) and reports a problem as one line naming the option, file, line, utterance or layer, with exit code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from quasr.errors import QuasrError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize speech recognition models and measure, on real speech, what it cost.")

DATA_HELP = ("Speech source (repeatable): a manifest .jsonl, asterisk[:test|:calib|:all], tts[:test|:calib], "
             "or hf:NAME[:SPLIT][?config=C&audio=COL&text=COL&speaker=COL]")
GROUP_HELP = ("Columns per scale group (NF4: per block); 0 = one group per output channel; default: the method's "
              "(128; nf4: 64)")
DECODING_HELP = ("standard (openai-whisper's defaults: temperature fallback, no-speech check, timestamps), "
                 "greedy (one pass, no fallback), or beamN (standard with beam search of width N)")
METHOD_HELP = "rtn | gptq | qep | gptaq | fade | tarq | tarq-rarebal | tarq-residual | nf4"
POOL_HELP = ("How calibration utterances are chosen: random, r-top (highest rare-word density), r-mix (half "
             "each)")
ALPHA_HELP = ("Compensation strength in [0, 1]: qep/gptaq's global alpha (default 0.5 / 0.25), fade's upper bound "
              "of the per-layer alpha (default 1)")
PAD_WEIGHT_HELP = ("Window mode: weight of padding frames against speech frames in the statistics (1 = as at "
                   "inference, 0 = speech frames only; the default 0.25 was chosen on calib-dev, docs/methods/fade.md)")
TEMPERATURES_HELP = "Fallback temperatures, comma-separated (default for standard: 0,0.2,0.4,0.6,0.8,1)"
MAX_SKIPPED_SHOWN = 20


@app.callback()
def _root() -> None:
    """quasr: quantize speech recognition models and measure what it cost."""


def _fail(e: Exception) -> None:
    from quasr.progress import console

    option = getattr(e, "option", None)
    msg = f"--{option.replace('_', '-')}: {e}" if option else str(e)
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _positive(option: str, value: int | None) -> None:
    from quasr.errors import UsageError

    if value is not None and value <= 0:
        raise UsageError(f"{option} must be a positive integer, got {value}")


def _decoding(name: str, temperatures: Optional[str], seed: int):
    from quasr.decoding import parse_decoding

    return parse_decoding(name, temperatures, seed)


def _load_sets(data: list[str], limit: Optional[int], skip_bad: bool):
    """Load every speech source, reporting each one's size and every skipped item (with its reason)."""
    from quasr.data import load_source
    from quasr.errors import DataError
    from quasr.progress import console

    if limit is not None and limit <= 0:
        raise DataError(f"--limit must be a positive number of utterances, got {limit}")
    dupes = sorted({d for d in data if data.count(d) > 1})
    if dupes:
        raise DataError(f"--data {dupes[0]} is given more than once (its results would overwrite each other)")
    sets = []
    for spec in data:
        ds = load_source(spec, limit=limit, skip_bad=skip_bad)
        note = f", {len(ds.skipped)} skipped" if ds.skipped else ""
        excl = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in ds.excluded.items() if v)
        console.print(f"{ds.name}: {len(ds)} utterances{note}" + (f" (excluded by design: {excl})" if excl else ""),
                      highlight=False)
        for _, why in ds.skipped[:MAX_SKIPPED_SHOWN]:
            console.print(f"  [yellow]skipped[/] {why}", highlight=False, soft_wrap=True)
        if len(ds.skipped) > MAX_SKIPPED_SHOWN:
            console.print(f"  ... and {len(ds.skipped) - MAX_SKIPPED_SHOWN} more skipped items")
        sets.append(ds)
    return sets


def _checkpoint_recipe(asr) -> dict:
    """The recipe keys of a loaded model for results records (a checkpoint's calibration recipe included)."""
    recipe = dict(model=asr.name, method=getattr(asr, "method", "fp"), bits=getattr(asr, "bits", None),
                  group_size=getattr(asr, "group_size", None))
    q = getattr(asr, "recipe", None) or {}
    if q.get("n_calib"):  # a checkpoint: its calibration recipe goes into every record
        calib = q.get("calib")
        recipe.update(calib="+".join(calib) if isinstance(calib, list) else calib, n_calib=q["n_calib"],
                      seed=q.get("seed"), alpha=q.get("alpha"), encoder_frames=q.get("encoder_frames"),
                      pad_stride=q.get("pad_stride"))
    if q:
        recipe["embedding_bits"] = q.get("embedding_bits")
    if q.get("act_bits"):  # quantized activations: which, and how their scales were set
        recipe.update(act_bits=q["act_bits"], act_mode=q.get("act_mode"), act_calibrator=q.get("act_calibrator"))
    return recipe


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("whisper-tiny.en", "--model", "-m", help="Bundled name, model dir or hub id"),
    data: list[str] = typer.Option(["asterisk:test"], "--data", "-d", help=DATA_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Keep N utterances per set, spread evenly"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write results JSON here"),
    decoding: str = typer.Option("standard", help=DECODING_HELP),
    temperatures: Optional[str] = typer.Option(None, help=TEMPERATURES_HELP),
    decode_seed: int = typer.Option(0, help="Seed of the sampled fallback decodes"),
    batch_size: int = typer.Option(8, help="Utterances per decoding batch"),
    runtime: Optional[str] = typer.Option(None, help="Transcribe in another runtime: whispercpp (a ggml file) or "
                                                     "ctranslate2 (a CTranslate2 directory); see quasr export"),
    adapters: Optional[Path] = typer.Option(None, help="A directory of speaker adapters (quasr adapt): each "
                                                       "utterance goes through its speaker's ('sat' for others)"),
    compute_type: str = typer.Option("default", help="ctranslate2: the compute type (default, int8, float32, ...)"),
    int8: bool = typer.Option(False, "--int8", help="A W8A8 checkpoint (8-bit per-row weights, static 8-bit inputs): "
                                                    "run its Linears as int8 matrix products"),
    int8_head: bool = typer.Option(False, "--int8-head", help="With --int8: the tied output head too, its input "
                                                              "quantized per token (not the checkpoint's arithmetic)"),
    errors: int = typer.Option(0, "--errors", help="Also list the N most frequent rare-word errors "
                                                   "(reference word -> hypothesis)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable items (counted, reported)"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Transcribe speech sets and print WER / rare-WER / common-WER / speed per set and per speaker."""
    try:
        from quasr.evaluate import evaluate, print_rare_errors, print_tables, to_records
        from quasr.metrics import NORMALIZER
        from quasr.models import load_model
        from quasr.models.whisper import quiet_transformers
        from quasr.results import check_writable, command_line, machine_info, now, write_json

        dec = _decoding(decoding, temperatures, decode_seed)
        _positive("--batch-size", batch_size)
        if errors < 0:
            from quasr.errors import UsageError

            raise UsageError(f"--errors must be a number of rows >= 0, got {errors}")
        if out:
            check_writable(out, "--out")
        quiet_transformers()
        sets = _load_sets(data, limit, skip_bad)
        if runtime:
            from quasr.deploy.runtimes import load_runtime

            asr = load_runtime(runtime, model, compute_type)
        else:
            asr = load_model(model)
        if int8:
            from quasr.errors import UsageError
            from quasr.quant.modules import enable_int8

            n_linear, n_head = enable_int8(asr.model, head=int8_head)
            if not n_linear:
                raise UsageError(f"--int8: {model} has no layer with 8-bit per-row weights and static 8-bit inputs "
                                 f"(quantize with --bits 8 --group-size 0 --sym --act-bits 8)")
            from quasr.progress import console

            console.print(f"--int8: {n_linear} Linears" + (" and the tied output head (inputs per token)" if n_head
                                                           else "") + " run as int8 matrix products")
        aset = None
        if adapters is not None:
            from quasr.adapt import AdapterSet

            aset = AdapterSet(asr, adapters)
        results = evaluate(asr, sets, batch_size=batch_size, decoding=dec, progress=progress, adapters=aset)
        where = f", {asr.family}" if runtime else ""
        print_tables(results, title=f"{asr.name} ({dec.label} decoding{where}, normalizer {NORMALIZER})")
        if errors:
            print_rare_errors(results, errors)
        if out:
            write_json(out, {
                "benchmark": "eval", "created": now(), "command": command_line(), "normalizer": NORMALIZER,
                "machine": machine_info(),
                "recipe": {"model": asr.name, "spec": model, "decoding": dec.to_dict(), "batch_size": batch_size,
                           "limit": limit, "data": data, **getattr(asr, "recipe", {}),
                           **({"runtime": runtime, "runtime_settings": asr.settings(dec)} if runtime else {})},
                "records": to_records(results, **_checkpoint_recipe(asr), **({"runtime": runtime} if runtime else {})),
                "skipped": {r.data: [{"item": i, "reason": why} for i, why in r.skipped] for r in results},
                "utterances": {r.data: r.utterances for r in results},
            })
            from quasr.progress import console

            console.print(f"wrote {out}")
    except QuasrError as e:
        _fail(e)


def _calibration(calib: list[str], n_calib: int, seed: int, skip_bad: bool, pool: str = "random"):
    """The calibration utterances: n_calib from the union of the sources, chosen by `pool` with `seed`."""
    from quasr.data.pools import POOLS, choose
    from quasr.quant.grid import QuantConfigError

    if pool not in POOLS:
        raise QuantConfigError(f"unknown calibration pool {pool!r} (choose from {', '.join(POOLS)})", option="pool")
    utts = [u for ds in _load_sets(calib, None, skip_bad) for u in ds]
    if n_calib > len(utts):
        raise QuantConfigError(f"asked for {n_calib} calibration utterances but {', '.join(calib)} has only "
                               f"{len(utts)}; lower --n-calib or add --calib sources")
    from quasr.models.whisper import WINDOW_SECONDS
    from quasr.progress import console

    rejected: list[str] = []
    out = choose(utts, n_calib, seed, pool, max_seconds=WINDOW_SECONDS, rejected=rejected)
    if rejected:
        console.print(f"calibration: redrew {len(rejected)} utterance(s) longer than the {WINDOW_SECONDS:.0f} s "
                      f"window: {', '.join(rejected)}")
    return out


def _known_methods() -> set[str]:
    from quasr.methods import METHODS, get_method

    get_method("gptq")  # registers them all
    return set(METHODS)


def _quant_config(method: str, bits: int, group_size: int | None, alpha, embedding_bits: int, n_calib: int, **kw):
    """The QuantConfig of the command-line options, checked (errors name the option) before any work."""
    from quasr.methods import get_method
    from quasr.quantize import MIN_CALIB, QuantConfig
    from quasr.quant.grid import QuantConfigError

    # the command line's own conventions (0 = per channel, 0 = full-precision embedding) are checked here
    if group_size is None:
        group_size = get_method(method).default_group_size if method in _known_methods() else 128
    if group_size < 0:
        raise QuantConfigError(f"must be a positive number of columns, or 0 for one group per output channel; got "
                               f"{group_size}", option="group_size")
    if embedding_bits != 0 and not 2 <= embedding_bits <= 8:
        raise QuantConfigError(f"must be between 2 and 8, or 0 to keep the embedding in full precision; got "
                               f"{embedding_bits}", option="embedding_bits")
    cfg = QuantConfig(method=method, bits=bits, group_size=group_size or None, alpha=alpha,
                      embedding_bits=embedding_bits or None, **kw)
    cfg.check()
    m = get_method(method)
    need = max(MIN_CALIB, m.min_calib)
    if m.needs_calibration and n_calib < need:
        raise QuantConfigError(f"{method} calibrates: it needs at least {need} utterances, got {n_calib}",
                               option="n_calib")
    return cfg


TARGETS = {  # a runtime's weight format -> the quasr grid that is exactly (or, for q*_1, nearly) its arithmetic
    # q4_0 / q5_0: ggml's scale rule too (d = m / -2^(bits-1), m the signed largest-magnitude weight of the block)
    "ggml-q4_0": dict(bits=4, group_size=32, sym=True, signed_max=True),
    "ggml-q4_1": dict(bits=4, group_size=32, sym=False),
    "ggml-q5_0": dict(bits=5, group_size=32, sym=True, signed_max=True),
    "ggml-q5_1": dict(bits=5, group_size=32, sym=False),
    "ggml-q8_0": dict(bits=8, group_size=32, sym=True), "ct2-int8": dict(bits=8, group_size=0, sym=True)}
TARGET_HELP = ("Quantize for a runtime's format: " + ", ".join(TARGETS) + " (sets --bits, --group-size, --sym and the "
               "embedding's grid; export with quasr export)")


def _target_grid(target: Optional[str]) -> dict:
    """The grid settings of --target (the token embedding gets the same grid: whisper.cpp stores it in the file's
    weight type; CTranslate2 int8 rounds it per row)."""
    from quasr.quant.grid import QuantConfigError

    if target is None:
        return {}
    if target not in TARGETS:
        raise QuantConfigError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})", option="target")
    g = TARGETS[target]
    return dict(g, embedding_bits=g["bits"], embedding_group_size=g["group_size"] or None,
                embedding_sym=g["sym"], signed_max=g.get("signed_max", False))


def _layer_table(report, max_rows: int = 200):
    from rich.table import Table

    t = Table(title=f"{report.config.method}: per-layer relative output error (RTN -> solver)")
    for col in ("layer", "shape", "err RTN", "err", "inherited", "after", "s"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    f = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
    for r in report.layers[:max_rows]:
        t.add_row(r["name"].replace("model.", ""), "x".join(map(str, r["shape"])), f(r.get("err_rtn")), f(r.get("err")),
                  f(r.get("err_asym_fp")), f(r.get("err_asym")), f"{r.get('seconds', 0):.2f}")
    return t


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Option("whisper-tiny.en", "--model", "-m", help="Bundled name, model dir or hub id"),
    method: str = typer.Option("gptq", help=METHOD_HELP),
    bits: int = typer.Option(4, help="Weight bits, 2-8"),
    group_size: Optional[int] = typer.Option(None, help=GROUP_HELP),
    alpha: Optional[float] = typer.Option(None, help=ALPHA_HELP),
    variant: Optional[str] = typer.Option(None, help="The method's variant (fade: split-size-vuln (default), "
                                                     "split-vuln, split, size-vuln)"),
    sym: bool = typer.Option(False, help="Symmetric grid (no zero points)"),
    act_order: bool = typer.Option(False, help="GPTQ: columns by decreasing Hessian diagonal (static groups)"),
    mse: bool = typer.Option(False, help="Search a clipped range per group (MSE)"),
    percdamp: float = typer.Option(0.01, help="GPTQ damping: this fraction of the mean Hessian diagonal is added to it"),
    embedding_bits: int = typer.Option(8, help="Bits of the tied token embedding / output head, per row; 0 keeps FP32"),
    embedding_format: str = typer.Option("affine", help="The embedding's storage: affine (--embedding-bits per "
                                                        "row) or nf4 (blocks of 64)"),
    layers: str = typer.Option("all", help="all | encoder | decoder"),
    target: Optional[str] = typer.Option(None, help=TARGET_HELP),
    encoder_frames: str = typer.Option("window", help="window (30 s, as at inference) | speech (cut after the audio)"),
    pad_stride: int = typer.Option(4, help="Window mode: statistics from every k-th padding frame, weighted by k "
                                           "(1 = every frame, exact but slower)"),
    pad_weight: float = typer.Option(0.25, help=PAD_WEIGHT_HELP),
    tail_cost: Optional[float] = typer.Option(None, help="tarq: mass of rare-word positions against common ones "
                                                         "(default 1: equal)"),
    tail_zipf: Optional[float] = typer.Option(None, help="tarq: a word is rare below this wordfreq Zipf frequency "
                                                         "(default 3)"),
    tail_lang: Optional[str] = typer.Option(None, help="tarq: wordfreq language of the transcripts (default en)"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant",
                                                help="nf4: store the block absmax constants in 8 bits"),
    act_bits: Optional[int] = typer.Option(None, help="Also quantize every Linear's and the conv stem's input: 8 "
                                                      "or 4 bits (W8A8, W4A8, W4A4, W8A4)"),
    act_mode: str = typer.Option("static", help="Activation scales: static (calibrated, one a tensor) or dynamic "
                                                "(per token)"),
    act_calibrator: str = typer.Option("mse", help="Static activation scales: max | percentile | mse | entropy | "
                                                   "output-mse | esc (CMA-ES over all scales)"),
    esc_budget: int = typer.Option(100, help="esc: fitness evaluations"),
    esc_population: Optional[int] = typer.Option(None, help="esc: CMA-ES population (default 4 + 3 ln n)"),
    esc_subset: int = typer.Option(16, help="esc: held-in calibration utterances the fitness is computed on"),
    esc_seed: int = typer.Option(0, help="esc: seed of the search"),
    esc_fitness: str = typer.Option("ce", help="esc: ce (teacher-forced cross-entropy) or wer"),
    calib: list[str] = typer.Option(["asterisk:calib", "tts:calib"], "--calib", help="Calibration source (repeatable)"),
    n_calib: int = typer.Option(128, help="Calibration utterances, chosen from the sources with --seed"),
    pool: str = typer.Option("random", help=POOL_HELP),
    seed: int = typer.Option(0, help="Seed of the calibration sample"),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write"),
    fp_dtype: str = typer.Option("float32", help="On-disk dtype of the tensors that stay full precision (conv, "
                                                  "norms, positions): float32 or float16 (lossless for the "
                                                  "bundled models, whose originals are float16)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable calibration items (listed)"),
    asym_errors: bool = typer.Option(False, "--asym-errors", help="qep, gptaq, fade, tarq: also report each layer's "
                                                                  "output error against the full-precision model "
                                                                  "(inherited / after; accumulates one more input "
                                                                  "product per layer, which costs time)"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Quantize a model layer by layer and write a low-bit checkpoint (the same bytes on every AVX2 machine unless
    QUASR_NUMERICS=native: see quasr.numerics)."""
    try:
        from quasr import numerics

        # before torch is imported; called in-process after torch (as by tests) it changes nothing, and the
        # checkpoint's recipe says "native"
        numerics.pin(warn=False)
        import resource

        from quasr import checkpoint
        from quasr.methods import get_method
        from quasr.models import load_model
        from quasr.models.whisper import quiet_transformers
        from quasr.progress import console
        from quasr.quant.grid import QuantConfigError
        from quasr.quantize import quantize_

        opts = {k: v for k, v in dict(tail_cost=tail_cost, tail_zipf=tail_zipf, tail_lang=tail_lang,
                                      double_quant=double_quant).items() if v is not None}
        grid = dict(bits=bits, group_size=group_size, sym=sym, embedding_bits=embedding_bits)
        grid.update(_target_grid(target))
        cfg = _quant_config(method, grid.pop("bits"), grid.pop("group_size"), alpha, grid.pop("embedding_bits"),
                            n_calib, mse=mse, act_order=act_order, layers=layers, percdamp=percdamp,
                            encoder_frames=encoder_frames, pad_stride=pad_stride, pad_weight=pad_weight,
                            variant=variant, options=opts, embedding_format=embedding_format, act_bits=act_bits,
                            act_mode=act_mode, act_calibrator=act_calibrator,
                            esc=dict(budget=esc_budget, population=esc_population, subset=esc_subset, seed=esc_seed,
                                     fitness=esc_fitness,
                                     state=str(Path(out).expanduser().absolute().with_name(
                                         f".{Path(out).name}.esc-state.pkl"))) if act_calibrator == "esc" else {},
                            **grid)
        import torch

        if fp_dtype not in ("float32", "float16"):
            raise QuantConfigError(f"must be float32 or float16, got {fp_dtype!r}", option="fp_dtype")
        checkpoint.check_target(out, "--out")
        quiet_transformers()
        calibrates = get_method(method).needs_calibration or (act_bits is not None and act_mode == "static")
        utts = _calibration(calib, n_calib, seed, skip_bad, pool) if calibrates else []
        asr = load_model(model)
        report = quantize_(asr, cfg, utts, progress=progress, asym_errors=asym_errors)
        console.print(_layer_table(report))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        asr.recipe.update(model=asr.name, spec=model, calib=calib if utts else None, seed=seed if utts else None,
                          pool=pool if utts else None, quant_seconds=round(report.seconds, 2),
                          peak_rss_mb=round(peak_mb))
        checkpoint.save(asr, out, asr.recipe | {"layers_report": report.layers}, fp_dtype=getattr(torch, fp_dtype))
        if cfg.esc.get("state"):
            Path(cfg.esc["state"]).unlink(missing_ok=True)  # the search is in the checkpoint now
        i = checkpoint.info(out)
        console.print(f"quantized {len(report.layers)} layers in {report.seconds:.1f} s; wrote {out} "
                      f"({i['dir_mb']:.1f} MB, {i['bits_per_weight']:.2f} bits per Linear weight)")
    except QuasrError as e:
        _fail(e)


def _compare_table(fp, q, label: str, title: str):
    """Per set: WER of both models, the difference with a paired bootstrap 95 % interval over utterances, the
    utterances better / worse, rare-WER, fallback windows and speed."""
    from rich.table import Table

    from quasr.stats import better_worse, paired_bootstrap

    tab = Table(title=title)
    for col in ("set", "utts", "WER fp %", f"WER {label} %", "Δ WER [95% CI]", "utts better / worse",
                "rare-WER fp %", "rare-WER q %", "fell back fp / q", "s/utt fp", "s/utt q"):
        tab.add_column(col, justify="left" if col == "set" else "right")
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for a, b in zip(fp, q):
        ea, eb = [u["errors"] for u in a.utterances], [u["errors"] for u in b.utterances]
        ci = paired_bootstrap(eb, ea, [u["n_ref"] for u in a.utterances])
        bw = better_worse(eb, ea)
        tab.add_row(a.data, str(a.n_utts), f(a.counts.wer), f(b.counts.wer), str(ci), f"{bw[0]} / {bw[1]}",
                    f(a.counts.rare_wer), f(b.counts.rare_wer),
                    " / ".join("-" if x is None else str(x) for x in (a.windows()["n_fallback_windows"],
                                                                      b.windows()["n_fallback_windows"])),
                    f(a.sec_per_utt), f(b.sec_per_utt))
    return tab


@app.command("compare")
def compare_cmd(
    model: str = typer.Option("whisper-tiny.en", "--model", "-m", help="Bundled name, model dir or hub id"),
    method: str = typer.Option("gptq", help=METHOD_HELP),
    bits: int = typer.Option(4, help="Weight bits, 2-8"),
    group_size: Optional[int] = typer.Option(None, help=GROUP_HELP),
    alpha: Optional[float] = typer.Option(None, help=ALPHA_HELP),
    variant: Optional[str] = typer.Option(None, help="The method's variant (see quasr quantize --help)"),
    embedding_bits: int = typer.Option(8, help="Bits of the tied token embedding / output head; 0 keeps FP32"),
    encoder_frames: str = typer.Option("window", help="window | speech (see quasr quantize --help)"),
    pad_stride: int = typer.Option(4, help="Window mode: every k-th padding frame, weight k (see quasr quantize --help)"),
    pad_weight: float = typer.Option(0.25, help=PAD_WEIGHT_HELP),
    calib: list[str] = typer.Option(["asterisk:calib", "tts:calib"], "--calib", help="Calibration source (repeatable)"),
    n_calib: int = typer.Option(128, help="Calibration utterances"),
    seed: int = typer.Option(0, help="Seed of the calibration sample"),
    data: list[str] = typer.Option(["asterisk:test"], "--data", "-d", help=DATA_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Keep N test utterances per set"),
    decoding: str = typer.Option("standard", help=DECODING_HELP),
    temperatures: Optional[str] = typer.Option(None, help=TEMPERATURES_HELP),
    decode_seed: int = typer.Option(0, help="Seed of the sampled fallback decodes"),
    batch_size: int = typer.Option(8, help="Utterances per decoding batch"),
    save: Optional[Path] = typer.Option(None, help="Also write the quantized checkpoint here"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write results JSON here"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Quantize a model and compare its WER with the original on the same speech (the default main job). The
    quantization pins torch's kernels as `quasr quantize` does, so the model compared is the checkpoint `quasr
    quantize` writes for the same recipe (quasr.numerics)."""
    try:
        from quasr import numerics

        numerics.pin(warn=False)  # before torch is imported (see quantize_cmd)
        import time

        from quasr import checkpoint
        from quasr.evaluate import evaluate, to_records
        from quasr.methods import get_method
        from quasr.metrics import NORMALIZER
        from quasr.models import load_model
        from quasr.models.whisper import quiet_transformers
        from quasr.progress import console
        from quasr.quantize import quantize_
        from quasr.results import check_writable, command_line, machine_info, now, write_json

        cfg = _quant_config(method, bits, group_size, alpha, embedding_bits, n_calib, encoder_frames=encoder_frames,
                            pad_stride=pad_stride, pad_weight=pad_weight, variant=variant)
        dec = _decoding(decoding, temperatures, decode_seed)
        _positive("--batch-size", batch_size)
        if save:
            checkpoint.check_target(save, "--save")
        if out:
            check_writable(out, "--out")
        quiet_transformers()
        utts = _calibration(calib, n_calib, seed, False) if get_method(method).needs_calibration else []
        sets = _load_sets(data, limit, False)
        asr = load_model(model)
        fp_size = sum(p.numel() * p.element_size() for p in {id(p): p for p in asr.model.parameters()}.values())
        fp = evaluate(asr, sets, batch_size=batch_size, decoding=dec, progress=progress)
        t = time.perf_counter()
        quantize_(asr, cfg, utts, progress=progress)
        q_seconds = time.perf_counter() - t
        q_size = sum(b.numel() * b.element_size() for b in asr.model.buffers()) + sum(
            p.numel() * p.element_size() for p in asr.model.parameters())
        q = evaluate(asr, sets, batch_size=batch_size, decoding=dec, progress=progress)
        label = f"{method} W{cfg.bits}" + (f"G{cfg.group_size}" if cfg.group_size else "") + \
                (f" E{embedding_bits}" if embedding_bits else "")
        console.print(_compare_table(fp, q, label, f"{asr.name}: full precision vs {label} ({dec.label} decoding, "
                                                   f"normalizer {NORMALIZER})"))
        console.print(f"model in memory: {fp_size / 1e6:.1f} MB full precision -> {q_size / 1e6:.1f} MB quantized; "
                      f"quantization took {q_seconds:.1f} s on {n_calib if utts else 0} calibration utterances. "
                      f"Δ WER: quantized − full precision, 95% paired bootstrap interval over utterances.")
        if save:
            checkpoint.save(asr, save, asr.recipe | {"model": asr.name, "spec": model, "calib": calib if utts else None,
                                                     "seed": seed if utts else None})
            console.print(f"wrote {save}")
        if out:
            recipe = dict(model=asr.name, method=method, bits=cfg.bits, group_size=cfg.group_size,
                          calib="+".join(calib) if utts else None, n_calib=len(utts) or None,
                          seed=seed if utts else None, alpha=asr.recipe.get("alpha"),
                          embedding_bits=cfg.embedding_bits, encoder_frames=encoder_frames if utts else None,
                          pad_stride=pad_stride if utts and encoder_frames == "window" else None)
            write_json(out, {"benchmark": "compare", "created": now(), "command": command_line(),
                             "normalizer": NORMALIZER, "decoding": dec.to_dict(), "machine": machine_info(),
                             "records": to_records(fp, model=asr.name, method="fp") + to_records(q, **recipe),
                             "utterances": {"fp": {r.data: r.utterances for r in fp},
                                            "quantized": {r.data: r.utterances for r in q}}})
            console.print(f"wrote {out}")
    except QuasrError as e:
        _fail(e)


EXPORT_FORMATS = {"ggml": "whisper.cpp model file: --type f16, f32, q4_0, q4_1, q5_0, q5_1, q8_0",
                  "ct2": "CTranslate2 / faster-whisper directory: --type int8, int8_float32, float16, float32",
                  "compressed-tensors": "pack-quantized directory (vLLM, transformers): no --type"}


@app.command("export")
def export_cmd(
    src: str = typer.Argument(..., help="A quasr checkpoint directory, or any model spec (bundled name, directory)"),
    out: Path = typer.Argument(..., help="Where to write: a file for ggml, a directory otherwise"),
    format: str = typer.Option(..., "--format", "-f", help="ggml | ct2 | compressed-tensors"),
    type: Optional[str] = typer.Option(None, "--type", "-t", help="The runtime's weight type (see --format)"),
):
    """Write a model in a runtime's format: whisper.cpp (ggml) or CTranslate2 (faster-whisper) with quasr's
    calibrated codes when the checkpoint's grid is the type's (see quasr quantize --target), or the runtime's
    own rounding of a full-precision model; or compressed-tensors."""
    try:
        from quasr.errors import UsageError
        from quasr.progress import console
        from quasr.results import check_writable

        if format not in EXPORT_FORMATS:
            raise UsageError(f"--format {format!r}: choose from {', '.join(EXPORT_FORMATS)}")
        if format == "ggml":
            from quasr.deploy.ggml import TYPES, export_ggml

            if type not in TYPES:
                raise UsageError(f"--type {type!r}: ggml types are {', '.join(TYPES)}")
            check_writable(out, "OUT")
            info = export_ggml(src, out, type)
        elif format == "ct2":
            from quasr.deploy.ct2 import TYPES, export_ct2

            if type not in TYPES:
                raise UsageError(f"--type {type!r}: CTranslate2 types are {', '.join(TYPES)}")
            check_writable(out, "OUT", kind="dir")
            info = export_ct2(src, out, type)
        else:
            from quasr.export import export_compressed_tensors

            if type is not None:
                raise UsageError("--type: compressed-tensors keeps the checkpoint's own grid; give no --type")
            check_writable(out, "OUT", kind="dir")
            export_compressed_tensors(src, out)
            info = {"path": str(out)}
        console.print(f"wrote {info['path']}" + (f" ({info['mb']:.1f} MB, {info.get('from_quasr_codes', 0)} tensors "
                                                 f"from quasr's codes)" if "mb" in info else ""))
    except QuasrError as e:
        _fail(e)


@app.command("info")
def info_cmd(path: Path = typer.Argument(..., help="Checkpoint directory"),
             verify: bool = typer.Option(True, help="Check the weights' sha256 and that the checkpoint loads its "
                                                    "config and tokenizer files (what eval checks)")):
    """Print a checkpoint's recipe, bits per weight and size, after verifying it."""
    try:
        import json

        from quasr import checkpoint
        from quasr.progress import console

        if verify:
            checkpoint.verify(path)
        i = checkpoint.info(path)
        r = {k: v for k, v in (i["recipe"] or {}).items() if k not in ("layers_report", "calib_ids")}
        print(json.dumps({"recipe": r, "verified": verify, "n_quantized": i["n_quantized"],
                          "linear": {k: i["linear"][k] for k in ("modules", "weights", "mb", "bits", "bits_per_weight")},
                          "embedding": {k: i["embedding"][k] for k in ("modules", "weights", "mb", "bits",
                                                                      "bits_per_weight")},
                          "fp_mb": i["fp"]["bytes"] / 1e6, "file_mb": i["file_mb"], "dir_mb": i["dir_mb"]},
                         indent=1, default=str))
        if not verify:
            console.print("[yellow]not verified[/] (--no-verify): the weights' sha256 and the config files were "
                          "not checked")
        from quasr.diagnostics import layer_rows, table

        rows = layer_rows(i["recipe"])
        if rows:
            console.print(table(rows, f"{path.name}: per-layer diagnostics ({r.get('method')})"))
        if i["activations"]:
            from rich.table import Table

            t = Table(title=f"{path.name}: quantized inputs ({len(i['activations'])})")
            for c in ("module", "input", "scale", "range ±"):
                t.add_column(c, justify="left" if c == "module" else "right")
            for n, a in i["activations"].items():
                sc = a["scale"]
                t.add_row(n, f"int{a['bits']} {a['mode']}", "per token" if sc is None else f"{sc:.4g}",
                          "-" if sc is None else f"{sc * ((1 << (a['bits'] - 1)) - 1):.4g}")
            console.print(t)
    except QuasrError as e:
        _fail(e)


@app.command("plot")
def plot_cmd(path: Path = typer.Argument(..., help="Checkpoint directory"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: "
                                                                         "<checkpoint name>-layers.png here)")):
    """Draw a checkpoint's per-layer diagnostics (FADE's alpha, vulnerability, reliability; errors) as a PNG."""
    try:
        from quasr import checkpoint
        from quasr.diagnostics import layer_rows, plot
        from quasr.errors import UsageError
        from quasr.progress import console
        from quasr.results import check_writable

        out = out or Path(f"{Path(path).name}-layers.png")
        check_writable(out, "--out")
        recipe = checkpoint.read_manifest(path).get("recipe") or {}
        rows = layer_rows(recipe)
        if not rows:
            raise UsageError(f"{path}: its recipe has no per-layer diagnostics (a calibrated method writes them)")
        plot(rows, out, f"{Path(path).name}: {recipe.get('method')} W{recipe.get('bits')}")
        console.print(f"wrote {out}")
    except QuasrError as e:
        _fail(e)


adapt_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Speaker adaptation: LoRA adapters over a frozen (NF4 or full-precision) base.")
app.add_typer(adapt_app, name="adapt")


def _adapt_data(data: list[str], speakers: Optional[str], limit: Optional[int], min_utts: int = 2):
    """The adaptation utterances of the chosen speakers (all with a speaker label when none are named)."""
    from quasr.adapt import AdapterError

    utts = [u for ds in _load_sets(data, None, False) for u in ds]
    wanted = [s.strip() for s in speakers.split(",")] if speakers else None
    if wanted:
        known = {u.speaker for u in utts}
        missing = [s for s in wanted if s not in known]
        if missing:
            raise AdapterError(f"--speakers: no utterances of {', '.join(missing)} in {', '.join(data)} (speakers "
                               f"there: {', '.join(sorted(k for k in known if k))})")
        utts = [u for u in utts if u.speaker in wanted]
    if limit is not None:
        if limit <= 0:
            raise AdapterError(f"--limit must be positive, got {limit}")
        from quasr.data import spread

        utts = [utts[i] for i in spread(len(utts), limit)]
    if len(utts) < min_utts:
        raise AdapterError(f"{len(utts)} adaptation utterance(s) in {', '.join(data)}"
                           + (f" for {speakers}" if speakers else "") + f"; need at least {min_utts}")
    return utts


def _adapt_run(base: str, utts, out: Path, rank: Optional[int], share: float, init: Optional[Path], speaker,
               epochs: int, lr: float, batch_size: int, seed: int, progress: bool):
    from quasr import adapt
    from quasr.models import load_model
    from quasr.models.whisper import quiet_transformers
    from quasr.progress import console
    from quasr.results import check_writable

    cfg = adapt.TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    cfg.check()
    check_writable(out, "--out", kind="dir")
    if out.exists() and (out / adapt.META).exists():
        raise adapt.AdapterError(f"--out {out}: already holds a finished adapter")
    quiet_transformers()
    asr = load_model(base)
    fp = adapt.fingerprint(asr)
    targets = adapt.TARGETS
    if init is not None:
        meta0 = adapt.read_meta(init)
        if meta0.get("fingerprint") != fp:
            raise adapt.AdapterError(f"--init {init}: trained on another base than {base}")
        rank, targets = meta0["rank"], tuple(meta0["targets"])
    rank = rank or adapt.rank_for(asr, share, targets)
    pm = adapt.attach(asr, rank, targets, seed=seed)
    if init is not None:
        adapt._load_adapter_weights(pm, init)
    n_base = adapt.base_parameters(asr)
    n_adapter = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)
    meta = {"fingerprint": fp, "base": base, "speaker": speaker, "rank": rank, "targets": list(targets),
            "init": str(init) if init else None, "adapter_parameters": n_adapter, "base_parameters": n_base,
            "share": round(n_adapter / n_base, 5), "utterances": [u.id for u in utts]}
    console.print(f"adapter rank {rank}: {n_adapter:,} parameters, {100 * n_adapter / n_base:.2f}% of the base's "
                  f"{n_base:,}; {len(utts)} utterances")
    meta = adapt.train(asr, pm, utts, out, cfg, meta, progress)
    console.print(f"wrote {out} ({meta['seconds']:.0f} s; loss by epoch: "
                  + ", ".join(f"{h['loss']:.3f}" for h in meta["history"]) + ")")


@adapt_app.command("sat")
def adapt_sat(
    base: str = typer.Option(..., help="The base: a quasr checkpoint (e.g. --method nf4) or a model spec"),
    data: list[str] = typer.Option(..., "--data", "-d", help="Adaptation speech (repeatable; see quasr eval)"),
    speakers: Optional[str] = typer.Option(None, help="The training speakers, comma-separated (default: all)"),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter directory (peft format + quasr_adapter.json)"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default: about --share of the base's parameters)"),
    share: float = typer.Option(0.01, help="The adapter's size as a share of the base's parameters"),
    epochs: int = typer.Option(2, help="Passes over the data"),
    lr: float = typer.Option(5e-4, help="AdamW learning rate"),
    batch_size: int = typer.Option(4, help="Utterances per step"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Keep N utterances, spread evenly"),
    seed: int = typer.Option(0, help="Seed of the initialization and the data order"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Speaker adaptive training: one shared adapter on the training speakers (resumes a killed run)."""
    try:
        _adapt_run(base, _adapt_data(data, speakers, limit), out, rank, share, None, None, epochs, lr, batch_size,
                   seed, progress)
    except QuasrError as e:
        _fail(e)


@adapt_app.command("speaker")
def adapt_speaker(
    base: str = typer.Option(..., help="The base the SAT adapter was trained on"),
    init: Optional[Path] = typer.Option(None, help="Start from this adapter (the SAT adapter); default: a new one"),
    speaker: str = typer.Option(..., help="The speaker to adapt to"),
    data: list[str] = typer.Option(..., "--data", "-d", help="Adaptation speech holding the speaker's utterances"),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter directory"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank without --init (default: about --share of the base)"),
    share: float = typer.Option(0.01, help="The adapter's size as a share of the base's parameters"),
    epochs: int = typer.Option(3, help="Passes over the speaker's data"),
    lr: float = typer.Option(5e-4, help="AdamW learning rate"),
    batch_size: int = typer.Option(4, help="Utterances per step"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Keep N of the speaker's utterances"),
    seed: int = typer.Option(0, help="Seed of the data order"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """One speaker's adapter, trained on that speaker's adaptation utterances (resumes a killed run)."""
    try:
        _adapt_run(base, _adapt_data(data, speaker, limit), out, rank, share, init, speaker, epochs, lr,
                   batch_size, seed, progress)
    except QuasrError as e:
        _fail(e)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
