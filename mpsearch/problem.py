"""The bit-allocation problem every solver sees, and what solvers hand back.

An :class:`AllocationProblem` is plain numpy: one row per layer, one column per bits
option. A solver picks one column per layer so that the summed sensitivity (predicted
loss increase) is smallest while every budgeted cost sum stays within its limit.
Solvers return a :class:`~mpsearch.front.Front` of :class:`~mpsearch.front.Solution`
objects (in ``front.py``). No torch in here.

Tied layers (fusion groups such as q/k/v) must take the same option; solvers treat each
tie group, and each untied layer, as one *unit* whose table row is the sum of its
members' rows (:meth:`AllocationProblem.unit_table`).

A cost may also hold a part that is not a sum over layers: a :class:`SharedCost` is paid
once per distinct option that any layer of a group takes (the scales that the parts of a
Linear cut by input features share at each width). Solvers that work on sums alone solve
:meth:`AllocationProblem.conservative`, which charges every layer of the group in full.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mpsearch.errors import InfeasibleBudget
from mpsearch.front import BoolArray, FloatArray, Front, IntArray, Solution

__all__ = ["AllocationProblem", "BoolArray", "FloatArray", "Front", "IntArray", "SharedCost",
           "Solution"]



def _frozen(array: NDArray[Any]) -> NDArray[Any]:
    array.flags.writeable = False
    return array


def _table(name: str, values: ArrayLike, shape: tuple[int, int]) -> FloatArray:
    try:
        table = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric {shape[0]}x{shape[1]} array: {error}")
    if table.shape != shape:
        raise ValueError(
            f"{name} has shape {table.shape}; expected (n_layers, n_options) = {shape}"
        )
    return table


def _merge_ties(groups: Sequence[Sequence[str]], index: Mapping[str, int]) -> list[list[int]]:
    """Union overlapping tie groups; returns groups of >= 2 layer indices, in layer order."""
    parent = list(range(len(index)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for number, group in enumerate(groups):
        if isinstance(group, str) or len(group) == 0:
            raise ValueError(
                f"ties[{number}] is {group!r}; each tie group must be a non-empty "
                "sequence of layer names, e.g. ('q', 'k', 'v')"
            )
        unknown = [name for name in group if name not in index]
        if unknown:
            raise ValueError(f"ties[{number}] names unknown layers {unknown}")
        first = root(index[group[0]])
        for name in group[1:]:
            parent[root(index[name])] = first
    members: dict[int, list[int]] = {}
    for i in range(len(index)):
        members.setdefault(root(i), []).append(i)
    return [group for group in members.values() if len(group) > 1]


#: options up to which min_cost enumerates every set of options a shared group may use
_MAX_SUBSET_OPTIONS = 8


@dataclass(frozen=True)
class SharedCost:
    """A part of cost ``cost`` paid once for each distinct option that the ``layers`` take:
    ``charge[o]`` when at least one of them takes option ``o``.

    The parts of a Linear cut by input features keep the whole layer's rows, so the
    rows' scales are stored once per width the parts use, not once per part.
    """

    cost: str
    layers: tuple[str, ...]
    charge: tuple[float, ...]


@dataclass(frozen=True, init=False, eq=False, repr=False)
class AllocationProblem:
    """Choose one bits option per layer: least summed sensitivity within every budget.

    Args:
        layers: layer names (FQNs), unique.
        bits: the bits options (columns), unique ints, e.g. ``(2, 4, 8)``.
        sensitivity: ``L x B`` predicted loss increase of each layer at each option.
            Must be finite everywhere; mark unavailable options with ``allowed``.
        costs: cost name -> ``L x B`` table, e.g. ``"avg_bits"``, ``"size_bytes"``,
            ``"bops"``, ``"latency_us"``; a choice's cost is the sum over layers.
        budgets: cost name -> upper limit on that sum; keys must be cost names.
        ties: groups of layer names that must take the same option. Overlapping groups
            are merged into one (fusion groups found separately may share a layer).
        pinned: layer -> the bits value it must take.
        allowed: ``L x B`` bool; ``False`` means the option is not offered for that
            layer (e.g. no kernel). Default: everything allowed.
        shared: parts of costs paid once per distinct option a group of layers takes
            (:class:`SharedCost`), on top of the ``costs`` tables.

    Raises:
        ValueError: an input is malformed or contradictory (the message names the value
            and what would work).

    Tables are stored as read-only float64 copies (``allowed`` as bool); ``ties`` is
    stored merged, as groups of at least two layers in layer order. Sums over layers are
    correctly rounded (``math.fsum``), so a budget set to :meth:`min_cost` is met exactly.

    Solvers work on *units* (a tie group or a lone layer): see :attr:`units`,
    :attr:`unit_of`, :attr:`unit_allowed` (which folds in ties, pins and ``allowed``),
    :meth:`unit_table` and :meth:`expand`.
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    sensitivity: FloatArray
    costs: Mapping[str, FloatArray]
    budgets: Mapping[str, float]
    ties: tuple[tuple[str, ...], ...]
    pinned: Mapping[str, int]
    allowed: BoolArray
    shared: tuple[SharedCost, ...]
    _shared_rows: tuple[tuple[str, IntArray, FloatArray], ...] = field(init=False, repr=False)
    _units: tuple[tuple[str, ...], ...] = field(init=False, repr=False)
    _unit_of: IntArray = field(init=False, repr=False)
    _first_layer: IntArray = field(init=False, repr=False)
    _unit_allowed: BoolArray = field(init=False, repr=False)

    # A hand-written __init__ because fields accept ArrayLike but hold read-only numpy
    # arrays; dataclasses.replace() still works (it calls __init__ by field name).
    def __init__(
        self,
        layers: Sequence[str],
        bits: Sequence[int],
        sensitivity: ArrayLike,
        costs: Mapping[str, ArrayLike],
        budgets: Mapping[str, float],
        *,
        ties: Sequence[Sequence[str]] = (),
        pinned: Mapping[str, int] | None = None,
        allowed: ArrayLike | None = None,
        shared: Sequence[SharedCost] = (),
    ) -> None:
        put = object.__setattr__
        names = tuple(layers)
        if not names or not all(isinstance(name, str) for name in names):
            raise ValueError(f"layers must be a non-empty sequence of names, got {layers!r}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"layer names must be unique; repeated: {duplicates}")
        options = tuple(bits)
        if not options or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in options
        ):
            raise ValueError(f"bits must be a non-empty sequence of ints, got {bits!r}")
        options = tuple(int(b) for b in options)
        if len(set(options)) != len(options):
            raise ValueError(f"bits options must be unique, got {options}")
        shape = (len(names), len(options))
        put(self, "layers", names)
        put(self, "bits", options)

        table = _table("sensitivity", sensitivity, shape)
        self._require_finite("sensitivity", table)
        put(self, "sensitivity", _frozen(table))

        cost_tables: dict[str, FloatArray] = {}
        for name, values in costs.items():
            if not isinstance(name, str) or name == "loss":
                raise ValueError(f"cost names must be strings other than 'loss', got {name!r}")
            cost_tables[name] = _frozen(_table(f"costs[{name!r}]", values, shape))
            self._require_finite(f"costs[{name!r}]", cost_tables[name])
        put(self, "costs", cost_tables)

        limits: dict[str, float] = {}
        for name, limit in budgets.items():
            if name not in cost_tables:
                raise ValueError(
                    f"budget {name!r} has no cost table; budgets must name one of "
                    f"{sorted(cost_tables)}"
                )
            if not math.isfinite(float(limit)):
                raise ValueError(
                    f"budget {name}={limit} must be finite; leave {name!r} out of budgets "
                    "for no limit"
                )
            limits[name] = float(limit)
        put(self, "budgets", limits)

        if allowed is None:
            mask = np.ones(shape, dtype=bool)
        else:
            raw = np.array(allowed)
            if raw.shape != shape or not (raw.dtype == bool or np.isin(raw, (0, 1)).all()):
                raise ValueError(
                    f"allowed must be a {shape[0]}x{shape[1]} bool array, got shape "
                    f"{raw.shape} and dtype {raw.dtype}"
                )
            mask = raw.astype(bool)
        empty = [names[i] for i in np.flatnonzero(~mask.any(axis=1))]
        if empty:
            raise ValueError(f"layers {empty[:5]} have no allowed bits option; allow at least one")
        put(self, "allowed", _frozen(mask))

        index = {name: i for i, name in enumerate(names)}
        groups = _merge_ties(ties, index)
        put(self, "ties", tuple(tuple(names[i] for i in group) for group in groups))

        pins: dict[str, int] = {}
        for name, value in (pinned or {}).items():
            if name not in index:
                raise ValueError(f"pinned layer {name!r} is not one of the layers")
            if value not in options:
                raise ValueError(f"pinned {name!r} to {value} bits; bits options are {options}")
            if not mask[index[name], options.index(value)]:
                raise ValueError(
                    f"pinned {name!r} to {value} bits, which allowed marks unavailable for it; "
                    f"it allows {self._allowed_bits(index[name])}"
                )
            pins[name] = int(value)
        put(self, "pinned", pins)
        self._build_units(groups)
        rows: list[tuple[str, IntArray, FloatArray]] = []
        for part in shared:
            if not isinstance(part, SharedCost) or part.cost not in cost_tables:
                raise ValueError(f"shared costs must be SharedCost of one of the costs "
                                 f"{sorted(cost_tables)}, got {part!r}")
            unknown = [name for name in part.layers if name not in index]
            if unknown or not part.layers or len(set(part.layers)) != len(part.layers):
                raise ValueError(f"shared cost {part.cost!r} names unknown or repeated layers "
                                 f"{unknown or list(part.layers)}")
            charge = np.array(part.charge, dtype=float)
            if (charge.shape != (len(options),) or not np.isfinite(charge).all()
                    or (charge < 0).any()):
                raise ValueError(f"shared cost {part.cost!r} needs one finite charge >= 0 per "
                                 f"bits option {options}, got {part.charge}")
            rows.append((part.cost, np.array([index[n] for n in part.layers]), _frozen(charge)))
        put(self, "shared", tuple(shared))
        put(self, "_shared_rows", tuple(rows))

    def _require_finite(self, name: str, table: FloatArray) -> None:
        bad = np.argwhere(~np.isfinite(table))
        if len(bad):
            row, col = bad[0]
            raise ValueError(
                f"{name}[{self.layers[row]!r}, {self.bits[col]} bits] is {table[row, col]}; "
                f"{name} must be finite everywhere ({len(bad)} entries are not); mark "
                "unavailable options with allowed=False instead"
            )

    def _allowed_bits(self, layer: int) -> list[int]:
        return [b for b, ok in zip(self.bits, self.allowed[layer]) if ok]

    def _build_units(self, groups: list[list[int]]) -> None:
        unit_of = np.full(self.n_layers, -1, dtype=np.int64)
        for number, group in enumerate(groups):
            unit_of[group] = number
        members: list[list[int]] = [list(group) for group in groups]
        for i in np.flatnonzero(unit_of < 0):
            unit_of[i] = len(members)
            members.append([int(i)])
        # Number units by their first layer so unit order follows layer order.
        order = sorted(range(len(members)), key=lambda u: members[u][0])
        members = [members[u] for u in order]
        unit_of = np.empty(self.n_layers, dtype=np.int64)
        for unit, group in enumerate(members):
            unit_of[group] = unit
        unit_allowed = np.ones((len(members), self.n_options), dtype=bool)
        np.logical_and.at(unit_allowed, unit_of, self.allowed)
        for unit, group in enumerate(members):
            names = [self.layers[i] for i in group]
            if not unit_allowed[unit].any():
                offered = {name: self._allowed_bits(i) for name, i in zip(names, group)}
                raise ValueError(
                    f"tie group {names} has no bits option allowed for all its layers: "
                    f"{offered}; allow a common option or untie them"
                )
            pins = {name: self.pinned[name] for name in names if name in self.pinned}
            if len(set(pins.values())) > 1:
                raise ValueError(f"pins inside tie group {names} disagree: {pins}; pin one value")
            if pins:
                value = next(iter(pins.values()))
                column = self.bits.index(value)
                if not unit_allowed[unit, column]:
                    raise ValueError(
                        f"{pins} pins tie group {names} to {value} bits, which is not allowed "
                        f"for all of them; common options: "
                        f"{[b for b, ok in zip(self.bits, unit_allowed[unit]) if ok]}"
                    )
                unit_allowed[unit] = False
                unit_allowed[unit, column] = True
        put = object.__setattr__
        put(self, "_unit_of", _frozen(unit_of))
        put(self, "_first_layer", _frozen(np.array([g[0] for g in members], dtype=np.int64)))
        put(self, "_units", tuple(tuple(self.layers[i] for i in g) for g in members))
        put(self, "_unit_allowed", _frozen(unit_allowed))

    def __repr__(self) -> str:
        return (
            f"AllocationProblem(n_layers={self.n_layers}, bits={self.bits}, "
            f"costs={list(self.costs)}, budgets={self.budgets}, n_units={self.n_units}, "
            f"pinned={len(self.pinned)}, shared={len(self.shared)})"
        )

    @property
    def n_layers(self) -> int:
        """Number of layers (rows)."""
        return len(self.layers)

    @property
    def n_options(self) -> int:
        """Number of bits options (columns)."""
        return len(self.bits)

    @property
    def n_units(self) -> int:
        """Number of decision units: tie groups plus untied layers."""
        return len(self._units)

    @property
    def units(self) -> tuple[tuple[str, ...], ...]:
        """Layer names of each unit, units ordered by their first layer."""
        return self._units

    @property
    def unit_of(self) -> IntArray:
        """Length-``L`` read-only array: the unit index of each layer."""
        return self._unit_of

    @property
    def unit_allowed(self) -> BoolArray:
        """``U x B`` read-only bool: options open to each unit (common allowed, pins)."""
        return self._unit_allowed

    def unit_table(self, values: ArrayLike) -> FloatArray:
        """Sum an ``L x B`` table over each unit's layers, giving ``U x B``.

        Args:
            values: per-layer table, e.g. ``problem.sensitivity`` or ``problem.costs[k]``.

        Returns:
            A new ``U x B`` float64 array.
        """
        table = _table("values", values, (self.n_layers, self.n_options))
        out = np.zeros((self.n_units, self.n_options))
        np.add.at(out, self._unit_of, table)
        return out

    def expand(self, unit_choice: ArrayLike) -> IntArray:
        """Turn one option index per unit into one option index per layer.

        Args:
            unit_choice: length-``U`` option indices (into ``bits``).

        Returns:
            Length-``L`` int64 array.
        """
        choice = np.asarray(unit_choice, dtype=np.int64)
        if choice.shape != (self.n_units,):
            raise ValueError(f"unit_choice has shape {choice.shape}; expected ({self.n_units},)")
        result: IntArray = choice[self._unit_of]
        return result

    def _choice(self, choice: ArrayLike) -> IntArray:
        raw = np.asarray(choice)
        if raw.shape != (self.n_layers,) or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(
                f"choice must be {self.n_layers} integer option indices, got shape "
                f"{raw.shape} and dtype {raw.dtype}"
            )
        if raw.size and (raw.min() < 0 or raw.max() >= self.n_options):
            raise ValueError(f"choice indices must lie in [0, {self.n_options}), got {raw}")
        return raw.astype(np.int64)

    def _sum(self, table: FloatArray, choice: IntArray) -> float:
        # fsum is correctly rounded, so a total never depends on summation order: a budget
        # set to min_cost() is met exactly by the choice that achieves it.
        return math.fsum(table[np.arange(self.n_layers), choice].tolist())

    def _cost(self, name: str, choice: IntArray) -> float:
        """Cost ``name`` of a choice: its table summed, and its shared charges."""
        terms = self.costs[name][np.arange(self.n_layers), choice].tolist()
        for cost, members, charge in self._shared_rows:
            if cost == name:
                terms += charge[np.unique(choice[members])].tolist()
        return math.fsum(terms)

    def shared_charges(self, name: str) -> list[tuple[IntArray, FloatArray]]:
        """The shared charges of cost ``name``: (layer indices, charge per option) each."""
        return [(members, charge) for cost, members, charge in self._shared_rows
                if cost == name]

    def conservative(self) -> AllocationProblem:
        """The problem with every shared charge folded into the table of each layer of its
        group: costs only sums over layers, each at least the exact one, so whatever meets
        its budgets meets this problem's. Itself when nothing is shared."""
        if not self.shared:
            return self
        costs = {name: table.copy() for name, table in self.costs.items()}
        for cost, members, charge in self._shared_rows:
            costs[cost][members] += charge
        return AllocationProblem(self.layers, self.bits, self.sensitivity, costs, self.budgets,
                                 ties=self.ties, pinned=self.pinned, allowed=self.allowed)

    def evaluate(self, choice: ArrayLike) -> dict[str, float]:
        """Loss and every cost of a choice.

        Args:
            choice: length-``L`` int array, the option index (into ``bits``) per layer.

        Returns:
            ``{"loss": summed sensitivity, <cost name>: summed cost, ...}``.
        """
        picked = self._choice(choice)
        result = {"loss": self._sum(self.sensitivity, picked)}
        for name in self.costs:
            result[name] = self._cost(name, picked)
        return result

    def is_feasible(self, choice: ArrayLike) -> bool:
        """Whether a choice respects allowed options, ties, pins and every budget."""
        picked = self._choice(choice)
        if not (picked == picked[self._first_layer[self._unit_of]]).all():
            return False
        if not self._unit_allowed[self._unit_of, picked].all():
            return False
        return all(self._cost(k, picked) <= limit for k, limit in self.budgets.items())

    def _extreme_choice(self, name: str, largest: bool) -> IntArray:
        if name not in self.costs:
            raise ValueError(f"unknown cost {name!r}; costs are {sorted(self.costs)}")
        sign = -1.0 if largest else 1.0
        groups = [np.unique(self._unit_of[members]) for members, _ in self.shared_charges(name)]
        charges = [charge for _, charge in self.shared_charges(name)]
        exact = (len(self.bits) <= _MAX_SUBSET_OPTIONS
                 and sum(len(g) for g in groups) == len(np.unique(np.concatenate(groups)))
                 if groups else True)
        table = self.unit_table((self if exact else self.conservative()).costs[name])
        value = np.where(self._unit_allowed, sign * table, np.inf)
        unit_choice = value.argmin(axis=1)
        for units, charge in zip(groups, charges) if exact else ():
            # Every set of options the group may use: each unit takes its extreme within
            # the set. The set the best choice uses is among them, so the least of their
            # exact costs is the minimum (the largest, for a maximum, is a lower bound).
            best: tuple[float, IntArray] | None = None
            for mask in range(1, 2 ** len(self.bits)):
                used = np.array([(mask >> o) & 1 for o in range(len(self.bits))], dtype=bool)
                within = np.where(used, value[units], np.inf)
                pick = within.argmin(axis=1)
                rows = within[np.arange(len(units)), pick]
                if not np.isfinite(rows).all():
                    continue
                total = math.fsum([*rows.tolist(), *(sign * charge[np.unique(pick)]).tolist()])
                if best is None or total < best[0]:
                    best = (total, pick)
            assert best is not None  # the set of every option covers each unit
            unit_choice[units] = best[1]
        return self.expand(unit_choice)

    def min_cost(self, name: str) -> float:
        """Smallest achievable sum of cost ``name`` under ties, pins and allowed options
        (with shared charges: exact where no unit is in two groups and there are at most
        :data:`_MAX_SUBSET_OPTIONS` options, else that of the cheapest choice with every
        charge paid in full, an upper bound)."""
        return self._cost(name, self._extreme_choice(name, largest=False))

    def max_cost(self, name: str) -> float:
        """Largest achievable sum of cost ``name`` under ties, pins and allowed options
        (with shared charges: the largest of the choices tried for :meth:`min_cost`'s
        search, turned round, which can fall short of the true largest)."""
        return self._cost(name, self._extreme_choice(name, largest=True))

    def check_budgets(self) -> None:
        """Raise if any single budget is below the smallest achievable value of its cost.

        Raises:
            InfeasibleBudget: with ``.smallest`` holding the min of every budgeted cost.
        """
        smallest = {name: self.min_cost(name) for name in self.budgets}
        problems = []
        for name, limit in self.budgets.items():
            if limit < smallest[name]:
                hint = ""
                choice = self._extreme_choice(name, largest=False)
                if (choice == choice[0]).all():
                    hint = f" (all layers at {self.bits[choice[0]]} bits)"
                shown, least = f"{limit:.6g}", f"{smallest[name]:.6g}"
                if shown == least:  # 1.9999999 against 2: both digits in full
                    shown, least = repr(float(limit)), repr(float(smallest[name]))
                problems.append(
                    f"{name}={shown} is below the smallest achievable {least}" + hint)
        if problems:
            raise InfeasibleBudget("; ".join(problems), smallest)

    def with_budgets(self, budgets: Mapping[str, float]) -> AllocationProblem:
        """The same problem with ``budgets`` replacing the current ones."""
        return dataclasses.replace(self, budgets=budgets)

    def solution(self, choice: ArrayLike) -> Solution:
        """Wrap a choice as a :class:`Solution` with its loss, costs and bits per layer."""
        picked = _frozen(self._choice(choice).copy())
        values = self.evaluate(picked)
        loss = values.pop("loss")
        bits = {name: self.bits[c] for name, c in zip(self.layers, picked.tolist())}
        return Solution(choice=picked, bits=bits, loss=loss, costs=values)
