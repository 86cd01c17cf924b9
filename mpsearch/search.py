"""``search``: discover → sensitivity → cost → problem → solver → bit map."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from torch import Tensor, nn

from mpsearch._io import batch_tensors, tensor_digest
from mpsearch._report import HeldLogs, some, warn_once, width_name
from mpsearch._state import backward_hooks_off, outside_inference_mode, preserved
from mpsearch.batches import Batch, batch_rows, materialize, model_device
from mpsearch.bitmap import BitMap, LayerEntry, _provenance
from mpsearch.budget import Budget
from mpsearch.costs import cost_tables, latency_cost_table, shared_scales
from mpsearch.errors import InfeasibleBudget
from mpsearch.layers import (
    RNN_KINDS,
    LayerInfo,
    Patterns,
    as_patterns,
    discover,
    fingerprint,
    idle_layers,
    layer_kind,
    layer_weight,
    plain_weights,
    quantizable_modules,
    require_values,
    unsearched_weights,
    weights_read,
)
from mpsearch.losses import LossSpec, Objective
from mpsearch.problem import AllocationProblem, Front, Solution
from mpsearch.quant import SUPPORTED_BITS, QuantConfig
from mpsearch.quant.apply import weight_cache
from mpsearch.refine import Refine, Refinement
from mpsearch.refine import refine as refine_map
from mpsearch.sensitivity import ESTIMATORS, Estimator, SensitivityTable
from mpsearch.slices import (
    PART,
    SlicePlan,
    is_sliced,
    plan_slices,
    reference_bits,
    slice_model,
    slice_scores,
    sliceable_layers,
)
from mpsearch.solvers import Solver, check_solver, solve

if TYPE_CHECKING:
    from mpsearch.hw.profile_data import HardwareProfile

log = logging.getLogger(__name__)

Ties = Sequence[Sequence[str]] | Literal["fused"] | None

DEFAULT_SENSITIVITY = "qerror"
"""The estimator ``search`` uses unless told otherwise (chosen by the fidelity benchmark)."""

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
"""Candidate bit-widths for size budgets: llama.cpp's k-quant widths. Finer steps than
(2, 3, 4, 8) let the solver trade a bit between layers without jumping to 8."""

DEFAULT_BITS_PROFILE = (2, 3, 4, 8, 32)
"""Candidate bit-widths with a hardware profile (each only where a kernel exists)."""

AUTO_SLICES = 16
"""Slices per layer of ``slices="auto"`` where it slices. Chosen (on the MNIST weights an
earlier machine trained, before seed 0 was shipped) with output-channel slices only: on
the MNIST CNN 4 slices gave 4.6×, 8 gave 8.7-8.9×, 16 gave 8.2-9.3×
below uniform INT4; on the MLP of ``results/unseen_models.md`` 8 → 16 went from 4.32× to
4.9-5.3×; some models that pass with a margin lost a little (the depthwise-separable CNN
7.1× → 6.5×, a ResNet 13× → 11×), others gained (ONet 30× → 48×). With slices by input
features too (``results/slices.md``): the MNIST CNN 6.9× with 4, 7.0-15× with 8, 6.9-8.8×
with 16; in an experiment 32 slices on two MNIST MLPs (fisher, qerror) gave 3.8-7.9×
against 4.2-9.7× with 16."""

AUTO_SLICE_LAYERS = 5.0
"""``slices="auto"`` slices where the searched weights sit in fewer than this many layers'
worth, by the effective count (Σ p)² / Σ p² over the layers' weight counts p (1 when one
layer holds them all, L for L equal layers), and the sliceable layers hold at least half
of them: per-layer allocation then has little to trade. Over the seven models of
``results/slices.md`` (the MNIST models on the weights an earlier machine trained; on the
shipped ones 16 slices give the MNIST CNN 11-14× and the dwsep CNN 4.2-5.0×): the MNIST
CNN (1.06), ONet (1.65) and the depthwise-separable CNN (4.39) gained from 16 slices
(4.0 bits: 1.0-1.1× → 6.9-8.8×, 11.6× → 48-56×, 3.0-3.3× → 6.5-7.2× below uniform INT4);
MobileNetV2 (5.88) lost a little at 4 bits with 8 slices
(17-20× → 16-18×) for 9× the qerror time; CRAFT (8.6), the CRNN (12.7) and MiniLM (24.6)
stay per layer."""


AUTO_SLICE_GAIN = 10.0
"""Where ``slices="auto"`` searches per layer (the weights spread over many layers) and
the per-layer map measures less than this many times below the uniform map of the budget
on the calibration data (per-layer allocation found less than an order of magnitude to
trade), it also searches :data:`AUTO_SLICES` slices per layer, if that costs at most
:data:`AUTO_SLICE_WORK_MACS`, and keeps whichever map measures less damage there. Spread
weights do not mean equal sensitivities. Held out, below uniform INT4: a two-layer
bidirectional LSTM (7.1 layers' worth) 3.2-3.9× per layer (4.0-4.1× on the calibration
data: a gate of 4 let it through) and 14-31× with 16 slices (14-29× on the calibration
data); another of its trainings 1.21× and 5.2-5.6× with 8; a dilated causal CNN (6.7)
2.5× and 4.7-5.8×; a small vision transformer (7.8) 1.6-1.9× and 1.7-2.0×. The
calibration data picked the better map in each; where per layer is far ahead it is not
tried (a ResNeXt, 5.1: 19.1× per layer on the calibration data, 19.8× held out; sliced
6.6× and 7.1×, for 3-5× the time)."""

AUTO_SLICE_WORK_MACS = 1e12
"""The most work ``slices="auto"`` spends trying slices on a model whose weights spread
over many layers: units (slices and unsliced layers) × multiply-accumulates of the layers
over the calibration data (the probes of ``qerror`` grow with the units). Small models
pass (that LSTM 1.5e11, the CNN 3e10); MobileNetV2 (8e12), MiniLM (7e12) and the OCR
models (1e13 and more), for which per-layer allocation is the rule, do not."""


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found.

    Attributes:
        bitmap: the chosen bit map.
        table: one row per layer (kind, params, macs, chosen ``w_bits``, ``omega_<b>`` for
            each candidate, and the estimator's own columns such as ``trace``).
        front: the solver's front (one solution for a single exact solve, many for
            ``solver="nsga2"``); row ``i`` of ``front.to_frame()`` is :meth:`bitmap_at` ``(i)``.
        sensitivity: the sensitivity table; pass it back as ``sensitivity=`` to search again
            at another budget for the cost of the solve only (a sliced search's table
            holds its slice plan, and the new search cuts the same slices, whatever data
            it is given).
        problem: the allocation problem that was solved.
        layers: the discovered layers.
        timings_s: seconds per stage.
        refinement: what the measured refinement did (None when it did not run).
        sliced_model: with ``slices=``: the channel-sliced copy of the model that the bit
            map describes (quantize, validate and export this one); None otherwise.
    """

    bitmap: BitMap
    table: pd.DataFrame
    front: Front
    sensitivity: SensitivityTable
    problem: AllocationProblem
    layers: tuple[LayerInfo, ...]
    timings_s: dict[str, float] = field(default_factory=dict)
    refinement: Refinement | None = None
    sliced_model: nn.Module | None = None

    def __repr__(self) -> str:
        return (f"SearchResult({self.bitmap!r}, predicted={self.bitmap.predicted}, "
                f"status={self.front.status!r})")

    def bitmap_at(self, index: int) -> BitMap:
        """The bit map of the front's solution ``index`` (row ``index`` of
        ``front.to_frame()``), with its own predicted loss and costs. The refinement's
        measurements (``calibration_*``) are kept only where the solution is the map the
        search returned: they were measured for that map alone.

        Raises:
            IndexError: ``index`` is outside the front.
        """
        if not -len(self.front) <= index < len(self.front):
            raise IndexError(f"front has {len(self.front)} solutions; index {index} is outside")
        chosen = self.front.solutions[index]
        entries = {name: dataclasses.replace(self.bitmap[name], w_bits=bits)
                   for name, bits in chosen.bits.items()}
        columns = [self.problem.bits.index(chosen.bits[n]) for n in self.problem.layers]
        stderr = self.sensitivity.omega_stderr[np.arange(len(columns)), columns]
        same = all(self.bitmap[n].w_bits == b for n, b in chosen.bits.items())
        predicted = {**{k: v for k, v in self.bitmap.predicted.items()
                        if same or not k.startswith("calibration_")},
                     "loss_increase": chosen.loss,
                     "loss_increase_stderr": float(np.sqrt((stderr ** 2).sum())),
                     **chosen.costs}
        provenance = {**self.bitmap.provenance, "front_index": index % len(self.front)}
        if not same:
            provenance["refined_moves"] = None
        return BitMap({**{n: self.bitmap[n] for n in self.bitmap}, **entries},
                      model_class=self.bitmap.model_class, fingerprint=self.bitmap.fingerprint,
                      budget=self.bitmap.budget, predicted=predicted,
                      provenance=provenance, slices=self.bitmap.slices)


def _check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        raise TypeError(f"bits must be a list of bit-widths, e.g. (2, 4, 8), got {bits!r}")
    given = tuple(bits)  # a numpy array or any iterable of whole numbers
    if not all(isinstance(b, (int, np.integer, float, np.floating)) and not isinstance(b, bool)
               and float(b).is_integer() for b in given):
        raise ValueError(f"bits must be whole numbers of {SUPPORTED_BITS}, got {given}")
    out = tuple(sorted({int(b) for b in given}))
    bad = [b for b in out if b not in SUPPORTED_BITS]
    if bad or not out:
        raise ValueError(f"bits must be a non-empty set of {SUPPORTED_BITS}, got {given}")
    return out


def _resolve_estimator(sensitivity: str | Estimator) -> Estimator:
    if isinstance(sensitivity, type):
        raise TypeError(f"sensitivity={sensitivity.__name__} is a class: pass an instance, "
                        f"e.g. sensitivity={sensitivity.__name__}()")
    if isinstance(sensitivity, str):
        try:
            return ESTIMATORS[sensitivity]()
        except KeyError:
            raise ValueError(f"unknown sensitivity {sensitivity!r}; known: "
                             f"{sorted(ESTIMATORS)}, a SensitivityTable, or an estimator "
                             "object with .estimate(...)") from None
    if isinstance(sensitivity, Estimator):
        return sensitivity
    hint = (" (a search result's .table is its summary; pass its .sensitivity)"
            if type(sensitivity).__name__ == "DataFrame" else "")
    raise TypeError(f"sensitivity must be a name, an estimator or a SensitivityTable, got "
                    f"{type(sensitivity).__name__}{hint}")


def _own_order(table: object, estimator: Estimator, names: Sequence[str],
               bits: Sequence[int]) -> SensitivityTable:
    """An estimator's table with its rows and columns in the search's order, read by
    their labels (a table in another order was read by position: a map of the wrong
    layers' sensitivities)."""
    who = getattr(estimator, "name", type(estimator).__name__)
    if not isinstance(table, SensitivityTable):
        raise TypeError(f"the estimator {who!r} returned a {type(table).__name__}; "
                        "estimate(...) must return a mpsearch.SensitivityTable")
    try:
        return table.select(names, bits)
    except ValueError as exc:
        raise ValueError(f"the estimator {who!r} returned a table that does not cover the "
                         f"search: {exc}") from None


def _literal(name: str) -> str:
    """A glob that matches ``name`` alone (``[``, ``*``, ``?`` in a ModuleDict key)."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _resolve_pins(pin: Mapping[str, int] | None, names: Sequence[str],
                  bits: Sequence[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pattern, b in (pin or {}).items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"pin {pattern!r} matches no quantizable layer searched (an "
                             f"include=/exclude= may leave it out: a layer left out stays "
                             f"float)")
        if b not in bits:
            raise ValueError(f"pin {pattern!r}={b} is not a candidate; bits={tuple(bits)}")
        out.update({n: int(b) for n in hits})
    return out


def _resolve_ties(tie: Ties, layers: Sequence[LayerInfo]) -> list[list[str]]:
    if tie is None:
        return []
    if tie == "fused":
        groups: dict[str, list[str]] = {}
        for info in layers:
            if info.fused_group is not None:
                groups.setdefault(info.fused_group, []).append(info.name)
        return list(groups.values())
    if isinstance(tie, str):  # a string other than "fused": a bad value, not a bad type
        raise ValueError(f"tie must be 'fused', None or a list of lists of layer names, "  # noqa: TRY004
                         f"got {tie!r}")
    if not isinstance(tie, Iterable):
        raise TypeError(f"tie must be 'fused', None or a list of lists of layer names, "
                        f"got {tie!r}")
    groups_given = list(tie)
    flat = [g for g in groups_given if isinstance(g, str)]
    if flat:  # ["a", "b"] would read as the groups ["a"] and ["b"] (or letters): no tie
        raise ValueError(f"tie must be a list of lists of layer names, e.g. "
                         f"[{[str(g) for g in groups_given][:4]}], got {tie!r}")
    return [list(g) for g in groups_given]


@outside_inference_mode
def search(model: nn.Module, budget: Budget | float, *, data: Iterable[Batch],
           loss_fn: LossSpec = None, bits: Sequence[int] | None = None,
           sensitivity: str | Estimator | SensitivityTable = DEFAULT_SENSITIVITY,
           solver: str | Solver = "ilp", seed: int = 0, include: Patterns = None,
           exclude: Patterns = None, pin: Mapping[str, int] | None = None, tie: Ties = None,
           a_bits: int | None = None, qconfig: QuantConfig | None = None,
           refine: bool | Refine | Literal["auto"] = "auto",
           progress: bool = True, profile: HardwareProfile | None = None,
           slices: int | Literal["auto"] | None = "auto") -> SearchResult:
    """Find the bit-width of every layer that loses the least within a budget.

    Args:
        model: any PyTorch model; left exactly as it was found. Searched in eval mode;
            its own forward hooks run on every pass the search makes (they are part of
            the model), also with quantized weights.
        budget: average weight bits (a number), or a :class:`Budget` of one or more limits.
        data: re-iterable calibration batches (tensors, ``(inputs, targets)`` pairs, or
            dicts of keyword tensors such as a tokenizer's output).
        loss_fn: what "loss" means. Default (``None`` or ``"divergence"``): divergence of
            the output from the float model's (KL for logits, MSE for hidden states or
            regression), targets unused — quantization should keep the float model's
            function, and this loss is free of the label loss's first-order noise (see
            :mod:`mpsearch.losses`). ``"task"``: cross-entropy (or the output's ``.loss``)
            on the batches' targets. Or a callable ``loss_fn(output, batch) -> scalar``.
        bits: candidate weight bit-widths (2–8, 16 half precision, 32 float); default
            :data:`DEFAULT_BITS` (2, 3, 4, 5, 6, 8: the widths of llama.cpp's k-quants,
            which compressed-tensors and HQQ store too; exporters to formats with fewer
            widen a layer to the next one they hold, with a warning); with a ``profile``,
            :data:`DEFAULT_BITS_PROFILE` (2, 3, 4, 8, 32: each offered where the device
            has a kernel for it); with a reused sensitivity table, the table's bits.
        sensitivity: ``"qerror"`` (default: each layer quantized alone at each width and
            the loss increase measured; the best search quality over the seven models of
            ``results/sensitivity_fidelity.md``; L × B probes, each replaying the network
            only from the probed layer on), ``"fisher_block"`` (per-sample Fisher along
            each layer's quantization error: a few times cheaper, the choice for large
            models), ``"fisher"`` (diagonal), ``"hutchinson"``, an estimator object, or a
            table from an earlier search (then only the solve runs).
        solver: ``"ilp"`` (exact), ``"greedy"``, ``"nsga2"`` (a whole front: see
            :attr:`SearchResult.front`), or a solver object.
        seed: seeds every random choice.
        include: glob patterns of layer FQNs to consider (default all quantizable layers).
        exclude: glob patterns of layer FQNs to leave in float.
        pin: FQN (or glob) → bits a layer must take, e.g. ``{"features.0": 8}``.
        tie: groups of FQNs that must share bits, or ``"fused"`` for layers reading the
            same input (q/k/v, gate/up).
        a_bits: quantize every layer's input activations to this many bits (None: float).
            The costs count them; the sensitivities, the predicted loss increase and the
            refinement measure weight quantization only (activations float), so the
            prediction understates the damage: ``validate`` measures both (the bit map's
            provenance records ``prediction_activations: "float"``).
        qconfig: weight quantizer scheme (default :class:`QuantConfig()`).
        refine: after the solve, measure the chosen map and its neighbours on the
            calibration data and keep the best within the budget (interactions between
            layers are real; see :mod:`mpsearch.refine`). ``"auto"`` or ``True``:
            :class:`Refine` defaults (at most 64 passes over the calibration data — the same
            map on every run — and 120 s); a :class:`Refine` to set limits; ``False``: off.
            Skipped when activations are quantized (``a_bits``).
        progress: show progress bars.
        profile: a measured :class:`~mpsearch.HardwareProfile`: adds the ``latency_us``
            cost (for ``Budget(latency_us=)`` / ``Budget(latency_ratio=)``) and offers a
            bit-width only to layers that have a real kernel for it on that device.
        slices: give each group of output channels its own width, not only each layer:
            cut every Linear / Conv layer's output channels (and each recurrent
            matrix's rows), ranked by a per-channel
            block-Fisher score, into this many equal slices and search over the slices
            (see :mod:`mpsearch.slices`; any integer from 2, 4 to 16 work well); a Linear is cut by its input
            features instead where that is predicted to lose less (MLPs: their input
            pixels and hidden units differ more than their output units). Where one layer holds most of the
            weights, per-layer allocation has nothing to trade and this is where the gain
            is: held-out output KL at 4.0 bits on the MNIST CNN, 1.00-1.09× below uniform
            INT4 per layer, 6.9-15× with 8 slices, 6.9-8.8× with 16, whichever estimator
            (``results/slices.md``, which also has the models where it gains little or
            loses). The estimator's work grows with the number of units (``qerror``:
            probes per slice). The bit map names the slices and records the plan;
            :func:`~mpsearch.quantize`, :func:`~mpsearch.quantize_` and
            :func:`~mpsearch.validate` take the original model as well as
            :attr:`SearchResult.sliced_model`, the sliced copy to export
            (:func:`~mpsearch.coalesce` first merges slices of equal width). Exports to
            formats with one width per tensor (llama.cpp, GPTQModel, compressed-tensors,
            HQQ, HAWQ) need ``slices=None``. Size budgets only (no ``profile``), no
            ``tie``. ``"auto"`` (default): :data:`AUTO_SLICES` slices where the weights sit
            in fewer than :data:`AUTO_SLICE_LAYERS` layers' worth (one Linear holding
            most of them, as in small CNNs: the bit map's provenance says why), per layer
            otherwise — and then, where the per-layer map measures less than
            :data:`AUTO_SLICE_GAIN` times below the budget's uniform map on the
            calibration data and slicing costs at most :data:`AUTO_SLICE_WORK_MACS`,
            :data:`AUTO_SLICES` slices too, keeping the map that measures less damage
            there — and always per layer with a ``profile``, ``tie`` or a per-layer table;
            ``None``: always per layer.

    Raises:
        InfeasibleBudget: no allocation meets the budget (the message says the smallest
            achievable value).
        ValueError: bad input (empty data, no quantizable layer, NaN weights or gradients…).
    """
    seed, include, exclude, pin, a_bits = _check_arguments(
        model, seed=seed, include=include, exclude=exclude, pin=pin, a_bits=a_bits,
        qconfig=qconfig, profile=profile, solver=solver)
    _warn_unmatched(model, include=include, exclude=exclude)
    if isinstance(tie, (list, tuple)) and not tie:
        tie = None  # no groups: nothing tied (slices="auto" stays free to slice)
    if any(m.training for m in model.modules()):
        log.info("the model is in train mode: searched in eval mode (dropout off, batch-norm "
                 "running statistics), as it will run deployed; its modes are restored after")
    per_layer_why = None
    if isinstance(bits, Iterable) and not isinstance(bits, (str, bytes)):
        bits = tuple(bits)  # read once (a generator), looked at here and searched below
    if slices == "auto":
        narrow = _has_narrow_bits(bits)
        slices = _auto_slices(sensitivity, tie, profile) if narrow else None
        if slices is None:
            per_layer_why = ("per layer: " + ("a hardware profile times whole layers"
                             if profile is not None else "tie= shares widths between layers"
                             if tie is not None else "no candidate width of 2-8 bits"
                             if not narrow else "the sensitivity table is per layer"))
    if slices is not None:
        return _sliced_search(
            model, budget, slices, data=data, loss_fn=loss_fn, bits=bits,
            sensitivity=sensitivity, solver=solver, seed=seed, include=include,
            exclude=exclude, pin=pin, tie=tie, a_bits=a_bits, qconfig=qconfig, refine=refine,
            progress=progress, profile=profile)
    timings: dict[str, float] = {}
    budget = Budget.coerce(budget)
    if bits is None:
        # a reused table brings its own candidates; otherwise the defaults
        bits = (sensitivity.bits if isinstance(sensitivity, SensitivityTable)
                else DEFAULT_BITS if profile is None else DEFAULT_BITS_PROFILE)
    bits = _check_bits(bits)
    qconfig = qconfig or QuantConfig()
    batches = materialize(data, "data")
    device = model_device(model)
    weights_id = state_fingerprint(model)  # the user's state, before any forward steps it
    model = plain_weights(model)  # a copy if weights are parametrized (weight_norm)
    with preserved(model), backward_hooks_off(model):
        model.eval()
        t = time.perf_counter()
        layers = discover(model, batches[0], include=include, exclude=exclude, warn=False)
        modules = quantizable_modules(model, include, exclude)
        layers, modules = _drop_idle(model, layers, modules, batches)
        _warn_unsearched(model, modules)
        timings["discover"] = time.perf_counter() - t
        names = [info.name for info in layers]
        if a_bits is not None and not all(i.input_quantizable for i in layers):
            log.warning("activations stay float for %s: an enclosing module reads their "
                        "weights directly, so they have no input of their own to quantize",
                        ", ".join(i.name for i in layers if not i.input_quantizable)[:300])
        costs = cost_tables(layers, bits, qconfig, a_bits)
        shared = shared_scales(layers, modules, bits, qconfig, costs["size_bytes"])
        allowed, limits = _hardware_costs(profile, model, layers, bits, qconfig, costs, budget)
        ties, pinned = _resolve_ties(tie, layers), _resolve_pins(pin, names, bits)
        # Fail on an impossible budget before the (costly) sensitivity stage.
        AllocationProblem(names, bits, np.zeros((len(names), len(bits))), costs,
                          limits, ties=ties, pinned=pinned, allowed=allowed,
                          shared=shared).check_budgets()
        settings = _refine_settings(refine, a_bits)
        objective = None
        # a reused table with a loss_fn of its own: checked, and compared with the table's
        if (settings is not None or not isinstance(sensitivity, SensitivityTable)
                or loss_fn is not None):
            objective = Objective(batches, loss_fn)
            objective.prepare(model, device)
        with weight_cache():
            t = time.perf_counter()
            if isinstance(sensitivity, SensitivityTable):
                _check_table(sensitivity, weights_id, qconfig)
                try:
                    table = sensitivity.select(names, bits)
                except ValueError as exc:
                    raise ValueError(f"{exc}: the table was measured on other layers or "
                                     "bits (another include=/exclude=/bits=); search with "
                                     "those, or recompute the table") from None
                _warn_other_loss(table, objective, settings is not None)
            else:
                assert objective is not None
                estimator = _resolve_estimator(sensitivity)
                table = estimator.estimate(model, modules, layers, objective, bits, qconfig,
                                           device=device, seed=seed, progress=progress)
                table = _own_order(table, estimator, names, bits)
                if table.omega.size and not np.any(table.omega):
                    log.warning("the %s estimate rates every layer 0 at every width: the "
                                "loss does not change with the weights (does loss_fn read "
                                "the model's output? does the forward run under "
                                "torch.no_grad() or .detach() its output? gradients then "
                                "see nothing: sensitivity='qerror' measures instead); any "
                                "map is as good as another to it", table.estimator)
                table = dataclasses.replace(
                    table, model_fingerprint=weights_id,
                    settings={**table.settings, "qconfig": dataclasses.asdict(qconfig)},
                    data_fingerprint=tensor_digest(batch_tensors(batches)) + ":" + objective.kind)
            timings["sensitivity"] = time.perf_counter() - t
            t = time.perf_counter()
            noisy = table.noisy_rows()
            if noisy.size:
                loss = table.diagnostics.get("loss", "calibration")
                log.warning(
                    "quantizing %d layer(s) alone lowered the %s loss on the calibration data "
                    "at some width (noise: quantization only adds error to the weights); the "
                    "solver charges those entries at least their standard error and never "
                    "rates a width below a wider one there (more calibration data, or the "
                    "default divergence loss, measures them): %s", noisy.size, loss,
                    some([names[i] for i in noisy]))
            problem = AllocationProblem(names, bits, table.planning_omega(), costs, limits,
                                        ties=ties, pinned=pinned, allowed=allowed,
                                        shared=shared)
            front = solve(problem, solver, seed=seed)
            timings["solve"] = time.perf_counter() - t
            if front.solver == "ilp" and front.status != "optimal":
                gap = "" if front.gap is None else f", proved within {front.gap:.2%} of it"
                log.warning("the ILP stopped at its time limit before proving its answer "
                            "optimal (after %.0f s%s): pass solver=ILPSolver(time_limit_s="
                            "None) to wait for the proof", front.time_s, gap)
            best, refinement = front.best, None
            if settings is not None:
                assert objective is not None
                t = time.perf_counter()
                # A measured table (qerror) would only measure itself again in the check.
                resolve = (None if table.estimator == "qerror"
                           else lambda p: solve(p, solver, seed=seed).best)
                best, refinement = refine_map(model, modules, layers, objective, problem, best,
                                              qconfig, settings, device=device,
                                              resolve=resolve, progress=progress)
                timings["refine"] = time.perf_counter() - t
                _log_gain(refinement)
    bitmap = _bitmap(model, layers, problem, best, budget, table, front, a_bits, qconfig,
                     refinement)
    if refinement is not None and objective is not None and (
            objective.kind != bitmap.provenance.get("loss")):
        # a reused table of another loss: the refinement measured this search's own (with
        # none, the prediction is the table's, in its loss)
        bitmap.provenance.update(loss=objective.kind, table_loss=table.diagnostics.get("loss"))
    if profile is not None:
        bitmap.provenance["profile"] = f"{profile.device.get('name')} / {profile.backend}"
    if per_layer_why:
        bitmap.provenance["slices_auto"] = per_layer_why
    if a_bits is not None:
        bitmap.provenance["prediction_activations"] = "float"
    frame = _frame(layers, table, best)
    log.info("search: %s in %.2fs (%s)", bitmap, sum(timings.values()), front.status)
    return SearchResult(bitmap, frame, front, table, problem, tuple(layers), timings,
                        refinement)


def _log_gain(refinement: Refinement) -> None:
    """Say what the mixed map measured against the best uniform map within the budget."""
    ratio = refinement.uniform_ratio
    if ratio is None:
        if refinement.uniform_measured is not None:  # no damage to compare against
            log.info("measured on the calibration data: loss increase %.4g, the best uniform "
                     "map within the budget (%s) %.4g: the mixed map is %s", refinement.
                     measured_after, width_name(refinement.uniform_bits or 32),
                     refinement.uniform_measured,
                     "better" if refinement.measured_after < refinement.uniform_measured
                     else "no better")
        return
    carried = ("" if refinement.uniform_samples is None else
               f", its damage carried by about {refinement.uniform_samples:.0f} of the "
               f"{refinement.samples} samples")
    log.info("measured on the calibration data: loss increase %.4g, %s the best uniform map "
             "within the budget (%s: %.4g%s)%s", refinement.measured_after,
             f"{ratio:.2f}x below" if ratio > 1.0 else "no better than",
             width_name(refinement.uniform_bits or 32), refinement.uniform_measured, carried,
             "; mixed precision gains little on this model and data" if ratio < 1.5 else "")


def _has_narrow_bits(bits: object) -> bool:
    """Whether candidate ``bits`` (None: the defaults) hold a width slices can be ranked at
    (2-8 bits); bits the search will refuse count as having one (it says why)."""
    if bits is None or isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        return True
    try:
        return any(float(b) <= 8 for b in bits)
    except (TypeError, ValueError):
        return True


def _auto_slices(sensitivity: object, tie: Ties,
                 profile: HardwareProfile | None) -> int | Literal["auto"] | None:
    """What ``slices="auto"`` means before the model is looked at: per layer (None) with
    a profile, ties or a per-layer table; a sliced table's slice count; else "auto"."""
    if tie is not None or profile is not None:
        return None
    if isinstance(sensitivity, SensitivityTable):
        counts = [int(n.rsplit(".", 1)[1]) + 1 for n in sensitivity.layers
                  if n.rsplit(".", 2)[-2:-1] == [PART] and n.rsplit(".", 1)[1].isdigit()]
        return max(counts) if counts else None
    return "auto"


def _out_proj_of(model: nn.Module, name: str, reader: str) -> bool:
    """Whether layer ``name`` is the ``out_proj`` of ``reader``, a plain
    ``nn.MultiheadAttention`` (a subclass may compute something else with it)."""
    return (name == (f"{reader}.out_proj" if reader else "out_proj")
            and type(model.get_submodule(reader)) is nn.MultiheadAttention)  # no subclass


def _few_layers(layers: Sequence[LayerInfo], sliceable: Iterable[str]) -> str | None:
    """Why ``slices="auto"`` slices (see :data:`AUTO_SLICE_LAYERS`), or None."""
    sizes = [info.params for info in layers]
    total = sum(sizes)
    if not total:
        return None
    count = total * total / sum(p * p for p in sizes)
    names = set(sliceable)
    if count >= AUTO_SLICE_LAYERS or sum(i.params for i in layers if i.name in names) < total / 2:
        return None
    big = max(layers, key=lambda info: info.params)
    who = big.name or "the model, one bare layer,"
    return f"the weights sit in {count:.2f} layers' worth ({who} holds {big.params / total:.0%})"


def _warn_uncut(layers: Sequence[LayerInfo], cut: Iterable[str]) -> None:
    """``slices="auto"`` would slice, but most weights sit in layers it cannot cut."""
    names = set(cut)
    kinds: dict[str, int] = {}
    for info in layers:
        if info.name not in names:
            kinds[info.kind] = kinds.get(info.kind, 0) + info.params
    total = sum(i.params for i in layers)
    log.warning("slices='auto': %s, but channel slices cannot cut %.0f%% of them (%s; they "
                "cut plain Linear (and Hugging Face Conv1D) layers, ungrouped or depthwise "
                "Conv layers, attention's projections and recurrent matrices, none pinned, "
                "tied or read by another module, nor a model that is one bare layer): "
                "the search is per layer, where so few layers leave the "
                "solver little to trade against uniform widths",
                _few_layers(layers, [i.name for i in layers]), 100 * sum(kinds.values()) / total,
                ", ".join(f"{k} weights {n / total:.0%}" for k, n in
                          sorted(kinds.items(), key=lambda kv: -kv[1])))


def _sliced_search(model: nn.Module, budget: Budget | float,
                   n_slices: int | Literal["auto"], *,
                   data: Iterable[Batch], loss_fn: LossSpec, bits: Sequence[int] | None,
                   include: Patterns, exclude: Patterns, pin: Mapping[str, int] | None,
                   tie: Ties, qconfig: QuantConfig | None, seed: int, progress: bool,
                   profile: HardwareProfile | None, **rest: object) -> SearchResult:
    """Rank each layer's channels, slice the model, search the sliced copy."""
    if tie is not None:
        raise ValueError("slices= and tie= do not combine: slices of one layer read the same "
                         "input, and tying them would undo the slicing")
    if profile is not None:
        raise ValueError("slices= works with size budgets only: a hardware profile measures "
                         "whole layers, not slices of them")
    auto = n_slices == "auto"
    if not auto and (isinstance(n_slices, bool) or not isinstance(n_slices, int)
                     or n_slices < 2):
        raise ValueError(f"slices must be an integer >= 2 (e.g. 4), 'auto' or None, "
                         f"got {n_slices!r}")
    t = time.perf_counter()
    original = model
    batches = materialize(data, "data")
    table_bits = rest["sensitivity"].bits if isinstance(rest["sensitivity"],
                                                        SensitivityTable) else None
    candidates = _check_bits(bits if bits is not None else table_bits or DEFAULT_BITS)
    qconfig = qconfig or QuantConfig()
    device = model_device(model)
    model = plain_weights(model)
    with preserved(model), backward_hooks_off(model):
        model.eval()
        layers = discover(model, batches[0], include=include, exclude=exclude, warn=False)
        modules = quantizable_modules(model, include, exclude)
        pinned = {n for n in modules for p in (pin or {}) if fnmatch.fnmatchcase(n, p)}
        sliceable = set(sliceable_layers(model, modules)) - pinned
        # a layer read by its parent stays whole (its parent reads the one weight), but
        # for recurrent matrices, which RecurrentSlices rebuilds for the recurrent module,
        # and attention's out_proj, whose slices answer its weight and bias
        cuttable = [i for i in layers if i.name in sliceable
                    and (not i.read_by or i.kind in RNN_KINDS
                         or _out_proj_of(model, i.name, i.read_by))]
        cut = [i.name for i in cuttable]
        why = _few_layers(layers, cut) if auto else None
        if auto and not why and _few_layers(layers, [i.name for i in layers]):
            _warn_uncut(layers, cut)
        plan: SlicePlan | None = None
        stored = _stored_plan(rest["sensitivity"])
        if stored is not None:  # a sliced search's table: its own slices, not new ones
            count, plan, why = _check_stored_plan(stored, n_slices, pinned), stored, None
        elif why or not auto:
            # what the search below would refuse, refused before the channel scores
            if not isinstance(rest["sensitivity"], SensitivityTable):
                _resolve_estimator(rest["sensitivity"])  # type: ignore[arg-type]
            _budget_problem(model, layers, candidates, qconfig, budget, pin,
                            rest["a_bits"]).check_budgets()  # type: ignore[arg-type]
            count = AUTO_SLICES if auto else int(n_slices)
            sliceable -= set(idle_layers(model, layers, batches))
            ranked = [i for i in cuttable if i.name in sliceable]
            plan = SlicePlan({})
            if ranked:
                objective = Objective(batches, loss_fn)
                objective.prepare(model, device)
                with weight_cache():
                    scores, columns = slice_scores(
                        model, modules, ranked, objective, reference_bits(candidates),
                        qconfig, device=device, seed=seed, progress=progress,
                        inputs=qconfig.granularity != "group")  # slices cut groups
                plan = plan_slices(scores, count, input_scores=columns, bits=candidates)
                most = max((len(p) for p in plan.layers.values()), default=count)
                if not auto and most < count:
                    log.warning("slices=%d: the layers here take at most %d slices each (a "
                                "slice holds at least 4 channels or input features)", count,
                                most)
            if plan.layers and isinstance(rest["sensitivity"], SensitivityTable):
                raise ValueError("the sensitivity table is of a per-layer search (its rows "
                                 "are whole layers, not slices): pass slices=None to search "
                                 "it again, or recompute the table for a sliced search")
            if not plan.layers:
                log.warning("slices=%d: no layer could be sliced (plain Linear and ungrouped "
                            "or depthwise Conv layers with at least 8 output channels, not "
                            "pinned and not sharing their weight); the search is per layer",
                            count)
    # sliced after the block has put back the buffers its forwards changed (a step counter):
    # the sliced copy holds the model's own state, whichever way the plan came
    sliced = None
    if plan is not None:
        try:
            sliced = slice_model(model, plan)
        except ValueError as exc:
            if stored is None:
                raise
            raise ValueError(f"the sensitivity table's slice plan does not fit this "
                             f"model ({exc}); recompute the table") from None
    planning = time.perf_counter() - t
    if sliced is None:  # "auto" and no layer dominates: per layer
        # its warnings held until it is kept (a sliced search may replace it)
        with HeldLogs() as held:
            result = search(original, budget, data=batches, loss_fn=loss_fn, bits=bits,
                            include=include, exclude=exclude, pin=pin, qconfig=qconfig,
                            seed=seed, progress=progress, slices=None,
                            **rest)  # type: ignore[arg-type]
        sizes = [info.params for info in layers]
        spread = not _few_layers(layers, [i.name for i in layers])
        result.bitmap.provenance["slices_auto"] = (
            f"per layer: the weights sit in {sum(sizes) ** 2 / max(sum(p * p for p in sizes), 1):.2f} "
            f"layers' worth (slices below {AUTO_SLICE_LAYERS:g})"
            if spread else "per layer: channel slices cannot cut most of the weights")
        if spread and stored is None and not isinstance(rest["sensitivity"], SensitivityTable):
            work = (len(layers) + (AUTO_SLICES - 1) * len(cuttable)) * sum(
                batch_rows(b) for b in batches) * sum(float(i.macs) for i in layers)
            cut_share = sum(i.params for i in cuttable) / max(sum(sizes), 1)
            if cut_share >= 0.5 and work <= AUTO_SLICE_WORK_MACS:
                return _or_slices(result, held, original, budget, batches=batches,
                                  loss_fn=loss_fn, bits=bits, include=include,
                                  exclude=exclude, pin=pin, qconfig=qconfig, seed=seed,
                                  progress=progress, profile=profile, work=work, **rest)
            result.bitmap.provenance["slices_auto"] += (
                f"; slices not tried: they could cut only {cut_share:.0%} of the weights"
                if cut_share < 0.5 else
                f"; slices not tried: {work:.2g} units x MACs over the calibration data, "
                f"over {AUTO_SLICE_WORK_MACS:g} (slices=16 searches them all the same)")
        held.release()
        return result
    assert plan is not None  # sliced is its model
    if why:
        log.info("slices='auto': %s, too few for per-layer allocation to trade; searching "
                 "%d channel slices per layer (slices=None: per layer)", why, count)
    own_include = include
    # The sliced model is searched by exact names: the user's globs name the original
    # layers (exclude='*.0' must not leave out slice 0 of every layer, nor a stored plan's
    # slices escape an exclude=), and a pin the layer it matched (pinned layers are whole).
    inner_include, inner_exclude, inner_pin = include, exclude, pin
    if include is not None or exclude is not None:
        inner_include = ([_literal(n) for n in modules if n not in plan.layers]
                         + [f"{_literal(n)}.{PART}.*" for n in plan.layers if n in modules])
        inner_exclude = None
    if pin:
        _resolve_pins(pin, list(modules), candidates)  # each pattern names a layer
        inner_pin = {_literal(n): b for p, b in pin.items() for n in modules
                     if fnmatch.fnmatchcase(n, p)}
    if stored is not None:  # the sliced model's table, without the plan it already follows
        table = rest["sensitivity"]
        assert isinstance(table, SensitivityTable)
        rest["sensitivity"] = dataclasses.replace(table, settings={
            k: v for k, v in table.settings.items() if k != "slices"})
    def per_layer(why: str) -> SearchResult:
        out = search(original, budget, data=batches, loss_fn=loss_fn, bits=bits,
                     include=include, exclude=exclude, pin=pin, qconfig=qconfig, seed=seed,
                     progress=progress, slices=None, **rest)  # type: ignore[arg-type]
        out.bitmap.provenance["slices_auto"] = f"per layer: {why}"
        return out

    scales = ("with one scale per tensor, every slice carries a scale of its own, which a "
              "size budget pays for")
    try:
        result = search(sliced, budget, data=batches, loss_fn=loss_fn, bits=bits,
                        include=inner_include, exclude=inner_exclude, pin=inner_pin,
                        qconfig=qconfig, seed=seed, progress=progress, slices=None,
                        **rest)  # type: ignore[arg-type]
    except InfeasibleBudget as exc:
        if stored is not None:
            raise InfeasibleBudget(f"{exc} on the sliced model this table was measured on "
                                   f"({scales}); search with slices=None and a new table",
                                   exc.smallest) from None
        log.warning("the %d-slice model cannot meet this budget (%s; %s): searching per layer",
                    count, exc, scales)
        return per_layer(f"{count} slices did not fit the budget")
    bitmap = result.bitmap
    if not plan.layers:  # nothing could be cut: a per-layer map, as the warning said
        return result
    bitmap.slices = plan
    bitmap.provenance["slices"] = count
    if why:
        bitmap.provenance["slices_auto"] = why
    # the table keeps its plan: passed back, it is searched on the same slices
    table = dataclasses.replace(result.sensitivity, settings={**result.sensitivity.settings,
                                                              "slices": plan.to_dict()})
    result = dataclasses.replace(result, sensitivity=table, sliced_model=sliced,
                                 timings_s={"slice": planning, **result.timings_s})
    if result.refinement is None:
        return result
    widest = _widest_uniform(_budget_problem(model, layers, candidates, qconfig, budget, pin,
                                             rest["a_bits"]))  # type: ignore[arg-type]
    refinement = result.refinement
    if widest is None or (refinement.uniform_bits or 0) >= widest:
        return result
    # The sliced model's uniform maps can cost more bytes than the model's own (with one
    # scale per tensor, each slice has its own): under a size budget the refinement then
    # compared against a narrower one. Measure the one the budget fits on the unsliced model.
    from mpsearch.validate import validate

    uniform = validate(original, BitMap.uniform(original, widest, qconfig=qconfig,
                                                a_bits=rest["a_bits"],  # type: ignore[arg-type]
                                                include=own_include, exclude=exclude),
                       data=batches, loss_fn=loss_fn, progress=False).loss_increase
    if uniform > refinement.measured_after:
        # (its samples were not counted: the count of the narrower map would mislead)
        refinement = dataclasses.replace(refinement, uniform_bits=widest,
                                         uniform_measured=uniform, uniform_samples=None)
        bitmap.predicted.update(calibration_uniform_bits=widest,
                                calibration_uniform_loss_increase=uniform)
        bitmap.predicted.pop("calibration_uniform_samples", None)
        _log_gain(refinement)
        return dataclasses.replace(result, refinement=refinement)
    if stored is not None:
        log.warning("the sliced map measured no better than uniform INT%d, which this budget "
                    "fits on the unsliced model (%s): search with slices=None", widest, scales)
        return result
    log.warning("the sliced map measured no better than uniform INT%d on the calibration "
                "data (%.4g against %.4g), which this budget fits on the unsliced model (%s): "
                "searching per layer instead", widest, refinement.measured_after, uniform,
                scales)
    return per_layer(f"{count} slices measured no better than uniform INT{widest} within "
                     f"this budget")


def _or_slices(result: SearchResult, held: HeldLogs, model: nn.Module,
               budget: Budget | float, *, batches: list[Batch], loss_fn: LossSpec,
               qconfig: QuantConfig, work: float, **options: Any) -> SearchResult:
    """The per-layer ``result`` of ``slices="auto"`` on a model whose weights spread over
    many layers, or a search of :data:`AUTO_SLICES` slices per layer where the per-layer
    map measured less than :data:`AUTO_SLICE_GAIN` times below the budget's uniform map
    on the calibration data and the sliced map measures less damage there. What each
    search logged (``held`` the per-layer one's) is said for the one returned."""
    try:
        with HeldLogs() as held_sliced:  # (released by an error in the block)
            out = _or_sliced(result, model, budget, batches=batches, loss_fn=loss_fn,
                             qconfig=qconfig, work=work, **options)
    except BaseException:
        held.release()
        raise
    kept, dropped = (held_sliced, held) if out is not result else (held, held_sliced)
    kept.release()
    dropped.drop()
    return out


def _or_sliced(result: SearchResult, model: nn.Module, budget: Budget | float, *,
               batches: list[Batch], loss_fn: LossSpec, qconfig: QuantConfig, work: float,
               **options: Any) -> SearchResult:
    """:func:`_or_slices`' choice, logging as it goes."""
    from mpsearch.validate import validate

    def damage(bitmap: BitMap) -> float:
        return validate(model, bitmap, data=batches, loss_fn=loss_fn,
                        progress=False).loss_increase

    widest = _widest_uniform(result.problem)
    if widest is None:
        return result
    uniform = damage(BitMap.uniform(model, widest, qconfig=qconfig, a_bits=options["a_bits"],
                                    include=options["include"], exclude=options["exclude"]))
    per_layer = damage(result.bitmap)
    if not uniform > 0 or uniform >= AUTO_SLICE_GAIN * per_layer:
        return result
    gain = uniform / per_layer if per_layer > 0 else float("inf")
    log.info("slices='auto': the per-layer map measured only %.2fx below uniform INT%d on "
             "the calibration data (under %g): searching %d channel slices per layer as "
             "well (%.2g units x MACs)", gain, widest, AUTO_SLICE_GAIN, AUTO_SLICES, work)
    try:
        sliced = _sliced_search(model, budget, AUTO_SLICES, data=batches, loss_fn=loss_fn,
                                qconfig=qconfig, tie=None, **options)
    except InfeasibleBudget:  # the slices' own scales do not fit a size budget
        return result
    if sliced.sliced_model is None:  # it fell back to per layer itself
        return result
    mixed = damage(sliced.bitmap)
    why = (f"per layer measured {gain:.2f}x below uniform INT{widest} on the calibration "
           f"data (under {AUTO_SLICE_GAIN:g}); {AUTO_SLICES} slices measured "
           f"{uniform / mixed if mixed > 0 else float('inf'):.2f}x")
    if mixed < per_layer:
        sliced.bitmap.provenance["slices_auto"] = why + ": sliced"
        return sliced
    result.bitmap.provenance["slices_auto"] = why + ": per layer"
    return result


def _budget_problem(model: nn.Module, layers: Sequence[LayerInfo], bits: Sequence[int],
                    qconfig: QuantConfig, budget: Budget | float,
                    pin: Mapping[str, int] | None, a_bits: int | None) -> AllocationProblem:
    """The per-layer problem of ``model`` with no sensitivities: its budgets and pins."""
    names = [i.name for i in layers]
    _, limits = _hardware_costs(None, model, layers, bits, qconfig, {}, Budget.coerce(budget))
    return AllocationProblem(names, bits, np.zeros((len(names), len(bits))),
                             cost_tables(layers, bits, qconfig, a_bits), limits,
                             pinned=_resolve_pins(pin, names, bits))


def _widest_uniform(problem: AllocationProblem) -> int | None:
    """The widest bit width below 32 at which every layer fits the problem's budgets and
    pins, or None."""
    for o in sorted(range(len(problem.bits)), key=lambda o: -problem.bits[o]):
        choice = np.full(len(problem.layers), o)
        if (problem.bits[o] < 32 and problem.unit_allowed[:, o].all()
                and problem.is_feasible(choice)):
            return int(problem.bits[o])
    return None


def _whole(value: object, what: str, example: str) -> int:
    """``value`` as a plain int: ints (NumPy's too) and whole-number floats (``4.0``)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, bool) and float(value).is_integer():
        return int(value)
    raise TypeError(f"{what} must be a whole number{example}, got {value!r}")


def _check_arguments(model: object, *, seed: object, include: object, exclude: object,
                     pin: object, a_bits: object, qconfig: object, profile: object,
                     solver: object = "ilp",
                     ) -> tuple[int, Patterns, Patterns, dict[str, int] | None, int | None]:
    """A clear TypeError (ValueError for a bad value) for an argument, before any work;
    the values as plain Python (seed, include, exclude, pin, a_bits)."""
    require_values(model)  # a TypeError for no module; lazy, meta or compiled models named
    check_solver(solver)
    if qconfig is not None and not isinstance(qconfig, QuantConfig):
        hint = ": build one, QuantConfig(**...)" if isinstance(qconfig, Mapping) else ""
        raise TypeError(f"qconfig must be a QuantConfig, got {type(qconfig).__name__}{hint}")
    from mpsearch.hw.profile_data import require_profile

    require_profile(profile)
    if pin is not None and not (isinstance(pin, Mapping)
                                and all(isinstance(k, str) for k in pin)):
        raise TypeError(f"pin must map layer names (or globs) to bits, e.g. "
                        f"{{'features.0': 8}}, got {pin!r}")
    activations = None if a_bits is None else _whole(a_bits, "a_bits", " of bits or None")
    if activations is not None and activations not in SUPPORTED_BITS:
        raise ValueError(f"a_bits must be None or one of {SUPPORTED_BITS}, got {a_bits!r}")
    return (_whole(seed, "seed", ""), as_patterns(include, "include"),
            as_patterns(exclude, "exclude"),
            None if pin is None else {k: _whole(v, f"pin[{k!r}]", " of bits")
                                      for k, v in pin.items()},
            activations)


def _warn_unmatched(model: nn.Module, **patterns: Patterns) -> None:
    """Say which include / exclude globs match no quantizable layer (a typo keeps nothing
    float, or searches less than meant). Not on a channel-sliced copy, whose layers a
    sliced search renames."""
    if is_sliced(model):
        return
    names = list(quantizable_modules(model))
    for option, given in patterns.items():
        globs = [given] if isinstance(given, str) else list(given or [])
        unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if unmatched:
            log.warning("%s= pattern(s) %s match no quantizable layer of %s (its layers are "
                        "e.g. %s)", option, unmatched, type(model).__name__, some(names, 4))


def _stored_plan(sensitivity: object) -> SlicePlan | None:
    """The slice plan a sliced search recorded in its table, or None."""
    if not isinstance(sensitivity, SensitivityTable) or sensitivity.settings.get(
            "slices") is None:
        return None
    try:
        return SlicePlan.from_dict(sensitivity.settings["slices"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the sensitivity table's slice plan is malformed: {exc}") from None


def _check_stored_plan(plan: SlicePlan, n_slices: int | Literal["auto"],
                       pinned: Iterable[str]) -> int:
    """The slice count of a table's plan, checked against ``slices=`` and ``pin=``."""
    count = max((len(p) for p in plan.layers.values()), default=0)
    if n_slices != "auto" and n_slices != count:
        raise ValueError(f"the sensitivity table was measured on {count} channel slices per "
                         f"layer, not {n_slices}: pass slices='auto' (or {count}) to search "
                         "its slices again, or recompute the table")
    both = sorted(set(pinned) & set(plan.layers))
    if both:
        raise ValueError(f"pin= names layer(s) the sensitivity table's slice plan cuts "
                         f"({', '.join(both[:5])}); recompute the table with these pins")
    return count


def _warn_unsearched(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Say which weights stay float because no estimator or quantizer handles their kind."""
    other = unsearched_weights(model, modules)
    if not other:
        return
    searched = sum(layer_weight(m).numel() for m in modules.values())
    share = sum(other.values()) / (sum(other.values()) + searched)
    # once a process: a sliced search and its per-layer alternative both look
    warn_once(log, f"{f'{share:.0%}' if share >= 0.01 else '<1%'} of the model's weights "
                   "stay float, outside the search and its budget: mpsearch does not "
                   "quantize " + ", ".join(f"{kind} ({n:,} weights)" for kind, n in
                                           sorted(other.items(), key=lambda kv: -kv[1])))


def _drop_idle(model: nn.Module, layers: list[LayerInfo], modules: dict[str, nn.Module],
               batches: Sequence[Batch]) -> tuple[list[LayerInfo], dict[str, nn.Module]]:
    """Leave out (float) the layers that run on no calibration batch: the loss cannot rate
    them, and a rating of zero would hand them the fewest bits and their budget to others."""
    idle = set(idle_layers(model, layers, batches))
    if not idle:
        return layers, modules
    if len(idle) == len(layers):
        raise ValueError(f"none of the {len(layers)} quantizable layer(s) ran on the "
                         "calibration data, so none can be rated: check that the batches "
                         "reach the model's layers (forward signature, keys)")
    bypassed = weights_read(model, batches[0], {n: modules[n] for n in idle})
    if bypassed:
        log.warning("%d layer(s) left out of the search and kept float: the model reads "
                    "their weight itself (e.g. F.linear(x, layer.weight)) instead of calling "
                    "the layer, and mpsearch rates, quantizes and counts layers through "
                    "their own forward: %s; call the layer in the forward to search it",
                    len(bypassed), some(sorted(bypassed)))
    unused = sorted(idle - bypassed)
    if unused:
        log.warning("%d layer(s) left out of the search and kept float, because they did "
                    "not run on any calibration batch (the loss cannot rate them): %s; give "
                    "data that runs them, or exclude= them to silence this", len(unused),
                    some(unused))
    return ([i for i in layers if i.name not in idle],
            {n: m for n, m in modules.items() if n not in idle})


def _refine_settings(refine: bool | Refine | str, a_bits: int | None) -> Refine | None:
    if isinstance(refine, Refine):
        settings: Refine | None = refine
    elif refine == "auto" or refine is True:
        settings = Refine()
    elif refine is False or refine is None:
        settings = None
    else:
        raise ValueError(f"refine must be 'auto', True, False or a Refine, got {refine!r}")
    if a_bits is not None:
        warn_once(log, f"a_bits={a_bits}: the sensitivities and the predicted loss increase "
                  "measure weight quantization only (activations float)"
                  + (", and the measured refinement is skipped" if settings else "")
                  + f"; the INT{a_bits} activations add damage they do not see: validate "
                  "the map to measure both")
        return None
    return settings


def _warn_other_loss(table: SensitivityTable, objective: Objective | None,
                     refining: bool) -> None:
    """A reused table rates another loss than the one this search was given."""
    rated = table.diagnostics.get("loss")
    if objective is not None and rated and rated != objective.kind:
        log.warning("the sensitivity table rates the %r loss but this search measures %r "
                    "(loss_fn=%r): %s; recompute the table with this loss_fn for one "
                    "criterion throughout", rated, objective.kind, objective.loss_fn,
                    "the solver ranks by one and the refinement by the other" if refining
                    else f"the solver ranks by {rated!r} (no refinement measures the other)")


#: the scheme of :func:`state_fingerprint` (an earlier one hashed the searched weights only)
STATE_FINGERPRINT = "state-sha256:"


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's whole state (its state_dict: weights, biases, buffers such as
    BatchNorm statistics), the tables' ``model_fingerprint``."""
    digest = tensor_digest(v for _, v in sorted(model.state_dict().items())
                           if isinstance(v, Tensor))
    return STATE_FINGERPRINT + digest.removeprefix("sha256:")


def _check_table(table: SensitivityTable, weights_id: str, qconfig: QuantConfig) -> None:
    if table.settings.get("slices") is not None:
        raise ValueError("the sensitivity table is of a channel-sliced search (its rows are "
                         "slices of layers): pass slices='auto' to search its slices again, "
                         "or recompute the table for a per-layer search (slices=None)")
    made = table.settings.get("qconfig")
    if made is not None and dict(made) != dataclasses.asdict(qconfig):
        raise ValueError(
            f"the sensitivity table was measured with qconfig={made}, but this search "
            f"quantizes with {dataclasses.asdict(qconfig)}: its Ω would describe another "
            "quantizer; pass the same qconfig= or recompute the table")
    if (table.model_fingerprint and table.model_fingerprint != weights_id
            and not table.model_fingerprint.startswith(STATE_FINGERPRINT)):
        raise ValueError(
            "the sensitivity table was saved with an earlier fingerprint scheme, which this "
            "mpsearch cannot compare with the model's state: recompute it, or clear "
            "table.model_fingerprint to reuse it deliberately")
    if table.model_fingerprint and table.model_fingerprint != weights_id:
        raise ValueError(
            "the sensitivity table was measured on another model state (weights, biases or "
            "buffers such as BatchNorm statistics: its model_fingerprint "
            f"{table.model_fingerprint[:19]}... differs from this model's {weights_id[:19]}...); "
            "recompute it with sensitivity='hutchinson'|'fisher'|'qerror', or clear "
            "table.model_fingerprint to reuse it deliberately")


def _hardware_costs(profile: HardwareProfile | None, model: nn.Module,
                    layers: Sequence[LayerInfo], bits: Sequence[int], qconfig: QuantConfig,
                    costs: dict[str, np.ndarray],
                    budget: Budget) -> tuple[np.ndarray | None, dict[str, float]]:
    """Add ``latency_us`` to ``costs`` from the profile; the allowed mask and the limits."""
    if profile is None:
        if budget.latency_us is not None or budget.latency_ratio is not None:
            raise ValueError(f"a latency budget ({budget}) needs profile= a HardwareProfile "
                             "(mpsearch.profile(model, sample_batch))")
        return None, budget.limits()
    lat = latency_cost_table(profile, model, layers, bits, qconfig)
    costs["latency_us"] = lat.table
    int8 = None
    if budget.latency_ratio is not None:
        # All-INT8 reference: every layer at 8 bits (float where 8 bits has no kernel).
        ref = latency_cost_table(profile, model, layers, (8, 32), qconfig)
        int8 = float(np.where(ref.allowed[:, 0], ref.table[:, 0], ref.table[:, 1]).sum())
    return lat.allowed, budget.resolved(int8)


def _bitmap(model: nn.Module, layers: Sequence[LayerInfo], problem: AllocationProblem,
            best: Solution, budget: Budget, table: SensitivityTable, front: Front,
            a_bits: int | None, qconfig: QuantConfig,
            refinement: Refinement | None = None) -> BitMap:
    tie_of: dict[str, str] = {}
    for k, group in enumerate(problem.ties):
        label = next((i.fused_group for i in layers if i.name == group[0] and i.fused_group),
                     None) or f"tie.{k}"
        tie_of.update({n: label for n in group})
    entries = {
        # a layer whose weight its parent reads directly has no input of its own to quantize
        info.name: LayerEntry(w_bits=best.bits[info.name],
                              a_bits=a_bits if info.input_quantizable else None,
                              qconfig=qconfig,
                              tie=tie_of.get(info.name), kind=info.kind,
                              shape=info.weight_shape)
        for info in layers
    }
    # Layers outside include/exclude stay float, so the bit map covers the whole model.
    for name, module in quantizable_modules(model).items():
        if name not in entries:
            entries[name] = LayerEntry(w_bits=32, qconfig=qconfig, kind=layer_kind(module),
                                       shape=tuple(layer_weight(module).shape))
    stderr = float(np.sqrt(sum(
        table.omega_stderr[i, problem.bits.index(best.bits[n])] ** 2
        for i, n in enumerate(problem.layers))))
    predicted = {"loss_increase": best.loss, "loss_increase_stderr": stderr, **best.costs}
    if refinement is not None:
        predicted["calibration_loss_increase"] = refinement.measured_after
        if refinement.uniform_bits is not None and refinement.uniform_measured is not None:
            predicted["calibration_uniform_bits"] = refinement.uniform_bits
            predicted["calibration_uniform_loss_increase"] = refinement.uniform_measured
        if refinement.uniform_samples is not None and refinement.samples is not None:
            predicted["calibration_uniform_samples"] = round(refinement.uniform_samples, 1)
            predicted["calibration_samples"] = refinement.samples
    return BitMap(entries, model_class=type(model).__name__,
                  fingerprint=fingerprint({n: e.shape or () for n, e in entries.items()}),
                  budget=budget.limits(), predicted=predicted,
                  provenance=_provenance(sensitivity=table.estimator, solver=front.solver,
                                         status=front.status, solve_time_s=front.time_s,
                                         profile=None, loss=table.diagnostics.get("loss"),
                                         refined_moves=None if refinement is None
                                         else len(refinement.moves)))


def _frame(layers: Sequence[LayerInfo], table: SensitivityTable, best: Solution) -> pd.DataFrame:
    frame = pd.DataFrame({
        "kind": [i.kind for i in layers],
        "params": [i.params for i in layers],
        "macs": [i.macs for i in layers],
        "w_bits": [best.bits[i.name] for i in layers],
    }, index=pd.Index([i.name for i in layers], name="layer"))
    return frame.join(table.to_frame())

