"""Plots: the front (loss against each cost, uniform maps, measured points), sensitivity."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import mpsearch
from mpsearch import Hutchinson, NSGA2Solver
from mpsearch.front import Front
from mpsearch.plot import plot_front, plot_sensitivity, uniform_points
from mpsearch.solvers import solve
from mpsearch.solvers.synthetic import synthetic_problem

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result(mnist_cnn: Any, mnist_calib: Any) -> mpsearch.SearchResult:
    return mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, solver=NSGA2Solver(n_gen=20),
                           sensitivity=Hutchinson(tol=0.2, min_probes=5, max_probes=20),
                           progress=False, slices=None)


def test_uniform_points_known_answer() -> None:
    problem = synthetic_problem(30, seed=2)
    points = uniform_points(problem)
    assert sorted(points) == list(problem.bits)
    for bits, values in points.items():  # avg_bits is the parameter-weighted mean bits
        assert values["avg_bits"] == pytest.approx(bits)
        column = problem.bits.index(bits)
        assert values["loss"] == pytest.approx(problem.sensitivity[:, column].sum())


def test_front_panels_uniform_and_measured(tmp_path: Path) -> None:
    problem = synthetic_problem(40, n_budgets=2, seed=3)
    front = NSGA2Solver(pop_size=20, n_gen=10, ilp_points=1).solve(problem)
    measured = [{"avg_bits": 3.0, "measured_loss": 0.5, "bops": 1e9},
                {"avg_bits": 4.0, "loss": 0.2}]
    fig = plot_front(front, problem=problem, measured=measured)
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == [  # the budgeted costs
        "average weight bits", "bit operations (BOPs)"]
    first = axes[0]
    texts = {t.get_text() for t in first.texts}
    assert texts == {f"{b}b" for b in problem.bits}
    assert first.get_yscale() == "log"
    labels = first.get_legend_handles_labels()[1]
    assert {"uniform", "measured", "budget", "lowest loss"} <= set(labels)
    line = next(li for li in first.lines if li.get_label().startswith("nsga2 front"))
    assert len(line.get_xdata()) == len(front)
    plt.close(fig)
    path = plot_front(front, "size_bytes", problem=problem, uniform=False,
                      path=tmp_path / "front.png")
    assert path.read_bytes()[:8] == PNG


def test_front_errors() -> None:
    problem = synthetic_problem(5, seed=1)
    front = solve(problem, "ilp")
    with pytest.raises(ValueError, match=r"cost\(s\) \['x'\] are not in the front"):
        plot_front(front, "x")
    with pytest.raises(ValueError, match="is empty"):
        plot_front(Front((), solver="ilp", status="timeout", time_s=1.0))
    with pytest.raises(TypeError, match="needs a Front or a SearchResult"):
        plot_front(problem)  # type: ignore[arg-type]
    fig = plot_front(front)  # no problem: every cost, no uniform marks
    assert len(fig.axes) == len(problem.costs) and not fig.axes[0].texts
    plt.close(fig)


def test_search_result_front_and_sensitivity(result: mpsearch.SearchResult,
                                             tmp_path: Path) -> None:
    fig = plot_front(result, ["avg_bits", "size_bytes"])
    # one mark per uniform map: each candidate bit-width
    assert len(fig.axes) == 2 and len(fig.axes[0].texts) == len(result.sensitivity.bits)
    plt.close(fig)
    table = result.sensitivity
    fig = plot_sensitivity(table)
    ax = fig.axes[0]
    assert len(ax.containers) == len(table.bits)  # one error-bar series per bits option
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(table.layers)
    # Bars are one standard error either side, clipped above zero on the log axis.
    bars = ax.containers[0].lines[2][0].get_segments()
    column = np.asarray(table.omega_stderr)[:, 0]
    heights = np.array([seg[1, 1] - seg[0, 1] for seg in bars])
    lower = np.minimum(column, np.asarray(table.omega)[:, 0] * (1 - 1e-9))
    assert heights == pytest.approx(column + lower)
    plt.close(fig)
    assert plot_sensitivity(table, path=tmp_path / "s.png").read_bytes()[:8] == PNG


def test_uniform_points_run_layers_without_a_kernel_at_the_next_width() -> None:
    """With a hardware profile, a width a layer has no kernel for is not offered: its
    uniform point runs that layer at the next wider width it has, as a deployment would,
    and a width no layer has gives no point (it would be plotted as free)."""
    base = synthetic_problem(6, seed=4)
    allowed = np.ones((base.n_layers, len(base.bits)), dtype=bool)
    three = base.bits.index(3)
    allowed[:, three] = False  # no 3-bit kernel anywhere
    allowed[0, base.bits.index(4)] = False  # layer 0: no 4-bit kernel
    problem = dataclasses.replace(base, allowed=allowed)
    points = uniform_points(problem)
    assert 3 not in points and 4 in points
    choice = np.full(base.n_layers, base.bits.index(4))
    choice[0] = base.bits.index(next(b for b in base.bits if b > 4))
    assert points[4] == pytest.approx(base.evaluate(choice))


def test_validate_reports_are_measured_points(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    """The docstring said "e.g. from mpsearch.validate", but a report (or its to_dict())
    has loss_increase, which was read as no point: nothing drawn, nothing said."""
    import mpsearch

    calib = mnist_calib[:1]
    res = mpsearch.search(mnist_cnn, 4.0, data=calib, sensitivity="fisher", slices=None,
                          refine=False, progress=False)
    report = mpsearch.validate(mnist_cnn, res.bitmap, data=calib, progress=False)
    for measured in (report, [report], [report.to_dict()]):
        fig = plot_front(res, measured=measured)
        line = next(li for li in fig.axes[0].lines if li.get_label() == "measured")
        assert list(line.get_ydata()) == [pytest.approx(report.loss_increase)]
        assert list(line.get_xdata()) == [pytest.approx(report.avg_bits)]
        plt.close(fig)
    with pytest.raises(ValueError, match="measured= gives no point"):
        plot_front(res, measured=[{"bits": 4, "accuracy": 0.9}])


def test_a_sliced_map_is_drawn_slice_by_slice_in_number_order() -> None:
    """The bars of a sliced map came in string order (parts.0, parts.1, parts.10, …)."""
    from torch import nn

    from mpsearch import BitMap, plot_bitmap
    from mpsearch.slices import SlicePlan, slice_model

    model = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 4))
    plan = SlicePlan({"0": tuple(tuple(range(i, 48, 12)) for i in range(12))})
    sliced = slice_model(model, plan)
    names = [f"0.parts.{k}" for k in range(12)] + ["2"]
    bitmap = BitMap.from_bits(sliced, {n: 2 + k % 7 for k, n in enumerate(sorted(names))})
    bitmap.slices = plan
    ax = plot_bitmap(bitmap)
    heights = [p.get_height() for p in ax.patches]
    assert heights == [bitmap[n].w_bits for n in names]
    plt.close(ax.figure)
