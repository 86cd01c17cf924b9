"""Hutchinson traces against exact Hessian traces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.sensitivity import Hutchinson, hutchinson_traces


def test_diagonal_quadratic_is_exact() -> None:
    # L = Σ c_i w_i²: H = diag(2c), and v·Hv = Σ 2 c_i v_i² = Tr(H) for every Rademacher v.
    c1, c2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[0.5, 4.0], [1.5, 0.25]])
    w1 = torch.randn(3, requires_grad=True)
    w2 = torch.randn(2, 2, requires_grad=True)
    est = hutchinson_traces({"a": w1, "b": w2},
                            lambda i: (c1 * w1**2).sum() + (c2 * w2**2).sum(), 1,
                            tol=0.01, min_probes=4, max_probes=50)
    assert est.mean["a"] == pytest.approx(12.0)
    assert est.mean["b"] == pytest.approx(12.5)
    assert est.stderr["a"] == pytest.approx(0.0, abs=1e-9)
    assert est.converged and est.n_probes == 4


def test_dense_quadratic_converges_to_block_traces() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen)
    hess = a @ a.T + torch.eye(5)  # cross terms couple the two blocks
    w = torch.randn(5, generator=gen, requires_grad=True)

    def loss(_i: int) -> torch.Tensor:
        return 0.5 * w @ hess @ w

    est = hutchinson_traces({"w": w}, loss, 1, tol=0.01, min_probes=10, max_probes=4000, seed=1)
    exact = float(torch.trace(hess))
    assert abs(est.mean["w"] - exact) < 4 * est.stderr["w"] + 1e-6
    assert est.stderr["w"] / exact < 0.011


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _exact_block_traces(model: _TwoLayer, batches: list[tuple[torch.Tensor, torch.Tensor]]
                        ) -> dict[str, float]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for name in ("fc1.weight", "fc2.weight"):
        def loss_of(w: torch.Tensor, name: str = name) -> torch.Tensor:
            p = dict(params)
            p[name] = w
            losses = [F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)
                      for x, y in batches]
            return torch.stack(losses).mean()

        h = torch.func.hessian(loss_of)(params[name])
        n = params[name].numel()
        out[name] = float(h.reshape(n, n).trace())
    return out


def test_network_traces_match_exact_hessian_over_batches() -> None:
    torch.manual_seed(0)
    model = _TwoLayer()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(3)]
    exact = _exact_block_traces(model, batches)
    weights = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}
    est = hutchinson_traces(
        weights, lambda i: F.cross_entropy(model(batches[i][0]), batches[i][1]), len(batches),
        tol=0.02, min_probes=30, max_probes=6000, seed=0)
    for name, tr in exact.items():
        assert tr > 0
        # unbiased: within 4 standard errors, and the error bar itself is honest and small
        assert abs(est.mean[name] - tr) < 4 * est.stderr[name], (name, est.mean[name], tr)
        assert est.stderr[name] / tr < 0.03
    assert est.n_probes % len(batches) == 0  # whole rounds keep batches equally weighted


def test_seeded_and_reproducible() -> None:
    torch.manual_seed(0)
    model = _TwoLayer()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    weights = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}

    def run(seed: int) -> dict[str, float]:
        return hutchinson_traces(weights, lambda i: F.cross_entropy(model(x), y), 1,
                                 tol=0.5, min_probes=5, max_probes=5, seed=seed).mean

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_nan_gradient_names_the_layer() -> None:
    w = torch.ones(3, requires_grad=True)
    v = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="loss is nan"):
        hutchinson_traces({"w": w}, lambda i: (w * math.nan).sum(), 1, max_probes=3)
    with pytest.raises(ValueError, match="'v'"):
        hutchinson_traces({"w": w, "v": v},
                          lambda i: (w**2).sum() + (torch.sqrt(v - 1.0)).sum() * 0.0, 1,
                          max_probes=3)


def test_probe_cap_reports_not_converged() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=gen)
    hess = a + a.T  # indefinite, large off-diagonal: noisy estimates
    w = torch.randn(30, generator=gen, requires_grad=True)
    est = hutchinson_traces({"w": w}, lambda i: 0.5 * w @ hess @ w, 1, tol=1e-4,
                            min_probes=2, max_probes=6)
    assert not est.converged and est.n_probes == 6
    assert len(est.history) == 5


def test_estimator_config_validation() -> None:
    with pytest.raises(ValueError, match="tol"):
        Hutchinson(tol=0)
    with pytest.raises(ValueError, match="max_probes"):
        Hutchinson(min_probes=10, max_probes=5)
