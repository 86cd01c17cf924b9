"""Hutchinson traces against exact Hessian traces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpsearch
from mpsearch.sensitivity import Hutchinson, hutchinson_traces


def test_diagonal_quadratic_is_exact() -> None:
    # L = Σ c_i w_i²: H = diag(2c), and v·Hv = Σ 2 c_i v_i² = Tr(H) for every Rademacher v.
    c1, c2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[0.5, 4.0], [1.5, 0.25]])
    w = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    est = hutchinson_traces(lambda i, p: (c1 * p["a"]**2).sum() + (c2 * p["b"]**2).sum(), w, 1,
                            tol=0.01, min_probes=4, max_probes=50)
    assert est.mean["a"] == pytest.approx(12.0)
    assert est.mean["b"] == pytest.approx(12.5)
    assert est.stderr["a"] == pytest.approx(0.0, abs=1e-9)
    assert est.converged and est.n_probes == 4


def test_dense_quadratic_converges_to_block_traces() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen)
    hess = a @ a.T + torch.eye(5)  # cross terms couple the two blocks
    w = torch.randn(5, generator=gen)

    def loss(_i: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * p["w"] @ hess @ p["w"]

    est = hutchinson_traces(loss, {"w": w}, 1, tol=0.05, min_probes=10, max_probes=2000, seed=1)
    exact = float(torch.trace(hess))
    assert est.converged
    assert abs(est.mean["w"] - exact) < 4 * est.stderr["w"] + 1e-6
    assert est.stderr["w"] / abs(est.mean["w"]) < 0.05  # the stopping rule held


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _setup() -> tuple[_TwoLayer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = _TwoLayer()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(3)]
    return model, batches


def _joint_hessian(model: _TwoLayer, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Hessian over (fc1.weight, fc2.weight) flattened together."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    n1 = params["fc1.weight"].numel()

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        p = dict(params)
        p["fc1.weight"] = flat[:n1].reshape(params["fc1.weight"].shape)
        p["fc2.weight"] = flat[n1:].reshape(params["fc2.weight"].shape)
        return F.cross_entropy(torch.func.functional_call(model, p, (batch[0],)), batch[1])

    flat = torch.cat([params["fc1.weight"].reshape(-1), params["fc2.weight"].reshape(-1)])
    return torch.func.hessian(loss_of)(flat)


def _model_loss(model: _TwoLayer, batches: list[tuple[torch.Tensor, torch.Tensor]]):  # type: ignore[no-untyped-def]
    def loss(i: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
        x, y = batches[i]
        return F.cross_entropy(torch.func.functional_call(model, dict(p), (x,)), y)

    return loss


def test_network_samples_are_exact_quadratic_forms() -> None:
    """Sample l of a probe v is v_l · (H v)_l, H the exact Hessian of that probe's batch.

    One probe over all layers at once: the cross-block terms v_l·H_lm v_m are in each
    sample (zero in expectation), so the reference uses the joint Hessian.
    """
    model, batches = _setup()
    hess = [_joint_hessian(model, b) for b in batches]
    weights = {"fc1.weight": model.fc1.weight.detach(), "fc2.weight": model.fc2.weight.detach()}
    n1 = model.fc1.weight.numel()
    n_probes = 12
    est = hutchinson_traces(_model_loss(model, batches), weights, len(batches),
                            tol=1e-6, min_probes=n_probes, max_probes=n_probes, seed=5)
    gen = torch.Generator().manual_seed(5)  # the probes, drawn in the estimator's order
    sums = {"fc1.weight": 0.0, "fc2.weight": 0.0}
    for k in range(n_probes):
        v = torch.cat([(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).float().reshape(-1)
                       for w in weights.values()])
        hv = hess[k % 3] @ v
        sums["fc1.weight"] += float(v[:n1] @ hv[:n1])
        sums["fc2.weight"] += float(v[n1:] @ hv[n1:])
    for name in weights:
        assert est.mean[name] == pytest.approx(sums[name] / n_probes, rel=1e-4)
    assert est.n_probes == n_probes


def test_network_traces_unbiased_over_batches() -> None:
    model, batches = _setup()
    hess = [_joint_hessian(model, b) for b in batches]
    n1 = model.fc1.weight.numel()
    exact = {"fc1.weight": sum(float(h[:n1, :n1].trace()) for h in hess) / 3,
             "fc2.weight": sum(float(h[n1:, n1:].trace()) for h in hess) / 3}
    weights = {"fc1.weight": model.fc1.weight.detach(), "fc2.weight": model.fc2.weight.detach()}
    est = hutchinson_traces(_model_loss(model, batches), weights, len(batches),
                            tol=1e-6, min_probes=240, max_probes=240, seed=0)
    for name, tr in exact.items():
        assert tr > 0
        assert abs(est.mean[name] - tr) < 4 * est.stderr[name], (name, est.mean[name], tr)
        assert est.stderr[name] < 0.5 * tr  # the error bar is informative
    assert not est.converged and est.n_probes % 3 == 0  # whole rounds keep batches balanced


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_methods_agree(method: str) -> None:
    model, batches = _setup()
    weights = {"fc1.weight": model.fc1.weight.detach(), "fc2.weight": model.fc2.weight.detach()}
    ref = hutchinson_traces(_model_loss(model, batches), weights, 3, tol=1e-6, min_probes=6,
                            max_probes=6, seed=2, method="forward_over_reverse")
    est = hutchinson_traces(_model_loss(model, batches), weights, 3, tol=1e-6, min_probes=6,
                            max_probes=6, seed=2, method=method)
    assert est.method == method
    for name in weights:
        assert est.mean[name] == pytest.approx(ref.mean[name], rel=1e-4)


def test_seeded_and_reproducible() -> None:
    torch.manual_seed(0)
    model = _TwoLayer()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    weights = {"fc1.weight": model.fc1.weight.detach(), "fc2.weight": model.fc2.weight.detach()}

    def run(seed: int) -> dict[str, float]:
        return hutchinson_traces(_model_loss(model, [(x, y)]), weights, 1,
                                 tol=0.5, min_probes=5, max_probes=5, seed=seed).mean

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_nan_gradient_names_the_layer() -> None:
    w = {"w": torch.ones(3), "v": torch.ones(2)}
    for method in ("forward_over_reverse", "double_backward"):
        with pytest.raises(ValueError, match="loss is nan"):
            hutchinson_traces(lambda i, p: (p["w"] * math.nan).sum(), w, 1, max_probes=3,
                              method=method)
        with pytest.raises(ValueError, match="gradient .*'v'"):
            hutchinson_traces(
                lambda i, p: (p["w"]**2).sum() + (torch.sqrt(p["v"] - 1.0)).sum() * 0.0, w, 1,
                max_probes=3, method=method)


def test_probe_cap_reports_not_converged() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=gen)
    hess = a + a.T  # indefinite, large off-diagonal: noisy estimates
    w = {"w": torch.randn(30, generator=gen)}
    est = hutchinson_traces(lambda i, p: 0.5 * p["w"] @ hess @ p["w"], w, 1, tol=1e-4,
                            min_probes=2, max_probes=6)
    assert not est.converged and est.n_probes == 6
    assert len(est.history) == 5


def test_estimator_config_validation() -> None:
    with pytest.raises(ValueError, match="tol"):
        Hutchinson(tol=0)
    with pytest.raises(ValueError, match="max_probes"):
        Hutchinson(min_probes=10, max_probes=5)
    with pytest.raises(ValueError, match="method"):
        Hutchinson(method="magic")


def test_tensor_without_influence_does_not_block_convergence() -> None:
    c = torch.tensor([1.0, 2.0])
    w = {"used": torch.randn(2), "unused": torch.randn(3)}
    est = hutchinson_traces(lambda i, p: (c * p["used"] ** 2).sum() + 0.0 * p["unused"].sum(),
                            w, 1, tol=0.01, min_probes=4, max_probes=100)
    assert est.converged and est.n_probes == 4
    assert est.mean["unused"] == 0.0 and est.stderr["unused"] == 0.0


def test_a_time_limit_stops_after_a_whole_round_past_min_probes(caplog) -> None:  # type: ignore[no-untyped-def]
    """A tolerance it cannot reach and a tiny time limit: it stops at the first whole
    round past min_probes (3 batches: 6 probes), not at max_probes, and says why."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen)
    hess = a @ a.T
    w = torch.randn(5, generator=gen)

    def loss(_i: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * p["w"] @ hess @ p["w"]

    est = hutchinson_traces(loss, {"w": w}, 3, tol=1e-6, min_probes=5, max_probes=300,
                            max_time_s=1e-9)
    assert est.n_probes == 6 and not est.converged
    untimed = hutchinson_traces(loss, {"w": w}, 3, tol=1e-6, min_probes=5, max_probes=30)
    assert untimed.n_probes == 30

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(8, 4, generator=gen)
    with caplog.at_level("WARNING"):
        res = mpsearch.search(model, 4.0, data=[x, x * 2], slices=None, refine=False,
                              sensitivity=Hutchinson(tol=1e-6, max_time_s=1e-9),
                              progress=False)
    diag = res.sensitivity.diagnostics
    assert diag["stopped_by"] == "max_time_s" and diag["probes"] == 8  # min_probes
    assert "its max_time_s=1e-09 s" in caplog.text and "raise Hutchinson(max_time_s=)" in caplog.text
    with pytest.raises(ValueError, match="max_time_s must be a number > 0 or None"):
        Hutchinson(max_time_s=0)
