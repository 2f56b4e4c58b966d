"""The `quasr` command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from quasr.errors import QuasrError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize speech recognition models and measure, on real speech, what it cost.")

DATA_HELP = ("Speech source (repeatable): a manifest .jsonl, asterisk[:test|:calib|:all], tts[:test|:calib], "
             "or hf:NAME[:SPLIT][?config=C&audio=COL&text=COL&speaker=COL]")


@app.callback()
def _root() -> None:
    """quasr: quantize speech recognition models and measure what it cost."""


def _fail(e: Exception) -> None:
    from quasr.progress import console

    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def _load_sets(data: list[str], limit: Optional[int], skip_bad: bool):
    from quasr.data import load_source
    from quasr.progress import console

    sets = []
    for spec in data:
        ds = load_source(spec, limit=limit, skip_bad=skip_bad)
        note = f", {len(ds.skipped)} skipped" if ds.skipped else ""
        excl = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in ds.excluded.items() if v)
        console.print(f"{ds.name}: {len(ds)} utterances{note}" + (f" (excluded by design: {excl})" if excl else ""))
        sets.append(ds)
    return sets


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("whisper-tiny.en", "--model", "-m", help="Bundled name, model dir or hub id"),
    data: list[str] = typer.Option(["asterisk:test"], "--data", "-d", help=DATA_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Keep N utterances per set, spread evenly"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write results JSON here"),
    batch_size: int = typer.Option(8, help="Utterances per decoding batch"),
    beams: int = typer.Option(1, help="Beam width (1 = greedy)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable items (counted, reported)"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Transcribe speech sets and print WER / rare-WER / speed per set and per speaker."""
    try:
        from quasr.evaluate import evaluate, print_tables, to_records
        from quasr.metrics import NORMALIZER
        from quasr.models import load_model
        from quasr.models.whisper import quiet_transformers
        from quasr.results import command_line, machine_info, now, write_json

        quiet_transformers()
        sets = _load_sets(data, limit, skip_bad)
        asr = load_model(model)
        results = evaluate(asr, sets, batch_size=batch_size, num_beams=beams, progress=progress)
        recipe = dict(model=asr.name, method=getattr(asr, "method", "fp"), bits=getattr(asr, "bits", None),
                      group_size=getattr(asr, "group_size", None))
        print_tables(results, title=f"{asr.name} ({'greedy' if beams == 1 else f'beam {beams}'}, normalizer {NORMALIZER})")
        if out:
            write_json(out, {
                "benchmark": "eval", "created": now(), "command": command_line(), "normalizer": NORMALIZER,
                "machine": machine_info(),
                "recipe": {"model": asr.name, "spec": model, "decoding": "greedy" if beams == 1 else f"beam{beams}",
                           "batch_size": batch_size, "limit": limit, "data": data,
                           **getattr(asr, "recipe", {})},
                "records": to_records(results, **recipe),
                "skipped": {r.data: [{"item": i, "reason": why} for i, why in r.skipped] for r in results},
                "utterances": {r.data: r.utterances for r in results},
            })
            from quasr.progress import console

            console.print(f"wrote {out}")
    except QuasrError as e:
        _fail(e)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
