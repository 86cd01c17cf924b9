"""Plots (matplotlib imported lazily, inside each function)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from mpsearch.bitmap import BitMap
    from mpsearch.search import SearchResult


def plot_bitmap(bitmap: BitMap, ax: Any = None, title: str | None = None,
                order: Sequence[str] | None = None) -> Any:
    """Bar chart of weight bits per layer (float layers grey), in ``order`` if given."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    names = list(order) if order is not None else list(bitmap)
    bits = [bitmap[n].w_bits for n in names]
    ax.bar(range(len(names)), bits, color=["tab:gray" if b >= 32 else "tab:blue" for b in bits])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_title(title or f"{bitmap.model_class}: {bitmap.avg_bits():.2f} avg bits")
    return ax


def plot_demo(summary: pd.DataFrame, result: SearchResult, title: str, path: Path) -> Path:
    """Bits per layer at the headline budget, and metric vs average bits against uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    plot_bitmap(result.bitmap, axes[0], order=list(result.table.index),
                title=f"bits per layer at {result.bitmap.avg_bits():.2f} avg bits")
    searched = summary[summary["map"] == "searched"].sort_values("avg_bits")
    uniform = summary[summary["map"] == "uniform"].sort_values("avg_bits")
    float_row = summary[summary["map"] == "float"]
    metric = "accuracy" if summary["accuracy"].notna().any() else None
    ax = axes[1]
    if metric:
        ax.plot(searched["avg_bits"], searched[metric], "o-", label="mpsearch (Hutchinson + ILP)")
        ax.plot(uniform["avg_bits"], uniform[metric], "s--", label="uniform")
        if len(float_row):
            ax.axhline(float(float_row[metric].iloc[0]), color="k", lw=0.8, label="float")
        ax.set_ylabel("eval accuracy")
    ax.set_xlabel("average weight bits")
    ax.set_title(f"{title}: accuracy vs budget")
    ax.legend()
    ax = axes[2]
    ax.semilogy(searched["avg_bits"], searched["output_divergence"], "o-", label="mpsearch")
    ax.semilogy(uniform["avg_bits"], uniform["output_divergence"], "s--", label="uniform")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("output divergence from float")
    ax.set_title("output divergence (log scale)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
