"""Plots (matplotlib imported lazily, inside each function)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.front import Front
from mpsearch.slices import PART

if TYPE_CHECKING:
    import pandas as pd

    from mpsearch.bitmap import BitMap
    from mpsearch.problem import AllocationProblem
    from mpsearch.search import SearchResult
    from mpsearch.sensitivity import SensitivityTable

__all__ = ["plot_bitmap", "plot_demo", "plot_front", "plot_sensitivity", "uniform_points"]


def _slices_in_order(names: list[str]) -> list[str]:
    """``names`` with each layer's slices together, by slice number (``parts.2`` before
    ``parts.10``), the layers in their first-seen order."""
    first: dict[str, int] = {}
    keys = []
    for n in names:
        owner, _, part = n.rpartition(f".{PART}.")
        if not owner or not part.isdigit():
            owner, part = n, "-1"
        first.setdefault(owner, len(first))
        keys.append((first[owner], int(part)))
    return [n for _, n in sorted(zip(keys, names), key=lambda kn: kn[0])]


def plot_bitmap(bitmap: BitMap, ax: Any = None, title: str | None = None,
                order: Sequence[str] | None = None, path: str | Path | None = None) -> Any:
    """Bar chart of weight bits per layer (float layers grey), in ``order`` if given.

    A sliced bit map has one bar per slice; each layer is named once, under its first
    slice, and a thin line separates the layers. A figure of its own (no ``ax``) widens
    with the number of bars. ``path``: save the figure there (PNG) and close it.

    Returns:
        The axes (or ``path`` when saved).
    """
    import matplotlib.pyplot as plt

    names = list(order) if order is not None else _slices_in_order(list(bitmap))
    if ax is None:
        _, ax = plt.subplots(figsize=(min(max(8.0, 0.22 * len(names)), 30.0), 3.6))
    bits = [bitmap[n].w_bits for n in names]
    ax.bar(range(len(names)), bits, color=["tab:gray" if b >= 32 else "tab:blue" for b in bits])
    labels = names
    if bitmap.slices is not None:
        owners = [n.rsplit(f".{PART}.", 1)[0] for n in names]
        labels = [o if i == 0 or owners[i - 1] != o else "" for i, o in enumerate(owners)]
        for i in range(1, len(owners)):
            if owners[i] != owners[i - 1]:
                ax.axvline(i - 0.5, color="0.7", lw=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_title(title or f"{bitmap.model_class}: {bitmap.avg_bits():.2f} avg bits")
    if path is None:
        return ax
    ax.figure.tight_layout()
    return _save(ax.figure, path)


#: axis labels of the costs a front carries
COST_LABELS = {"avg_bits": "average weight bits", "size_bytes": "weight size (bytes)",
               "bops": "bit operations (BOPs)", "latency_us": "predicted latency (µs)"}


def plot_demo(summary: pd.DataFrame, result: SearchResult, title: str, path: Path) -> Path:
    """Bits per layer at the headline budget, and metric vs average bits against uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    unit = "layer" if result.bitmap.slices is None else "channel slice"
    plot_bitmap(result.bitmap, axes[0], order=list(result.table.index),
                title=f"bits per {unit} at {result.bitmap.avg_bits():.2f} avg bits")
    how = (f"mpsearch ({result.sensitivity.estimator} + "
           f"{result.bitmap.provenance.get('solver', 'solver')})")
    searched = summary[summary["map"] == "searched"].sort_values("avg_bits")
    uniform = summary[summary["map"] == "uniform"].sort_values("avg_bits")
    float_row = summary[summary["map"] == "float"]
    metric = "accuracy" if summary["accuracy"].notna().any() else None
    ax = axes[1]
    if metric:
        ax.plot(searched["avg_bits"], searched[metric], "o-", label=how)
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


def uniform_points(problem: AllocationProblem) -> dict[int, dict[str, float]]:
    """Predicted loss and every cost of each uniform map (all layers at one bits option).

    Ties and pins are ignored: a uniform map is a reference point, not a candidate. Where
    a layer is not allowed a width (``allowed``: no kernel for it on the profiled
    hardware), it takes the next wider width it is allowed, as a deployment would run it
    (the narrowest allowed if none is wider); a width no layer is allowed gives no point.
    """
    out = {}
    allowed = np.asarray(problem.allowed, dtype=bool)
    order = np.argsort(problem.bits)
    for column, bits in enumerate(problem.bits):
        if not allowed[:, column].any():
            continue
        choice = np.full(problem.n_layers, column, dtype=np.int64)
        for i in np.flatnonzero(~allowed[:, column]):
            wider = [c for c in order if allowed[i, c] and problem.bits[c] > bits]
            choice[i] = wider[0] if wider else next(c for c in order if allowed[i, c])
        out[bits] = problem.evaluate(choice)
    return out


def _front_and_problem(front_or_result: Front | SearchResult,
                       problem: AllocationProblem | None
                       ) -> tuple[Front, AllocationProblem | None]:
    if isinstance(front_or_result, Front):
        return front_or_result, problem
    front = getattr(front_or_result, "front", None)
    if not isinstance(front, Front):
        raise TypeError(f"plot_front needs a Front or a SearchResult, got "
                        f"{type(front_or_result).__name__}")
    return front, problem if problem is not None else front_or_result.problem


def _rows(measured: Any) -> list[dict[str, Any]]:
    """Rows of a DataFrame, of dicts, or of :func:`mpsearch.validate` reports (one or
    several: ``loss_increase`` the loss, ``size_bytes_quantized`` the bytes)."""
    if measured is None:
        return []
    if hasattr(measured, "to_dict") and hasattr(measured, "columns"):
        return list(measured.to_dict("records"))  # a DataFrame
    if hasattr(measured, "loss_increase") and hasattr(measured, "to_dict"):
        measured = [measured]  # one report
    rows = []
    for row in measured:
        if hasattr(row, "loss_increase") and hasattr(row, "to_dict"):  # a report
            row = {**row.to_dict(), "size_bytes": row.size_bytes_quantized}
        rows.append(dict(row))
    return rows


def _measured_loss(row: Mapping[str, Any]) -> Any:
    for key in ("measured_loss", "loss", "loss_increase"):
        if row.get(key) is not None:
            return row[key]
    return None


def plot_front(front_or_result: Front | SearchResult, cost: str | Sequence[str] | None = None,
               *, uniform: bool | Mapping[int, Mapping[str, float]] = True,
               measured: pd.DataFrame | Iterable[Mapping[str, Any]] | None = None,
               problem: AllocationProblem | None = None, logy: bool = True,
               title: str | None = None, path: str | Path | None = None) -> Any:
    """Predicted loss against each cost along a front, uniform maps marked.

    Args:
        front_or_result: a :class:`~mpsearch.front.Front` or a
            :class:`~mpsearch.search.SearchResult` (which also supplies the problem).
        cost: the cost(s) on the x axes, one panel each; default: the budgeted costs
            (or every cost of the front when the problem is unknown).
        uniform: mark the uniform maps (needs the problem), or give them as
            ``{bits: {"loss": ..., <cost>: ...}}``.
        measured: measured points to overlay: :func:`mpsearch.validate` reports (their
            ``loss_increase`` against their costs), or rows with the cost and
            ``measured_loss`` (or ``loss``, ``loss_increase``) columns. Rows that give no
            point on any panel are a ``ValueError``, naming what they hold.
        problem: the allocation problem, when passing a bare front.
        logy: log-scale the loss axis (when every plotted loss is positive).
        title: figure title.
        path: save the figure there (PNG) and close it.

    Returns:
        The matplotlib figure (or ``path`` when saved).

    Raises:
        ValueError: the front is empty, a cost is not in it, or ``measured`` gives no
            point.
    """
    import matplotlib.pyplot as plt

    front, problem = _front_and_problem(front_or_result, problem)
    if not len(front):
        raise ValueError(f"front from {front.solver!r} is empty (status {front.status!r}); "
                         "nothing to plot")
    available = list(front.solutions[0].costs)
    if cost is None:
        costs = list(problem.budgets) if problem is not None and problem.budgets else available
    else:
        costs = [cost] if isinstance(cost, str) else list(cost)
    unknown = [c for c in costs if c not in available]
    if unknown:
        raise ValueError(f"cost(s) {unknown} are not in the front; it has {available}")
    marks: dict[int, Mapping[str, float]] = {}
    if uniform is True and problem is not None:
        marks.update(uniform_points(problem))
    elif isinstance(uniform, Mapping):
        marks.update(uniform)
    extra = _rows(measured)
    if extra and not any(c in r and _measured_loss(r) is not None for r in extra
                         for c in costs):
        raise ValueError(f"measured= gives no point on these panels ({costs}): each row needs "
                         f"one of those costs and a measured_loss / loss / loss_increase; "
                         f"the first has {sorted(extra[0])}")
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4.2), squeeze=False)
    best = front.best
    for ax, name in zip(axes[0], costs):
        x = [s.costs[name] for s in front.solutions]
        y = [s.loss for s in front.solutions]
        order = np.argsort(x, kind="stable")
        ax.plot(np.asarray(x)[order], np.asarray(y)[order], "o-", ms=3, lw=1,
                label=f"{front.solver} front ({len(front)})")
        ax.plot([best.costs[name]], [best.loss], "*", ms=14, color="tab:red",
                label="lowest loss")
        losses: list[float] = list(y)
        for bits, point in sorted(marks.items()):
            if name in point and "loss" in point:
                ax.plot([point[name]], [point["loss"]], "s", color="tab:gray", ms=7)
                ax.annotate(f"{bits}b", (point[name], point["loss"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
                losses.append(point["loss"])
        if marks:
            ax.plot([], [], "s", color="tab:gray", label="uniform")
        points = [(float(r[name]), float(_measured_loss(r))) for r in extra
                  if name in r and _measured_loss(r) is not None]
        if points:
            ax.plot(*zip(*points), "D", mfc="none", color="tab:green", label="measured")
            losses += [v for _, v in points]
        if problem is not None and name in problem.budgets:
            ax.axvline(problem.budgets[name], color="k", ls="--", lw=0.8, label="budget")
        ylabel = "predicted loss increase (sum of sensitivity)"
        if logy and min(losses) > 0:
            ax.set_yscale("log")
        elif logy:
            ylabel += "; linear: a loss ≤ 0"
        ax.set_xlabel(COST_LABELS.get(name, name))
        if name in ("size_bytes", "bops"):  # large counts: 120k, 1.4M, not 140000
            from matplotlib.ticker import EngFormatter, MaxNLocator

            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{front.solver}: predicted loss against cost ({front.status})")
    fig.tight_layout()
    if path is None:
        return fig
    return _save(fig, path)


def plot_sensitivity(table: SensitivityTable, *, logy: bool = True, title: str | None = None,
                     path: str | Path | None = None) -> Any:
    """Sensitivity Ω per layer at each bits option, with one-standard-error bars.

    Args:
        table: a :class:`~mpsearch.sensitivity.SensitivityTable` (e.g. ``res.sensitivity``).
        logy: log-scale Ω (non-positive values are then not drawn).
        title: axes title.
        path: save the figure there (PNG) and close it.

    Returns:
        The matplotlib figure (or ``path`` when saved).
    """
    import matplotlib.pyplot as plt

    omega = np.asarray(table.omega, dtype=np.float64)
    stderr = np.asarray(table.omega_stderr, dtype=np.float64)
    n_layers = len(table.layers)
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * n_layers, 16), 4.5))
    index = np.arange(n_layers)
    width = 0.8 / max(len(table.bits), 1)
    for j, bits in enumerate(table.bits):
        values, errors = omega[:, j], stderr[:, j]
        lower = np.minimum(errors, values * (1 - 1e-9)) if logy else errors
        shown = values > 0 if logy else np.ones(n_layers, dtype=bool)
        ax.errorbar(index[shown] + (j - (len(table.bits) - 1) / 2) * width, values[shown],
                    yerr=[np.maximum(lower[shown], 0), errors[shown]], fmt="o", ms=3,
                    capsize=2, label=f"{bits} bits")
    if logy and (omega > 0).any():
        ax.set_yscale("log")
    if n_layers <= 60:
        ax.set_xticks(index)
        ax.set_xticklabels(table.layers, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel(f"layer index ({n_layers} layers)")
    ax.set_ylabel("Ω: predicted loss increase")
    ax.set_title(title or f"sensitivity ({table.estimator or 'table'}), ±1 standard error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is None:
        return fig
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
