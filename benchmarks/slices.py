"""Channel slices against per-layer allocation, at equal average bits (issue #3).

For each model of the fidelity benchmark (the same real weights, calibration and held-out
data, see ``sensitivity_fidelity.load_case``) and each of the three estimators of the
issue (``qerror``, ``fisher``, ``hutchinson``; Hutchinson capped as there), ``search``
with the library defaults (ILP, candidate bits 2/3/4/5/6/8, the divergence loss, the
measured refinement on) runs per layer (``slices=None``) and with ``slices=4`` and
``slices=8``, at 3.0 and 4.0 average bits. Each map is validated on the held-out data:
its output divergence (KL for logits, MSE for hidden states and score maps) against the
uniform map's at the same average bits (INT3, INT4) gives the ratio the issue's bar is
stated in (at least 4× below uniform INT4). The second budget reuses the first search's
sensitivity table, as a user would (``sensitivity=result.sensitivity``), so its time is
the slicing, the solve and the refinement only.

Writes ``results/slices.{md,csv,png}``. Each model's rows are kept in ``--cache`` as they
finish, so an interrupted run resumes (``--reuse``) and ``--report`` rebuilds the tables;
models not in the cache keep their rows of the published ``results/slices.csv``.

    python benchmarks/slices.py                         # everything (~1 h on 2 cores)
    python benchmarks/slices.py --models mnist_cnn mnist_dwsep
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from sensitivity_fidelity import HUTCHINSON_CAP, load_case, log

import mpsearch
from mpsearch.search import AUTO_SLICES
from mpsearch.sensitivity import Fisher, Hutchinson, QError

MODELS = ("mnist_cnn", "mnist_dwsep", "mtcnn_onet", "ocr_crnn", "minilm", "mobilenet_v2",
          "ocr_craft")
ESTIMATORS = ("qerror", "fisher", "hutchinson")
SLICES: tuple[int | None, ...] = (None, 4, 8, 16)
BUDGETS = (4.0, 3.0)
BAR = 4.0


def estimator(name: str, model: str) -> Any:
    """The estimator object, Hutchinson capped as in the fidelity benchmark."""
    if name == "hutchinson":
        return Hutchinson(max_probes=HUTCHINSON_CAP.get(model, 200), max_time_s=None)
    return QError() if name == "qerror" else Fisher()


def auto_pick(name: str) -> tuple[float, int]:
    """The effective layer count of the model and the slices the default
    ``slices="auto"`` takes there (1: per layer), by the library's own rule. (Its measured
    second look at slices, where a per-layer map gains little, is for models under
    ``AUTO_SLICE_WORK_MACS``; the per-layer models here, CRNN, MiniLM, MobileNetV2 and
    CRAFT, are 7-45 times over it.)"""
    from mpsearch.layers import discover, quantizable_modules
    from mpsearch.search import _few_layers
    from mpsearch.slices import sliceable_layers

    case = load_case(name)
    layers = discover(case.model, case.calib[0], warn=False)
    cut = set(sliceable_layers(case.model, quantizable_modules(case.model)))
    sizes = [i.params for i in layers]
    why = _few_layers(layers, [i.name for i in layers if i.name in cut and not i.read_by])
    return sum(sizes) ** 2 / sum(p * p for p in sizes), AUTO_SLICES if why else 1


def run_model(name: str, counts: Sequence[int | None] = SLICES) -> list[dict[str, Any]]:
    """Every (estimator, slices, budget) search of one model, validated on held-out data
    (``counts``: the slice counts to run, None per layer)."""
    case = load_case(name)
    uniform = {}
    for budget in BUDGETS:
        rep = mpsearch.validate(case.model, mpsearch.BitMap.uniform(case.model, int(budget)),
                                data=case.evals, progress=False)
        uniform[budget] = rep.output_divergence
    rows = []
    for est in ESTIMATORS:
        for n in counts:
            table = None
            for budget in BUDGETS:
                t = time.perf_counter()
                result = mpsearch.search(case.model, budget, data=case.calib,
                                         sensitivity=table or estimator(est, name), slices=n,
                                         progress=False)
                seconds = time.perf_counter() - t
                table = result.sensitivity
                rep = mpsearch.validate(case.model, result.bitmap, data=case.evals,
                                        progress=False)
                ratio = uniform[budget] / rep.output_divergence
                rows.append({
                    "model": name, "estimator": est, "slices": n or 1, "budget": budget,
                    "units": len(result.problem.layers),
                    "avg_bits": round(result.bitmap.avg_bits(), 4),
                    "divergence_kind": rep.divergence_kind,
                    "uniform_divergence": uniform[budget],
                    "divergence": rep.output_divergence, "uniform_ratio": ratio,
                    "agreement": rep.agreement, "time_s": seconds,
                    "table_reused": budget != BUDGETS[0],
                    "refined_moves": result.bitmap.provenance.get("refined_moves"),
                })
                log(f"{name} {est} slices={n} budget={budget}: {ratio:.2f}x below uniform "
                    f"INT{int(budget)} at {result.bitmap.avg_bits():.3f} bits, {seconds:.0f} s")
    return rows


def _fmt(x: float) -> str:
    return f"{x:.2f}×"


def report(frame: pd.DataFrame, out: Path, *, command: str, total_s: float,
           threads: int, published: Sequence[str] = ()) -> list[Path]:
    """Write the Markdown tables, the CSV and the plot. ``published``: models whose rows
    were kept from the published CSV (neither run now nor in the cache)."""
    out.mkdir(parents=True, exist_ok=True)
    frame = frame.assign(model=pd.Categorical(frame.model, [m for m in MODELS
                                                            if m in set(frame.model)],
                                              ordered=True),
                         estimator=pd.Categorical(frame.estimator, ESTIMATORS, ordered=True))
    frame = frame.sort_values(["model", "estimator", "budget", "slices"])
    frame.to_csv(out / "slices.csv", index=False)
    at4 = frame[frame.budget == 4.0]
    wide = at4.pivot_table(index=["model", "estimator"], columns="slices",
                           values="uniform_ratio")
    wide.columns = ["per layer" if c == 1 else f"slices={c}" for c in wide.columns]
    order = [m for m in MODELS if m in set(frame.model)]
    lines = [
        "# Channel slices against per-layer allocation",
        "",
        (f"`{command}` — {time.strftime('%Y-%m-%d %H:%M')}, {total_s / 60:.1f} min "
        f"(this invocation; models reused from the cache keep their own times); torch "
        f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {threads} torch "
        "threads."
         + (f" The rows of {', '.join(f'`{m}`' for m in published)} are kept from the "
            f"published `{out / 'slices.csv'}`, measured by earlier runs (the library may "
            "have changed since: re-run them with `--models`)." if published else "")),
        "",
        ("`search` with the library defaults (ILP, bits 2/3/4/5/6/8, divergence loss, measured "
        "refinement on), per layer and with `slices=4` / `slices=8` / `slices=16` (16 only "
        "on the models the default slices); each map validated on "
        "held-out data. **Ratio** = held-out output divergence of uniform INT4 (INT3) / that "
        "of the searched map at 4.0 (3.0) average bits; the issue's bar is 4× at 4 bits. "
        "The 3-bit search reuses the 4-bit search's sensitivity table."),
        "",
        "## At 4.0 average bits: ratio below uniform INT4",
        "",
        "| model | estimator | " + " | ".join(wide.columns) + " |",
        "|---|---|" + "---|" * len(wide.columns),
    ]
    for m in order:
        for est in ESTIMATORS:
            if (m, est) in wide.index:
                vals = wide.loc[(m, est)]
                lines.append(f"| {m} | {est} | " + " | ".join(
                    "" if pd.isna(v) else (f"**{_fmt(v)}**" if v >= BAR else _fmt(v))
                    for v in vals) + " |")
    best = at4.groupby(["model", "slices"]).uniform_ratio.min().unstack()
    best.columns = ["per layer" if c == 1 else f"slices={c}" for c in best.columns]
    picks = {m: auto_pick(m) for m in order}
    best["default (auto)"] = [best.loc[m].get("per layer" if picks[m][1] == 1
                                              else f"slices={picks[m][1]}") for m in order]
    lines += ["", ("Worst estimator per model (the issue asks each of the three to pass). "
              "`default (auto)`: what `search` does with no `slices=` argument, the column "
              f"of the setting its rule picks ({AUTO_SLICES} slices where the weights sit in "
              "fewer than "
              "5 layers' worth, the effective count (Σ p)² / Σ p² of the layers' weight "
              "counts; per layer otherwise):"), "",
              "| model | effective layers | " + " | ".join(best.columns) + " |",
              "|---|---|" + "---|" * len(best.columns)]
    for m in order:
        lines.append(f"| {m} | {picks[m][0]:.2f} | " + " | ".join(
            "" if pd.isna(v) else (f"**{_fmt(v)}**" if v >= BAR else _fmt(v))
            for v in best.loc[m]) + " |")
    passed = {c: [m for m in order if best.loc[m].get(c, 0) >= BAR] for c in best.columns}
    lines += ["", "Models where every estimator meets the 4× bar: " + "; ".join(
        f"{c}: {len(v)} of {int(best[c].notna().sum())}" + (f" ({', '.join(v)})" if v else "")
        for c, v in passed.items()) + ".", ""]
    lines += ["## Every run", "",
              ("| model | estimator | slices | budget | units | avg bits | divergence "
              "(uniform) | ratio | agreement | time s | refined moves |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in frame.itertuples():
        agree = "" if pd.isna(r.agreement) else f"{r.agreement:.3f}"
        lines.append(
            f"| {r.model} | {r.estimator} | {r.slices} | {r.budget:g} | {r.units} | "
            f"{r.avg_bits:.3f} | {r.divergence:.3g} ({r.uniform_divergence:.3g}) | "
            f"{_fmt(r.uniform_ratio)} | {agree} | {r.time_s:.1f}"
            f"{' (table reused)' if r.table_reused else ''} | {r.refined_moves} |")
    md = out / "slices.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig, axes = plt.subplots(1, len(ESTIMATORS), figsize=(4.2 * len(ESTIMATORS), 3.8),
                             sharey=True)
    for ax, est in zip(np.atleast_1d(axes), ESTIMATORS, strict=True):
        sub = at4[at4.estimator == est]
        xs = np.arange(len(order))
        cols = sorted(sub.slices.unique())
        for k, c in enumerate(cols):
            vals = [sub[(sub.model == m) & (sub.slices == c)].uniform_ratio.mean() for m in order]
            ax.bar(xs + (k - (len(cols) - 1) / 2) * 0.8 / len(cols), vals, 0.8 / len(cols),
                   label="per layer" if c == 1 else f"slices={c}")
        ax.axhline(BAR, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(xs, order, rotation=45, ha="right", fontsize=8)
        ax.set_title(est)
    np.atleast_1d(axes)[0].set_ylabel("uniform INT4 / searched (held-out), 4.0 bits")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    png = out / "slices.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, out / "slices.csv", png]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--cache", type=Path, default=Path("results/slices_cache"))
    parser.add_argument("--reuse", action="store_true",
                        help="skip models whose rows are in --cache")
    parser.add_argument("--report", action="store_true",
                        help="only rebuild the report from every model in --cache")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--slices", nargs="+", type=lambda v: None if v == "none" else int(v),
                        choices=SLICES, default=list(SLICES), metavar="N|none",
                        help="slice counts to run (default: all); a model's rows for the "
                             "others are kept from --cache, or else from the published "
                             "--out/slices.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.models:
            path = args.cache / f"{name}.csv"
            if args.reuse and path.exists():
                log(f"{name}: reused {path}")
                continue
            t = time.perf_counter()
            rows = pd.DataFrame(run_model(name, args.slices))
            ran = {1 if n is None else n for n in args.slices}
            kept = (pd.read_csv(path) if path.exists() else
                    pd.read_csv(args.out / "slices.csv") if (args.out / "slices.csv").exists()
                    else pd.DataFrame(columns=rows.columns))
            kept = kept[(kept.model == name) & ~kept.slices.isin(ran)]
            pd.concat([kept, rows], ignore_index=True).to_csv(path, index=False)
            log(f"{name}: done in {time.perf_counter() - t:.0f} s")
    names = [m for m in MODELS if (args.cache / f"{m}.csv").exists()]
    frames = [pd.read_csv(args.cache / f"{m}.csv") for m in names]
    published = args.out / "slices.csv"
    from_published: list[str] = []
    if published.exists():  # models not in the cache: the published rows
        old = pd.read_csv(published)
        from_published = [m for m in MODELS if m not in names and m in set(old.model)]
        frames += [old[old.model == m] for m in from_published]
    frame = pd.concat(frames)
    for p in report(frame, args.out, command=" ".join(
            ["python", "benchmarks/slices.py", *(argv or sys.argv[1:])]),
            total_s=time.perf_counter() - start, threads=args.threads,
            published=from_published):
        log(f"wrote {p}")


if __name__ == "__main__":
    main()
