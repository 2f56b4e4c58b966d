"""Compare two quasr checkpoints tensor by tensor: which codes, scales and zero points differ, and where first.

    python scripts/diff_checkpoints.py CKPT_A CKPT_B [--all]

Prints the number of tensors that differ and, per differing packed weight, how many of its codes differ
(in execution order, so the first differing layer shows where two runs diverged). Exit code 0 when the two
weight files are identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def codes(ckpt: Path, name: str, t: torch.Tensor) -> torch.Tensor | None:
    """Unpacked codes of a packed weight (None for other tensors)."""
    from quasr.quant.pack import unpack

    spec = json.loads((ckpt / "quasr_checkpoint.json").read_text())["modules"].get(name.rsplit(".", 1)[0])
    if spec is None or not name.endswith(".weight_packed"):
        return None
    return unpack(t, spec["bits"], spec["shape"][1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--all", action="store_true", help="list every differing tensor, not the first 10")
    args = ap.parse_args()
    ta, tb = load_file(args.a / "model.safetensors"), load_file(args.b / "model.safetensors")
    if ta.keys() != tb.keys():
        print(f"different tensor names: {sorted(ta.keys() ^ tb.keys())[:5]}")
        return 1
    order = list(json.loads((args.a / "quasr_checkpoint.json").read_text())["modules"])
    rank = {n: i for i, n in enumerate(order)}
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    diff.sort(key=lambda k: (rank.get(k.rsplit(".", 1)[0], len(rank)), k))
    n_codes = n_diff = 0
    rows = []
    for k in diff:
        ca, cb = codes(args.a, k, ta[k]), codes(args.b, k, tb[k])
        if ca is not None:
            d = int((ca != cb).sum())
            n_codes += ca.numel()
            n_diff += d
            rows.append(f"  {k}: {d} of {ca.numel()} codes differ")
        else:
            rows.append(f"  {k}: {int((ta[k] != tb[k]).sum())} of {ta[k].numel()} values differ")
    total_codes = sum(codes(args.a, k, t).numel() for k, t in ta.items() if codes(args.a, k, t) is not None)
    print(f"{len(diff)} of {len(ta)} tensors differ; {n_diff} of {total_codes} codes differ "
          f"({100 * n_diff / max(total_codes, 1):.3f}%)")
    print("\n".join(rows if args.all else rows[:10]) + ("" if args.all or len(rows) <= 10 else f"\n  ... {len(rows) - 10} more"))
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())
