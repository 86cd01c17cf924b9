"""Moves between allocations, shared by the greedy solver, the ILP's greedy start and
NSGA-II's repair.

Everything here works in the normalised unit space of
:class:`~mpsearch.solvers._reduce.Model`: ``loss`` is ``U x B``, ``shares`` holds one
``U x B`` table per budget, ``limits`` the value each share sum must stay within, and
``allowed`` masks the options still in play. A *move* changes one unit's option; its
*rate* is the loss it changes per unit of budget it uses or frees, budgets combined by
positive weights (the Lagrangian prices: what a unit of each budget is worth at the
optimum of the relaxation).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from mpsearch.problem import BoolArray, FloatArray, IntArray

__all__ = [
    "budget_weight",
    "descend",
    "eject",
    "eject_down",
    "improve",
    "reduce_excess",
    "upgrade",
    "used_shares",
]


def used_shares(shares: Sequence[FloatArray], choice: IntArray) -> list[float]:
    """Each budget's share sum for a unit choice."""
    rows = np.arange(len(choice))
    return [float(s[rows, choice].sum()) for s in shares]


def budget_weight(
    allowed: BoolArray,
    shares: Sequence[FloatArray],
    prices: Sequence[float],
    which: Sequence[int] | None = None,
) -> FloatArray:
    """Budgets combined into one ``U x B`` weight (0 on masked options).

    Args:
        allowed: options in play.
        shares: per-budget share tables.
        prices: per-budget prices (>= 0); a small floor keeps a budget priced at zero
            from being ignored.
        which: budgets to include (default all).
    """
    floor = 1e-6 * max(max(prices, default=0.0), 1.0)
    picked = range(len(shares)) if which is None else which
    weight = np.zeros(allowed.shape)
    for k in picked:
        weight += (prices[k] + floor) * shares[k]
    result: FloatArray = np.where(allowed, weight, 0.0)
    return result


def upgrade(
    choice: IntArray,
    loss: FloatArray,
    allowed: BoolArray,
    weight: FloatArray,
    shares: Sequence[FloatArray],
    limits: Sequence[float],
    *,
    trail: list[tuple[int, int]] | None = None,
) -> IntArray:
    """Greedy upgrades: walk every unit's loss/weight hull upward from ``choice``, steps of
    all units taken in order of loss saved per weight, while every budget holds.

    A unit whose next step does not fit is blocked: its later hull steps build on it.
    Returns a new choice; each move taken is appended to ``trail`` as ``(unit, to)``.
    """
    choice = choice.copy()
    used = used_shares(shares, choice)
    moves: list[tuple[float, int, int, int]] = []  # (-loss saved per weight, unit, step, to)
    for unit, (w_row, l_row, ok) in enumerate(
        zip(weight.tolist(), loss.tolist(), allowed.tolist())
    ):
        at, step = int(choice[unit]), 0
        while True:
            best, to = 0.0, -1
            for b, open_ in enumerate(ok):
                if open_ and l_row[b] < l_row[at] and w_row[b] > w_row[at]:
                    rate = (l_row[at] - l_row[b]) / (w_row[b] - w_row[at])
                    if rate > best:
                        best, to = rate, b
            if to < 0:
                break
            moves.append((-best, unit, step, to))
            at, step = to, step + 1
    moves.sort()
    blocked: set[int] = set()
    for _, unit, _, to in moves:
        if unit in blocked:
            continue
        at = int(choice[unit])
        trial = [u + float(s[unit, to] - s[unit, at]) for u, s in zip(used, shares)]
        if all(t <= c for t, c in zip(trial, limits)):
            choice[unit], used = to, trial
            if trail is not None:
                trail.append((unit, to))
        else:
            blocked.add(unit)  # its later hull steps build on this one
    return choice


def _smallest(values: FloatArray, count: int) -> IntArray:
    """Indices of the ``count`` smallest values (all of them if fewer), in index order."""
    if len(values) <= count:
        return np.arange(len(values))
    picked: IntArray = np.sort(np.argpartition(values, count - 1)[:count])
    return picked


def _down_moves(loss: FloatArray, allowed: BoolArray, weight: FloatArray, choice: IntArray,
                units: IntArray) -> tuple[FloatArray, FloatArray, IntArray]:
    """Each unit's down move adding the least loss per weight freed (the most weight
    freed on a tie): (rate, freed, to); rate is inf where no option frees weight."""
    at = choice[units]
    freed = weight[units, at][:, None] - weight[units]
    ok = allowed[units] & (freed > 0)
    added = loss[units] - loss[units, at][:, None]
    rate = np.where(ok, added / np.where(ok, freed, 1.0), np.inf)
    best = rate.min(axis=1)
    to = np.where(ok & (rate == best[:, None]), freed, -np.inf).argmax(axis=1)
    return best, freed[np.arange(len(units)), to], to


def _next_down(l_row: list[float], w_row: list[float], ok: list[bool], at: int
               ) -> tuple[float, float, int] | None:
    """One unit's entry of :func:`_down_moves` in plain Python: (rate, -freed, to)."""
    best: tuple[float, float, int] | None = None
    for b, open_ in enumerate(ok):
        freed = w_row[at] - w_row[b]
        if open_ and freed > 0:
            candidate = ((l_row[b] - l_row[at]) / freed, -freed, b)
            if best is None or candidate < best:
                best = candidate
    return best


def descend(
    choice: IntArray,
    loss: FloatArray,
    allowed: BoolArray,
    shares: Sequence[FloatArray],
    limits: Sequence[float],
    prices: Sequence[float],
) -> IntArray | None:
    """Greedy downgrades until every budget holds: repeatedly the move (one unit to a
    cheaper option) adding the least loss per unit of over-spent budget freed.

    Budgets are weighted by ``prices``; only the over-spent ones count, and the weights
    are rebuilt when that set changes. Returns a new choice, or ``None`` when no move
    frees an over-spent budget any more.
    """
    choice = choice.copy()
    used = used_shares(shares, choice)
    # A move can overspend another budget; bound the rebuilds so that cannot cycle.
    for _ in range(4 * len(shares) + 4):
        over = [k for k, (u, c) in enumerate(zip(used, limits)) if u > c]
        if not over:
            return choice
        weight = budget_weight(allowed, shares, prices, over)
        units = np.arange(len(choice))
        rate, freed, to = _down_moves(loss, allowed, weight, choice, units)
        movable = np.flatnonzero(np.isfinite(rate))
        heap = list(zip(rate[movable].tolist(), (-freed[movable]).tolist(), movable.tolist(),
                        to[movable].tolist()))
        heapq.heapify(heap)
        changed = False
        while heap and not changed:
            _, _, unit, step = heapq.heappop(heap)
            at = int(choice[unit])
            choice[unit] = step
            for k, s in enumerate(shares):
                used[k] += float(s[unit, step] - s[unit, at])
            now_over = [k for k, (u, c) in enumerate(zip(used, limits)) if u > c]
            if not now_over:
                return choice
            changed = now_over != over
            entry = _next_down(loss[unit].tolist(), weight[unit].tolist(),
                               allowed[unit].tolist(), step)
            if entry is not None:
                heapq.heappush(heap, (*entry[:2], unit, entry[2]))
        if not changed:
            return None
        used = used_shares(shares, choice)  # drop the drift of incremental sums
    return None


def reduce_excess(
    choice: IntArray,
    loss: FloatArray,
    allowed: BoolArray,
    shares: Sequence[FloatArray],
    limits: Sequence[float],
    *,
    max_rounds: int = 10_000,
) -> IntArray | None:
    """Feasibility search for when :func:`descend` stalls (budgets pulling apart): take
    the move, or else the pair of moves, cutting the summed overspend the most (least
    loss added on ties) until every budget holds. ``None`` if it stalls too."""
    choice = choice.copy()
    n_units, n_options = loss.shape
    rows = np.arange(n_units)
    stacked = np.stack(shares)
    capacity = np.asarray(limits, dtype=np.float64)[:, None]
    masked = np.where(allowed, loss, np.inf)
    for _ in range(max_rounds):
        used = stacked[:, rows, choice].sum(axis=1)
        excess = float(np.maximum(used - capacity[:, 0], 0.0).sum())
        if excess <= 0.0:
            return choice
        delta = (stacked - stacked[:, rows, choice][:, :, None]).reshape(len(shares), -1)
        delta_loss = (masked - masked[rows, choice][:, None]).ravel()
        open_ = np.isfinite(delta_loss)
        after = np.maximum(used[:, None] + delta - capacity, 0.0).sum(axis=0)
        after = np.where(open_, after, np.inf)
        best = int(np.lexsort((delta_loss, after))[0])
        if after[best] < excess * (1 - 1e-12):
            choice[best // n_options] = best % n_options
            continue
        # Pairs among the moves that cut some budget's overspend on their own.
        over = used > capacity[:, 0]
        helps = np.flatnonzero(open_ & (delta[over] < 0).any(axis=0))[: 64 * n_options]
        if len(helps) < 2:
            return None
        pair = used[:, None, None] + delta[:, helps][:, :, None] + delta[:, helps][:, None, :]
        after_pair = np.maximum(pair - capacity[:, :, None], 0.0).sum(axis=0)
        units = helps // n_options
        after_pair[units[:, None] == units[None, :]] = np.inf
        i, j = divmod(int(after_pair.argmin()), len(helps))
        if not after_pair[i, j] < excess * (1 - 1e-12):
            return None
        for move in (int(helps[i]), int(helps[j])):
            choice[move // n_options] = move % n_options
    return None


def _accept(moves: IntArray, choice: IntArray, delta_share: FloatArray, slack: FloatArray,
            n_options: int) -> int:
    """Take improving moves in the order given while they touch distinct units and fit
    the slack together. ``moves`` is ``G x M``: each row one or more flat (unit, option)
    indices taken together."""
    flat_share = delta_share.reshape(len(slack), -1)
    needs = flat_share[:, moves].sum(axis=2).T.tolist()  # G x K
    left = slack.tolist()
    touched: set[int] = set()
    taken = 0
    for group, need in zip(moves.tolist(), needs):
        units = [move // n_options for move in group]
        if touched.intersection(units) or any(n > room for n, room in zip(need, left)):
            continue
        left = [room - n for room, n in zip(left, need)]
        touched.update(units)
        for move, unit in zip(group, units):
            choice[unit] = move % n_options
        taken += len(group)
    return taken


def improve(
    choice: IntArray,
    loss: FloatArray,
    allowed: BoolArray,
    shares: Sequence[FloatArray],
    limits: Sequence[float],
    *,
    candidates: int = 32,
    max_rounds: int = 10_000,
    pairs: bool = True,
) -> tuple[IntArray, int]:
    """Local search from a feasible choice: take loss-reducing moves that fit, else pairs
    (one unit up, another down to pay for it), until none improves.

    Each round takes the best moves (or pairs) first, then any others on distinct units
    that still fit together. Pairs are searched between every move that frees budget
    and the ``candidates`` up moves saving the most loss plus the ``candidates`` saving
    the most per budget used; ``pairs=False`` takes single moves only (a cheap fill).

    Returns:
        The improved choice (new array) and the number of moves taken.
    """
    choice = choice.copy()
    n_units, n_options = loss.shape
    rows = np.arange(n_units)
    stacked = np.stack(shares) if shares else np.zeros((0, *loss.shape))
    capacity = np.asarray(limits, dtype=np.float64)
    masked = np.where(allowed, loss, np.inf)
    tolerance = 1e-12 * max(float(np.abs(np.where(allowed, loss, 0.0)).max(initial=0.0)), 1e-300)
    taken = 0
    for _ in range(max_rounds):
        delta_loss = masked - masked[rows, choice][:, None]
        delta_share = stacked - stacked[:, rows, choice][:, :, None]
        slack = capacity - stacked[:, rows, choice].sum(axis=1)
        fits = (delta_share <= slack[:, None, None]).all(axis=0)
        better = delta_loss < -tolerance
        single = np.flatnonzero(better & fits)
        if len(single):
            order = single[_smallest(delta_loss.flat[single], 4 * candidates)]
            order = order[np.argsort(delta_loss.flat[order], kind="stable")]
            taken += _accept(order[:, None], choice, delta_share, slack, n_options)
            continue
        up = np.flatnonzero(better)  # none fits alone
        if not (pairs and len(up) and len(shares)):
            break
        up_loss = delta_loss.flat[up]
        up_share = delta_share.reshape(len(shares), -1)[:, up]
        spend = np.maximum(up_share - np.maximum(slack, 0.0)[:, None], 0.0).sum(axis=0)
        keep = np.union1d(_smallest(up_loss, candidates),
                          _smallest(up_loss / np.maximum(spend, 1e-300), candidates))
        up, up_loss, up_share = up[keep], up_loss[keep], up_share[:, keep]
        # A partner must free budget and add less loss than the best up move saves.
        frees = (delta_share < 0).any(axis=0) & (delta_loss < -float(up_loss.min()))
        frees[rows, choice] = False
        down = np.flatnonzero(frees)
        if not len(down):
            break
        gain = up_loss[:, None] + delta_loss.flat[down][None, :]
        ok = gain < -tolerance
        ok &= (up // n_options)[:, None] != (down // n_options)[None, :]
        for k in range(len(shares)):
            ok &= (up_share[k][:, None] + delta_share[k].flat[down][None, :]) <= slack[k]
        gain = np.where(ok, gain, np.inf)
        partner = gain.argmin(axis=1)
        best = gain[np.arange(len(up)), partner]
        found = np.flatnonzero(np.isfinite(best))
        if not len(found):
            break
        found = found[np.argsort(best[found], kind="stable")]
        chosen = np.column_stack([up[found], down[partner[found]]])
        taken += _accept(chosen, choice, delta_share, slack, n_options)
    return choice, taken


def eject(
    choice: IntArray,
    loss: FloatArray,
    allowed: BoolArray,
    shares: Sequence[FloatArray],
    limits: Sequence[float],
    prices: Sequence[float],
    *,
    candidates: int = 8,
) -> IntArray | None:
    """One move up that does not fit, paid for by greedy downgrades of the other units
    (:func:`descend` with the moved unit held), any room left over filled by single
    loss-reducing moves: an exchange of any number of units.

    Tries the ``candidates`` up moves saving the most loss; returns the best resulting
    choice if it has less loss than ``choice``, else ``None``.
    """
    rows = np.arange(len(choice))
    masked = np.where(allowed, loss, np.inf)
    current = masked[rows, choice]
    saving = masked - current[:, None]
    up = np.flatnonzero(saving < 0)
    if not len(up):
        return None
    up = up[_smallest(saving.flat[up], candidates)]
    total = float(current.sum())
    best, best_loss = None, total - 1e-12 * max(abs(total), 1e-300)
    held = allowed.copy()
    for move in up.tolist():
        unit, to = divmod(move, loss.shape[1])
        trial = choice.copy()
        trial[unit] = to
        held[unit] = False
        held[unit, to] = True
        result = descend(trial, loss, held, shares, limits, prices)
        held[unit] = allowed[unit]
        if result is None:
            continue
        result, _ = improve(result, loss, allowed, shares, limits, pairs=False)
        value = float(masked[rows, result].sum())
        if value < best_loss:
            best, best_loss = result, value
    return best


def eject_down(
    choice: IntArray,
    loss: FloatArray,
    allowed: BoolArray,
    weight: FloatArray,
    shares: Sequence[FloatArray],
    limits: Sequence[float],
    *,
    candidates: int = 8,
) -> IntArray | None:
    """The mirror of :func:`eject`: one move down that frees budget, the room it leaves
    filled by single loss-reducing moves of the other units (moved unit held).

    Tries the ``candidates`` down moves adding the least loss per weight freed; returns
    the best resulting choice if it has less loss than ``choice``, else ``None``.
    """
    rows = np.arange(len(choice))
    masked = np.where(allowed, loss, np.inf)
    current = masked[rows, choice]
    freed = weight[rows, choice][:, None] - weight
    added = masked - current[:, None]
    down = np.flatnonzero((freed > 0) & np.isfinite(added))
    if not len(down):
        return None
    down = down[_smallest(added.flat[down] / freed.flat[down], candidates)]
    total = float(current.sum())
    best, best_loss = None, total - 1e-12 * max(abs(total), 1e-300)
    held = allowed.copy()
    for move in down.tolist():
        unit, to = divmod(move, loss.shape[1])
        trial = choice.copy()
        trial[unit] = to
        held[unit] = False
        held[unit, to] = True
        result, _ = improve(trial, loss, held, shares, limits, pairs=False)
        held[unit] = allowed[unit]
        value = float(masked[rows, result].sum())
        if value < best_loss:
            best, best_loss = result, value
    return best
