"""The calibration objective: what "the loss" means for a model and its data.

Decided once from the first batch and the model's first output:

1. ``loss_fn`` a callable: the user's ``loss_fn(output, batch) -> scalar tensor``;
2. ``loss_fn=None`` or ``"divergence"`` (the default): the divergence of the model's
   output from the *float* model's output on the same batch — KL over the last dimension
   for logits (``(N, C)``, ``(N, T, C)``), mean squared error for hidden states such as
   ``last_hidden_state``, for a value per sample (``(N,)``, ``(N, 1)``), for outputs of
   four or more dimensions (images, score maps), for rows of length 1 (normalized
   embeddings) and for outputs whose targets are real numbers that are not class
   distributions (regression; one-hot or smoothed labels are classes)
   (:func:`divergence_kind`) — masked by ``attention_mask`` where there is one. A model
   whose outputs are probabilities (it ends in softmax) is compared through their
   logarithms. Targets in the batch are not needed and not used otherwise;
3. ``loss_fn="task"``: the task loss on the batch's targets — the output's own ``.loss``
   (Hugging Face models given ``labels``), else cross-entropy of the logits.

Why the divergence is the default, even where there are labels: post-training
quantization should keep the float model's function, and that is what users check (output
KL, top-1 agreement). The divergence is zero with a zero gradient at the float weights, so
the loss increase of a quantized layer is its pure second-order term, never negative, and
its Hessian there is the Gauss-Newton matrix (positive semi-definite, which suits the
Hutchinson estimator). A task loss has a non-zero gradient at a trained model's weights on
finite calibration data, and its first-order term is noise of either sign that swamps
small damage: on the MNIST CNN, quantizing a layer alone *lowered* the held-out label
loss for 5 of 16 (layer, bits) entries, and single-layer ratings measured on the labels
(``qerror``) made a searched map 2.9× worse in output KL than uniform INT4 where the
divergence made it 1.09× better (``results/sensitivity_fidelity.md``, section 4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch._report import warn_once
from mpsearch.batches import (
    Batch,
    call,
    first_output,
    ignored_outputs,
    output_kind,
    slice_batch,
    split_batch,
    to_device,
)

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Batch], Tensor]
#: what ``loss_fn=`` accepts: a callable, ``"divergence"`` / ``None`` (default) or ``"task"``
LossSpec = LossFn | Literal["divergence", "task"] | None
LOSS_NAMES = ("divergence", "task")


def compared_output(output: Any) -> Tensor:
    """The tensor a divergence compares (:func:`first_output`), a value per sample
    ``(N,)`` as ``(N, 1)``: the last dimension is what a position's divergence sums over,
    and the samples stay the leading one."""
    first: Tensor = first_output(output)
    if first.dim() == 0:
        return first.reshape(1)  # one number for the whole batch (no rows to keep)
    return first[:, None] if first.dim() == 1 else first


#: probabilities below this are compared as this (log 0 would be -inf, and 0 · -inf NaN)
_TINY_PROB = 1e-12


def is_distribution(t: Tensor | None, classes: int) -> bool:
    """True where every row of ``t`` (its last dimension, of ``classes`` entries) is a
    probability distribution: non-negative, summing to 1 (one-hot or smoothed labels, a
    softmax output)."""
    if (t is None or not t.is_floating_point() or t.dim() < 1 or t.numel() == 0
            or classes < 2 or t.shape[-1] != classes):
        return False
    v = t.detach().float()
    return bool((v >= 0).all() and ((v.sum(-1) - 1).abs() <= 1e-3).all())


def unit_rows(t: Tensor) -> bool:
    """True where every row of ``t`` (its last dimension) has length 1: normalized
    embeddings (a sentence encoder's), not class scores."""
    if not t.is_floating_point() or t.dim() < 2 or t.shape[-1] < 2 or t.numel() == 0:
        return False
    return bool(((t.detach().float().norm(dim=-1) - 1).abs() <= 1e-3).all())


def divergence_kind(output: Any, targets: Tensor | None) -> tuple[Literal["kl", "mse"], bool]:
    """How an output is compared with the float model's: ``("kl", probabilities)`` for
    class scores, ``("mse", False)`` for anything else.

    KL for logits (:func:`mpsearch.batches.output_kind`) — unless the rows are unit vectors
    (normalized embeddings, :func:`unit_rows`), or the batch's targets are real numbers
    that are not class distributions (a regressor with several outputs): those take MSE;
    one-hot or smoothed float labels are classes. ``probabilities``: the output's
    rows are probability distributions already (a model ending in softmax), compared through
    their logarithms (a softmax of probabilities would flatten them)."""
    if output_kind(output) != "logits":
        return "mse", False
    first = compared_output(output)
    if unit_rows(first):
        return "mse", False
    classes = int(first.shape[-1]) if first.dim() else 1
    if (targets is not None and targets.is_floating_point()
            and not is_distribution(targets, classes)):
        return "mse", False
    return "kl", is_distribution(first, classes)


def log_probabilities(probs: Tensor) -> Tensor:
    """Logarithms of probabilities, as logits a KL compares (see :func:`divergence_kind`)."""
    return probs.float().clamp_min(_TINY_PROB).log()


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over positions; ``mask`` (same leading shape, 1 = real token) weights them."""
    if mask is not None and tuple(mask.shape) == tuple(per_position.shape):
        m = mask.to(per_position.dtype)
        return (per_position * m).sum() / m.sum().clamp_min(1.0)
    return per_position.mean()


def _kl_per_position(logits: Tensor, ref_logits: Tensor) -> Tensor:
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(ref_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _mse_per_position(hidden: Tensor, ref_hidden: Tensor) -> Tensor:
    return (hidden.float() - ref_hidden.float()).pow(2).mean(-1)


def kl_divergence(logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(softmax(ref) ‖ softmax(logits)) over the last dimension, averaged over positions."""
    return _masked_mean(_kl_per_position(logits, ref_logits), mask)


def mse_divergence(hidden: Tensor, ref_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the last dimension, averaged over positions."""
    return _masked_mean(_mse_per_position(hidden, ref_hidden), mask)


def _per_sample(per_position: Tensor, mask: Tensor | None,
                rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Each sample's mean over its positions and its share of the batch mean (weights that
    sum to 1 and give back :func:`_masked_mean`), or None where the leading dimension is
    not the batch's samples (a time-major output)."""
    if per_position.ndim == 0 or per_position.shape[0] != rows or rows < 1:
        return None
    flat = per_position.detach().reshape(rows, -1).double()
    if mask is not None and tuple(mask.shape) == tuple(per_position.shape):
        m = mask.detach().reshape(rows, -1).double()
    else:
        m = torch.ones_like(flat)
    counts = m.sum(1)
    if not counts.sum() > 0:  # every position masked: no sample carries the loss
        return None
    values = (flat * m).sum(1) / counts.clamp_min(1.0)
    weights = counts / counts.sum().clamp_min(1.0)
    return values.cpu().numpy(), weights.cpu().numpy()


def mean_and_stderr(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted mean of independent values (weights summing to 1) and its standard error:
    ``sqrt(s² Σ w²)`` with ``s²`` the weighted variance, unbiased (``(Σ w (v − m)²) /
    (1 − Σ w²)``); the plain ``std(ddof=1) / sqrt(n)`` for equal weights. inf
    for one value: one sample gives no estimate of its error."""
    w = np.asarray(weights, dtype=float)
    v = np.asarray(values, dtype=float)
    mean = float(np.dot(w, v))
    sw2 = float(np.dot(w, w))
    if v.size < 2 or sw2 >= 1.0:
        return mean, math.inf
    var = float(np.dot(w, (v - mean) ** 2)) / (1.0 - sw2)
    return mean, math.sqrt(max(var, 0.0) * sw2)


def _compared(output: Any) -> str:
    """Which of a model's outputs :func:`first_output` takes, in words."""
    for key in ("logits", "last_hidden_state"):
        value = (output.get(key) if isinstance(output, Mapping)
                 else getattr(output, key, None))
        if isinstance(value, Tensor):
            return repr(key)
    return "the first"


def effective_samples(increase: np.ndarray, weights: np.ndarray) -> float | None:
    """How many samples carry a loss increase (each sample's increase over the float
    model, weights summing to 1): ``(Σ c)² / Σ c²`` over the contributions ``c = w ·
    max(increase, 0)`` — n when every sample is hurt alike, 1 when one sample holds it
    all. None where no sample's loss increased."""
    c = np.asarray(weights, dtype=float) * np.clip(np.asarray(increase, dtype=float), 0.0, None)
    square = float(np.dot(c, c))
    if not square > 0.0:
        return None
    return float(c.sum()) ** 2 / square


def _rows_independent(model: nn.Module, batch: Batch, out: Any,
                      device: torch.device) -> bool | None:
    """Whether the last row of ``batch`` alone gives the last row of its output ``out``:
    the leading dimension is then the samples (a model that transposes to sequence-first
    modules inside included), and not where time leads (the last time step alone sees
    none of the others). None where it cannot tell (one row, an output whose leading
    dimension is not the batch's, or a model that fails on one row)."""
    n = split_batch(batch).batch_size
    full = first_output(out)
    if n < 2 or not isinstance(full, Tensor) or full.dim() == 0 or full.shape[0] != n:
        return None
    try:
        last = first_output(call(model, to_device(split_batch(slice_batch(batch, n - 1, n)),
                                                  device)))
    except Exception:  # noqa: BLE001 (a model built for its batch size, say: cannot tell)
        return None
    if not isinstance(last, Tensor) or last.shape != full[n - 1:].shape:
        return False
    ref = full[n - 1:].float()
    return bool((last.float() - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-6)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy over the last dimension of ``logits``; ``-100`` targets are ignored.

    Raises:
        ValueError: there is not one target per prediction.
    """
    if logits.dim() == 0 or logits.numel() // max(logits.shape[-1], 1) != targets.numel():
        raise ValueError(
            f"loss_fn='task': the model predicts {tuple(logits.shape)} (one row of class "
            f"scores per target over the last dimension) but the batch's targets are "
            f"{tuple(targets.shape)}: give one class index per prediction, or use the "
            "default divergence loss (no targets needed)")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


class Objective:
    """The loss of a model on calibration batch ``i``.

    Call :meth:`prepare` once on the float model before any weight changes; it records the
    float reference outputs needed by divergence losses.

    Attributes:
        kind: ``"custom"``, ``"hf_loss"``, ``"cross_entropy"``, ``"kl"`` or ``"mse"``.
        batches: the calibration batches.
    """

    def __init__(self, batches: Sequence[Batch], loss_fn: LossSpec = None) -> None:
        if isinstance(loss_fn, str) and loss_fn not in LOSS_NAMES:
            raise ValueError(f"loss_fn must be a callable, None, 'divergence' or 'task', "
                             f"got {loss_fn!r}")
        if loss_fn is not None and not isinstance(loss_fn, str) and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable or a name, got {type(loss_fn).__name__}")
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.kind = "custom" if callable(loss_fn) else ""
        #: the model outputs probabilities (it ends in softmax): a KL compares their logarithms
        self.probabilities = False
        self._refs: list[Tensor] = []
        #: False where the leading dimension is not the samples (a model fed sequence-first,
        #: time leading): :meth:`sample_losses` and Fisher's per-sample pieces do not split
        self.batch_first = True

    @property
    def is_divergence(self) -> bool:
        """True where the loss compares with the float model's own output."""
        return self.kind in ("kl", "mse")

    @torch.no_grad()
    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Decide the loss kind and record float reference outputs where needed."""
        self.batch_first = not any(
            isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and not m.batch_first
            for m in model.modules())
        if not callable(self.loss_fn):
            split = to_device(split_batch(self.batches[0]), device)
            out = call(model, split)
            measured = _rows_independent(model, self.batches[0], out, device)
            if measured is not None:  # the data say it, not the modules' flags
                self.batch_first = measured
            if self.loss_fn == "task":
                if split.targets is None:
                    raise ValueError("loss_fn='task' needs targets in the batches "
                                     "((inputs, targets) pairs or a 'labels' key)")
                loss = getattr(out, "loss", None)
                self.kind = "hf_loss" if isinstance(loss, Tensor) else "cross_entropy"
                if self.kind == "cross_entropy":
                    self._check_targets(out, split)
            else:
                self.kind, self.probabilities = divergence_kind(out, split.targets)
                first = first_output(out)
                shape = tuple(first.shape) if isinstance(first, Tensor) else ()
                why = ""
                if self.kind == "mse" and output_kind(out) == "logits":
                    why = (" (its rows are unit vectors: embeddings)"
                           if unit_rows(compared_output(out)) else
                           " (float targets that are not class distributions: a regression)")
                elif self.probabilities:
                    why = " (its rows are probabilities: compared as their logarithms)"
                log.info("divergence loss: %s of the output %s to the float model's%s",
                         "KL over the last dimension" if self.kind == "kl" else "MSE", shape,
                         why)
                others = ignored_outputs(out)
                if others:  # said once: every stage of a search prepares an objective
                    warn_once(log, f"the model returns {len(others) + 1} tensors and the "
                              f"divergence compares only {_compared(out)} with the float "
                              "model's; a layer that feeds only the others ("
                              + ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
                              + ") goes unmeasured (a search rates it harmless and gives it "
                              "the fewest bits). Pass loss_fn= to score them too")
        self._refs = []
        if self.is_divergence:
            for i, batch in enumerate(self.batches):
                out = call(model, to_device(split_batch(batch), device))
                ref = self.compared(out).detach()
                if not torch.isfinite(ref).all():
                    raise ValueError(f"the float model's output on batch {i} of the data is "
                                     "non-finite (NaN/inf): check the inputs and the weights")
                self._refs.append(ref)

    def compared(self, out: Any) -> Tensor:
        """The tensor of ``out`` a divergence compares (:func:`compared_output`), as
        log-probabilities where the model outputs probabilities."""
        y = compared_output(out)
        return log_probabilities(y) if self.probabilities else y

    def _check_targets(self, out: Any, split: Any) -> None:
        """One target per prediction on batch 0 (the full error here, not a piece's
        later); on every batch, class indices within the output's classes (or -100), and
        as many target rows as input rows where batch 0 has."""
        logits = first_output(out)
        classes = int(logits.shape[-1]) if logits.dim() else 1
        rows = split.targets.dim() > 0 and split.targets.shape[0] == split.batch_size
        for i, batch in enumerate(self.batches):
            one = split_batch(batch)
            t = one.targets
            if t is None:
                continue
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"loss_fn='task': batch {i}'s targets are {t.dtype}; "
                                 "cross-entropy takes class indices (integers)")
            bad = t[(t != -100) & ((t < 0) | (t >= classes))]
            if bad.numel():
                raise ValueError(f"loss_fn='task': batch {i} has targets "
                                 f"{sorted(set(bad.tolist()))[:5]} outside the model's "
                                 f"{classes} classes (0–{classes - 1}, or -100 to ignore)")
            if rows and (t.dim() == 0 or t.shape[0] != one.batch_size):
                raise ValueError(f"loss_fn='task': batch {i} has {one.batch_size} samples "
                                 f"but targets of shape {tuple(t.shape)}")
        cross_entropy(logits, split.targets)

    def loss(self, model: nn.Module, i: int, device: torch.device) -> Tensor:
        """Loss of ``model`` on batch ``i`` (a scalar tensor, differentiable)."""
        batch = self.batches[i]
        split = to_device(split_batch(batch), device)
        out = call(model, split)
        return self.loss_of_output(out, i, batch, split.targets, split.attention_mask)

    def loss_of_output(self, out: Any, i: int, batch: Batch, targets: Tensor | None,
                       mask: Tensor | None) -> Tensor:
        """Loss of an already computed output of batch ``i``."""
        if self.kind == "custom":
            assert callable(self.loss_fn)
            value = self.loss_fn(out, batch)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise TypeError(
                    f"loss_fn must return a scalar tensor, got {type(value).__name__}"
                    + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
                )
            return value.reshape(())
        if self.kind == "hf_loss":
            return out.loss
        if self.kind == "cross_entropy":
            if targets is None:
                raise ValueError(f"batch {i} has no targets but batch 0 had some")
            return cross_entropy(first_output(out), targets)
        if not self._refs:
            raise RuntimeError("Objective.prepare() must run before a divergence loss")
        ref = self._refs[i]
        if self.kind == "kl":
            return kl_divergence(self.compared(out), ref, mask)
        return mse_divergence(self.compared(out), ref, mask)

    @torch.no_grad()
    def sample_losses(self, out: Any, i: int, targets: Tensor | None, mask: Tensor | None,
                      rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The loss of an already computed output of batch ``i`` per sample: each of the
        ``rows`` samples' value and its weight in the batch's loss (weights summing to 1;
        ``Σ weight · value`` is :meth:`loss_of_output`). None where the loss does not split
        by sample: a custom ``loss_fn``, a Hugging Face model's own loss, or an output whose
        leading dimension is not the batch's samples (``rows`` differs, or the model has
        sequence-first recurrent or attention modules, ``batch_first=False``)."""
        if not self.batch_first:
            return None
        if self.kind in ("kl", "mse"):
            if not self._refs:
                raise RuntimeError("Objective.prepare() must run before a divergence loss")
            per_position = (_kl_per_position if self.kind == "kl" else _mse_per_position)(
                self.compared(out), self._refs[i])
            return _per_sample(per_position, mask, rows)
        if self.kind == "cross_entropy" and targets is not None:
            logits = first_output(out)
            if tuple(logits.shape[:-1]) != tuple(targets.shape):
                return None
            per_position = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           targets.reshape(-1), ignore_index=-100,
                                           reduction="none").reshape(targets.shape)
            return _per_sample(per_position, targets != -100, rows)
        return None
