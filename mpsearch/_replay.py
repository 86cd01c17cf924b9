"""Measure the calibration loss with a few layer weights changed, recomputing only what follows.

Quantizing one layer changes nothing that the model computes before that layer runs. One
recorded pass stores the outputs of the submodules that finish before each layer starts;
later passes return those stored outputs instead of recomputing them, so a probe of a layer
near the output costs little more than the layers after it. This works on any model, not
only on sequential ones: the model's own ``forward`` still runs, and only whole submodule
calls that provably precede the first changed layer (same inputs, same weights) are
replayed.

A submodule is replayed only if it was called exactly once per batch and, in the traced
pass, finished before the first changed layer started, returned a tensor or a
tuple/list/dict of tensors, and left its inputs alone: it neither rewrote one in place (a stage that starts with
``ReLU(inplace=True)`` rewrites the previous stage's output, which a U-net decoder reads
again as a skip tensor) nor returned one itself (``nn.Identity``), since a replay would
lose that effect on the caller's tensors. Replayed outputs are cloned, so in-place
operations after them (``out += x``, ``ReLU(inplace=True)``) cannot corrupt the store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor, nn

from mpsearch._state import functional_call
from mpsearch.batches import split_batch, to_device
from mpsearch.layers import weight_key
from mpsearch.losses import Objective

log = logging.getLogger(__name__)

#: absolute slack of the replay self-check: a divergence loss at the float weights is zero
#: up to float32 rounding, which reaches ~1e-9 for a KL over a few classes (a sliced model
#: concatenates its slices' products, so its logits differ from the original's in the last
#: bits), far below any quantization loss the estimators measure
REPLAY_ABS_TOL = 1e-7


def _storable(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if type(value) in (tuple, list):
        return all(_storable(v) or v is None for v in value)
    if type(value) is dict:
        return all(_storable(v) or v is None for v in value.values())
    return False


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple/list/dict of arguments."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _storages(value: Any) -> set[int]:
    """Addresses of the memory behind the tensors in ``value`` (views share their base's)."""
    out = set()
    for t in _tensors(value):
        try:
            out.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested)
            out.add(id(t))
    return out


def _version(t: Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(_clone(v) for v in value)
    if type(value) is dict:
        return {k: _clone(v) for k, v in value.items()}
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if type(value) in (tuple, list):
        return sum(_nbytes(v) for v in value)
    if type(value) is dict:
        return sum(_nbytes(v) for v in value.values())
    return 0


class PrefixReplay:
    """Calibration losses under weight changes, replaying the unchanged prefix of the model.

    Use as a context manager; the model's submodules get a replaying ``forward`` inside it
    and their own back on exit. The model's parameters are never written: changed weights
    are passed with :func:`torch.func.functional_call` (:func:`mpsearch._state.functional_call`).

    Args:
        model: the model (eval mode).
        objective: the calibration objective (already prepared).
        device: where the model runs.
        layers: FQNs of the layers whose weights may change (each has a ``weight``).
    """

    def __init__(self, model: nn.Module, objective: Objective, device: torch.device,
                 layers: Sequence[str]) -> None:
        self.model = model
        self.objective = objective
        self.device = device
        self.layers = list(layers)
        self._splits = [to_device(split_batch(b), device).for_model(model)
                        for b in objective.batches]
        self._modules = dict(model.named_modules())
        self._keys = {n: weight_key(model, n) for n in self.layers}
        self._start: dict[str, int] = {}
        self._end: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._store: dict[str, list[Any]] = {}
        self._active: frozenset[str] = frozenset()
        self._batch = 0
        self._reference: dict[str, Tensor] = {}
        self._plans: dict[int, frozenset[str]] = {}
        self._wanted: set[str] = set()
        self._shared: set[str] = set()
        self._patched: list[nn.Module] = []
        self.reference_losses = np.zeros(len(self._splits))
        #: work done so far, in whole passes over the calibration data (a replayed pass
        #: counts the share of module calls it recomputes): a deterministic clock
        self.passes = 0.0
        #: False once the self-check after the first :meth:`record` found a replay that
        #: does not reproduce a full pass; every later measurement is then a full pass
        self.exact = True
        self._verified = False
        #: also keep each sample's loss (:meth:`sample_losses`) where the objective splits
        self.per_sample = False
        self._samples: list[tuple[np.ndarray, np.ndarray] | None] = []
        self._reference_samples: list[tuple[np.ndarray, np.ndarray] | None] = []

    # -- tracing -------------------------------------------------------------------------

    def _trace(self) -> None:
        """One pass on batch 0 recording when each submodule starts and ends."""
        clock = iter(range(1 << 62))
        handles = []
        storable: dict[str, bool] = {}

        inputs: dict[str, list[tuple[Tensor, int | None]]] = {}

        def hooks(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
            def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
                self._calls[name] = self._calls.get(name, 0) + 1
                self._start.setdefault(name, next(clock))
                inputs[name] = [(t, _version(t)) for t in _tensors((args, kwargs))]

            def post(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
                self._end[name] = next(clock)
                # Effects on the caller's tensors that a replay would lose: an input
                # rewritten in place, or an input (or a view of one) handed back.
                seen = inputs.pop(name, [])
                rewritten = any(v is None or _version(t) != v for t, v in seen)
                returned = (_storages(out) & _storages([t for t, _ in seen])) - {0}
                storable[name] = (storable.get(name, True) and _storable(out)
                                  and not rewritten and not returned)

            return pre, post

        for name, module in self._modules.items():
            if name:
                pre, post = hooks(name)
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post, with_kwargs=True))
        try:
            with torch.no_grad():
                self._call(0)
        finally:
            for h in handles:
                h.remove()
        # A layer whose weight an enclosing module reads directly (MultiheadAttention's
        # out_proj) never runs itself: a change to it can act from that module's start.
        for n in self.layers:
            if n not in self._start:
                parts = n.split(".")
                reader = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)
                               if ".".join(parts[:k]) in self._start), None)
                if reader is not None:
                    self._start[n], self._end[n] = self._start[reader], self._end[reader]
        # A layer that batch 0 does not reach (a branch only some inputs take) may act
        # anywhere in another batch: a change to it is measured by a full pass.
        for n in self.layers:
            if n not in self._start:
                self._start[n] = self._end[n] = 0
        self._replayable = {n for n, c in self._calls.items() if c == 1 and storable.get(n)}
        # A weight shared with another module (tied embeddings) changes that module too:
        # nothing may be replayed before such a layer.
        owners: dict[int, int] = {}
        for module in self._modules.values():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self._shared = {n for n in self.layers
                        if owners.get(id(self.model.get_parameter(self._keys[n])), 0) > 1}

    def _plan(self, first: int) -> frozenset[str]:
        """The outermost replayable submodules that finish before event ``first``."""
        if first not in self._plans:
            done = {n for n in self._replayable if self._end[n] < first}
            self._plans[first] = frozenset(
                n for n in done
                if not any(".".join(n.split(".")[:k]) in done for k in range(1, n.count(".") + 1))
            )
        return self._plans[first]

    # -- running -------------------------------------------------------------------------

    def _call(self, i: int, weights: Mapping[str, Tensor] | None = None) -> Any:
        split = self._splits[i]
        if not weights:
            return self.model(*split.args, **split.kwargs)
        return functional_call(
            self.model, {self._keys.get(n) or weight_key(self.model, n): w
                         for n, w in weights.items()}, split.args, split.kwargs)

    def _loss(self, i: int, out: Any) -> float:
        split = self._splits[i]
        value = self.objective.loss_of_output(out, i, self.objective.batches[i], split.targets,
                                              split.attention_mask)
        if self.per_sample:
            self._samples[i] = self.objective.sample_losses(
                out, i, split.targets, split.attention_mask, split.batch_size)
        return float(value)

    def sample_losses(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last :meth:`record` / :meth:`losses` call's loss per sample over all batches,
        with weights giving the mean of the per-batch losses (each batch counts ``1 / B``,
        its samples by their share of its loss); None unless :attr:`per_sample` is set and
        the objective splits by sample on every batch."""
        parts = self._samples
        if not self.per_sample or not parts or any(p is None for p in parts):
            return None
        values = np.concatenate([p[0] for p in parts if p is not None])
        weights = np.concatenate([p[1] / len(parts) for p in parts if p is not None])
        return values, weights

    def record(self, weights: Mapping[str, Tensor] | None = None) -> np.ndarray:
        """Run every batch with ``weights`` (FQN → weight) and store what later passes replay.

        Returns:
            The loss on each batch; later :meth:`losses` calls change weights relative to
            these.
        """
        self._reference = dict(weights or {})
        store: dict[str, list[Any]] = {n: [] for n in self._wanted}

        def keep(name: str) -> Callable[..., None]:
            def post(_m: nn.Module, _args: Any, out: Any) -> None:
                store[name].append(_clone(out))
            return post

        # first of the module's forward hooks: the output its forward returns, which the
        # replay hands back from forward, before the user's hooks (they run on it again)
        hooks = [self._modules[n].register_forward_hook(keep(n), prepend=True)
                 for n in self._wanted]
        losses = np.zeros(len(self._splits))
        self._samples = [None] * len(self._splits)
        try:
            with torch.no_grad():
                for i in range(len(self._splits)):
                    losses[i] = self._loss(i, self._call(i, self._reference))
        finally:
            for h in hooks:
                h.remove()
        # The trace saw batch 0; a module that another batch calls more or less often
        # (data-dependent control flow) is not replayed.
        uneven = sorted(n for n, outs in store.items() if len(outs) != len(self._splits))
        if uneven:
            log.debug("not replayed (called a different number of times per batch): %s",
                      uneven[:5])
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad and not weights:
            raise ValueError(f"the float model's loss is not finite on calibration batch(es) "
                             f"{bad[:5]} ({losses[bad[0]]}): check loss_fn and the data")
        self._store = {n: outs for n, outs in store.items() if n not in uneven}
        self.reference_losses = losses
        self._reference_samples = list(self._samples)
        self.passes += 1.0
        size_mb = sum(_nbytes(v) for outs in self._store.values() for v in outs) / 2**20
        log.debug("replay store: %d submodules, %.1f MiB", len(self._store), size_mb)
        if not self._verified:
            self._verified = True
            self._verify()
            self._samples = list(self._reference_samples)
        return losses.copy()

    #: layers (spread over the forward order) whose replay the self-check compares
    VERIFY_LAYERS = 8

    def _verify(self) -> None:
        """Replay batch 0 from several layers with their weights unchanged: the loss must
        be the recorded one. The trace sees in-place rewrites of a module's arguments only;
        a model that rewrites a stored tensor some other way (through an attribute, a
        global) would make replayed losses wrong, and this check turns replay off instead.
        Costs batch 0 replayed from each checked layer on: about one pass over 4 batches."""
        order = sorted((n for n in self.layers if n not in self._shared), key=self._start.__getitem__)
        k = min(self.VERIFY_LAYERS, len(order))
        picks = sorted({order[round(j * (len(order) - 1) / max(k - 1, 1))] for j in range(k)},
                       key=self._start.__getitem__)
        ref = self.reference_losses[0]
        if not math.isfinite(ref):  # nothing to compare with: the caller names the loss
            return
        weights = {n: self.model.get_parameter(self._keys[n]) for n in picks}
        for name in picks:
            first = self._start[name]
            self._active = self._plan(first) & self._store.keys()
            self._batch = 0
            try:
                with torch.no_grad():
                    got = self._loss(0, self._call(0, {name: weights[name], **self._reference}))
            finally:
                self._active = frozenset()
            self.passes += self._work(first) / len(self._splits)
            if not math.isclose(got, ref, rel_tol=1e-5, abs_tol=REPLAY_ABS_TOL):
                self.exact = False
                log.warning(
                    "replaying %s's forward from layer %s does not reproduce a full pass "
                    "(loss %.6g, recorded %.6g): the model rewrites a stored tensor in a way "
                    "mpsearch cannot trace; every measurement now runs the whole network "
                    "(exact, slower)", type(self.model).__name__, name, got, ref)
                return

    def losses(self, changes: Mapping[str, Tensor], *, replay: bool = True) -> np.ndarray:
        """Loss on each batch with the recorded weights, ``changes`` applied on top.

        ``replay=False`` recomputes the whole network (same result, for comparisons).
        """
        if not changes:
            self._samples = list(self._reference_samples)
            return self.reference_losses.copy()
        unknown = [n for n in changes if n not in self._start]
        if unknown:
            raise ValueError(f"cannot change layer(s) {unknown[:5]}: not traced")
        first = min(0 if n in self._shared else self._start[n] for n in changes)
        replay = replay and self.exact
        self.passes += self._work(first) if replay else 1.0
        weights = {**self._reference, **changes}
        out = np.zeros(len(self._splits))
        self._samples = [None] * len(self._splits)
        self._active = self._plan(first) & self._store.keys() if replay else frozenset()
        try:
            with torch.no_grad():
                for i in range(len(self._splits)):
                    self._batch = i
                    out[i] = self._loss(i, self._call(i, weights))
        finally:
            self._active = frozenset()
        if not np.all(np.isfinite(out)):
            raise ValueError(f"the loss is not finite with layer(s) {sorted(changes)[:5]} "
                             "changed")
        return out

    def skipped_fraction(self, layer: str) -> float:
        """Share of the traced module events that precede ``layer`` (work a probe skips)."""
        return 1.0 - self._work(0 if layer in self._shared else self._start[layer])

    def _work(self, first: int) -> float:
        """Share of a pass recomputed when the first change is at event ``first``."""
        total = max(self._end.values(), default=0) + 1
        return 1.0 - first / total if total else math.nan

    def __enter__(self) -> Self:
        self._trace()
        self._wanted = set().union(*(self._plan(self._start[n]) for n in self.layers))
        self._patched = []
        for name in self._wanted:
            module = self._modules[name]

            def forward(*args: Any, _name: str = name,
                        _original: Callable[..., Any] = module.forward, **kwargs: Any) -> Any:
                if _name in self._active:
                    return _clone(self._store[_name][self._batch])
                return _original(*args, **kwargs)

            module.forward = forward
            self._patched.append(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self._patched:
            del module.forward
        self._patched = []
        self._store = {}
