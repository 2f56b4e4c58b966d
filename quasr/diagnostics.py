"""Per-layer diagnostics of a quantization run: what the solver saw and chose for every layer.

A checkpoint keeps the engine's report (`recipe.layers_report`): per layer its relative output error before
(RTN) and after the solver, and whatever the method reported, such as FADE's α, vulnerability v (v_w, v_g)
and reliability r (r_split, r_size). `quasr info DIR` prints them as a table, `quasr plot DIR` draws them.
"""
from __future__ import annotations

from pathlib import Path

COLUMNS = ("alpha", "v", "v_w", "v_g", "r", "r_split", "r_size", "dw_rel", "err_rtn", "err")
SCORES = ("alpha", "v", "r")  # what the plot draws, one line each


def layer_rows(recipe: dict | None) -> list[dict]:
    """The per-layer rows of a checkpoint's recipe that carry diagnostics (quantized Linears only)."""
    rows = (recipe or {}).get("layers_report") or []
    return [r for r in rows if isinstance(r, dict) and "name" in r and any(c in r for c in COLUMNS)]


def short(name: str) -> str:
    """model.encoder.layers.3.self_attn.q_proj -> enc 3 self_attn.q_proj"""
    parts = name.replace("model.", "").split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return f"{parts[0][:3]} {parts[2]} {'.'.join(parts[3:])}"
    return ".".join(parts)


def table(rows: list[dict], title: str = "per-layer diagnostics"):
    from rich.table import Table

    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    t = Table(title=title)
    t.add_column("layer")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(short(r["name"]), *("-" if r.get(c) is None else
                                      (f"{r[c]:.2e}" if c.startswith("err") else f"{r[c]:.3f}") for c in cols))
    return t


def plot(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """A PNG of α, v and r by layer, encoder and decoder side by side (layers in execution order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quasr.results import atomic_write_bytes

    scores = [s for s in SCORES if any(s in r for r in rows)] or ["err"]
    sides = [(side, [r for r in rows if f".{side}." in r["name"]]) for side in ("encoder", "decoder")]
    sides = [(side, rs) for side, rs in sides if rs] or [("layers", rows)]
    fig, axes = plt.subplots(1, len(sides), figsize=(7 * len(sides), 4), squeeze=False, sharey=True)
    for ax, (side, rs) in zip(axes[0], sides):
        x = range(len(rs))
        for s in scores:
            ax.plot(x, [r.get(s) for r in rs], marker="o", markersize=3, linewidth=1, label=s)
        ax.set_title(side)
        ax.set_xticks(list(x))
        ax.set_xticklabels([short(r["name"]).split(" ", 1)[-1] for r in rs], rotation=90, fontsize=6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
