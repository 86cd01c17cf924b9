"""Diagonal Fisher sensitivity from per-sample squared gradients.

Ω[l, b] = ½ · Σ_i F_ii (Q_b(w_i) − w_i)², F_ii = Σ_m c_m g_mi², where g_m is the gradient
of micro-batch m's (pseudo-)loss and c_m weights it so that F estimates the Hessian of the
mean calibration loss. Squaring per sample, never the batch gradient: the batch gradient of
a model at a minimum is close to zero while every sample's is not.

What is differentiated depends on the calibration loss:

- **targets** (cross-entropy, a Hugging Face ``.loss``, or a custom ``loss_fn``): the
  empirical Fisher, one sample at a time;
- **KL to the float model's logits** (no targets): the loss and its gradient are zero at the
  float weights, but its Hessian there is the Fisher of the model's predictive distribution,
  so each position's label is *sampled* from the float model's softmax (seeded) and
  g_m is the gradient of the cross-entropy to those labels: E[g gᵀ] = Hessian;
- **MSE to the float model's hidden states**: likewise with Gaussian probes:
  g_m = Jᵀz, z ~ N(0, I), E[g gᵀ] = JᵀJ, and the MSE's Hessian is (2 / (positions · D)) JᵀJ.

With ``block=True`` the whole layer block enters, not only its diagonal:
Ω[l, b] = ½ · Σ_m c_m (g_m · ΔW_lb)² ≈ ½ ΔWᵀ F ΔW, at no extra cost.

The standard error is that of the sum over micro-batches.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mpsearch._report import some
from mpsearch._state import functional_call
from mpsearch.batches import batch_rows, first_output, slice_batch, split_batch, to_device
from mpsearch.layers import layer_weight, weight_key
from mpsearch.losses import cross_entropy

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.losses import Objective
    from mpsearch.quant import QuantConfig

from mpsearch.sensitivity.base import SensitivityTable

log = logging.getLogger(__name__)


def _positions(split_mask: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """1 for each real position of an output of ``shape`` (all but the last dimension)."""
    if split_mask is not None and tuple(split_mask.shape) == shape[:-1]:
        return split_mask.float()
    return torch.ones(shape[:-1])


@dataclass(frozen=True, kw_only=True)
class Fisher:
    """Diagonal (or block) Fisher sensitivity estimator.

    Attributes:
        micro_batch: samples per squared gradient (1 = per-sample). Sampled-label Fishers
            (losses without targets) stay unbiased with larger micro-batches, only noisier;
            the empirical Fisher needs per-sample gradients.
        block: use the layer's whole Fisher block along ΔW instead of its diagonal.
    """

    name: str = field(default="fisher", init=False)
    micro_batch: int = 1
    block: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", "fisher_block" if self.block else "fisher")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")

    def estimate(self, model: nn.Module, modules: Mapping[str, nn.Module],
                 layers: Sequence[LayerInfo], objective: Objective, bits: Sequence[int],
                 qconfig: QuantConfig, *, device: torch.device, seed: int = 0,
                 progress: bool = False) -> SensitivityTable:
        """Accumulate per-sample squared gradients and weigh them by each layer's ΔW²."""
        from mpsearch.quant.apply import quantize_weight

        start = time.perf_counter()
        names = [info.name for info in layers]
        weights = {n: layer_weight(modules[n]).detach() for n in names}
        deltas = {
            (i, j): (quantize_weight(weights[info.name], info.kind, b, qconfig, modules[info.name])
                     - weights[info.name]).to(weights[info.name].dtype)
            for i, info in enumerate(layers) for j, b in enumerate(bits) if b < 32
        }
        per_step: list[np.ndarray] = []  # each sample's contribution to Ω[l, b] (before ½)
        per_step_fisher: list[np.ndarray] = []
        for weight, grads in self.gradients(model, weights, objective, device=device, seed=seed,
                                            progress=progress, desc=self.name):
            k = next(iter(grads.values())).shape[0]
            contrib = np.zeros((k, len(layers), len(bits)))
            fisher = np.zeros((k, len(layers)))
            for li, n in enumerate(names):
                g = grads[n].flatten(1)
                g2 = g.square()
                fisher[:, li] = weight * g2.sum(1).double().numpy()
                for j in range(len(bits)):
                    d = deltas.get((li, j))
                    if d is None:
                        continue
                    d = d.reshape(1, -1)
                    value = ((g * d).sum(1).square() if self.block else (g2 * d.square()).sum(1))
                    contrib[:, li, j] = weight * value.double().numpy()
            per_step.extend(contrib)
            per_step_fisher.extend(fisher)
        steps = np.stack(per_step)
        m = len(steps)
        omega = 0.5 * steps.sum(0)
        omega_se = (0.5 * math.sqrt(m) * steps.std(0, ddof=1) if m > 1
                    else np.full_like(omega, np.inf))
        fisher_sum = np.stack(per_step_fisher)
        trace = fisher_sum.sum(0)
        trace_se = math.sqrt(m) * fisher_sum.std(0, ddof=1) if m > 1 else np.full(len(names), np.inf)
        flat = [n for li, n in enumerate(names) if trace[li] == 0.0]
        if flat:
            log.warning("zero Fisher information for %d layer(s) (no per-sample gradient "
                        "reaches them: e.g. a slice of ReLU channels that never fire, or a "
                        "layer that feeds only outputs the loss does not compare; the "
                        "solver will give them the fewest bits): %s",
                        len(flat), some(flat))
        return SensitivityTable(
            tuple(names), tuple(bits), omega, omega_se,
            columns={"fisher": trace, "fisher_stderr": trace_se},
            estimator=self.name,
            settings={k: v for k, v in asdict(self).items() if k != "name"},
            diagnostics={"gradients": m, "loss": objective.kind,
                         "fisher": "sampled" if objective.is_divergence else "empirical",
                         "time_s": time.perf_counter() - start},
        )

    def gradients(self, model: nn.Module, weights: Mapping[str, Tensor], objective: Objective,
                  *, device: torch.device, seed: int = 0, progress: bool = False,
                  desc: str = "fisher") -> Iterator[tuple[float, dict[str, Tensor]]]:
        """The scaled per-sample (or per-micro-batch) gradients of the pseudo-loss with
        respect to ``weights`` (FQN → weight), piece by piece: ``(c_m, {FQN: (k, *shape)})``,
        so that Σ c_m g g estimates the Hessian of the mean calibration loss."""
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        numel = max(1, sum(int(w.numel()) for w in weights.values()))
        pieces = self._pieces(objective, max(1, min(_VMAP_ROWS, _VMAP_BYTES // (4 * numel))))
        with tqdm(total=sum(p[1][1] - p[1][0] for p in pieces), desc=desc, unit="sample",
                  disable=not progress, leave=False) as bar:
            for i, piece, weight in pieces:
                yield weight, self._gradients(model, objective, i, piece, weights, device, gen)
                bar.update(piece[1] - piece[0])

    def _pieces(self, objective: Objective,
                rows: int = 32) -> list[tuple[int, tuple[int, int, Any], float]]:
        """(batch index, (first row, end row, sub-batch), weight c_m = 1 / batches), at
        most ``rows`` samples a piece when gradients are per sample."""
        rows_per_piece = rows if self.micro_batch == 1 else self.micro_batch
        out = []
        n_batches = len(objective.batches)
        whole = [i for i in range(n_batches) if not _rows_lead(objective, i)]
        if whole:
            log.warning("%d calibration batch(es) do not split into samples along their "
                        "leading dimension (a 0-dim output, or time leading): one "
                        "gradient per batch there, not per sample (%s)", len(whole),
                        "noisier" if objective.is_divergence else
                        "the empirical Fisher becomes the square of the batch gradient: "
                        "pass batches of one sample to keep it per sample")
        for i, batch in enumerate(objective.batches):
            rows = batch_rows(batch)
            if i in whole:
                out.append((i, (0, rows, batch), 1.0 / n_batches))
                continue
            for s0 in range(0, rows, rows_per_piece):
                s1 = min(s0 + rows_per_piece, rows)
                piece = batch if (s0, s1) == (0, rows) else slice_batch(batch, s0, s1)
                out.append((i, (s0, s1, piece), 1.0 / n_batches))
        return out

    def _gradients(self, model: nn.Module, objective: Objective, i: int,
                   piece: tuple[int, int, Any], weights: Mapping[str, Tensor],
                   device: torch.device, gen: torch.Generator) -> dict[str, Tensor]:
        """Scaled gradients, one row per sample (``micro_batch=1``) or per micro-batch."""
        s0, s1, batch = piece
        probe = _Probe(objective, i, s0, s1, gen)
        split = to_device(split_batch(batch), device).for_model(model)
        if self.micro_batch > 1 or not _rows_lead(objective, i):
            return {n: g[None] for n, g in _grad(model, weights, split, probe, batch).items()}
        if objective.kind not in ("custom", "hf_loss") and s1 - s0 > 1:
            try:
                return _vmap_grads(model, weights, split, probe, s1 - s0)
            except Exception as exc:  # noqa: BLE001 (ops without batching rules: loop instead)
                log.debug("per-sample gradients by vmap failed (%s); looping", exc)
        pieces = [slice_batch(batch, r, r + 1) for r in range(s1 - s0)]
        rows = [_grad(model, weights, to_device(split_batch(one), device), probe.row(r), one)
                for r, one in enumerate(pieces)]
        return {n: torch.stack([g[n] for g in rows]) for n in weights}


#: samples per vmapped per-sample-gradient call
_VMAP_ROWS = 32
#: at most this many bytes of float32 per-sample gradients at once: fewer samples a call
#: for models above 33 M searched weights (VGG-16's 138 M: 7 a call, 3.9 GB, not 18 GB)
_VMAP_BYTES = 4 << 30


def _rows_lead(objective: Objective, i: int) -> bool:
    """Whether batch ``i`` splits into samples along its leading dimension, inputs and
    compared output alike (so that per-sample pieces can slice it); a 0-dim output does
    not, nor does a model fed sequence-first (:attr:`Objective.batch_first`)."""
    if not objective.batch_first:
        return False
    if objective.kind not in ("kl", "mse"):
        return True
    ref = objective._refs[i]
    return ref.dim() >= 2 and ref.shape[0] == batch_rows(objective.batches[i])


class _Probe:
    """The pseudo-loss of rows ``s0:s1`` of calibration batch ``i``, its randomness drawn
    up front (vmap cannot draw from a generator).

    Each loss carries the scale √c so that c · g² comes out of the square (see the module
    docstring for why each loss kind is what it is).
    """

    def __init__(self, objective: Objective, i: int, s0: int, s1: int,
                 gen: torch.Generator | None) -> None:
        self.objective, self.i, self.s0, self.s1 = objective, i, s0, s1
        self.kind = objective.kind
        full = split_batch(objective.batches[i])
        self.n_rows = max(full.batch_size, 1)
        self.aux: Tensor | None = None
        self.mask: Tensor | None = None
        if self.kind in ("kl", "mse"):
            ref = objective._refs[i]
            positions = _positions(full.attention_mask, tuple(ref.shape))
            self.total = float(positions.sum().clamp_min(1.0))
            per_sample = _rows_lead(objective, i)
            self.mask = positions[s0:s1] if per_sample else positions
            self.ref = ref[s0:s1] if per_sample else ref
            if gen is not None and self.kind == "kl":
                probs = F.softmax(self.ref.float(), dim=-1).reshape(-1, ref.shape[-1]).cpu()
                self.aux = torch.multinomial(probs, 1, generator=gen).reshape(
                    self.ref.shape[:-1])
            elif gen is not None:
                self.aux = torch.randn(self.ref.shape, generator=gen)
        elif self.kind == "cross_entropy":
            self.targets = full.targets[s0:s1] if full.targets is not None else None

    def row(self, r: int) -> _Probe:
        """The same probe restricted to row ``r`` (relative to ``s0``)."""
        out = _Probe.__new__(_Probe)
        out.__dict__.update(self.__dict__)
        out.s0, out.s1 = self.s0 + r, self.s0 + r + 1
        for key in ("aux", "mask", "ref", "targets"):
            value = getattr(self, key, None)
            if isinstance(value, Tensor):
                setattr(out, key, value[r:r + 1])
        return out

    def loss(self, out: Any, batch: Any, split: Any, aux: Tensor | None = None,
             mask: Tensor | None = None, targets: Tensor | None = None,
             rows: int | None = None) -> Tensor:
        """The pseudo-loss of ``out``; ``rows``: samples it covers (default the probe's)."""
        aux = self.aux if aux is None else aux
        mask = self.mask if mask is None else mask
        y = (self.objective.compared(out) if self.kind in ("kl", "mse")
             else first_output(out) if self.kind == "cross_entropy" else None)
        if self.kind == "kl":
            assert aux is not None and mask is not None and y is not None
            per_pos = F.cross_entropy(y.float().reshape(-1, y.shape[-1]),
                                      aux.to(y.device).reshape(-1), reduction="none")
            return (per_pos * mask.to(y.device).reshape(-1)).sum() / math.sqrt(self.total)
        if self.kind == "mse":
            assert aux is not None and mask is not None and y is not None
            per_pos = (y.float() * aux.to(y.device)).sum(-1)
            return (per_pos * mask.to(y.device)).sum() * math.sqrt(
                2.0 / (self.total * y.shape[-1]))
        scale = (self.s1 - self.s0 if rows is None else rows) / math.sqrt(self.n_rows)
        if self.kind == "cross_entropy":
            t = self.targets if targets is None else targets
            assert t is not None and y is not None
            return cross_entropy(y, t.to(y.device)) * scale
        # hf_loss / custom: the empirical Fisher of the per-sample loss; a micro-batch of k
        # samples gives the mean of k gradients, so k · g_m squared approximates the sum
        # of their squares.
        value = self.objective.loss_of_output(out, self.i, batch, split.targets,
                                              split.attention_mask)
        return value * scale


def _call(model: nn.Module, params: Mapping[str, Tensor], args: Any, kwargs: Any) -> Any:
    return functional_call(model, {weight_key(model, n): p for n, p in params.items()},
                           tuple(args), dict(kwargs))


def _check(grads: Mapping[str, Tensor], probe: _Probe) -> None:
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise ValueError(f"NaN/inf gradient on calibration batch {probe.i}, samples "
                         f"{probe.s0}:{probe.s1}, in layer(s) {bad}")


def _grad(model: nn.Module, weights: Mapping[str, Tensor], split: Any,
          probe: _Probe, batch: Any) -> dict[str, Tensor]:
    """One gradient of ``probe``'s pseudo-loss with respect to every layer weight
    (``batch``: the samples ``split`` holds, as the user's ``loss_fn`` receives them)."""
    params = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    with torch.enable_grad():
        split = split.for_model(model)
        out = _call(model, params, split.args, split.kwargs)
        loss = probe.loss(out, batch, split)
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite loss on calibration batch {probe.i}, samples "
                             f"{probe.s0}:{probe.s1}")
        # a loss that does not depend on the output (a constant loss_fn) has no gradient:
        # zero information, which the table's warning names, as the other estimators do
        grads = (torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                 if loss.requires_grad else (None,) * len(params))
    result = {n: torch.zeros_like(weights[n]) if g is None else g.detach()
              for n, g in zip(params, grads)}
    _check(result, probe)
    return result


def _vmap_grads(model: nn.Module, weights: Mapping[str, Tensor], split: Any, probe: _Probe,
                rows: int) -> dict[str, Tensor]:
    """Per-sample gradients of a sub-batch in one vectorised call."""
    keys = [k for k, v in split.kwargs.items() if isinstance(v, Tensor) and v.dim() > 0
            and v.shape[0] == rows]
    fixed = {k: v for k, v in split.kwargs.items() if k not in keys}
    args = list(split.args)
    if not all(isinstance(a, Tensor) and a.shape[0] == rows for a in args):
        raise TypeError("positional inputs without a batch dimension")
    side: dict[str, Tensor] = {}
    for key, value in (("aux", probe.aux), ("mask", probe.mask),
                       ("targets", getattr(probe, "targets", None))):
        if isinstance(value, Tensor):
            side[key] = value

    def one(params: dict[str, Tensor], a: list[Tensor], kw: dict[str, Tensor],
            extra: dict[str, Tensor]) -> Tensor:
        out = _call(model, params, [t[None] for t in a],
                    {**fixed, **{k: t[None] for k, t in kw.items()}})
        return probe.loss(out, None, split, rows=1, **{k: t[None] for k, t in extra.items()})

    with warnings.catch_warnings():
        # ops without a batching rule (LSTM, fused attention) run one sample at a time:
        # still correct, and PyTorch says so once per op; the timing is in the table
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0))(
            dict(weights), args, {k: split.kwargs[k] for k in keys}, side)
    result = {n: g.detach() for n, g in grads.items()}
    _check(result, probe)
    return result
