"""Interaction-aware refinement: improve a solved bit map by measuring, not predicting.

The solver adds up single-layer sensitivities, but quantization errors of different layers
interact (they can compound or cancel). Refinement starts from the solver's map, measures
its real calibration loss, and tries its neighbours: one unit (a layer or a tie group) one
option up, alone where the budget has room, paired with another unit one option down to
pay for it, or paid for by as many other units one option down as it takes (the ones the
table rates cheapest per unit of budget freed) — the only way a large layer, rated too
cheap by the table and left at a low width, can move up; and the mirror of that, one unit
down with the budget it frees spent on others one option up. The candidates the
sensitivity table rates best are measured; the best
measured improvement is taken, and the search goes on from there until no candidate
improves, or its work budget is spent (passes over the calibration data, counted by the
share of each pass recomputed, so the same search stops at the same map on any machine; a
time cap only as a safety net); a uniform map within the budget that
measures better than the result replaces it. Every map it visits meets every budget, and
it never returns a map whose measured loss is worse than the solver's or than any uniform
map the budget allows. (A loss that can measure below the float model's — the label loss,
a custom ``loss_fn`` on few samples — counts gains only down to no damage, and a uniform
map measured below it must show the clear gain a move must.)

Before the local search, a *check* (where the table is a prediction, not a measurement):
each layer of the solver's map is quantized alone at its chosen width and the loss
increase measured, largest predicted contribution first. Where a measured value departs
from the table, that layer's row is corrected (measured values where measured, the other
widths scaled by the ratio at the nearest measured width) and the problem solved again;
the new widths are checked in turn, up to ``check_rounds`` times, within half of each
limit of the refinement. This catches what the local search cannot: a quadratic rating
(Fisher, Hessian trace) that misses how fast a layer's damage grows at 2-3 bits, on a
layer too large for any small move to lift — e.g.
the diagonal Fisher rated MobileNetV2's classifier at 2 bits 11× too cheap. The local
search then ranks its candidates with the corrected table.

Each measurement reuses the current map's outputs up to the first changed layer (prefix
replay), so a move near the output costs little.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mpsearch._replay import PrefixReplay
from mpsearch.batches import batch_rows
from mpsearch.layers import layer_weight
from mpsearch.losses import effective_samples, mean_and_stderr
from mpsearch.problem import AllocationProblem, Solution
from mpsearch.sensitivity.base import planning_rows

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.losses import Objective
    from mpsearch.quant import QuantConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Refine:
    """Settings of the refinement.

    Attributes:
        max_evals: most measured maps (each a pass over the calibration data from the
            first changed layer on). ``"auto"`` (default): 200, two per unit searched, or
            as many as the ``"auto"`` pass limit, whichever is most.
        max_passes: most work, in passes over the calibration data: a map measured from
            its first changed layer on counts the share of the pass it recomputes, a
            reference pass counts whole; None: no such limit. Unlike the time budget it
            does not depend on the machine or its load, so the same search refines to the
            same map. ``"auto"`` (default) is the most of: 64; two per unit searched (a
            sliced search: 16 slices of 8 layers are 128 units, and the check alone
            measures each once); and as many passes as :data:`WORK_MACS`
            multiply-accumulates of the searched layers over the calibration data pay
            for, up to :data:`MAX_AUTO_PASSES` (a cheap model refines until it converges:
            a pass of an LSTM reading 500 MNIST digits row by row costs 1.1 G of them).
            64 passes take 2-70 s on this project's models on one core (1 s per pass on
            the OCR CRNN with 32 text lines). On a squeeze-and-excitation CNN with 16
            slices a layer, the diagonal Fisher's map went from 1.8× to 5.5× below uniform
            INT4 (held out) with the limit at 256 passes instead of 64: its check had not
            finished one round; on that LSTM, Hutchinson's from 2.7× to 4.2× with 95
            passes instead of 68, where it converged.
        time_budget_s: stop measuring after this many seconds (a cap; results that stop on
            it depend on the machine's speed).
        candidates: neighbours measured per round, best predicted first.
        patience: when none of a round's candidates improves, measure up to this many
            batches of ``candidates`` before stopping.
        min_gain: a move is taken only if it lowers the measured loss increase by at least
            this fraction.
        min_z: a move's mean gain must also exceed this many standard errors of its
            paired loss differences: per batch with three or more calibration batches,
            per sample with fewer (where the loss splits by sample; with one or two
            batches of a custom ``loss_fn`` there is no such test). A
            stricter test keeps fewer moves but did not generalise better: on held-out data
            2 or 3 standard errors lost against 1 on MobileNetV2 at 4 bits (17.3× against
            20.4× below uniform INT4, Fisher and Hutchinson tables), tied on the ONet face
            classifier and the MNIST CNNs, and went either way on the dwsep CNN.
        check_rounds: rounds of the check (measure each chosen width alone, correct the
            table, solve again); 0 turns it off. ``search`` skips it for a table that is
            itself measured on the same data (``"qerror"``).
    """

    max_evals: int | Literal["auto"] = "auto"
    max_passes: float | Literal["auto"] | None = "auto"
    time_budget_s: float = 120.0
    candidates: int = 6
    patience: int = 3
    min_gain: float = 0.01
    min_z: float = 1.0
    check_rounds: int = 3

    def __post_init__(self) -> None:
        if self.max_evals != "auto" and not (isinstance(self.max_evals, int)
                                             and self.max_evals >= 1):
            raise ValueError(f"max_evals must be an integer >= 1 or 'auto', got "
                             f"{self.max_evals!r}")
        if self.max_passes not in (None, "auto") and not (
                isinstance(self.max_passes, (int, float)) and self.max_passes > 0):
            raise ValueError(f"max_passes must be > 0, 'auto' or None, got {self.max_passes!r}")
        if self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not self.min_z >= 0:
            raise ValueError(f"min_z must be >= 0, got {self.min_z}")
        if self.check_rounds < 0:
            raise ValueError(f"check_rounds must be >= 0, got {self.check_rounds}")


    def for_units(self, units: int, pass_macs: float | None = None) -> Refine:
        """These settings with ``"auto"`` limits made numbers for a search of ``units``
        units (layers, slices or tie groups) whose pass over the calibration data costs
        ``pass_macs`` multiply-accumulates in the searched layers (None: unknown)."""
        passes = max(MAX_PASSES, 2.0 * units)
        if pass_macs is not None and pass_macs > 0:
            passes = max(passes, float(min(MAX_AUTO_PASSES, WORK_MACS // pass_macs)))
        return dataclasses.replace(
            self,
            max_evals=(max(MAX_EVALS, 2 * units, int(passes)) if self.max_evals == "auto"
                       else self.max_evals),
            max_passes=passes if self.max_passes == "auto" else self.max_passes)


#: the least of the ``"auto"`` limits of :class:`Refine`
MAX_EVALS, MAX_PASSES = 200, 64.0
#: the ``"auto"`` pass limit pays for at least this many multiply-accumulates of the
#: searched layers (about 10-40 s on one core of this project's CPU), up to
#: ``MAX_AUTO_PASSES`` passes: counted in work, not seconds, so that it is the same on
#: every machine
WORK_MACS, MAX_AUTO_PASSES = 2e11, 1024.0


@dataclass(frozen=True)
class Refinement:
    """What the refinement did.

    Attributes:
        measured_before: measured calibration loss increase of the solver's map.
        measured_after: the same for the returned map.
        evaluations: maps measured.
        moves: accepted moves, each ``{"bits": {layer: [old, new]}, "measured": value}``
            (the check's re-solved map, when taken, is a move with ``"check": True``).
        time_s: seconds spent.
        passes: work done, in passes over the calibration data (see :attr:`Refine.max_passes`).
        stopped_by: the limit that ended it (``"max_evals"``, ``"max_passes"``,
            ``"time_budget_s"``), or ``"converged"`` when no candidate improved.
        checked: the check's single-layer measurements, ``{layer: {bits: [predicted,
            measured]}}`` (empty when the check did not run).
        uniform_bits: the width of the best uniform map within the budgets (every layer
            at one width; measured, it is usually the widest that fits, e.g. INT4 at 4.0
            average bits); None where no uniform map fits or is allowed.
        uniform_measured: that uniform map's measured calibration loss increase: against
            :attr:`measured_after`, what the mixed map gains on this model and data
            (:attr:`uniform_ratio`).
        uniform_samples: how many calibration samples carry that uniform map's damage, as
            an effective count (:func:`mpsearch.losses.effective_samples`: 64 samples hurt
            alike count 64, one sample holding it all counts 1); None where the loss does
            not split by sample. Few means the measured choices rest on those few
            samples: on MTCNN's PNet (64 calibration faces, 9 carrying uniform INT4's
            damage) maps measured 6-10x better than uniform there and 1-4x held out; but
            on its RNet (1.6 of 64) they held 65-112x, so no warning is given.
        samples: the calibration samples (None where the loss does not split by sample).
    """

    measured_before: float
    measured_after: float
    evaluations: int
    moves: list[dict[str, Any]] = field(default_factory=list)
    time_s: float = 0.0
    checked: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    passes: float = 0.0
    stopped_by: str = "converged"
    uniform_bits: int | None = None
    uniform_measured: float | None = None
    uniform_samples: float | None = None
    samples: int | None = None

    @property
    def uniform_ratio(self) -> float | None:
        """Measured calibration loss increase of the best uniform map within the budgets
        over that of the returned map (2.0: half the uniform map's damage); inf where the
        returned map measures no damage and the uniform map some; None without a uniform
        map, or where the uniform map measures no damage (a loss that quantization can
        lower, e.g. the label loss: compare :attr:`uniform_measured` and
        :attr:`measured_after` themselves)."""
        if self.uniform_measured is None or self.uniform_measured <= 0:
            return None
        if self.measured_after <= 0:
            return math.inf
        return self.uniform_measured / self.measured_after


def _limit_reached(settings: Refine, evaluations: int, passes: float, t0: float,
                   share: float = 1.0) -> str | None:
    """The first of the settings' limits (scaled by ``share``) reached, or None
    (``settings`` with numbers for limits: :meth:`Refine.for_units`)."""
    max_evals, max_passes = settings.max_evals, settings.max_passes
    assert max_evals != "auto" and max_passes != "auto"
    if evaluations >= max_evals * share:
        return "max_evals"
    if max_passes is not None and passes >= max_passes * share:
        return "max_passes"
    if time.perf_counter() - t0 > settings.time_budget_s * share:
        return "time_budget_s"
    return None


def _neighbours(problem: AllocationProblem, unit_choice: np.ndarray,
                unit_loss: np.ndarray, unit_costs: Mapping[str, np.ndarray],
                slack: Mapping[str, float], limit: int) -> list[tuple[float, dict[int, int]]]:
    """Feasible one-step moves ranked by predicted loss change: ``(Δ, {unit: option})``."""
    allowed = problem.unit_allowed
    n_units = len(unit_choice)
    ups: list[tuple[int, int]] = []
    downs: list[tuple[int, int]] = []
    for u in range(n_units):
        options = np.flatnonzero(allowed[u])
        c = unit_choice[u]
        higher, lower = options[options > c], options[options < c]
        if higher.size:
            ups.append((u, int(higher[0])))
        if lower.size:
            downs.append((u, int(lower[-1])))

    def delta_cost(u: int, o: int) -> dict[str, float]:
        return {k: float(t[u, o] - t[u, unit_choice[u]]) for k, t in unit_costs.items()}

    def delta_loss(u: int, o: int) -> float:
        return float(unit_loss[u, o] - unit_loss[u, unit_choice[u]])

    def fits(*moves: tuple[int, int]) -> bool:
        total = {k: sum(delta_cost(u, o)[k] for u, o in moves) for k in slack}
        return all(total[k] <= slack[k] + 1e-9 * max(1.0, abs(slack[k])) for k in slack)

    scored: list[tuple[float, dict[int, int]]] = []
    for u, o in ups:
        if fits((u, o)):
            scored.append((delta_loss(u, o), {u: o}))
    # Pair each promising up-step with the cheapest down-steps that pay for it.
    ups_ranked = sorted(ups, key=lambda m: delta_loss(*m))[:4 * limit]
    downs_ranked = sorted(downs, key=lambda m: delta_loss(*m))[:4 * limit]
    for u, o in ups_ranked:
        for v, p in downs_ranked:
            if u != v and fits((u, o), (v, p)):
                scored.append((delta_loss(u, o) + delta_loss(v, p), {u: o, v: p}))
    # A step no single partner can balance: paid for (or spent) by several others.
    for u, o in ups_ranked:
        move = _compound((u, o), downs, delta_cost, delta_loss, slack, pay=True)
        if move is not None and len(move) > 2:
            scored.append((sum(delta_loss(v, p) for v, p in move.items()), move))
    for u, o in sorted(downs, key=lambda m: delta_loss(*m))[:limit]:
        move = _compound((u, o), ups, delta_cost, delta_loss, slack, pay=False)
        if move is not None and len(move) > 2:
            scored.append((sum(delta_loss(v, p) for v, p in move.items()), move))
    scored.sort(key=lambda s: s[0])
    return scored[:limit]


def _compound(step: tuple[int, int], partners: Sequence[tuple[int, int]],
              delta_cost: Callable[[int, int], dict[str, float]],
              delta_loss: Callable[[int, int], float], slack: Mapping[str, float], *,
              pay: bool) -> dict[int, int] | None:
    """``step`` plus partner steps of other units, chosen greedily by predicted loss per
    unit of budget.

    ``pay=True``: ``step`` goes up and down-steps are added, cheapest predicted damage per
    unit of overrun removed first, until every budget holds (None if they cannot).
    ``pay=False``: ``step`` goes down and up-steps are added, best predicted gain per unit
    of budget first, while every budget still holds (None if none fits).
    """
    u = step[0]
    total = delta_cost(*step)
    move = {u: step[1]}
    pool = [(v, p, delta_cost(v, p), delta_loss(v, p)) for v, p in partners if v != u]

    def over(t: Mapping[str, float]) -> dict[str, float]:
        return {k: t[k] - slack[k] for k in slack
                if t[k] > slack[k] + 1e-9 * max(1.0, abs(slack[k]))}

    if pay:
        deficit = over(total)
        while deficit and pool:
            worth = []
            for c in pool:
                freed = sum(min(d, max(0.0, -c[2][k])) / d for k, d in deficit.items())
                worth.append(c[3] / freed if freed > 0 else math.inf)
            i = int(np.argmin(worth))
            if not math.isfinite(worth[i]):
                return None
            best = pool.pop(i)
            move[best[0]] = best[1]
            total = {k: total[k] + best[2][k] for k in total}
            deficit = over(total)
        return None if deficit else move
    if over(total):
        return None
    room = {k: slack[k] - total[k] for k in slack}
    scale = {k: max(abs(r), 1e-12) for k, r in room.items()}
    for v, p, cost, loss in sorted(pool, key=lambda c: c[3] / max(
            1e-30, sum(max(0.0, c[2][k]) / scale[k] for k in scale))):
        if loss >= 0:
            continue
        trial = {k: total[k] + cost[k] for k in total}
        if not over(trial):
            move[v], total = p, trial
    return move


def refine(model: nn.Module, modules: Mapping[str, nn.Module], layers: Sequence[LayerInfo],
           objective: Objective, problem: AllocationProblem, start: Solution,
           qconfig: QuantConfig, settings: Refine, *, device: torch.device,
           resolve: Callable[[AllocationProblem], Solution] | None = None,
           progress: bool = False) -> tuple[Solution, Refinement]:
    """Improve ``start`` by a measured check and local search (see the module docstring).

    Args:
        resolve: solves a problem (the search's solver); without it there is no check.

    Returns:
        The refined solution (``start`` itself if nothing improved) and a report.
    """
    from mpsearch.quant.apply import quantize_weight

    t0 = time.perf_counter()
    samples = sum(batch_rows(b) for b in objective.batches)
    settings = settings.for_units(problem.n_units,
                                  samples * sum(float(info.macs) for info in layers))
    kinds = {info.name: info.kind for info in layers}
    originals = {n: layer_weight(modules[n]).detach() for n in problem.layers}

    def weight(name: str, option: int) -> Tensor | None:
        b = problem.bits[option]
        if b >= 32:
            return None
        w = originals[name]
        return quantize_weight(w, kinds[name], b, qconfig, modules[name]).to(w.dtype)

    def weights_of(unit_choice: np.ndarray, units: Sequence[int]) -> dict[str, Tensor]:
        out = {}
        for u in units:
            for name in problem.units[u]:
                w = weight(name, int(unit_choice[u]))
                out[name] = originals[name] if w is None else w
        return out

    def weights_of_layer(name: str, option: int) -> dict[str, Tensor]:
        w = weight(name, option)
        return {name: originals[name] if w is None else w}

    first = {u: int(np.flatnonzero(problem.unit_of == u)[0]) for u in range(problem.n_units)}
    unit_choice = np.array([start.choice[first[u]] for u in range(problem.n_units)])
    unit_loss = problem.unit_table(problem.sensitivity)
    unit_costs = {k: problem.unit_table(problem.costs[k]) for k in problem.budgets}
    everything = list(range(problem.n_units))
    replay = PrefixReplay(model, objective, device, list(problem.layers))
    # Per-sample losses: with fewer than three batches, for the gain test (there is no
    # per-batch noise estimate); always, to count the samples the uniform map hurts.
    replay.per_sample = True
    moves: list[dict[str, Any]] = []
    evaluations = 0
    checked: dict[str, dict[int, list[float]]] = {}
    with replay:
        float_loss = float(replay.record().mean())
        float_samples = replay.sample_losses()
        check_choice: np.ndarray | None = None
        if resolve is not None and settings.check_rounds:
            corrected, check_choice, n = _check(
                problem, start, resolve, settings, t0,
                lambda name, o: float(replay.losses(weights_of_layer(name, o)).mean()) - float_loss,
                lambda: replay.passes, checked, bar_disabled=not progress)
            evaluations += n
            unit_loss = problem.unit_table(corrected)
            if check_choice is not None:
                check_choice = np.array([check_choice[first[u]] for u in range(problem.n_units)])
        current_split = replay.record(weights_of(unit_choice, everything))
        current_samples = replay.sample_losses()
        current = float(current_split.mean()) - float_loss
        before = current
        if check_choice is not None and not np.array_equal(check_choice, unit_choice):
            check_split = replay.record(weights_of(check_choice, everything))
            check_samples = replay.sample_losses()
            measured = float(check_split.mean()) - float_loss
            evaluations += 1
            if _clear_gain(check_split - current_split, current, settings,
                           _paired(check_samples, current_samples)):
                moves.append({"bits": {n: [problem.bits[unit_choice[u]], problem.bits[o]]
                                       for u, o in enumerate(check_choice)
                                       if o != unit_choice[u] for n in problem.units[u]},
                              "measured": measured, "check": True})
                unit_choice, current, current_split = check_choice, measured, check_split
                current_samples = check_samples
            else:
                replay.record(weights_of(unit_choice, everything))
        # The uniform maps within every budget are measured too, and taken at the end if
        # better than the refined map: additive ratings can prefer a mix worse than plain
        # uniform (one layer holding most weights, a few small layers at 8 bits), which no
        # pair of moves reaches. (Local search from a uniform start fitted the calibration
        # data and lost on held-out data: measured on the MNIST dwsep CNN.)
        uniform: tuple[float, np.ndarray, int] | None = None
        uniform_samples: tuple[np.ndarray, np.ndarray] | None = None
        uniform_split = current_split
        for o in range(len(problem.bits)):
            trial = np.full_like(unit_choice, o)
            if (not problem.unit_allowed[:, o].all()
                    or not problem.is_feasible(problem.expand(trial))):
                continue
            if np.array_equal(trial, unit_choice):  # the map is already this uniform one
                trial_split, trial_samples = current_split, current_samples
            else:
                trial_split = replay.losses(weights_of(trial, everything))
                trial_samples = replay.sample_losses()
                evaluations += 1
            measured = float(trial_split.mean()) - float_loss
            # below 0 (less loss than the float model) is noise: the wider map wins a tie
            if uniform is None or (max(measured, 0.0), -problem.bits[o]) < (
                    max(uniform[0], 0.0), -problem.bits[uniform[2]]):
                uniform, uniform_samples = (measured, trial, o), trial_samples
                uniform_split = trial_split
        # progress in passes over the calibration data where that is the limit
        by_pass = settings.max_passes is not None
        bar = tqdm(total=settings.max_passes if by_pass else settings.max_evals,
                   initial=round(replay.passes, 1) if by_pass else evaluations,
                   desc="refine", unit="pass" if by_pass else "map", disable=not progress,
                   leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} passes "
                   "[{elapsed}<{remaining}{postfix}]" if by_pass else None)
        stopped_by = "converged"
        while True:
            limit = _limit_reached(settings, evaluations, replay.passes, t0)
            if limit is not None:
                stopped_by = limit
                break
            totals = {k: math.fsum(unit_costs[k][u, unit_choice[u]] for u in everything)
                      for k in unit_costs}
            if problem.shared:  # the tables leave shared charges out: the exact totals
                totals.update({k: v for k, v in problem.evaluate(
                    problem.expand(unit_choice)).items() if k in totals})
            slack = {k: problem.budgets[k] - totals[k] for k in unit_costs}
            # Measure the best-rated candidates first; only when none of them improves, the
            # next ones (interactions are what the ratings miss), up to `patience` batches.
            ranked = _neighbours(problem, unit_choice, unit_loss, unit_costs, slack,
                                 settings.candidates * settings.patience)
            # Only a gain clear of the batch-to-batch noise counts: small calibration sets
            # otherwise reward moves that fit them and lose on held-out data.
            best: tuple[float, dict[int, int]] | None = None
            limit = None
            for rank, (_, move) in enumerate(ranked):
                limit = _limit_reached(settings, evaluations, replay.passes, t0)
                if limit is not None:
                    break
                if rank and rank % settings.candidates == 0 and best is not None:
                    break
                trial = unit_choice.copy()
                for u, o in move.items():
                    trial[u] = o
                if not problem.is_feasible(problem.expand(trial)):
                    continue
                trial_split = replay.losses(weights_of(trial, list(move)))
                trial_samples = replay.sample_losses()
                measured = float(trial_split.mean()) - float_loss
                evaluations += 1
                bar.update(round(replay.passes - bar.n, 1) if by_pass else 1)
                if (_clear_gain(trial_split - current_split, current, settings,
                                _paired(trial_samples, current_samples))
                        and (best is None or measured < best[0])):
                    best = (measured, move)
            if best is None:
                stopped_by = limit or "converged"
                break
            moves.append({
                "bits": {n: [problem.bits[unit_choice[u]], problem.bits[o]]
                         for u, o in best[1].items() for n in problem.units[u]},
                "measured": best[0]})
            for u, o in best[1].items():
                unit_choice[u] = o
            current_split = replay.record(weights_of(unit_choice, everything))
            current_samples = replay.sample_losses()
            current = float(current_split.mean()) - float_loss
            bar.set_postfix(measured=f"{current:.4g}")
        bar.close()
        # Where a map measured less loss than the float model, the loss is evidently
        # noisy at this scale (the label loss on few samples): the uniform map must then
        # show the clear gain a move must, or a budget of 8 bits could fall back to
        # uniform INT4 on noise.
        if (uniform is not None and not np.array_equal(uniform[1], unit_choice)
                and current > 0 and uniform[0] < current - settings.min_gain * abs(current)
                and (uniform[0] >= 0 or _clear_gain(
                    uniform_split - current_split, current, settings,
                    _paired(uniform_samples, current_samples)))):
            o = uniform[2]
            moves.append({"bits": {n: [problem.bits[unit_choice[u]], problem.bits[o]]
                                   for u in everything for n in problem.units[u]
                                   if unit_choice[u] != o},
                          "measured": uniform[0], "uniform": problem.bits[o]})
            unit_choice, current = uniform[1], uniform[0]
        passes = replay.passes
    paired = _paired(uniform_samples, float_samples)
    report = Refinement(before, current, evaluations, moves, time.perf_counter() - t0, checked,
                        passes, stopped_by,
                        uniform_bits=None if uniform is None else problem.bits[uniform[2]],
                        uniform_measured=None if uniform is None else uniform[0],
                        uniform_samples=None if paired is None else effective_samples(*paired),
                        samples=None if float_samples is None else len(float_samples[0]))
    log.info("refinement: measured loss increase %.4g -> %.4g in %d evaluations (%.1f passes, "
             "%.1f s), %d moves; stopped: %s", before, current, evaluations, passes,
             report.time_s, len(moves), stopped_by)
    if stopped_by == "time_budget_s" and settings.max_passes is not None:
        log.warning("refinement stopped at its time budget (%.0f s) before its other limits: "
                    "the result depends on this machine's speed; raise Refine.time_budget_s "
                    "for a reproducible map", settings.time_budget_s)
    solution = problem.solution(problem.expand(unit_choice)) if moves else start
    return solution, report


def _check(problem: AllocationProblem, start: Solution,
           resolve: Callable[[AllocationProblem], Solution], settings: Refine, t0: float,
           probe: Callable[[str, int], float], passes: Callable[[], float],
           checked: dict[str, dict[int, list[float]]], *,
           bar_disabled: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Measure each layer alone at its chosen width, correct the table, solve again.

    Returns:
        The corrected ``L x B`` table, the choice of the last solve (None if the table
        never changed) and the number of probes measured.
    """
    table = np.array(problem.sensitivity, dtype=float)
    measured: dict[tuple[int, int], float] = {}
    choice, resolved, n = np.asarray(start.choice), None, 0
    lowered: set[int] = set()
    bar = tqdm(desc="refine: check", unit="layer", disable=bar_disabled, leave=False)
    for _ in range(settings.check_rounds):
        todo = [(i, int(o)) for i, o in enumerate(choice)
                if problem.bits[o] < 32 and (i, int(o)) not in measured]
        if not todo:
            break
        todo.sort(key=lambda io: -table[io])  # largest predicted contribution first
        bar.total = n + len(todo)  # this round's probes; a later round adds its own
        bar.refresh()
        for i, o in todo:
            if _limit_reached(settings, n, passes(), t0, share=0.5) is not None:
                break
            value = probe(problem.layers[i], o)
            if value < 0:  # less loss than float: noise (see planning_rows below)
                lowered.add(i)
            measured[(i, o)] = max(0.0, value)
            checked.setdefault(problem.layers[i], {})[problem.bits[o]] = [
                float(problem.sensitivity[i, o]), measured[(i, o)]]
            n += 1
            bar.update(1)
        before = table.copy()
        for i in {i for i, _ in measured}:
            table[i] = _corrected_row(np.asarray(problem.sensitivity[i], dtype=float),
                                      {o: v for (j, o), v in measured.items() if j == i},
                                      problem.bits)
        # a row measured below zero: no width rated less damaging than a wider one
        table = planning_rows(table, None, problem.bits, sorted(lowered))
        if np.allclose(table, before, rtol=1e-12, atol=0.0):
            break
        choice = np.asarray(resolve(dataclasses.replace(problem, sensitivity=table)).choice)
        resolved = choice
    bar.close()
    log.info("refinement check: %d layer widths measured alone (%d layers), the table "
             "corrected%s", n, len({i for i, _ in measured}),
             "" if resolved is None else " and solved again")
    return table, resolved, n


def _corrected_row(predicted: np.ndarray, measured: Mapping[int, float],
                   bits: Sequence[int]) -> np.ndarray:
    """A layer's table row with measured entries put in and the others scaled by the
    measured / predicted ratio at the nearest measured width (ratio capped to 1e-3…1e3)."""
    row = predicted.copy()
    for o in range(len(row)):
        if o in measured:
            row[o] = measured[o]
            continue
        if bits[o] >= 32:
            continue
        near = min(measured, key=lambda m: (abs(bits[m] - bits[o]), -bits[m]))
        ref = predicted[near]
        if ref > 0 and measured[near] > 0:
            row[o] = predicted[o] * float(np.clip(measured[near] / ref, 1e-3, 1e3))
    return row


def _paired(trial: tuple[np.ndarray, np.ndarray] | None,
            current: tuple[np.ndarray, np.ndarray] | None
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-sample loss differences (trial − current) and their weights, where both have them."""
    if trial is None or current is None:
        return None
    return trial[0] - current[0], trial[1]


def _clear_gain(diff: np.ndarray, current: float, settings: Refine,
                samples: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
    """Whether per-batch loss differences (trial − current) show a real improvement: a
    mean gain of at least ``min_gain`` of the current loss increase and, with three or
    more batches, more than ``min_z`` standard errors of the paired differences; with
    fewer batches, of the paired per-sample differences (``samples``: values and weights)
    where the loss splits by sample."""
    # Gains count down to no damage, not below: a map measuring less loss than the float
    # model (a label loss or custom loss_fn can) measures noise, as a quantizer only adds
    # error; a map at no damage has nothing to gain.
    mean = max(float(diff.mean()), -current)
    if current <= 0 or mean >= -settings.min_gain * abs(current):
        return False
    if diff.size < 3:
        # fewer than three samples' worth of weight (Kish's effective count): no test
        if samples is None or float(np.dot(samples[1], samples[1])) * 3 > 1:
            return True
        sample_mean, se = mean_and_stderr(*samples)
        return max(sample_mean, -current) + settings.min_z * se < 0
    return mean + settings.min_z * float(diff.std(ddof=1)) / math.sqrt(diff.size) < 0
