"""profile → HardwareProfile JSON → latency costs in search → export_onnx → validate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import mpsearch
from mpsearch import BitMap, Budget, HardwareProfile, Hutchinson, InfeasibleBudget
from mpsearch.hw.cost import latency_table, predict_latency
from mpsearch.hw.kernels_ort import LayerSpec
from mpsearch.hw.onnx_export import build_onnx
from mpsearch.hw.runtime import OrtModel
from mpsearch.layers import discover
from mpsearch.quant import QuantConfig

FAST = {"rounds": 1, "warmup": 1, "round_s": 0.002, "progress": False}


@pytest.fixture(scope="module")
def cnn_profile(mnist_cnn: torch.nn.Module,
                mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]) -> HardwareProfile:
    return mpsearch.profile(mnist_cnn, mnist_eval[0][0][:8], **FAST)


def test_profile_records_formats_and_reasons(cnn_profile: HardwareProfile,
                                             mnist_cnn: torch.nn.Module) -> None:
    assert len(cnn_profile.shapes) == 4  # four distinct layer shapes
    conv = next(r for k, r in cnn_profile.shapes.items() if k.startswith("Conv2d"))
    assert set(conv["formats"]) == {"fp32", "w8a8"}
    assert set(conv["unsupported"]) == {"2bit", "4bit"}
    lin = next(r for k, r in cnn_profile.shapes.items() if k.startswith("Linear|in=8x1568"))
    assert set(lin["formats"]) == {"fp32", "w8a8", "w4b128", "w2b128"}
    for fmt in lin["formats"].values():
        st = fmt["warm"]
        assert 0 <= st["p10_us"] <= st["median_us"] <= st["p90_us"] and st["n"] >= 1
    rec = next(iter(cnn_profile.models.values()))
    assert set(rec["layers"]) == {"features.0", "features.3", "classifier.0", "classifier.2"}
    assert rec["e2e_fp32_us"]["warm"]["median_us"] > 0
    assert cnn_profile.device["kind"] == "cpu" and cnn_profile.versions["onnxruntime"]
    rows = cnn_profile.table()
    assert any(r["kernel"].startswith("none: no 4-bit convolution") for r in rows)


def test_profile_json_round_trip(cnn_profile: HardwareProfile, tmp_path: Path) -> None:
    path = cnn_profile.save(tmp_path / "p.json")
    back = HardwareProfile.load(path)
    assert back.to_dict() == cnn_profile.to_dict()
    assert path.read_text() == back.save(tmp_path / "q.json").read_text()
    with pytest.raises(ValueError, match="format_version"):
        HardwareProfile.from_dict({**cnn_profile.to_dict(), "format_version": 99})


def test_reuse_measures_no_shape_twice(cnn_profile: HardwareProfile, mnist_cnn: torch.nn.Module,
                                       mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    before = {k: dict(v["formats"]) for k, v in cnn_profile.shapes.items()}
    again = mpsearch.profile(mnist_cnn, mnist_eval[0][0][:8], reuse=cnn_profile,
                             end_to_end=False, **FAST)
    assert again is cnn_profile
    assert {k: dict(v["formats"]) for k, v in again.shapes.items()} == before


def test_unknown_shape_is_estimated_and_flagged(cnn_profile: HardwareProfile) -> None:
    known = LayerSpec.from_dict(next(r["spec"] for k, r in cnn_profile.shapes.items()
                                     if k.startswith("Linear|in=8x1568")))
    assert not cnn_profile.lookup(known, "fp32").estimated
    new = LayerSpec(kind="Linear", weight_shape=(256, 1568), input_shape=(8, 1568))
    look = cnn_profile.lookup(new, "fp32")
    assert look.estimated and look.latency_us is not None and look.latency_us > 0
    assert "estimated" in look.reason
    with pytest.raises(ValueError, match="no measured"):
        cnn_profile.lookup(new, "w8b128")


def test_latency_table_masks_missing_kernels(cnn_profile: HardwareProfile,
                                             mnist_cnn: torch.nn.Module,
                                             mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]
                                             ) -> None:
    layers = discover(mnist_cnn, mnist_eval[0][0][:8])
    lat = latency_table(cnn_profile, mnist_cnn, layers, (2, 3, 4, 8, 32), QuantConfig())
    names = [i.name for i in layers]
    conv = names.index("features.3")
    lin = names.index("classifier.0")
    assert lat.allowed[conv].tolist() == [False, False, False, True, True]
    assert lat.allowed[lin].tolist() == [True, False, True, True, True]
    assert "convolution" in lat.reasons["features.3@4"]
    # rows sum to the predicted end-to-end latency
    pred = predict_latency(cnn_profile, mnist_cnn, BitMap.uniform(mnist_cnn, 32))
    assert lat.table[:, -1].sum() == pytest.approx(pred["latency_us"], rel=1e-9)
    # ... with each bit-width's in-graph factor, measured by profile on the deployed model
    rec = next(iter(cnn_profile.models.values()))
    assert set(rec["graph_factor"]) == {"2", "4", "8"}
    assert set(rec["e2e_bits_us"]["8"]) == {"warm"}
    f8 = cnn_profile.graph_factor(next(iter(cnn_profile.models)), 8)
    assert 0.25 <= f8 <= 4.0 and f8 == rec["graph_factor"]["8"]["warm"]
    pred8 = predict_latency(cnn_profile, mnist_cnn, BitMap.uniform(mnist_cnn, 8))
    assert lat.table[:, 3].sum() == pytest.approx(pred8["latency_us"], rel=1e-9)
    raw = sum(cnn_profile.lookup(LayerSpec.from_dict(cnn_profile.shapes[v["key"]]["spec"]),
                                 pred8["formats"][n]).latency_us * v["calls"]
              for n, v in rec["layers"].items())
    assert pred8["latency_us"] == pytest.approx(raw * f8 + pred8["rest_us"], rel=1e-9)
    assert cnn_profile.graph_factor("no such model", 8) == 1.0


def test_search_respects_latency_budgets(cnn_profile: HardwareProfile,
                                         mnist_cnn: torch.nn.Module,
                                         mnist_calib: list[tuple[torch.Tensor, torch.Tensor]],
                                         mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]
                                         ) -> None:
    fp32 = predict_latency(cnn_profile, mnist_cnn, BitMap.uniform(mnist_cnn, 32))["latency_us"]
    first = mpsearch.search(mnist_cnn, Budget(latency_us=fp32 * 10), data=mnist_calib[:1],
                            profile=cnn_profile, progress=False,
                            sensitivity=Hutchinson(max_probes=8, min_probes=4, tol=0.5), slices=None)
    # unconstrained in latency: every layer keeps float (no loss at all)
    assert set(first.bitmap.bits().values()) == {32}
    lo = min(first.problem.min_cost("latency_us"), fp32)
    for budget_us in np.linspace(lo, fp32, 3)[1:]:
        res = mpsearch.search(mnist_cnn, Budget(latency_us=float(budget_us)), data=mnist_calib[:1],
                              profile=cnn_profile, sensitivity=first.sensitivity, progress=False, slices=None)
        assert res.bitmap.predicted["latency_us"] <= budget_us * (1 + 1e-9)
        for conv in ("features.0", "features.3"):
            assert res.bitmap[conv].w_bits in (8, 32)
    with pytest.raises(InfeasibleBudget, match="latency_us"):
        mpsearch.search(mnist_cnn, Budget(latency_us=lo * 0.5), data=mnist_calib[:1],
                        profile=cnn_profile, sensitivity=first.sensitivity, progress=False, slices=None)
    with pytest.raises(ValueError, match="profile"):
        mpsearch.search(mnist_cnn, Budget(latency_ratio=0.7), data=mnist_calib[:1],
                        progress=False, slices=None)
    res = mpsearch.search(mnist_cnn, Budget(latency_ratio=1.0, avg_bits=12.0),
                          data=mnist_calib[:1], profile=cnn_profile,
                          sensitivity=first.sensitivity, progress=False, slices=None)
    int8 = predict_latency(cnn_profile, mnist_cnn, BitMap.uniform(mnist_cnn, 8))["latency_us"]
    assert res.bitmap.predicted["latency_us"] <= int8 * (1 + 1e-9)
    assert res.bitmap.predicted["avg_bits"] <= 12.0 + 1e-9


def test_budget_latency_fields() -> None:
    assert Budget(latency_ratio=0.7).resolved(1000.0) == {"latency_us": 700.0}
    assert Budget(latency_us=5.0, size_bytes=10).limits() == {"size_bytes": 10.0,
                                                                 "latency_us": 5.0}
    with pytest.raises(ValueError, match="not both"):
        Budget(latency_us=1.0, latency_ratio=0.5)
    with pytest.raises(ValueError, match="positive"):
        Budget(latency_ratio=-1.0)


def test_export_cnn_matches_simulated_model(mnist_cnn: torch.nn.Module,
                                            mnist_eval: list[tuple[torch.Tensor, torch.Tensor]],
                                            tmp_path: Path) -> None:
    x = mnist_eval[0][0][:16]
    bm = BitMap.from_bits(mnist_cnn, {"classifier.0": 4, "classifier.2": 2}, default=8, a_bits=8)
    path = mpsearch.export_onnx(mnist_cnn, bm, tmp_path / "cnn.onnx", sample_batch=x)
    import onnx

    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QLinearConv", "MatMulNBits"} <= ops and "Conv" not in ops
    y = OrtModel(mnist_cnn, bm, x).run(x)
    ref = mpsearch.quantize(mnist_cnn, bm)(x).detach().numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.02
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.9
    with pytest.raises(ValueError, match="convolution"):
        build_onnx(mnist_cnn, BitMap.uniform(mnist_cnn, 4), x)
    # a float64 model wrote a graph ORT refused to load (DynamicQuantizeLinear on doubles)
    import copy

    with pytest.raises(ValueError, match=r"float32 graphs.*torch.float64"):
        mpsearch.export_onnx(copy.deepcopy(mnist_cnn).double(), bm, tmp_path / "f64.onnx",
                             sample_batch=x.double())
    assert not (tmp_path / "f64.onnx").exists()


def test_export_of_a_head_tied_to_its_embedding_matches_quantize(tmp_path: Path) -> None:
    """quantize() quantizes the one tensor an LM head shares with its embedding, so the
    lookup reads quantized values; the export kept the lookup's table float (10× off)."""

    class TiedLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            self.fc = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc(self.emb(x))))

    torch.manual_seed(0)
    model = TiedLM().eval()
    x = torch.randint(0, 50, (2, 7))
    bm = BitMap.from_bits(model, {"head": 4}, default=8)
    y = OrtModel(model, bm, x).run(x)
    ref = mpsearch.quantize(model, bm)(x).detach().numpy()
    untied = mpsearch.quantize(model, bm)
    untied.emb.weight = torch.nn.Parameter(model.emb.weight.detach().clone())
    off = untied(x).detach().numpy()
    assert np.abs(y - ref).max() < 0.2 * np.abs(off - ref).max()
    assert torch.equal(model.emb.weight, model.head.weight)  # the model is untouched


@pytest.mark.slow
def test_export_minilm_matches_simulated_model(minilm: tuple[torch.nn.Module, object]) -> None:
    from mpsearch.zoo import text_batches

    model, tok = minilm
    batch = text_batches(tok, n_batches=1, batch_size=2)[0]  # type: ignore[arg-type]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    bits = {n: (4 if "intermediate" in n else 8) for n in names}
    bm = BitMap.from_bits(model, bits)
    # 8-bit layers run W8A8: simulate their activation quantization too
    bm = BitMap({n: (e if e.w_bits != 8 else type(e)(**{**e.__dict__, "a_bits": 8}))
                 for n, e in bm.items()}, model_class=bm.model_class, fingerprint=bm.fingerprint)
    y = OrtModel(model, bm, batch).run(batch)
    ref = mpsearch.quantize(model, bm)(**batch).last_hidden_state.detach().numpy()
    assert y.shape == ref.shape
    real = batch["attention_mask"].bool().numpy()  # padding positions carry no meaning
    err = np.linalg.norm(y[real] - ref[real]) / np.linalg.norm(ref[real])
    yf = model(**batch).last_hidden_state.detach().numpy()
    sim_err = np.linalg.norm(ref[real] - yf[real]) / np.linalg.norm(yf[real])
    # MatMulNBits (accuracy_level 4) also rounds activations to int8 per block, which the
    # simulation does not: the kernels differ from it by less than it differs from float.
    assert err < 0.1 and err < sim_err


def test_validate_measures_latency(cnn_profile: HardwareProfile, mnist_cnn: torch.nn.Module,
                                   mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    bm = BitMap.from_bits(mnist_cnn, {"classifier.0": 4}, default=8)
    data = [(x[:8], y[:8]) for x, y in mnist_eval[:2]]
    rep = mpsearch.validate(mnist_cnn, bm, data=data, profile=cnn_profile, measure_latency=True,
                            progress=False)
    assert rep.latency_us_measured is not None and rep.latency_us_measured > 0
    assert rep.latency_us_predicted is not None and rep.latency_us_predicted > 0
    assert rep.latency_error == pytest.approx(rep.latency_us_predicted
                                              / rep.latency_us_measured - 1)
    assert rep.deployed_rel_error is not None and 0 < rep.deployed_rel_error < 0.2
    assert rep.deployed_vs_simulated_rel_error is not None
    assert "latency" in str(rep)


def test_validate_times_the_shape_the_profile_predicts(
        cnn_profile: HardwareProfile, mnist_cnn: torch.nn.Module,
        mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The profile predicts batches of 8; evaluation batches of 3 are timed as 8 of their
    rows (a batch of 3 costs less, and the gap is no prediction error)."""
    bm = BitMap.from_bits(mnist_cnn, {"classifier.0": 4}, default=8)
    data = [(x[:3], y[:3]) for x, y in mnist_eval[:2]]
    rep = mpsearch.validate(mnist_cnn, bm, data=data, profile=cnn_profile, measure_latency=True,
                            progress=False)
    assert rep.latency_input_shape == [[8, 1, 28, 28]]
    assert "(input 8×1×28×28)" in str(rep)
    same = mpsearch.validate(mnist_cnn, bm, data=[(x[:8], y[:8]) for x, y in mnist_eval[:1]],
                             profile=cnn_profile, measure_latency=True, progress=False)
    assert same.latency_input_shape == [[8, 1, 28, 28]]


@pytest.mark.slow
def test_a_sliced_maps_latency_needs_a_profile_of_its_deployed_model() -> None:
    """The profile of the model has none of the merged slices' shapes; the error said to
    profile the model again, which measures the same shapes."""
    from mpsearch.zoo.mnist import mnist_batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    data = mnist_batches("eval", batch_size=8, n_batches=1)
    prof = mpsearch.profile(model, data[0][0], **FAST)
    res = mpsearch.search(model, 4.0, data=data, sensitivity="fisher", slices=8,
                          bits=(2, 4, 8), refine=False, progress=False)
    # one slice of each layer at 4 bits, the rest at 8: a 4-bit layer of 98 (or 32) input
    # features, in a block size the model's own layers (784, 256) were not measured in
    bm = BitMap.from_bits(res.sliced_model, {n: 4 if n.endswith(".parts.0") else 8
                                             for n in res.bitmap})
    bm.slices = res.bitmap.slices
    with pytest.raises(ValueError, match=r"a sliced map deploys its slices .* "
                                         r"mpsearch.profile\(mpsearch.slice_model\(model, "
                                         r"mpsearch.coalesce\(bitmap, model\)\)"):
        mpsearch.validate(model, bm, data=data, profile=prof, progress=False)
    deployed = mpsearch.slice_model(model, mpsearch.coalesce(bm, model))
    both = mpsearch.profile(deployed, data[0][0], reuse=prof, **FAST)
    rep = mpsearch.validate(model, bm, data=data, profile=both, progress=False)
    assert rep.latency_us_predicted is not None and rep.latency_us_predicted > 0


def test_float_is_measured_whatever_bits_asks(mnist_cnn: torch.nn.Module,
                                              mnist_eval: list[tuple[torch.Tensor, torch.Tensor]],
                                              ) -> None:
    """bits=(4, 8) failed with KeyError('fp32'): the model's rest and the float layers of
    a map are priced from float."""
    prof = mpsearch.profile(mnist_cnn, mnist_eval[0][0][:8], bits=(4, 8), **FAST)
    assert prof.shapes and all("fp32" in rec["formats"] for rec in prof.shapes.values())
