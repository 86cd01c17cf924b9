"""search() end to end on real models and real data."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch import BitMap, Budget, Hutchinson, InfeasibleBudget


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                     + len(m._backward_hooks) for m in model.modules()),
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _assert_same(before: dict[str, object], model: nn.Module) -> None:
    after = _state(model)
    wb, wa = before["weights"], after["weights"]
    assert isinstance(wb, dict) and isinstance(wa, dict)
    assert all(torch.equal(wb[k], wa[k]) for k in wb)
    for key in ("modes", "flags", "hooks", "grads"):
        assert before[key] == after[key], key


FAST = Hutchinson(tol=0.2, min_probes=5, max_probes=20)


def test_search_cnn_end_to_end(mnist_cnn, mnist_calib, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(mnist_cnn).train()  # train mode must survive too
    model.features[0].weight.requires_grad_(False)  # and a frozen weight stays frozen
    before = _state(model)
    res = mpsearch.search(model, 4.0, data=mnist_calib, sensitivity=FAST, seed=0,
                          progress=False, refine=False, slices=None)  # the solver's own answer
    _assert_same(before, model)
    bm = res.bitmap
    assert set(bm) == {"features.0", "features.3", "classifier.0", "classifier.2"}
    assert bm.avg_bits() <= 4.0 + 1e-9
    assert bm.predicted["avg_bits"] == pytest.approx(bm.avg_bits())
    assert res.front.status == "optimal"
    t = res.table
    for col in ("kind", "params", "macs", "w_bits", "omega_2", "omega_3", "omega_4", "omega_8",
                "trace", "trace_stderr"):
        assert col in t.columns, col
    assert (t["trace"] > 0).all() and (t["trace_stderr"] > 0).all()
    # Ω falls with more bits, and the chosen bits minimise ΣΩ: spot-check the classifier
    assert (t["omega_2"] > t["omega_8"]).all()
    assert t.loc["classifier.0", "macs"] == 32 * 7 * 7 * 128
    assert res.bitmap.provenance["sensitivity"] == "hutchinson"
    # small layers are cheap to keep at 8 bits; the 200k-parameter FC layer pays the budget
    assert bm["classifier.0"].w_bits <= 4 and bm["features.0"].w_bits == 8


def test_reproducible_and_table_reuse(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    a = mpsearch.search(mnist_cnn, 3.0, data=mnist_calib, sensitivity=FAST, seed=3,
                        progress=False, slices=None)
    b = mpsearch.search(mnist_cnn, 3.0, data=mnist_calib, sensitivity=FAST, seed=3,
                        progress=False, slices=None)
    np.testing.assert_array_equal(a.sensitivity.omega, b.sensitivity.omega)
    c = mpsearch.search(mnist_cnn, 5.0, data=mnist_calib, sensitivity=a.sensitivity,
                        progress=False, slices=None)
    assert c.timings_s["sensitivity"] < 0.5 * a.timings_s["sensitivity"]
    np.testing.assert_array_equal(c.sensitivity.omega, a.sensitivity.omega)
    assert c.bitmap.predicted["loss_increase"] <= a.bitmap.predicted["loss_increase"]
    # a table describes one quantizer: another qconfig is refused, also after a JSON trip
    from mpsearch import QuantConfig
    from mpsearch.sensitivity import SensitivityTable

    back = SensitivityTable.from_dict(json.loads(json.dumps(a.sensitivity.to_dict())))
    for table in (a.sensitivity, back):
        with pytest.raises(ValueError, match="qconfig"):
            mpsearch.search(mnist_cnn, 5.0, data=mnist_calib, sensitivity=table,
                            qconfig=QuantConfig(symmetric=True), progress=False, slices=None)


def test_budgets_pins_and_ties(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    first = mpsearch.search(mnist_cnn, 3.0, data=mnist_calib, sensitivity=FAST, progress=False, slices=None)
    table = first.sensitivity
    res = mpsearch.search(mnist_cnn, 3.0, data=mnist_calib, sensitivity=table,
                          pin={"classifier.2": 8, "features.*": 2},
                          tie=[["features.0", "features.3"]], progress=False, slices=None)
    bm = res.bitmap
    assert bm["classifier.2"].w_bits == 8 and bm["features.0"].w_bits == 2
    assert bm["features.0"].w_bits == bm["features.3"].w_bits
    assert bm["features.0"].tie == bm["features.3"].tie is not None
    size_limit = 60_000.0
    res = mpsearch.search(mnist_cnn, Budget(size_bytes=size_limit, bops=3e8), data=mnist_calib,
                          sensitivity=table, progress=False, slices=None)
    assert res.bitmap.predicted["size_bytes"] <= size_limit
    assert res.bitmap.predicted["bops"] <= 3e8
    report = mpsearch.validate(mnist_cnn, res.bitmap, data=mnist_calib[:1], progress=False)
    assert report.size_bytes_quantized == pytest.approx(res.bitmap.predicted["size_bytes"])


def test_infeasible_budget_states_smallest(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    # checked before the sensitivity stage: no time is spent on an impossible budget
    slow = Hutchinson(tol=0.01, min_probes=1000, max_probes=1000)
    with pytest.raises(InfeasibleBudget, match=r"avg_bits=1.5 is below the smallest achievable 2"):
        mpsearch.search(mnist_cnn, 1.5, data=mnist_calib, sensitivity=slow, progress=False)
    with pytest.raises(InfeasibleBudget, match=r"smallest achievable 7\.82"):
        mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, sensitivity=slow,
                        pin={"classifier.0": 8}, progress=False)
    assert issubclass(InfeasibleBudget, ValueError)


def test_bad_input_errors(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="empty"):
        mpsearch.search(mnist_cnn, 4.0, data=[], progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        mpsearch.search(mnist_cnn, 4.0, data=iter(mnist_calib), progress=False)
    with pytest.raises(ValueError, match="no quantizable layer"):
        mpsearch.search(nn.Sequential(nn.ReLU()), 4.0, data=[torch.randn(2, 3)], progress=False)
    with pytest.raises(ValueError, match="bits must be"):
        mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, bits=(1, 4), progress=False)
    with pytest.raises(ValueError, match="whole numbers"):  # was truncated to 7 bits
        mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, bits=(7.5, 8), progress=False)
    with pytest.raises(ValueError, match="unknown sensitivity"):
        mpsearch.search(mnist_cnn, 4.0, data=mnist_calib, sensitivity="magic", progress=False)
    with pytest.raises(ValueError, match="positive"):
        Budget(avg_bits=-1)
    with pytest.raises(ValueError, match="at least one"):
        Budget()


@pytest.mark.parametrize("estimator", ["fisher_block", "fisher"])
def test_nan_gradient_names_layer(mnist_cnn, mnist_calib, estimator) -> None:  # type: ignore[no-untyped-def]
    # (The default, qerror, needs no gradient: it runs this model without complaint.)
    class Sqrt(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(x - x.detach())  # value 0, gradient inf → NaN downstream

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), Sqrt(), nn.Linear(16, 10))
    before = _state(model)
    with pytest.raises(ValueError, match=r"NaN/inf gradient .*\['1'\]"):
        mpsearch.search(model, 4.0, data=mnist_calib[:1], sensitivity=estimator, progress=False, slices=None)
    _assert_same(before, model)


def test_custom_loss_and_divergence_default(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    images = [x for x, _ in mnist_calib[:2]]  # no targets: KL to the float output
    res = mpsearch.search(mnist_cnn, 4.0, data=images, sensitivity=FAST, progress=False, slices=None)
    assert res.sensitivity.diagnostics["loss"] == "kl"
    assert (res.table["trace"] > 0).all()  # Gauss-Newton: positive semi-definite

    def loss_fn(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(out, batch[1], label_smoothing=0.1)

    res = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib[:2], loss_fn=loss_fn,
                          sensitivity=FAST, progress=False, slices=None)
    assert res.sensitivity.diagnostics["loss"] == "custom"


@pytest.mark.slow
def test_dwsep_searched_beats_uniform(mnist_dwsep, mnist_calib, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    """MobileNet-style CNN: the searched map beats uniform at the same average bits.

    Measured here (Hutchinson, CE loss): 3 bits, KL 0.15–0.20 vs 0.53 and accuracy 91–93 %
    vs 77 %; 4 bits, KL 0.024 vs 0.026 (per-channel MSE quantization leaves uniform W4
    little to lose on this model).
    """
    res = mpsearch.search(mnist_dwsep, 3.0, data=mnist_calib, seed=0, progress=False,
                          sensitivity=Hutchinson(max_probes=60), slices=None)
    for bits in (3.0, 4.0):
        bm = res.bitmap if bits == 3.0 else mpsearch.search(
            mnist_dwsep, bits, data=mnist_calib, sensitivity=res.sensitivity,
            progress=False, slices=None).bitmap
        searched = mpsearch.validate(mnist_dwsep, bm, data=mnist_eval, progress=False)
        uniform = mpsearch.validate(mnist_dwsep, BitMap.uniform(mnist_dwsep, int(bits)),
                                    data=mnist_eval, progress=False)
        assert searched.avg_bits <= bits + 1e-9
        assert searched.accuracy_quantized is not None and uniform.accuracy_quantized is not None
        if bits == 3.0:
            assert searched.output_divergence * 2 < uniform.output_divergence
            assert searched.accuracy_quantized > uniform.accuracy_quantized + 0.05
        else:
            assert searched.output_divergence <= uniform.output_divergence * 1.05


@pytest.mark.slow
def test_minilm_tokenizer_batches(minilm) -> None:  # type: ignore[no-untyped-def]
    from mpsearch.zoo.minilm import text_batches

    model, tok = minilm
    calib = text_batches(tok, "calib", n_batches=2, batch_size=4, max_length=32)
    before = _state(model)
    res = mpsearch.search(model, 4.0, data=calib, tie="fused",
                          sensitivity=Hutchinson(tol=0.3, min_probes=4, max_probes=8),
                          progress=False, slices=None)
    _assert_same(before, model)
    bm = res.bitmap
    assert len(bm) == 37 and bm.avg_bits() <= 4.0 + 1e-9
    assert res.sensitivity.diagnostics["loss"] == "mse"
    q = "encoder.layer.0.attention.self."
    assert bm[q + "query"].w_bits == bm[q + "key"].w_bits == bm[q + "value"].w_bits
    assert bm[q + "query"].tie is not None
    report = mpsearch.validate(model, bm, data=calib, progress=False)
    assert report.divergence_kind == "mse" and report.output_divergence > 0


@pytest.mark.parametrize("estimator", ["qerror", "fisher", "hutchinson"])
def test_torch_transformer_out_proj_is_searched(estimator: str) -> None:
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: every
    estimator still rates it, the quantizer quantizes it, and its activations (it has no
    input of its own) stay float rather than claiming an a_bits nothing applies."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(16, 5)).eval()
    data = [torch.randn(4, 6, 16) for _ in range(3)]
    before = _state(model)
    sens = (Hutchinson(tol=0.5, min_probes=3, max_probes=6) if estimator == "hutchinson"
            else estimator)
    res = mpsearch.search(model, 4.0, data=data, sensitivity=sens, progress=False, slices=None)
    _assert_same(before, model)
    name = "0.layers.0.self_attn.out_proj"
    row = res.table.loc[name]
    assert row["macs"] == 6 * 16 * 16
    omega = [row[f"omega_{b}"] for b in res.problem.bits]
    assert omega[0] > omega[-1] >= 0  # rated, and 2 bits worse than 8
    qkv = res.table.loc["0.layers.0.self_attn"]  # the packed in_proj_weight
    assert qkv["kind"] == "MultiheadAttention" and qkv["macs"] == 3 * 6 * 16 * 16
    assert qkv["omega_2"] > qkv[f"omega_{res.problem.bits[-1]}"]
    q = mpsearch.quantize(model, mpsearch.BitMap.uniform(model, 2))
    for attr in ("out_proj.weight", "in_proj_weight"):
        assert not torch.equal(q[0].layers[0].self_attn.get_parameter(attr),
                               model[0].layers[0].self_attn.get_parameter(attr))
    if estimator == "qerror":
        act = mpsearch.search(model, 4.0, data=data, sensitivity="qerror", a_bits=8,
                              progress=False, slices=None)
        assert act.bitmap[name].a_bits is None
        assert act.bitmap["0.layers.0.linear1"].a_bits == 8


@pytest.mark.parametrize("estimator", ["qerror", "fisher"])
def test_parametrized_weights_are_searched_and_left_intact(estimator: str) -> None:
    """weight_norm layers: a computed weight is searched on a baked copy; the user's model
    keeps its parametrizations; quantize stores the quantized values."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv1d(4, 16, 3)), nn.ReLU(), nn.Flatten(),
                          weight_norm(nn.Linear(16 * 14, 10))).eval()
    data = [torch.randn(8, 4, 16) for _ in range(3)]
    with torch.no_grad():
        y = model(data[0])
    before = _state(model)
    res = mpsearch.search(model, 4.0, data=data, sensitivity=estimator, progress=False, slices=None)
    _assert_same(before, model)
    assert set(res.bitmap.bits()) == {"0", "3"}  # not mistaken for one shared weight
    assert all(parametrize.is_parametrized(model[i], "weight") for i in (0, 3))
    with torch.no_grad():
        assert torch.equal(model(data[0]), y)
    q = mpsearch.quantize(model, mpsearch.BitMap.uniform(model, 2))
    assert not parametrize.is_parametrized(q[3], "weight")
    from mpsearch.quant.apply import quantize_weight

    expected = quantize_weight(model[3].weight.detach(), "Linear", 2,
                               mpsearch.QuantConfig())
    assert torch.equal(q[3].weight, expected)
    assert parametrize.is_parametrized(model[3], "weight")  # the original is untouched
    rep = mpsearch.validate(model, res.bitmap, data=data, progress=False)
    assert 0 < rep.output_divergence < 0.01


class _TwoHeads(nn.Module):
    """A trunk with a used head, a head no batch runs, and a branch only wide inputs run."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.used, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 6)
        self.wide = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        if bool((x[:, 0] > 2).any()):  # data-dependent: one sample of batch 1 takes it
            h = h + self.wide(h)
        return self.used(h)


@pytest.mark.parametrize("estimator", ["qerror", "fisher", "hutchinson"])
def test_layers_no_batch_runs_are_left_float_with_a_warning(estimator: str,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    # Before, every estimator failed here: qerror and the refinement raised ("did not run
    # on the calibration data"), after the gradient estimators had rated the unused head 0,
    # which would hand it the fewest bits and its share of the budget to the others.
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    data = [torch.randn(4, 8).clamp(-1, 1) for _ in range(3)]
    data[1][2, 0] = 3.0
    before = _state(model)
    sens = (Hutchinson(tol=0.5, min_probes=3, max_probes=6) if estimator == "hutchinson"
            else estimator)
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(model, 4.0, data=data, sensitivity=sens, progress=False, slices=None)
    _assert_same(before, model)
    assert list(res.problem.layers) == ["trunk", "used", "wide"]  # `wide` ran on batch 1
    assert res.bitmap["unused"].w_bits == 32
    assert res.table.loc["wide", "omega_2"] > 0  # rated on the batch that runs it
    assert res.bitmap.predicted["avg_bits"] <= 4.0 + 1e-9
    idle = [r.getMessage() for r in caplog.records if "left out of the search" in r.message]
    assert len(idle) == 1 and idle[0].startswith("1 layer(s)") and idle[0].count("unused") == 1
    assert not any("did not run in the sample" in r.message for r in caplog.records)


def test_no_layer_running_is_an_error() -> None:
    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    model = Bypass()
    with pytest.raises(ValueError, match="none of the 1 quantizable layer"):
        mpsearch.search(model, 4.0, data=[torch.randn(2, 3)], progress=False, slices=None)


def test_tuple_output_warns_that_the_divergence_reads_only_the_first(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsearch.batches import ignored_outputs

    monkeypatch.setattr("mpsearch._report._SAID", set())  # said once a process

    class TwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.trunk(x))
            return self.a(h), self.b(h)

    t = torch.zeros(2, 3)
    assert ignored_outputs(t) == [] and ignored_outputs((t,)) == []
    assert ignored_outputs((t, 1, torch.zeros(2, 5))) == ["[2] (2, 5)"]
    assert ignored_outputs({"x": t, "y": t}) == ["'y' (2, 3)"]
    assert ignored_outputs({"logits": t, "hidden_states": (t, t)}) == []
    # a plain dict's other entries are predictions too, wherever its logits sit
    assert ignored_outputs({"boxes": torch.zeros(2, 4), "logits": t}) == ["'boxes' (2, 4)"]
    # a Hugging Face encoder's pooler is a layer of its own that only pooler_output reads
    assert ignored_outputs({"last_hidden_state": t, "pooler_output": torch.zeros(2, 4)}) == [
        "'pooler_output' (2, 4)"]
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(TwoOut().eval(), 4.0, data=[torch.randn(4, 8)] * 2,
                              progress=False, slices=None)
    said = [r.getMessage() for r in caplog.records if "only the first" in r.message]
    assert len(said) == 1 and "[1] (4, 5)" in said[0] and "loss_fn=" in said[0]
    assert res.table.loc["b", "omega_2"] == 0  # what the warning is about


def test_weights_of_kinds_not_searched_are_named_with_their_share(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsearch.layers import quantizable_modules, unsearched_weights

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)              # 400 weights, not searched
            self.up = nn.ConvTranspose1d(8, 8, 2)       # 128 weights, not searched
            self.mid = nn.Linear(8, 8)                  # 64, searched
            self.head = nn.Linear(8, 50, bias=False)    # tied to emb: covered
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.up(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            return self.head(torch.relu(self.mid(h)))

    model = Mixed().eval()
    assert unsearched_weights(model, quantizable_modules(model)) == {"ConvTranspose1d": 128}
    untied = Mixed()
    untied.head = nn.Linear(8, 50)
    assert unsearched_weights(untied, quantizable_modules(untied)) == {
        "Embedding": 400, "ConvTranspose1d": 128}
    assert unsearched_weights(untied, quantizable_modules(untied, exclude="mid")) == {
        "Embedding": 400, "ConvTranspose1d": 128}  # excluded by choice: not counted
    # a model's own parameter is named, not its class ("does not quantize Mixed")
    untied.pos = nn.Parameter(torch.zeros(5, 8))
    assert unsearched_weights(untied, quantizable_modules(untied))["pos"] == 40
    del untied.pos
    torch.manual_seed(0)
    monkeypatch.setattr("mpsearch._report._SAID", set())  # said once a process
    with caplog.at_level("WARNING", logger="mpsearch"):
        mpsearch.search(untied.eval(), 4.0, data=[torch.randint(0, 50, (2, 5))] * 2,
                        refine=False, progress=False, slices=None)
    said = [r.getMessage() for r in caplog.records if "stay float" in r.message]
    # 528 float weights against 464 searched (mid 64, head 400): 53 %
    assert said == [("53% of the model's weights stay float, outside the search and its "
                     "budget: mpsearch does not quantize Embedding (400 weights), "
                     "ConvTranspose1d (128 weights)")]


def test_the_verbs_work_under_inference_mode(mnist_cnn, mnist_calib, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    """A user's ``with torch.inference_mode():`` (and batches made there, which autograd
    cannot save) changes nothing: the same maps and divergences as outside it."""
    uniform = BitMap.uniform(mnist_cnn, 4)
    kw = {"sensitivity": "fisher", "slices": None, "refine": False, "progress": False}
    outside = (mpsearch.validate(mnist_cnn, uniform, data=mnist_eval[:1], progress=False),
               mpsearch.search(mnist_cnn, 4.0, data=mnist_calib[:2], **kw).bitmap)
    with torch.inference_mode():
        calib = [(x.clone(), y.clone()) for x, y in mnist_calib[:2]]
        assert calib[0][0].is_inference()
        inside = (mpsearch.validate(mnist_cnn, uniform, data=mnist_eval[:1], progress=False),
                  mpsearch.search(mnist_cnn, 4.0, data=calib, **kw).bitmap)
        qmodel = mpsearch.quantize(mnist_cnn, uniform)
    assert inside[0].output_divergence == pytest.approx(outside[0].output_divergence, rel=1e-6)
    assert inside[1] == outside[1]
    torch.testing.assert_close(qmodel(mnist_eval[0][0][:8]),
                               mpsearch.quantize(mnist_cnn, uniform)(mnist_eval[0][0][:8]))


def test_a_reused_table_of_another_loss_says_so(mnist_cnn, mnist_calib, caplog) -> None:  # type: ignore[no-untyped-def]
    """A table rated with the KL to the float model, reused with loss_fn="task": the
    refinement measures cross-entropy, and the bit map says which loss it measured."""
    first = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib[:2], sensitivity="fisher",
                            slices=None, refine=False, progress=False)
    assert first.bitmap.provenance["loss"] == "kl"
    with caplog.at_level("WARNING", logger="mpsearch"):
        again = mpsearch.search(mnist_cnn, 3.0, data=mnist_calib[:2], slices=None,
                                sensitivity=first.sensitivity, loss_fn="task",
                                refine=mpsearch.refine.Refine(max_evals=4), progress=False)
    assert any("rates the 'kl' loss but this search measures 'cross_entropy'" in r.getMessage()
               for r in caplog.records)
    assert again.bitmap.provenance["loss"] == "cross_entropy"
    assert again.bitmap.provenance["table_loss"] == "kl"
    # without the refinement too (the loss_fn went unread: no word, no check)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mpsearch"):
        bare = mpsearch.search(mnist_cnn, 3.0, data=mnist_calib[:2], slices=None,
                               sensitivity=first.sensitivity, loss_fn="task", refine=False,
                               progress=False)
    assert "the solver ranks by 'kl' (no refinement measures the other)" in caplog.text
    # its prediction is the table's, in the table's loss: validate compares it with that
    assert bare.bitmap.provenance["loss"] == "kl" and "table_loss" not in bare.bitmap.provenance
    with pytest.raises(ValueError, match="loss_fn"):
        mpsearch.search(mnist_cnn, 3.0, data=mnist_calib[:2], slices=None, refine=False,
                        sensitivity=first.sensitivity, loss_fn="nonsense", progress=False)


def test_a_glob_that_matches_no_layer_is_named(mnist_cnn, mnist_calib, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib[:1], sensitivity="fisher",
                              slices=None, refine=False, progress=False,
                              exclude=["classifier.2", "clasifier.*"])
    said = [r.getMessage() for r in caplog.records if "match no quantizable layer" in r.getMessage()]
    assert len(said) == 1 and "exclude= pattern(s) ['clasifier.*']" in said[0]
    assert res.bitmap["classifier.2"].w_bits == 32  # the pattern that matched still applies


def _computed_weights_model(kind: str) -> nn.Module:
    import warnings

    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 6))
    if kind == "pruned":
        prune.l1_unstructured(model[2], "weight", amount=0.5)
    elif kind == "old_weight_norm":  # the deprecated hook-based forms
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nn.utils.weight_norm(model[2])
            nn.utils.spectral_norm(model[0])
    else:
        from torch.nn.utils.parametrizations import weight_norm

        weight_norm(model[2])
    return model.eval()


@pytest.mark.parametrize("kind", ["pruned", "old_weight_norm", "parametrized"])
@pytest.mark.parametrize("slices", [None, 4])
def test_weights_computed_by_torch_hooks_are_searched_and_left_intact(kind: str,
                                                                      slices: int | None) -> None:
    """Pruned layers and the old-style weight_norm / spectral_norm compute their weight in
    a forward pre-hook (not a parameter): the search crashed on them before ('weight is not
    an nn.Parameter'), and a sliced map of a parametrized layer could not be applied."""
    model = _computed_weights_model(kind)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 12, generator=g) for _ in range(3)]
    with torch.no_grad():
        y = model(data[0])
    before = _state(model)
    res = mpsearch.search(model, 3.0, data=data, progress=False, slices=slices)
    _assert_same(before, model)
    with torch.no_grad():
        assert torch.equal(model(data[0]), y)
    assert res.table["omega_2"].gt(0).all()  # the probes reach the computed weights
    q = mpsearch.quantize(model, res.bitmap)
    if slices:
        q = mpsearch.merge_slices(q)
    w = q[2].weight
    assert w[0].unique().numel() <= 2 ** 4  # stored quantized, not recomputed from a source
    if kind == "pruned":
        assert int((w == 0).sum()) >= 512  # the pruned half stays zero
    rep = mpsearch.validate(model, res.bitmap, data=data, progress=False)
    assert 0 < rep.output_divergence < 0.05
    with torch.no_grad():
        assert torch.equal(model(data[0]), y)


@pytest.mark.parametrize("shape, kind", [((8,), "mse"), ((8, 1), "mse"), ((8, 1, 4, 4), "mse"),
                                         ((8, 5), "kl"), ((8, 3, 5), "kl"), ((8, 3, 1), "mse")])
def test_the_divergence_follows_the_output_shape(shape: tuple[int, ...], kind: str) -> None:
    """KL over the last dimension only where it holds classes: a regression's single value
    (KL over one class is always 0: every layer would look harmless) and an image's width
    are compared by MSE."""
    from mpsearch.losses import Objective

    class Shaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, int(np.prod(shape[1:])))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).reshape(shape)

    objective = Objective([torch.randn(8, 4)])
    objective.prepare(Shaped(), torch.device("cpu"))
    assert objective.kind == kind


def test_a_padding_masked_nested_transformer_is_searched() -> None:
    """nn.TransformerEncoder(enable_nested_tensor=True) given a key padding mask turns the
    batch into nested tensors in eval mode, which have no shape to record: the search
    crashed in discover. Its flag is off during the search and restored after."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
                16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=True)
            self.out = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.out(self.enc(self.inp(x), src_key_padding_mask=mask))

    torch.manual_seed(0)
    model = Encoder().eval()
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[1:, 5:] = True
    data = [{"x": torch.randn(4, 7, 6), "mask": mask} for _ in range(2)]
    assert model.enc.use_nested_tensor
    res = mpsearch.search(model, 4.0, data=data, progress=False)
    assert model.enc.use_nested_tensor
    assert res.table["omega_2"].gt(0).all()
    mpsearch.validate(model, res.bitmap, data=data, progress=False)


def test_bits_as_a_numpy_array() -> None:
    """bits=np.array([...]) crashed a sliced search (the truth value of an array)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    data = [torch.randn(8, 8) for _ in range(2)]
    res = mpsearch.search(model, 4.0, data=data, bits=np.array([2, 4, 8]), progress=False,
                          sensitivity="fisher", refine=False)
    assert set(res.bitmap.bits().values()) <= {2, 4, 8}


def test_a_shuffling_dataloader_leaves_the_global_generator_alone() -> None:
    """materialize started the loader twice (``iter(data) is data``) and each start drew
    its order from torch's global generator: a search moved it by two epochs."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    loader = DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=8, shuffle=True)
    data = [(x,) for (x,) in loader]
    state = torch.get_rng_state()
    mpsearch.search(model, 4.0, data=loader, progress=False, sensitivity="fisher",
                    refine=False, slices=None)
    assert torch.equal(torch.get_rng_state(), state)
    mpsearch.validate(model, mpsearch.BitMap.uniform(model, 4), data=loader, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(data) == 4


def test_a_model_without_values_is_refused_clearly() -> None:
    """A model built on the meta device failed inside torch ('Tensor.item() cannot be
    called on meta tensors')."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    bm = mpsearch.BitMap.uniform(model, 4)  # shapes are enough for a bit map
    data = [torch.randn(4, 8)]
    for call in (lambda: mpsearch.search(model, 4.0, data=data, progress=False),
                 lambda: mpsearch.quantize(model, bm),
                 lambda: mpsearch.validate(model, bm, data=data, progress=False)):
        with pytest.raises(ValueError, match="meta device.*load the model's weights"):
            call()


def test_a_lazy_model_not_yet_run_is_refused_clearly() -> None:
    """An nn.LazyLinear not yet run failed in the finite-weights check, and then again in
    the clean-up that restores requires_grad, whose error the user saw."""
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(4, 8)]
    for call in (lambda: mpsearch.search(model, 4.0, data=data, progress=False),
                 lambda: mpsearch.quantize(model, mpsearch.BitMap.uniform(nn.Linear(8, 16), 4)),
                 lambda: mpsearch.validate(model, mpsearch.BitMap.uniform(nn.Linear(8, 16), 4),
                                           data=data, progress=False)):
        with pytest.raises(ValueError, match=r"not initialized yet \(0.weight, 0.bias.*"
                                             "run one forward pass"):
            call()
    model(data[0])  # initialized: searched as any model
    res = mpsearch.search(model, 4.0, data=data, progress=False, sensitivity="fisher",
                          slices=None)
    assert set(res.bitmap) == {"0", "2"}


class _Aliased(nn.Module):
    """fc2 registered twice and called through its second name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 6)
        self.alias = self.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.alias(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("estimator", ["qerror", "fisher", "hutchinson"])
def test_a_module_under_two_names_is_searched_and_left_as_it_was(estimator: str) -> None:
    """``self.alias = self.fc2``: torch's functional_call put the swapped-in tensor back
    through the second name, so the search crashed (``weight is not an nn.Parameter``)
    and left fc2 holding a quantized plain tensor; slices replaced fc2 under one name only,
    so the forward ran the float layer through the other."""
    torch.manual_seed(0)
    model = _Aliased().eval()
    data = [torch.randn(64, 12) for _ in range(2)]
    params = dict(model.named_parameters())
    before = _state(model)
    sens = FAST if estimator == "hutchinson" else estimator
    for slices in (None, 4):
        res = mpsearch.search(model, 3.0, data=data, progress=False, sensitivity=sens,
                              slices=slices)
        _assert_same(before, model)
        assert dict(model.named_parameters()) == params  # the same Parameter objects
        assert all(type(p) is nn.Parameter for p in model.parameters())
    assert res.bitmap.slices is not None and "fc2" in res.bitmap.slices.layers
    sliced = mpsearch.slice_model(model, res.bitmap)
    assert sliced.alias is sliced.fc2 and type(sliced.fc2).__name__ == "ChannelSlices"
    x = data[0]
    assert torch.allclose(sliced(x), model(x), atol=1e-5)
    uniform = mpsearch.BitMap.uniform(sliced, 2)
    with torch.no_grad():
        # the sliced copy's fc2 runs quantized: its output is the unsliced model's at 2 bits
        want = mpsearch.quantize(model, mpsearch.BitMap.uniform(model, 2))(x)
        assert torch.allclose(mpsearch.quantize(sliced, uniform)(x), want, atol=1e-5)


def test_a_buffer_the_forward_re_registers_in_an_aliased_module_is_kept() -> None:
    """Putting an aliased module's slots back must not undo the forward's own work: a
    cache that grows with the input is the forward's to keep (a stale one broke the next
    forward)."""
    from mpsearch._state import functional_call

    class Growing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > len(self.table):
                self.register_buffer("table", torch.arange(float(x.shape[-1])),
                                     persistent=False)
            return self.fc(x) + self.table[: x.shape[-1]]

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Growing()
            self.alias = self.block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alias(x)

    model = Twice()
    weight = model.block.fc.weight
    functional_call(model, {"block.fc.weight": torch.zeros(4, 4)}, (torch.randn(1, 4),))
    assert model.block.fc.weight is weight  # the user's Parameter is back
    assert model.block.table.shape == (4,)  # the grown cache stays
    model(torch.randn(1, 4))


@pytest.mark.parametrize("estimator", ["qerror", "fisher", "hutchinson"])
def test_a_tied_embedding_under_three_names_is_left_as_it_was(estimator: str) -> None:
    """A T5's layout: one embedding as ``shared``, ``enc.embed_tokens`` and
    ``dec.embed_tokens``, its weight tied to the LM head. torch ties the head's swapped-in
    weight into the embedding and restored it through the second name, so the user's
    embedding kept a quantized tensor."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(50, 8)
            self.enc, self.dec = nn.Module(), nn.Module()
            self.enc.embed_tokens = self.dec.embed_tokens = self.shared
            self.mid = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.shared.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.enc.embed_tokens(ids) + self.dec.embed_tokens(ids)
            return self.lm_head(torch.relu(self.mid(h)))

    torch.manual_seed(0)
    model = Tied().eval()
    weight = model.shared.weight
    before = _state(model)
    data = [torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(i))
            for i in range(2)]
    mpsearch.search(model, 4.0, data=data, sensitivity=FAST if estimator == "hutchinson"
                    else estimator, slices=None, progress=False)
    assert model.shared.weight is weight and model.lm_head.weight is weight
    _assert_same(before, model)


def test_buffers_the_forward_updates_are_restored() -> None:
    """A forward that counts what it has seen ran ~50 times in a search and came back
    with its buffers changed: the user's state_dict was not the one handed in."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.Linear(12, 32), nn.Linear(32, 6)
            self.register_buffer("seen", torch.zeros(()))
            self.register_buffer("ema", torch.zeros(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            with torch.no_grad():
                self.seen += x.shape[0]
                self.ema.mul_(0.9).add_(0.1 * h.mean(0))
            return self.out(h)

    torch.manual_seed(0)
    model = Counting().eval()
    data = [torch.randn(16, 12) for _ in range(3)]
    before = _state(model)
    seen = model.seen
    mpsearch.search(model, 4.0, data=data, progress=False, sensitivity="fisher")
    mpsearch.validate(model, mpsearch.BitMap.uniform(model, 4), data=data, progress=False)
    _assert_same(before, model)
    assert model.seen is seen and float(model.seen) == 0.0
    # its table is reused on it, sliced or not, with other data too: the fingerprint is of
    # the state handed in, not of one a counting forward had moved on (a reviewer's case)
    for slices in (None, 4):
        res = mpsearch.search(model, 4.0, data=data, progress=False, sensitivity="fisher",
                              slices=slices, refine=False)
        again = mpsearch.search(model, 3.0, data=data[:2], progress=False,
                                sensitivity=res.sensitivity, slices=slices, refine=False)
        assert again.bitmap.slices == res.bitmap.slices
    assert res.sliced_model is not None and float(res.sliced_model.seen) == 0.0
    _assert_same(before, model)


def test_a_layer_whose_weight_the_forward_reads_itself_is_named_as_such(
        caplog: pytest.LogCaptureFixture) -> None:
    """F.linear(x, self.fc.weight) bypasses fc: it never runs, so it stays float; the
    warning said it 'did not run on any calibration batch', as for an unused head."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(torch.relu(self.a(x)), self.fc.weight, self.fc.bias)

    torch.manual_seed(0)
    model = Bypass().eval()
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(model, 4.0, data=[torch.randn(4, 8)], progress=False,
                              sensitivity="fisher", slices=None)
    assert set(res.bitmap.bits()) == {"a", "fc", "unused"}
    assert res.bitmap["fc"].w_bits == 32 and res.bitmap["unused"].w_bits == 32
    assert "reads their weight itself" in caplog.text and ": fc;" in caplog.text
    assert "did not run on any calibration batch" in caplog.text and ": unused;" in caplog.text


def test_a_two_input_model_given_a_pair_is_told_the_batch_convention() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.fc(x + y)

    pair = [torch.randn(4, 8), torch.randn(4, 8)]
    with pytest.raises(TypeError, match=r"\(inputs, targets\).*\(\(x1, x2\), targets\)"):
        mpsearch.search(Two(), 4.0, data=[pair], progress=False)
    res = mpsearch.search(Two(), 4.0, data=[(tuple(pair),)], progress=False,
                          sensitivity="fisher", slices=None)
    assert set(res.bitmap.bits()) == {"fc"}
    # validate says the same
    with pytest.raises(TypeError, match=r"\(\(x1, x2\), targets\)"):
        mpsearch.validate(Two(), res.bitmap, data=[pair], progress=False)
    # one batch passed as the data, not in a list: its items are read as two batches
    one = (tuple(pair), torch.randn(4, 4))
    for verb in (lambda d: mpsearch.search(Two(), 4.0, data=d, progress=False),
                 lambda d: mpsearch.validate(Two(), res.bitmap, data=d, progress=False)):
        with pytest.raises(ValueError, match=r"one batch .*wrap it in a list"):
            verb(one)
    assert mpsearch.validate(Two(), res.bitmap, data=[one], progress=False).n_samples == 4


def test_a_flat_tie_list_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,)))]
    with pytest.raises(ValueError, match="list of lists"):
        mpsearch.search(model, 4.0, data=data, tie=["0", "2"], progress=False)


def test_auto_slices_search_per_layer_without_a_narrow_width(mnist_cnn, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    """bits=(16, 32) with the default slices="auto" failed: "slices need a candidate width
    of 2-8 bits", of slices the user never asked for. A generator of bits is read once."""
    calib = [x for x, _ in mnist_calib[:1]]
    res = mpsearch.search(mnist_cnn, 16.0, data=calib, bits=(16, 32), sensitivity="fisher",
                          progress=False)
    assert res.bitmap.slices is None and set(res.bitmap.bits().values()) <= {16, 32}
    assert res.bitmap.provenance["slices_auto"] == "per layer: no candidate width of 2-8 bits"
    res = mpsearch.search(mnist_cnn, 4.0, data=calib, bits=(b for b in (2, 4, 8)),
                          sensitivity="fisher", refine=False, progress=False)
    assert res.bitmap.avg_bits() <= 4.0 + 1e-9 and set(res.bitmap.bits().values()) <= {2, 4, 8}
