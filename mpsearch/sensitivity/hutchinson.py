"""Hessian-trace sensitivity (HAWQ-V2/V3) by Hutchinson's estimator.

One Hessian-vector product over all layer weights at once, with a Rademacher probe v,
gives ``v_l · (Hv)_l``: an unbiased sample of every layer's block trace Tr(H_ll). Probe k
uses calibration batch ``k mod n_batches``, so after whole rounds the mean estimates the
trace of the Hessian of the mean calibration loss, and the standard error covers both the
probe and the batch variation. Sampling stops after a whole round once every layer's
relative standard error (on |mean|) is under ``tol``, or at ``max_probes``.

Ω[l, b] = ½ · Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖², the trace clipped at 0 (a negative
curvature estimate does not make quantization noise helpful).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mpsearch.sensitivity.base import SensitivityTable

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.losses import Objective
    from mpsearch.quant import QuantConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson trace estimates, one per named tensor.

    Attributes:
        mean: estimated trace per name.
        stderr: its standard error per name.
        n_probes: probes used.
        converged: whether every relative standard error got under the tolerance.
        history: after each whole round, (probes so far, largest relative standard error).
    """

    mean: dict[str, float]
    stderr: dict[str, float]
    n_probes: int
    converged: bool
    history: list[tuple[int, float]] = field(default_factory=list)


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """Fused attention kernels have no double backward; the math kernel has."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _relative_stderr(mean: np.ndarray, stderr: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = stderr / np.abs(mean)
    return np.where(np.isfinite(rel), rel, np.inf)


def hutchinson_traces(params: Mapping[str, Tensor], loss_of_batch: Callable[[int], Tensor],
                      n_batches: int, *, tol: float = 0.1, min_probes: int = 8,
                      max_probes: int = 200, seed: int = 0,
                      progress: bool = False) -> TraceEstimate:
    """Estimate Tr(H_ll) for every tensor in ``params`` with shared Rademacher probes.

    Args:
        params: named tensors (requiring grad) whose diagonal Hessian blocks are wanted.
        loss_of_batch: returns the (differentiable) loss of calibration batch ``i``.
        n_batches: number of calibration batches; probes cycle over them.
        tol: stop once every relative standard error is below this (checked after whole
            rounds over the batches, and not before ``min_probes``).
        min_probes: fewest probes.
        max_probes: most probes.
        seed: seeds the probes (reproducible).
        progress: show a progress bar.

    Raises:
        ValueError: the loss or a gradient is NaN/inf (naming the tensors).
    """
    names = list(params)
    tensors = [params[n] for n in names]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[np.ndarray] = []
    history: list[tuple[int, float]] = []
    converged = False
    bar = tqdm(total=max_probes, desc="hutchinson", unit="probe", disable=not progress,
               leave=False)
    try:
        with _double_backward_attention():
            for k in range(max_probes):
                i = k % n_batches
                loss = loss_of_batch(i)
                if not bool(torch.isfinite(loss)):
                    raise ValueError(f"the calibration loss is {loss.item()} on batch {i}; "
                                     "check the data and the model")
                grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
                bad = [n for n, g in zip(names, grads) if g is not None
                       and not bool(torch.isfinite(g).all())]
                if bad:
                    raise ValueError(f"NaN/inf gradient on batch {i} in layer(s) {bad[:10]}")
                vs = [torch.randint(0, 2, t.shape, generator=gen).to(t.device, t.dtype) * 2 - 1
                      for t in tensors]
                used = [(g, v, t) for g, v, t in zip(grads, vs, tensors)
                        if g is not None and g.requires_grad]
                sample = np.zeros(len(names))
                if used:
                    gv = sum((g * v).sum() for g, v, _ in used)
                    hvs = torch.autograd.grad(gv, [t for _, _, t in used], allow_unused=True)
                    hv_iter = iter(hvs)
                    for j, (g, v) in enumerate(zip(grads, vs)):
                        if g is None or not g.requires_grad:
                            continue
                        hv = next(hv_iter)
                        if hv is not None:
                            sample[j] = float((v * hv).sum())
                if not np.all(np.isfinite(sample)):
                    bad = [n for n, s in zip(names, sample) if not math.isfinite(s)]
                    raise ValueError(f"NaN/inf Hessian-vector product in layer(s) {bad[:10]}")
                samples.append(sample)
                bar.update(1)
                n = len(samples)
                if n % n_batches == 0 and n >= 2:
                    arr = np.stack(samples)
                    mean, se = arr.mean(0), arr.std(0, ddof=1) / math.sqrt(n)
                    worst = float(_relative_stderr(mean, se).max())
                    history.append((n, worst))
                    bar.set_postfix(rel_stderr=f"{worst:.3f}")
                    if n >= min_probes and worst < tol:
                        converged = True
                        break
    finally:
        bar.close()
    arr = np.stack(samples)
    mean = arr.mean(0)
    se = arr.std(0, ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else np.full(len(names), np.inf)
    return TraceEstimate(dict(zip(names, mean.tolist())), dict(zip(names, se.tolist())),
                         len(arr), converged, history)


@dataclass(frozen=True, kw_only=True)
class Hutchinson:
    """Hessian-trace sensitivity estimator.

    Attributes:
        tol: relative standard error every layer's trace must reach.
        min_probes: fewest Hessian-vector products.
        max_probes: most Hessian-vector products.
    """

    name: str = field(default="hutchinson", init=False)
    tol: float = 0.1
    min_probes: int = 8
    max_probes: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.min_probes < 2:
            raise ValueError(f"min_probes must be >= 2, got {self.min_probes}")
        if self.max_probes < self.min_probes:
            raise ValueError(f"max_probes ({self.max_probes}) must be >= min_probes "
                             f"({self.min_probes})")

    def estimate(self, model: nn.Module, modules: Mapping[str, nn.Module],
                 layers: Sequence[LayerInfo], objective: Objective, bits: Sequence[int],
                 qconfig: QuantConfig, *, device: torch.device, seed: int = 0,
                 progress: bool = False) -> SensitivityTable:
        """Score every layer at every bit-width (the caller restores the model's state)."""
        from mpsearch.quant.apply import weight_error_sq

        start = time.perf_counter()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        weights = {info.name: modules[info.name].weight for info in layers}
        for w in weights.values():
            w.requires_grad_(True)
        n_batches = len(objective.batches)
        # Whole rounds over the batches keep every batch equally weighted.
        min_probes = max(self.min_probes, n_batches if n_batches > 1 else 2)
        max_probes = max(self.max_probes, min_probes)
        est = hutchinson_traces(
            weights, lambda i: objective.loss(model, i, device), n_batches,
            tol=self.tol, min_probes=min_probes, max_probes=max_probes, seed=seed,
            progress=progress,
        )
        if not est.converged:
            rel = {n: est.stderr[n] / abs(est.mean[n]) if est.mean[n] else math.inf
                   for n in est.mean}
            worst = sorted(rel, key=rel.__getitem__, reverse=True)[:3]
            log.warning("Hutchinson stopped at %d probes before every relative standard error "
                        "reached %.3g; worst: %s", est.n_probes, self.tol,
                        ", ".join(f"{n} ({rel[n]:.2f})" for n in worst))
        negative = [n for n, t in est.mean.items() if t < 0]
        if negative:
            log.warning("negative Hessian trace estimates (clipped to 0 in omega) for %d "
                        "layer(s): %s", len(negative), ", ".join(negative[:5]))
        omega = np.zeros((len(layers), len(bits)))
        omega_se = np.zeros_like(omega)
        bar = tqdm(total=len(layers) * len(bits), desc="quantization error", unit="op",
                   disable=not progress, leave=False)
        for i, info in enumerate(layers):
            w = weights[info.name].detach()
            per_param = max(est.mean[info.name], 0.0) / info.params
            per_param_se = est.stderr[info.name] / info.params
            for j, b in enumerate(bits):
                err = weight_error_sq(w, info.kind, b, qconfig)
                omega[i, j] = 0.5 * per_param * err
                omega_se[i, j] = 0.5 * per_param_se * err
                bar.update(1)
        bar.close()
        names = [info.name for info in layers]
        return SensitivityTable(
            tuple(names), tuple(bits), omega, omega_se,
            columns={"trace": np.array([est.mean[n] for n in names]),
                     "trace_stderr": np.array([est.stderr[n] for n in names])},
            estimator=self.name,
            settings={k: v for k, v in asdict(self).items() if k != "name"},
            diagnostics={"probes": est.n_probes, "converged": est.converged,
                         "convergence": est.history, "loss": objective.kind,
                         "time_s": time.perf_counter() - start},
        )

