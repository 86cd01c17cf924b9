"""Fisher and qerror estimators against answers computed by hand on softmax-linear models,
and the contract every registered estimator keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpsearch
from mpsearch.layers import discover, quantizable_modules
from mpsearch.losses import Objective
from mpsearch.quant.apply import quantize_weight
from mpsearch.sensitivity import ESTIMATORS, Fisher, QError, SensitivityTable

CPU = torch.device("cpu")
BITS = (2, 3, 4, 32)


def _softmax_linear(seed: int = 0, d: int = 6, c: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, c, bias=False)).eval()
    return model


def _estimate(model: nn.Module, batches: list, estimator, **kw) -> SensitivityTable:  # type: ignore[no-untyped-def, type-arg]
    objective = Objective(batches, kw.pop("loss_fn", None))
    objective.prepare(model, CPU)
    layers = discover(model, batches[0])
    return estimator.estimate(model, quantizable_modules(model), layers, objective, BITS,
                              mpsearch.QuantConfig(), device=CPU, seed=0)


def _delta(w: torch.Tensor, b: int) -> torch.Tensor:
    return quantize_weight(w, "Linear", b, mpsearch.QuantConfig()) - w


def _sample_kl(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """KL(float ‖ quantized) of each row of ``x`` through a softmax-linear layer."""
    log_p, log_q = F.log_softmax(x @ w.T, -1), F.log_softmax(x @ q.T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).numpy()


def test_qerror_is_the_measured_kl() -> None:
    """Ω is the mean of the per-batch KL; its standard error comes from the per-sample
    increases (std / √n), in one batch as in two."""
    model = _softmax_linear()
    x = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(1))
    w = model[0].weight.detach()
    for batches in ([x[0], x[1]], [x.reshape(100, 6)]):
        table = _estimate(model, batches, QError())
        for j, b in enumerate(BITS):
            q = w + _delta(w, b) if b < 32 else w
            kl = [F.kl_div(F.log_softmax(xb @ q.T, -1), F.log_softmax(xb @ w.T, -1),
                           log_target=True, reduction="batchmean") for xb in batches]
            assert table.omega[0, j] == pytest.approx(float(np.mean(kl)), rel=1e-5, abs=1e-9)
            per_sample = _sample_kl(w, q, x.reshape(100, 6))
            se = float(per_sample.std(ddof=1) / np.sqrt(100))
            assert table.omega_stderr[0, j] == pytest.approx(se, rel=1e-4, abs=1e-9)
            assert (table.omega_stderr[0, j] > 0) == (b < 32)


def test_qerror_stderr_over_batches_for_a_custom_loss() -> None:
    """A custom loss_fn returns one number per batch: the standard error is over batches."""
    model = _softmax_linear()
    x = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(2))
    w = model[0].weight.detach()

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return out.pow(2).mean()
    table = _estimate(model, list(x), QError(), loss_fn=loss_fn)
    q = w + _delta(w, 2)
    delta = [float((xb @ q.T).pow(2).mean() - (xb @ w.T).pow(2).mean()) for xb in x]
    assert table.omega[0, 0] == pytest.approx(np.mean(delta), rel=1e-5)
    assert table.omega_stderr[0, 0] == pytest.approx(np.std(delta, ddof=1) / np.sqrt(3),
                                                     rel=1e-4)


def _hessian_forms(model: nn.Module, x: torch.Tensor, b: int) -> tuple[float, float]:
    """½ ΔᵀHΔ (block) and ½ Σ H_ii Δ_i² (diagonal) of the mean KL at the float weights."""
    w = model[0].weight.detach()
    d = _delta(w, b)
    p = F.softmax(x @ w.T, -1)
    dz = x @ d.T  # (N, C): the logit change
    block = 0.5 * float(((p * dz**2).sum(-1) - (p * dz).sum(-1) ** 2).mean())
    hdiag = torch.einsum("nc,nj->cj", p * (1 - p), x**2) / len(x)
    return block, 0.5 * float((hdiag * d**2).sum())


@pytest.mark.parametrize("block", [False, True])
def test_sampled_fisher_matches_kl_hessian(block: bool) -> None:
    model = _softmax_linear()
    x = torch.randn(1200, 6, generator=torch.Generator().manual_seed(2))
    table = _estimate(model, [x[:600], x[600:]], Fisher(block=block))
    for j, b in enumerate(BITS[:3]):
        exact = _hessian_forms(model, x, b)[0 if block else 1]
        got, se = table.omega[0, j], table.omega_stderr[0, j]
        assert abs(got - exact) < 4 * se + 1e-12, (b, got, exact, se)
        assert got == pytest.approx(exact, rel=0.15)
    assert table.omega[0, 3] == 0.0
    w = model[0].weight.detach()
    p = F.softmax(x @ w.T, -1)
    trace = float(torch.einsum("nc,nj->cj", p * (1 - p), x**2).sum() / len(x))
    assert table.columns["fisher"][0] == pytest.approx(trace, rel=0.1)


def test_empirical_fisher_is_mean_of_per_sample_squares(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _softmax_linear()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen))
               for n in (7, 12)]
    table = _estimate(model, batches, Fisher(), loss_fn="task")
    w = model[0].weight.detach()
    fisher = torch.zeros_like(w)
    for xb, yb in batches:
        p = F.softmax(xb @ w.T, -1)
        g = torch.einsum("nc,nj->ncj", p - F.one_hot(yb, 4), xb)  # per-sample gradients
        fisher += g.pow(2).mean(0) / len(batches)
    for j, b in enumerate(BITS[:3]):
        assert table.omega[0, j] == pytest.approx(
            0.5 * float((fisher * _delta(w, b) ** 2).sum()), rel=1e-4)
    assert table.columns["fisher"][0] == pytest.approx(float(fisher.sum()), rel=1e-4)

    def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise RuntimeError("no batching rule")

    monkeypatch.setattr("mpsearch.sensitivity.fisher._vmap_grads", broken)
    looped = _estimate(model, batches, Fisher(), loss_fn="task")
    np.testing.assert_allclose(looped.omega, table.omega, rtol=1e-5)


@pytest.mark.parametrize("block", [False, True])
def test_custom_loss_reads_its_batch_in_the_fisher_pass(block: bool) -> None:
    """A loss_fn(output, batch) that takes its labels from the batch gets each sample's
    own batch: the empirical Fisher equals the task loss's (cross-entropy on the labels)."""
    model = _softmax_linear()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen))
               for n in (7, 12)]
    rows = []

    def labelled(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        rows.append(len(x))
        return F.cross_entropy(out, y)

    task = _estimate(model, batches, Fisher(block=block), loss_fn="task")
    custom = _estimate(model, batches, Fisher(block=block), loss_fn=labelled)
    assert set(rows) == {1}  # one sample per gradient: the empirical Fisher
    np.testing.assert_allclose(custom.omega, task.omega, rtol=1e-5)


@pytest.mark.parametrize("name", ["fisher", "qerror"])
def test_a_value_per_sample_is_compared_as_one_column(name: str) -> None:
    """A model returning ``(N,)`` is rated as the same model returning ``(N, 1)`` (MSE per
    sample, not over the batch as one position)."""
    torch.manual_seed(0)
    column = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    flat = nn.Sequential(*column, nn.Flatten(0)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 6, generator=gen) for n in (9, 5)]
    assert flat(batches[0]).shape == (9,)
    est = ESTIMATORS[name]()
    one, two = _estimate(flat, batches, est), _estimate(column, batches, est)
    np.testing.assert_allclose(one.omega, two.omega, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(one.omega_stderr, two.omega_stderr, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("loss_fn", ["task", None])
def test_fisher_rejects_nan_gradients(loss_fn: str | None) -> None:
    model = _softmax_linear()
    x = torch.randn(4, 6)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite|NaN/inf"):
        _estimate(model, [(x, torch.zeros(4, dtype=torch.long))], Fisher(), loss_fn=loss_fn)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_contract(name: str, mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    """Every registered estimator: table shape, finite values, 32 bits free, weights
    untouched, a name, settings that are plain JSON, and a table that reloads."""
    est = ESTIMATORS[name](**({"max_probes": 16} if name == "hutchinson" else {}))
    state = {k: v.clone() for k, v in mnist_cnn.state_dict().items()}
    table = _estimate(mnist_cnn, [x for x, _ in mnist_calib[:2]], est)
    assert table.estimator == est.name == name
    assert table.omega.shape == (4, len(BITS))
    assert np.isfinite(table.omega).all() and (table.omega_stderr >= 0).all()
    assert (table.omega[:, -1] == 0).all()
    assert (table.omega[:, 0] > table.omega[:, 2]).all()  # 2 bits hurt more than 4
    for k, v in mnist_cnn.state_dict().items():
        assert torch.equal(v, state[k])
    assert table.diagnostics["time_s"] > 0
    SensitivityTable.from_dict(table.to_dict())  # JSON-ready


def test_table_save_load_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = SensitivityTable(("a", "b"), (2, 4), np.array([[1.0, 0.5], [2.0, 0.1]]),
                             np.array([[np.inf, 0.1], [0.0, 0.0]]),
                             {"fisher": np.array([3.0, np.nan])}, "fisher", {"block": True},
                             {"history": [(1, 0.5)]}, "sha256:m", "sha256:d")
    path = table.save(tmp_path / "t.json")
    back = SensitivityTable.load(path)
    np.testing.assert_array_equal(back.omega, table.omega)
    np.testing.assert_array_equal(back.omega_stderr, table.omega_stderr)
    assert np.isnan(back.columns["fisher"][1])
    assert (back.estimator, back.model_fingerprint, back.data_fingerprint) == (
        "fisher", "sha256:m", "sha256:d")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        SensitivityTable.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "mpsearch.bitmap"}')
    with pytest.raises(ValueError, match="not an mpsearch sensitivity table"):
        SensitivityTable.load(tmp_path / "other.json")


def test_default_loss_is_the_divergence_even_with_labels() -> None:
    model = _softmax_linear()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    labelled = Objective([(x, y)])
    labelled.prepare(model, CPU)
    assert labelled.kind == "kl" and float(labelled.loss(model, 0, CPU)) == 0.0
    task = Objective([(x, y)], "task")
    task.prepare(model, CPU)
    assert task.kind == "cross_entropy"
    assert float(task.loss(model, 0, CPU)) == pytest.approx(
        float(F.cross_entropy(model(x), y)), rel=1e-6)
    # the labels change nothing of the default ratings
    with_labels = _estimate(model, [(x, y)], QError())
    without = _estimate(model, [x], QError())
    np.testing.assert_array_equal(with_labels.omega, without.omega)
    # real-valued targets: a regression, the divergence is the MSE
    regression = Objective([(x, torch.randn(16, 4))])
    regression.prepare(model, CPU)
    assert regression.kind == "mse"


def test_soft_labels_are_classes_not_a_regression() -> None:
    """One-hot or smoothed float labels are class distributions: the default divergence
    stays the KL, with the same ratings as no labels; other real-valued targets of the
    output's width are a regression (MSE)."""
    model = _softmax_linear()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=gen)
    onehot = F.one_hot(torch.randint(0, 4, (16,), generator=gen), 4).float()
    smoothed = onehot * 0.9 + 0.1 / 4
    without = _estimate(model, [x], QError())
    for targets in (onehot, smoothed):
        objective = Objective([(x, targets)])
        objective.prepare(model, CPU)
        assert objective.kind == "kl" and not objective.probabilities
        np.testing.assert_array_equal(_estimate(model, [(x, targets)], QError()).omega,
                                      without.omega)
    for targets in (torch.randn(16, 4, generator=gen), onehot * 2.0, torch.randn(16, 1)):
        objective = Objective([(x, targets)])
        objective.prepare(model, CPU)
        assert objective.kind == "mse"


@pytest.mark.parametrize("estimator", [QError(), Fisher()], ids=["qerror", "fisher"])
def test_probability_outputs_are_compared_as_distributions(estimator) -> None:  # type: ignore[no-untyped-def]
    """A model ending in softmax is rated as the same model without it: KL between its
    output distributions, not between softmaxes of its probabilities (30× flatter)."""
    logits_model = _softmax_linear()
    probs_model = nn.Sequential(logits_model[0], nn.Softmax(-1)).eval()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    objective = Objective([x])
    objective.prepare(probs_model, CPU)
    assert objective.kind == "kl" and objective.probabilities
    from_logits = _estimate(logits_model, [x], estimator)
    from_probs = _estimate(probs_model, [x], estimator)
    assert from_logits.omega[0, 0] > 1e-3
    np.testing.assert_allclose(from_probs.omega, from_logits.omega, rtol=1e-4, atol=1e-9)
    # log-probabilities were right before: log_softmax is unchanged by a shift
    log_model = nn.Sequential(logits_model[0], nn.LogSoftmax(-1)).eval()
    np.testing.assert_allclose(_estimate(log_model, [x], estimator).omega, from_logits.omega,
                               rtol=1e-4, atol=1e-9)


def test_normalized_embeddings_are_compared_by_mse() -> None:
    """A sentence encoder's unit-length embeddings are no class scores: MSE, not KL over
    a softmax of their dimensions."""
    encoder = nn.Sequential(nn.Linear(6, 8, bias=False))

    class Normalized(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(encoder(x), dim=-1)

    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(4))
    objective = Objective([x])
    objective.prepare(Normalized(), CPU)
    assert objective.kind == "mse"
    raw = Objective([x])  # the same vectors, not normalized: scores of 8 classes
    raw.prepare(encoder, CPU)
    assert raw.kind == "kl"


def test_the_multi_output_warning_is_said_once(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Every stage of a search prepares an objective: the warning came 3-4 times a call."""
    import mpsearch._report

    monkeypatch.setattr(mpsearch._report, "_SAID", set())

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.body(x))
            return self.a(h), self.b(h)

    model = TwoHeads().eval()
    x = [torch.randn(32, 6, generator=torch.Generator().manual_seed(6))]
    with caplog.at_level("WARNING"):
        for _ in range(2):
            res = mpsearch.search(model, 4.0, data=x, progress=False, slices=None)
            mpsearch.validate(model, res.bitmap, data=x, progress=False)
    said = [r for r in caplog.records if "the model returns 2 tensors" in r.getMessage()]
    assert len(said) == 1


def test_validate_compares_probabilities_and_reads_one_hot_labels() -> None:
    """validate's output KL of a softmax model is its logits twin's, and one-hot float
    labels give the same accuracy as class indices."""
    logits_model = _softmax_linear()
    probs_model = nn.Sequential(logits_model[0], nn.Softmax(-1)).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=gen)
    y = (x @ logits_model[0].weight.detach().T).argmax(-1)
    y[:8] = (y[:8] + 1) % 4  # some wrong, so accuracy is not trivially 1
    bitmap = mpsearch.BitMap.uniform(logits_model, 2)
    ref = mpsearch.validate(logits_model, bitmap, data=[(x, y)], progress=False)
    probs = mpsearch.validate(probs_model, bitmap, data=[(x, F.one_hot(y, 4).float())],
                              progress=False)
    assert ref.output_divergence > 1e-3
    assert probs.output_divergence == pytest.approx(ref.output_divergence, rel=1e-4)
    assert probs.divergence_kind == "kl"
    assert probs.accuracy_float == ref.accuracy_float == pytest.approx(56 / 64)
    assert probs.accuracy_quantized == ref.accuracy_quantized


def test_loss_fn_names_are_checked() -> None:
    model = _softmax_linear()
    with pytest.raises(ValueError, match="'divergence' or 'task'"):
        Objective([torch.randn(2, 6)], "kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs targets"):
        Objective([torch.randn(2, 6)], "task").prepare(model, CPU)


def test_fisher_takes_fewer_samples_a_call_on_big_models(mnist_cnn, mnist_calib, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Per-sample gradients are held a few samples at a time when all of them at once
    would pass the memory cap (VGG-16 at 32 samples: 18 GB); the table is the same."""
    from mpsearch.sensitivity import fisher

    def table() -> np.ndarray:
        return mpsearch.search(mnist_cnn, 4.0, data=mnist_calib[:1], sensitivity="fisher",
                               slices=None, refine=False, progress=False).sensitivity.omega

    whole = table()
    pieces: list[int] = []
    real = fisher.Fisher._pieces

    def spy(self, objective, rows=32):  # type: ignore[no-untyped-def]
        out = real(self, objective, rows)
        pieces.extend(p[1][1] - p[1][0] for p in out)
        return out

    monkeypatch.setattr(fisher, "_VMAP_BYTES", 4 * 206_736 * 7)  # the CNN's weights, 7 times
    monkeypatch.setattr(fisher.Fisher, "_pieces", spy)
    np.testing.assert_allclose(table(), whole, rtol=1e-5, atol=1e-9)
    assert max(pieces) == 7 and sum(pieces) == 100


def test_qerror_on_one_sample_claims_no_error_bar() -> None:
    """One calibration sample gives no estimate of the error: the table said 0 (certainty)."""
    import math

    import mpsearch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    res = mpsearch.search(model, 4.0, data=[torch.randn(1, 6)], progress=False,
                          slices=None, refine=False)
    stderr = res.table["omega_2_stderr"]
    assert all(math.isinf(v) for v in stderr) and res.table["omega_2"].gt(0).all()
