"""Hessian-trace sensitivity (HAWQ-V2/V3) by Hutchinson's estimator.

One Hessian-vector product over all layer weights at once, with a Rademacher probe v,
gives ``v_l · (Hv)_l``: an unbiased sample of every layer's block trace Tr(H_ll). Probe k
uses calibration batch ``k mod n_batches``, so after whole rounds the mean estimates the
trace of the Hessian of the mean calibration loss, and the standard error covers both the
probe and the batch variation. Sampling stops after a whole round once every layer's
relative standard error (on |mean|) is under ``tol``, or at ``max_probes``.

Hessian-vector products are computed by forward-mode differentiation of the gradient
(``torch.func.jvp`` of ``grad``), 5–35× faster on CPU than differentiating the gradient a
second time (depthwise convolutions and attention especially); double backward remains
the fallback for ops without a forward-mode derivative. The weights are swapped in with
``functional_call``, so the user's parameters are never made to require grad.

Ω[l, b] = ½ · Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖², with Tr(H_l) taken as
max(estimate, standard error). The shared probe carries cross-block terms v_l·H_lm v_m
(zero in expectation) that can swamp a layer of small curvature; a trace not resolved
from zero is charged at its error bar rather than at zero, which would make that layer
look free to quantize to 2 bits (seen on an MNIST classifier: estimate < 0, true cost of
2 bits 5× the whole uniform-4-bit map's).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mpsearch._report import some
from mpsearch._state import functional_call
from mpsearch.layers import layer_weight, weight_key
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
        method: how the Hessian-vector products were computed.
    """

    mean: dict[str, float]
    stderr: dict[str, float]
    n_probes: int
    converged: bool
    history: list[tuple[int, float]] = field(default_factory=list)
    method: str = "forward_over_reverse"


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


LossOfParams = Callable[[int, Mapping[str, Tensor]], Tensor]
HVP_METHODS = ("auto", "forward_over_reverse", "double_backward")


def _quiet_jvp_setup() -> None:
    """Load torch's forward-mode decompositions without their warnings: on first use they
    compile themselves with ``torch.jit.script``, which newer torch releases warn is
    deprecated, 18 times, about torch's own code (nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
        with contextlib.suppress(ImportError):
            import torch._decomp.decompositions_for_jvp  # noqa: F401


def _hvp_forward_over_reverse(loss: LossOfParams, i: int, params: dict[str, Tensor],
                              v: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor],
                                                             dict[str, Tensor]]:
    """(loss, gradient, Hv) by forward-mode differentiation of the gradient."""
    from torch.func import grad_and_value, jvp

    _quiet_jvp_setup()

    def grad_value(p: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return grad_and_value(lambda q: loss(i, q))(p)

    out = jvp(grad_value, (params,), (v,))
    (g, value), (hv, _) = out[0], out[1]
    # other parameters that still require grad would leave an autograd graph behind
    return (value.detach(), {n: t.detach() for n, t in g.items()},
            {n: t.detach() for n, t in hv.items()})


def _hvp_double_backward(loss: LossOfParams, i: int, params: dict[str, Tensor],
                         v: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor],
                                                        dict[str, Tensor]]:
    """(loss, gradient, Hv) by differentiating g·v a second time."""
    names = list(params)
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    value = loss(i, leaves)
    grads = torch.autograd.grad(value, [leaves[n] for n in names], create_graph=True,
                                allow_unused=True)
    g = {n: gr if gr is not None else torch.zeros_like(params[n]) for n, gr in zip(names, grads)}
    used = [n for n, gr in zip(names, grads) if gr is not None and gr.requires_grad]
    hv = {n: torch.zeros_like(params[n]) for n in names}
    if used:
        gv = torch.stack([(g[n] * v[n]).sum() for n in used]).sum()
        for n, h in zip(used, torch.autograd.grad(gv, [leaves[n] for n in used],
                                                  allow_unused=True)):
            if h is not None:
                hv[n] = h
    return (value.detach(), {n: t.detach() for n, t in g.items()},
            {n: t.detach() for n, t in hv.items()})


def hutchinson_traces(loss: LossOfParams, params: Mapping[str, Tensor], n_batches: int, *,
                      tol: float = 0.1, min_probes: int = 8, max_probes: int = 200,
                      seed: int = 0, method: str = "auto", max_time_s: float | None = None,
                      progress: bool = False) -> TraceEstimate:
    """Estimate Tr(H_ll) for every tensor in ``params`` with shared Rademacher probes.

    Args:
        loss: ``loss(i, p)`` is the loss of calibration batch ``i`` with the tensors of
            ``params`` replaced by those of ``p`` (same names); differentiable in ``p``.
        params: the named tensors whose diagonal Hessian blocks are wanted (the point at
            which the Hessian is taken).
        n_batches: number of calibration batches; probes cycle over them.
        tol: stop once every relative standard error is below this (checked after whole
            rounds over the batches, and not before ``min_probes``).
        min_probes: fewest probes.
        max_probes: most probes.
        seed: seeds the probes (reproducible).
        method: Hessian-vector products by ``"forward_over_reverse"`` (``torch.func``:
            forward-mode differentiation of the gradient, much faster on CPU),
            ``"double_backward"``, or ``"auto"``: the first, falling back to the second
            for models with an op that has no forward-mode derivative.
        max_time_s: also stop after the first whole round (past ``min_probes``) that ends
            more than this many seconds after the start (None: no time limit).
        progress: show a progress bar.

    Raises:
        ValueError: the loss, a gradient or a Hessian-vector product is NaN/inf (naming
            the tensors), or a bad ``method``.
    """
    if method not in HVP_METHODS:
        raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
    names = list(params)
    point = {n: t.detach() for n, t in params.items()}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hvp = _hvp_double_backward if method == "double_backward" else _hvp_forward_over_reverse
    used_method = "double_backward" if method == "double_backward" else "forward_over_reverse"
    samples: list[np.ndarray] = []
    history: list[tuple[int, float]] = []
    converged = False
    start = time.perf_counter()
    bar = tqdm(total=max_probes, desc="hutchinson", unit="probe", disable=not progress,
               leave=False)
    try:
        with _double_backward_attention():
            for k in range(max_probes):
                i = k % n_batches
                v = {n: (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.device, t.dtype)
                     for n, t in point.items()}
                try:
                    value, g, hv = hvp(loss, i, point, v)
                except (RuntimeError, NotImplementedError) as exc:
                    if method != "auto" or hvp is _hvp_double_backward:
                        raise
                    log.info("forward-over-reverse HVP unavailable (%s); using double backward",
                             str(exc).splitlines()[0][:200])
                    hvp, used_method = _hvp_double_backward, "double_backward"
                    value, g, hv = hvp(loss, i, point, v)
                if not bool(torch.isfinite(value)):
                    raise ValueError(f"the calibration loss is {float(value)} on batch {i}; "
                                     "check the data and the model")
                bad = [n for n in names if not bool(torch.isfinite(g[n]).all())]
                if bad:
                    raise ValueError(f"NaN/inf gradient on batch {i} in layer(s) {bad[:10]}")
                sample = np.array([float((v[n] * hv[n]).sum()) for n in names])
                if not np.all(np.isfinite(sample)):
                    bad = [n for n, s_ in zip(names, sample) if not math.isfinite(s_)]
                    raise ValueError(f"NaN/inf Hessian-vector product on batch {i} in layer(s) "
                                     f"{bad[:10]}")
                samples.append(sample)
                bar.update(1)
                n = len(samples)
                if n % n_batches == 0 and n >= 2:
                    arr = np.stack(samples)
                    mean, se = arr.mean(0), arr.std(0, ddof=1) / math.sqrt(n)
                    # a tensor the loss does not depend on gives exact zeros: nothing to wait for
                    live = np.any(arr != 0.0, axis=0)
                    rel = _relative_stderr(mean, se)[live]
                    worst = float(rel.max()) if rel.size else 0.0
                    history.append((n, worst))
                    bar.set_postfix(rel_stderr=f"{worst:.3f}")
                    if n >= min_probes and worst < tol:
                        converged = True
                        break
                    if (n >= min_probes and max_time_s is not None
                            and time.perf_counter() - start > max_time_s):
                        break
    finally:
        bar.close()
    arr = np.stack(samples)
    mean = arr.mean(0)
    se = arr.std(0, ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else np.full(len(names), np.inf)
    return TraceEstimate(dict(zip(names, mean.tolist())), dict(zip(names, se.tolist())),
                         len(arr), converged, history, used_method)


class _BoundLoss(nn.Module):
    """The objective's loss on batch ``i`` as a module, so ``functional_call`` can swap
    the weights of the wrapped model without touching them."""

    def __init__(self, model: nn.Module, objective: Objective, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.device = device

    def forward(self, i: int) -> Tensor:
        return self.objective.loss(self.model, i, self.device)


@dataclass(frozen=True, kw_only=True)
class Hutchinson:
    """Hessian-trace sensitivity estimator.

    Attributes:
        tol: relative standard error every layer's trace must reach.
        min_probes: fewest Hessian-vector products.
        max_probes: most Hessian-vector products.
        max_time_s: stop sampling after the first whole round over the calibration batches
            that ends past this many seconds (with a warning giving the error bars reached);
            None: only ``tol`` and ``max_probes`` stop it. Each probe is a Hessian-vector
            product over one batch: 200 on all-MiniLM-L6-v2 with 16 sentences a batch took
            about 20 minutes on 2 CPU cores.
        method: how Hessian-vector products are computed (see :func:`hutchinson_traces`).
    """

    name: str = field(default="hutchinson", init=False)
    tol: float = 0.1
    min_probes: int = 8
    max_probes: int = 200
    max_time_s: float | None = 300.0
    method: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in HVP_METHODS:
            raise ValueError(f"method must be one of {HVP_METHODS}, got {self.method!r}")
        if not 0 < self.tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.min_probes < 2:
            raise ValueError(f"min_probes must be >= 2, got {self.min_probes}")
        if self.max_time_s is not None and (isinstance(self.max_time_s, bool) or not isinstance(
                self.max_time_s, (int, float)) or not self.max_time_s > 0):
            raise ValueError(f"max_time_s must be a number > 0 or None, got {self.max_time_s!r}")
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
        for p in model.parameters():  # only the swapped-in weights are differentiated
            p.requires_grad_(False)
        weights = {info.name: layer_weight(modules[info.name]) for info in layers}
        keys = {info.name: weight_key(model, info.name) for info in layers}
        bound = _BoundLoss(model, objective, device)

        def loss(i: int, p: Mapping[str, Tensor]) -> Tensor:
            return functional_call(bound, {f"model.{keys[n]}": t for n, t in p.items()}, (i,))

        n_batches = len(objective.batches)
        # Whole rounds over the batches keep every batch equally weighted.
        min_probes = max(self.min_probes, n_batches if n_batches > 1 else 2)
        max_probes = max(self.max_probes, min_probes)
        est = hutchinson_traces(
            loss, weights, n_batches, tol=self.tol, min_probes=min_probes,
            max_probes=max_probes, seed=seed, method=self.method,
            max_time_s=self.max_time_s, progress=progress,
        )
        idle = [n for n in est.mean if est.mean[n] == 0.0 and est.stderr[n] == 0.0]
        if not est.converged:
            # exact zeros (idle layers) were never waited for; name the ones that were
            rel = {n: est.stderr[n] / abs(est.mean[n]) if est.mean[n] else math.inf
                   for n in est.mean if n not in idle}
            worst = sorted(rel, key=rel.__getitem__, reverse=True)[:3]
            timed_out = est.n_probes < max_probes
            log.warning("Hutchinson stopped at %d probes%s before every relative standard "
                        "error reached %.3g; worst: %s%s", est.n_probes,
                        f" (its max_time_s={self.max_time_s:g} s)" if timed_out else "",
                        self.tol, ", ".join(f"layer {n!r} at {rel[n]:.2f}" for n in worst),
                        "; raise Hutchinson(max_time_s=) for tighter error bars"
                        if timed_out else
                        "; raise Hutchinson(max_probes=) for tighter error bars (the "
                        "table's omega_stderr columns show them)")
        if idle:
            log.warning("the loss does not depend on %d layer(s) (zero curvature; the solver "
                        "will give them the fewest bits): %s", len(idle), some(idle))
        unresolved = [n for n, t in est.mean.items() if t < est.stderr[n] and n not in idle]
        if unresolved:
            log.warning("Hessian trace not resolved from zero for %d layer(s) (charged at one "
                        "standard error in omega, so the solver does not take their noise "
                        "for insensitivity; more probes, Hutchinson(max_probes=), resolve "
                        "them): %s", len(unresolved), some(unresolved))
        omega = np.zeros((len(layers), len(bits)))
        omega_se = np.zeros_like(omega)
        bar = tqdm(total=len(layers) * len(bits), desc="quantization error", unit="op",
                   disable=not progress, leave=False)
        for i, info in enumerate(layers):
            w = weights[info.name].detach()
            # A trace within one standard error of zero is charged at that error: treating
            # it as 0 would make the layer look free to quantize to any width.
            per_param = max(est.mean[info.name], est.stderr[info.name]) / info.params
            per_param_se = est.stderr[info.name] / info.params
            for j, b in enumerate(bits):
                err = weight_error_sq(w, info.kind, b, qconfig, modules[info.name])
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
                         "stopped_by": ("tol" if est.converged else "max_probes"
                                        if est.n_probes >= max_probes else "max_time_s"),
                         "hvp_method": est.method,
                         "convergence": est.history, "loss": objective.kind,
                         "time_s": time.perf_counter() - start},
        )

