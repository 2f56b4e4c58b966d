"""One peer cell, run inside that peer's venv by bench/peers/run.py: load the Whisper directory, quantize it with
the peer (bench/peers/schemes.py), measure what it cost, transcribe the test sets with quasr's decoding and score
them with quasr's metrics into the results file.

    .venvs/peers/quanto/bin/python bench/peers/runner.py --peer quanto --scheme qint4 --model whisper-tiny.en \
        --path ~/.cache/quasr/models/whisper-tiny.en-... --out bench/results/peers.json
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def state_bytes(model) -> int:
    """Bytes of the model's state dict as torch.save writes it: every weight counted, in the peer's own storage."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def saved_bytes(peer: str, model) -> tuple[int, str]:
    """(bytes on disk, how they were measured): the tool's own compressed save where it has one
    (llm-compressor: save_pretrained(save_compressed=True), the compressed-tensors files), else torch.save of
    the state dict in the tool's storage."""
    import tempfile

    if peer == "llmcompressor":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, save_compressed=True)  # compresses the modules in place: call it last
            files = list(Path(tmp).glob("*.safetensors"))
            return sum(f.stat().st_size for f in files), "save_pretrained(save_compressed=True): the safetensors files"
    return state_bytes(model), "torch.save of the state dict: every weight, the FP32 tied embedding included"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True)
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--model", required=True, help="the model's name in the records")
    ap.add_argument("--path", required=True, help="its transformers directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="asterisk:test,tts:test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--calib", default="asterisk:calib,tts:calib")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoding", default="standard")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--command", default=None)
    ap.add_argument("--quantize-only", action="store_true",
                    help="quantize, print the seconds it took as JSON and stop (bench/peers/time_gptq.py)")
    args = ap.parse_args()

    import torch

    if args.peer == "quanto":
        # quanto's int4 weights fail under torch.inference_mode ("Cannot set version_counter for inference
        # tensor"), which quasr decodes under; its cells decode under torch.no_grad (the same arithmetic).
        # Patched before quasr is imported: its decorators bind torch.inference_mode at import.
        torch.inference_mode = lambda mode=True: torch.no_grad()

    from schemes import QUANTIZE, SCHEMES

    from quasr.bench import OPTION_KEYS, eval_cell, parse_data
    from quasr.cli import _calibration
    from quasr.decoding import parse_decoding
    from quasr.models import load_model
    from quasr.models.whisper import quiet_transformers
    from quasr.results import ResultsFile

    quiet_transformers()
    torch.manual_seed(0)
    bits, group, desc = SCHEMES[args.peer][args.scheme]
    venv = Path(sys.prefix)
    versions = (venv / "versions.txt").read_text().split() if (venv / "versions.txt").exists() else []
    keep = ("torch==", "transformers==", "llmcompressor==", "bitsandbytes==", "optimum-quanto==", "hqq==", "torchao==",
            "compressed-tensors==")
    calibrates = args.peer == "llmcompressor"
    calib = _calibration(args.calib.split(","), args.n_calib, args.seed, False) if calibrates else []
    asr = load_model(args.path)
    asr.name = args.model
    n_weights = sum(p.numel() for p in {id(p): p for p in asr.model.parameters()}.values())
    with torch.no_grad():  # quasr builds the weights as inference tensors; the tools need ordinary ones
        for p in asr.model.parameters():
            p.data = p.data.clone()
    t = time.perf_counter()
    QUANTIZE[args.peer](asr, args.scheme, calib)
    quant_seconds = time.perf_counter() - t
    if args.quantize_only:
        print(json.dumps({"quant_seconds": round(quant_seconds, 2), "threads": torch.get_num_threads(),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
        return
    asr.model.eval()
    extra = {"peer": args.peer, "scheme": args.scheme, "scheme_desc": desc, "quant_seconds": round(quant_seconds, 2),
             "versions": [v for v in versions if v.lower().startswith(keep)],
             "threads": torch.get_num_threads()}
    results = ResultsFile(args.out, "peers", option_keys=OPTION_KEYS + ("peer", "scheme"))
    keys = dict(model=args.model, method=f"{args.peer}:{args.scheme}", bits=bits, group_size=group, peer=args.peer,
                scheme=args.scheme, calib=args.calib.replace(",", "+") if calibrates else None,
                n_calib=args.n_calib if calibrates else None, seed=args.seed if calibrates else None)
    decoding = parse_decoding(args.decoding)
    for d, n in parse_data(args.data, args.limit):
        eval_cell(results, asr, d, n, keys, extra=dict(extra, peak_rss_mb=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), command=args.command),
            decoding=decoding, batch_size=args.batch_size)
    # the size last: llm-compressor's compressed save rewrites the modules it saves (a deep copy did not keep the
    # model usable: its Linears lost their weights), and the records just written get it
    size, size_note = saved_bytes(args.peer, asr.model)
    sized = {"size_mb": round(size / 1e6, 2), "bits_per_weight": round(8 * size / n_weights, 3), "size_note": size_note}
    measured = {d for d, _ in parse_data(args.data, args.limit)}
    results.add(*[dict(r, **sized) for r in results.records
                  if r.get("method") == keys["method"] and r.get("model") == args.model and r.get("data") in measured
                  and r.get("decoding") == decoding.label])
    extra.update(sized)
    print(json.dumps({k: v for k, v in extra.items() if k != "versions"}))


if __name__ == "__main__":
    main()
