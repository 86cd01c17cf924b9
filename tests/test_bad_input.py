"""Bad input to the verbs gets a clear error up front (not a raw TypeError from deep
inside), and unusual but legitimate input (a 0-dim output, a parametrized weight read in
train mode) works without changing the model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import mpsearch
from mpsearch import BitMap, BitMapError, QuantConfig, SensitivityTable

FAST = {"progress": False, "refine": False}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4)).eval()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("qconfig", {"symmetric": True}, r"qconfig must be a QuantConfig, got dict: build one"),
    ("seed", "x", r"seed must be a whole number, got 'x'"),
    ("seed", True, r"seed must be a whole number"),
    ("include", 5, r"include must be a glob pattern \(str\) or a list of them, got 5"),
    ("exclude", [0], r"exclude must be a glob pattern"),
    ("pin", ["0"], r"pin must map layer names \(or globs\) to bits"),
    ("pin", {"0": "8"}, r"pin\['0'\] must be a whole number of bits, got '8'"),
    ("pin", {"0": 4.5}, r"pin\['0'\] must be a whole number of bits, got 4.5"),
    ("a_bits", 8.5, r"a_bits must be a whole number of bits or None"),
])
def test_an_argument_of_the_wrong_type_is_named(option: str, value: object,
                                                message: str) -> None:
    with pytest.raises(TypeError, match=message):
        mpsearch.search(_mlp(), 4.0, data=_data(), **{option: value}, **FAST)  # type: ignore[arg-type]


def test_whole_floats_numpy_ints_and_any_iterable_of_globs_are_taken() -> None:
    """What worked before the checks still works, as plain Python values (a NumPy seed
    crashed torch.Generator; NumPy a_bits made a bit map json could not write)."""
    import collections

    import numpy as np

    res = mpsearch.search(_mlp(), 4.0, data=_data(), slices=None, seed=np.int64(3),
                          pin={"0": 8.0}, a_bits=np.int64(8),
                          include=(n for n in ["0", "2", "4"]),
                          exclude=collections.deque(["4"]), **FAST)
    assert res.bitmap["0"].w_bits == 8 and res.bitmap["4"].w_bits == 32
    assert json.loads(res.bitmap.to_json())["layers"]["2"]["a_bits"] == 8


def test_a_model_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        mpsearch.search({"w": torch.ones(2)}, 4.0, data=_data(), **FAST)  # type: ignore[arg-type]


def test_one_unwrapped_inputs_targets_pair_is_told_to_be_wrapped() -> None:
    """``data=(x, y)`` iterated as two batches fed the labels to the model: torch said
    'mat1 and mat2 must have the same dtype'."""
    x, y = _data()[0]
    with pytest.raises(ValueError, match=r"tuple of two unlike tensors \(float32 \[16, 8\] "
                                         r"and int64 \[16\]\).*\[\(inputs, targets\)\]"):
        mpsearch.search(_mlp(), 4.0, data=(x, y), **FAST)
    # float targets of another width (a regressor's) are not a second batch either
    with pytest.raises(ValueError, match=r"tuple of two unlike tensors \(float32 \[16, 8\] "
                                         r"and float32 \[16, 1\]\)"):
        mpsearch.search(_mlp(), 4.0, data=(x, x[:, :1]), **FAST)
    # two alike batches in a tuple are two batches
    res = mpsearch.search(_mlp(), 4.0, data=(x, x[:8]), slices=None, **FAST)
    assert res.bitmap.avg_bits() <= 4.0


def test_an_empty_batch_is_refused() -> None:
    x, y = _data()[0]
    with pytest.raises(ValueError, match=r"data\[1\] holds no sample"):
        mpsearch.search(_mlp(), 4.0, data=[(x, y), (x[:0], y[:0])], **FAST)


def test_task_loss_with_too_few_targets_says_so() -> None:
    x, y = _data()[0]
    with pytest.raises(ValueError, match=r"predicts \(16, 4\) .* targets are \(10,\)"):
        mpsearch.search(_mlp(), 4.0, data=[(x, y[:10])], loss_fn="task", **FAST)
    with pytest.raises(ValueError, match=r"batch 1 has 16 samples but targets of shape "
                                         r"\(15,\)"):
        mpsearch.search(_mlp(), 4.0, data=[(x, y), (x, y[:15])], loss_fn="task", **FAST)


def test_a_result_summary_passed_as_sensitivity_points_at_the_table() -> None:
    model, data = _mlp(), _data()
    res = mpsearch.search(model, 4.0, data=data, slices=None, **FAST)
    with pytest.raises(TypeError, match=r"got DataFrame \(a search result's .table is its "
                                        r"summary; pass its .sensitivity\)"):
        mpsearch.search(model, 4.0, data=data, sensitivity=res.table, **FAST)  # type: ignore[arg-type]


def test_a_per_layer_table_with_explicit_slices_is_told_apart() -> None:
    """It used to say the table 'was measured on other weights' (the sliced copy's)."""
    model, data = _mlp(), _data()
    res = mpsearch.search(model, 4.0, data=data, slices=None, **FAST)
    with pytest.raises(ValueError, match=r"table is of a per-layer search .* pass "
                                         r"slices=None"):
        mpsearch.search(model, 4.0, data=data, sensitivity=res.sensitivity, slices=4, **FAST)


def test_a_table_with_repeated_bits_or_layers_or_a_bad_qconfig_is_refused() -> None:
    good = {"layers": ("a", "b"), "bits": (2, 4), "omega": [[1.0, 0.1], [2.0, 0.2]],
            "omega_stderr": [[0.0, 0.0], [0.0, 0.0]]}
    SensitivityTable(**good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bits must be distinct; repeated: \['4'\]"):
        SensitivityTable(**{**good, "bits": (4, 4)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layers must be distinct; repeated: \['a'\]"):
        SensitivityTable(**{**good, "layers": ("a", "a")})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"settings\['qconfig'\] must be an object"):
        SensitivityTable(**good, settings={"qconfig": "per-channel"})  # type: ignore[arg-type]


class _Summed(nn.Module):
    """Returns one number for the whole batch (a 0-dim output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).sum()


@pytest.mark.parametrize("sensitivity", ["fisher", "fisher_block"])
def test_a_zero_dim_output_gets_one_fisher_gradient_per_batch(sensitivity: str) -> None:
    """Per-sample pieces sliced the 0-dim reference output (IndexError); now each batch
    is one gradient, as the warning says, and the Fisher is that of the batches."""
    model, data = _Summed().eval(), [x for x, _ in _data()]
    est = mpsearch.Fisher(block=sensitivity == "fisher_block")
    res = mpsearch.search(model, 4.0, data=data, sensitivity=est, slices=None, **FAST)
    table = res.sensitivity
    assert table.diagnostics["gradients"] == 2  # one per batch
    assert (table.omega[:, 0] > table.omega[:, -1]).all()  # 2 bits cost more than 8
    # the default search (ranks channels with block Fisher to slice them) also runs
    assert mpsearch.search(model, 4.0, data=data, **FAST).bitmap.avg_bits() <= 4.0


def test_reading_a_train_mode_spectral_norm_weight_does_not_step_it() -> None:
    """A train-mode spectral_norm takes a power-iteration step on every access of its
    weight: BitMap.uniform, check_model, quantize and validate each advanced it."""
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
    model.train()
    plist = model[0].parametrizations.weight  # type: ignore[union-attr]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bitmap = BitMap.uniform(model, 4)
    bitmap.check_model(model)
    mpsearch.quantize(model, bitmap)
    mpsearch.validate(model, bitmap, data=_data(), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and plist.training  # modes as they were


def test_validate_takes_shapes_from_the_model_for_a_map_without_them() -> None:
    """A map imported without model= has no shapes; validate raised 'avg_bits needs
    shapes' after all its measuring."""
    model = _mlp()
    doc = json.loads(BitMap.from_bits(model, {"0": 8, "2": 2, "4": 4}).to_json())
    for entry in doc["layers"].values():
        entry.pop("shape")
    report = mpsearch.validate(model, BitMap.from_dict(doc), data=_data(), progress=False)
    assert report.avg_bits == pytest.approx((8 * 512 + 2 * 4096 + 4 * 256) / (512 + 4096 + 256))


@pytest.mark.parametrize("key", ["predicted", "budget"])
def test_a_non_numeric_prediction_or_budget_is_a_bitmap_error(key: str) -> None:
    doc = json.loads(BitMap.uniform(_mlp(), 4).to_json())
    doc[key] = {"loss_increase": "abc"}
    with pytest.raises(BitMapError, match=f"'{key}' must map names to (finite )?numbers"):
        BitMap.from_json(json.dumps(doc))


def test_qconfig_check_accepts_a_quantconfig() -> None:
    res = mpsearch.search(_mlp(), 4.0, data=_data(), qconfig=QuantConfig(), slices=None,
                          seed=3, include=["0", "2"], exclude="4", pin={"0": 8}, **FAST)
    assert res.bitmap["0"].w_bits == 8 and res.bitmap["4"].w_bits == 32


@pytest.mark.parametrize("sensitivity", ["fisher", "hutchinson"])
def test_the_users_backward_hooks_neither_skew_gradients_nor_get_lost(
        sensitivity: str) -> None:
    """A backward hook that zeroed a layer's input gradients rated the layers before it
    Ω = 0 (free to quantize to 2 bits). They are suspended during the search and put
    back, in order, after it."""
    data = [x for x, _ in _data()]
    plain = mpsearch.search(_mlp(), 4.0, data=data, sensitivity=sensitivity, slices=None,
                            **FAST).sensitivity.omega
    model = _mlp()
    calls: list[str] = []

    def zero_inputs(_m: nn.Module, grad_in: tuple, _out: tuple) -> tuple:  # type: ignore[type-arg]
        calls.append("zero")
        return tuple(None if g is None else g * 0 for g in grad_in)

    def scale_outputs(_m: nn.Module, grad_out: tuple) -> tuple:  # type: ignore[type-arg]
        calls.append("scale")
        return tuple(g * 10 for g in grad_out)

    model[2].register_full_backward_hook(zero_inputs)
    model[0].register_full_backward_pre_hook(scale_outputs)
    hooked = mpsearch.search(model, 4.0, data=data, sensitivity=sensitivity, slices=None,
                             **FAST).sensitivity.omega
    assert hooked == pytest.approx(plain, rel=1e-5)
    assert not calls
    model(data[0].requires_grad_()).sum().backward()
    assert calls == ["zero", "scale"]  # both back, and they run


def test_a_table_from_a_search_that_could_slice_nothing_is_reused_with_slices() -> None:
    """slices=4 on layers too small to cut gives a per-layer table; handing it back with
    the same slices=4 searches again (no slice plan to disagree with)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    first = mpsearch.search(model, 4.0, data=_data(), slices=4, **FAST)
    again = mpsearch.search(model, 4.0, data=_data(), slices=4,
                            sensitivity=first.sensitivity, **FAST)
    assert again.bitmap.bits() == first.bitmap.bits()


@pytest.mark.parametrize(("targets", "message"), [
    (torch.full((16,), 9), r"batch 1 has targets \[9\] outside the model's 4 classes"),
    (torch.full((16,), -1), r"batch 1 has targets \[-1\] outside"),
    (torch.rand(16), r"batch 1's targets are torch.float32; cross-entropy takes class"),
])
def test_task_targets_that_are_no_class_index_name_their_batch(targets: torch.Tensor,
                                                               message: str) -> None:
    (x, y), _ = _data()
    with pytest.raises(ValueError, match=message):
        mpsearch.search(_mlp(), 4.0, data=[(x, y), (x, targets)], loss_fn="task", **FAST)


@pytest.mark.parametrize("verb", ["quantize", "quantize_", "validate", "export_onnx"])
def test_the_verbs_name_what_a_bitmap_argument_should_be(verb: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, data = _mlp(), _data()
    res = mpsearch.search(model, 4.0, data=data, slices=None, **FAST)
    call = {"quantize": lambda b: mpsearch.quantize(model, b),
            "quantize_": lambda b: mpsearch.quantize_(model, b),
            "validate": lambda b: mpsearch.validate(model, b, data=data, progress=False),
            "export_onnx": lambda b: mpsearch.export_onnx(model, b, tmp_path / "m.onnx",
                                                          sample_batch=data[0])}[verb]
    with pytest.raises(TypeError, match="got SearchResult: pass the search result's .bitmap"):
        call(res)
    with pytest.raises(TypeError, match="got str: read it with BitMap.load"):
        call("map.json")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        {"quantize": mpsearch.quantize, "quantize_": mpsearch.quantize_}.get(
            verb, lambda m, b: mpsearch.validate(m, b, data=data))(None, res.bitmap)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("solver", 3, r"solver must be a name \(\['greedy', 'ilp', 'nsga2'\]\) or an object"),
    ("bits", 4, r"bits must be a list of bit-widths, e.g. \(2, 4, 8\), got 4"),
    ("tie", 3, r"tie must be 'fused', None or a list of lists"),
    ("profile", "cpu", r"profile must be a HardwareProfile .* got str"),
])
def test_more_search_arguments_of_the_wrong_type(option: str, value: object,
                                                 message: str) -> None:
    with pytest.raises(TypeError, match=message):
        mpsearch.search(_mlp(), 4.0, data=_data(), slices=None, **{option: value}, **FAST)  # type: ignore[arg-type]


def test_bitmap_constructors_refuse_fractional_bits_and_a_dict_qconfig() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="w_bits must be one of .* got 4.5"):
        BitMap.uniform(model, 4.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="qconfig must be a QuantConfig, got dict"):
        BitMap.uniform(model, 4, qconfig={"granularity": "tensor"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bits must map layer names to bits, got NoneType"):
        BitMap.from_bits(model, None, default=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include must be a glob pattern"):
        BitMap.uniform(model, 4, include=3)  # type: ignore[arg-type]
    import numpy as np

    assert json.loads(BitMap.uniform(model, np.int64(4)).to_json())["layers"]["0"]["w_bits"] == 4  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "message"), [
    ({"columns": [1, 2]}, r"'columns' must be an object, got list"),
    ({"layers": "024"}, r"'layers' must be a list, got str"),
    ({"bits": [2, 4.5]}, r"'layers' must be names and 'bits' integers"),
])
def test_a_malformed_table_file_is_named(change: dict, message: str, tmp_path) -> None:  # type: ignore[no-untyped-def, type-arg]
    table = mpsearch.search(_mlp(), 4.0, data=_data(), slices=None, **FAST).sensitivity
    path = table.save(tmp_path / "t.json")
    doc = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        SensitivityTable.load(path)


def test_numpy_budgets_and_a_text_time_limit() -> None:
    import numpy as np

    assert mpsearch.Budget(size_bytes=np.int64(1000)).size_bytes == 1000.0
    assert mpsearch.Budget.coerce(np.float32(4)).avg_bits == 4.0
    assert type(mpsearch.Budget(avg_bits=np.float64(3)).avg_bits) is float
    with pytest.raises(ValueError, match=r"max_time_s must be a number > 0 or None, got '10'"):
        mpsearch.Hutchinson(max_time_s="10")  # type: ignore[arg-type]


def test_export_onnx_says_which_activation_bits_its_kernels_do_not_apply(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mpsearch.export import ExportWarning

    model, batch = _mlp(), _data()[0][0]
    with pytest.warns(ExportWarning, match=r"activation bits the kernels do not apply .* "
                                           r"for 3 layer\(s\): 0 \(a_bits=2; its w4b32 kernel "
                                           r"takes float input\)"):
        mpsearch.export_onnx(model, BitMap.uniform(model, 4, a_bits=2), tmp_path / "a.onnx",
                             sample_batch=batch)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # W8A8 does quantize inputs to 8 bits
        mpsearch.export_onnx(model, BitMap.uniform(model, 8, a_bits=8), tmp_path / "b.onnx",
                             sample_batch=batch)


def test_a_dict_batchs_labels_go_only_to_a_model_that_takes_them() -> None:
    """A dict batch's ``labels`` went to the model too (Hugging Face models take them); a
    plain model of keyword inputs failed on them (a trap for anyone not using Hugging
    Face). They are now its targets only; a forward of ``**kwargs`` still gets them, with
    the hint where it fails on them."""

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.fc(tokens * mask)

    class Passes(Keywords):
        def forward(self, **inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(**inputs)

    model = Keywords()
    (x, y), _ = _data()
    with_labels = [{"tokens": x, "mask": torch.ones_like(x), "labels": y}]
    apart = [({"tokens": x, "mask": torch.ones_like(x)}, y)]
    for loss in (None, "task"):
        got = mpsearch.validate(model, BitMap.uniform(model, 3), data=with_labels,
                                loss_fn=loss, progress=False)
        want = mpsearch.validate(model, BitMap.uniform(model, 3), data=apart, loss_fn=loss,
                                 progress=False)
        assert got.loss_increase == pytest.approx(want.loss_increase, rel=1e-6)
    assert set(mpsearch.search(model, 4.0, data=with_labels, slices=None, **FAST).bitmap) \
        == {"fc"}
    passes = Passes()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'labels' \(.*"
                                        r"give \(dict_of_inputs, labels\) batches"):
        mpsearch.validate(passes, BitMap.uniform(passes, 4), data=with_labels, progress=False)


def test_labels_check_holds_no_model_with_a_forward_of_its_own() -> None:
    """The check of a forward's signature was cached by the function: a forward set on the
    instance (accelerate's hooks: a partial of the module) kept the model alive."""
    import functools
    import gc
    import weakref

    from mpsearch.batches import split_batch

    def forward(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return module.fc(tokens)

    model = nn.Module()
    model.fc = nn.Linear(8, 4)
    model.forward = functools.partial(forward, model)
    x = torch.randn(3, 8)
    split = split_batch({"tokens": x, "labels": torch.zeros(3, dtype=torch.long)})
    assert "labels" not in split.for_model(model).kwargs
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


class _Reordered:
    """A user's estimator: the diagonal Fisher's table, its rows and columns reversed
    (labels and all), or something that is no table."""

    name = "reordered"

    def __init__(self, returns: str = "table") -> None:
        self.returns = returns

    def estimate(self, model, modules, layers, objective, bits, qconfig, **kw):  # type: ignore[no-untyped-def]
        table = mpsearch.Fisher().estimate(model, modules, layers, objective, bits, qconfig,
                                           **kw)
        if self.returns == "dict":
            return {"omega": table.omega}
        if self.returns == "fewer":
            return table.select(table.layers[1:], table.bits)
        return table.select(table.layers[::-1], table.bits[::-1])


def test_a_custom_estimators_table_is_read_by_its_labels() -> None:
    """Rows and columns were read by position: the same table with its bits reversed put
    every layer at 2 bits, silently."""
    model, data = _mlp(), _data()
    fisher = mpsearch.search(model, 3.0, data=data, sensitivity="fisher", **FAST)
    mine = mpsearch.search(model, 3.0, data=data, sensitivity=_Reordered(), **FAST)
    assert mine.bitmap.bits() == fisher.bitmap.bits()
    assert len(set(fisher.bitmap.bits().values())) > 1  # a mixed map: the order matters
    np.testing.assert_array_equal(mine.sensitivity.omega, fisher.sensitivity.omega)
    with pytest.raises(TypeError, match="'reordered' returned a dict; estimate.* must "
                                        "return a mpsearch.SensitivityTable"):
        mpsearch.search(model, 3.0, data=data, sensitivity=_Reordered("dict"), **FAST)
    with pytest.raises(ValueError, match=r"'reordered' returned a table that does not cover "
                                         r"the search: .*no row for layer\(s\) \['0"):
        mpsearch.search(model, 3.0, data=data, sensitivity=_Reordered("fewer"), **FAST)
    with pytest.raises(TypeError, match=r"sensitivity=QError is a class: pass an instance, "
                                        r"e.g. sensitivity=QError\(\)"):
        mpsearch.search(model, 3.0, data=data, sensitivity=mpsearch.QError, **FAST)  # type: ignore[arg-type]


def test_a_channels_last_model_is_searched_as_the_contiguous_one(mnist_dwsep,  # type: ignore[no-untyped-def]
                                                                 mnist_calib) -> None:
    """Its 1x1 convolutions' weights are "contiguous" with stride(-1) != 1, and the
    weights' fingerprint failed to view them as bytes."""
    import copy

    from mpsearch._io import tensor_digest

    last = copy.deepcopy(mnist_dwsep).to(memory_format=torch.channels_last)
    weights = [p for p in last.parameters() if p.dim() == 4 and p.shape[-1] == 1]
    assert weights and weights[0].stride(-1) != 1
    assert (tensor_digest(last.state_dict().values())
            == tensor_digest(mnist_dwsep.state_dict().values()))
    opts = {"data": mnist_calib[:1], "sensitivity": "fisher", "slices": None, **FAST}
    assert (mpsearch.search(last, 3.0, **opts).bitmap.bits()
            == mpsearch.search(mnist_dwsep, 3.0, **opts).bitmap.bits())


def test_activation_bits_are_said_to_be_outside_the_prediction(caplog, monkeypatch,  # type: ignore[no-untyped-def]
                                                               tmp_path) -> None:
    """With a_bits the table, the prediction and the refinement measure weights only: a
    reviewer's map predicted 0.056 and measured 18.7, with an INFO line the only word."""
    from mpsearch import _report

    monkeypatch.setattr(_report, "_SAID", set())
    model, data = _mlp(), _data()
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(model, 4.0, data=data, a_bits=4, progress=False, slices=None)
    assert ("a_bits=4: the sensitivities and the predicted loss increase measure weight "
            "quantization only (activations float), and the measured refinement is "
            "skipped") in caplog.text
    assert res.refinement is None
    res.bitmap.save(tmp_path / "map.json")
    assert BitMap.load(tmp_path / "map.json").provenance["prediction_activations"] == "float"
    assert "prediction_activations" not in mpsearch.search(
        model, 4.0, data=data, slices=None, **FAST).bitmap.provenance


def test_labels_outside_the_classes_give_no_accuracy_and_say_so(mnist_cnn, mnist_eval,  # type: ignore[no-untyped-def]
                                                               caplog) -> None:
    """1-based (or otherwise shifted) labels read as 0.0 accuracy, silently."""
    bm = BitMap.uniform(mnist_cnn, 4)
    data = mnist_eval[:1]
    right = mpsearch.validate(mnist_cnn, bm, data=data, progress=False)
    with caplog.at_level("WARNING", logger="mpsearch"):
        shifted = mpsearch.validate(mnist_cnn, bm, data=[(x, y + 5) for x, y in data],
                                    progress=False)
    assert right.accuracy_float is not None and right.accuracy_float > 0.9
    assert shifted.accuracy_float is None and shifted.accuracy_quantized is None
    assert shifted.output_divergence == right.output_divergence
    assert ("no accuracy: batch 0 has labels [10, 11, 12, 13, 14] outside the model's 10 "
            "classes (0–9, or -100 to ignore)") in caplog.text


def test_wrapped_and_scripted_models_are_told_what_to_pass() -> None:
    """DataParallel failed in torch's stateless API; a scripted model 'had no quantizable
    layer'."""
    model, data = _mlp(), _data()
    bm = BitMap.uniform(model, 4)
    for wrapped, message in ((nn.DataParallel(model), ("DataParallel wrapper: pass the "
                                                       r"module it wraps \(model.module\)")),
                             (torch.jit.script(model), ("TorchScript module.*pass the Python "
                                                        "nn.Module it was made from"))):
        for call in (lambda w=wrapped: mpsearch.search(w, 4.0, data=data, **FAST),
                     lambda w=wrapped: mpsearch.quantize(w, bm),
                     lambda w=wrapped: mpsearch.validate(w, bm, data=data, progress=False)):
            with pytest.raises(ValueError, match=message):
                call()


def test_budget_and_slice_count_messages_say_what_they_mean(caplog) -> None:
    """1.9999999 bits read "avg_bits=2 is below the smallest achievable 2", and slices=1000
    was cut to what the layers allow without a word."""
    model, data = _mlp(), _data()
    with pytest.raises(mpsearch.InfeasibleBudget,
                       match=r"avg_bits=1.9999999 is below the smallest achievable 2.0"):
        mpsearch.search(model, 1.9999999, data=data, **FAST)
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(model, 4.0, data=data, slices=1000, sensitivity="fisher", **FAST)
    assert ("slices=1000: the layers here take at most 16 slices each (a slice holds at "
            "least 4 channels or input features)") in caplog.text
    assert max(len(p) for p in res.bitmap.slices.layers.values()) == 16


@pytest.mark.parametrize("sensitivity", ["fisher", "fisher_block", "hutchinson", "qerror"])
def test_a_loss_that_ignores_the_output_is_named(sensitivity: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """A constant loss_fn: Fisher raised torch's "element 0 of tensors does not require
    grad"; every estimator now rates zero and the search says why."""
    model, data = _mlp(), _data()
    with caplog.at_level("WARNING", logger="mpsearch"):
        res = mpsearch.search(model, 4.0, data=data, sensitivity=sensitivity, slices=None,
                              loss_fn=lambda out, batch: torch.tensor(1.0), **FAST)
    assert not res.sensitivity.omega.any()
    assert "rates every layer 0 at every width: the loss does not change with the weights" \
        in caplog.text


def test_a_loss_fn_that_returns_nan_is_named_once(caplog) -> None:  # type: ignore[no-untyped-def]
    """qerror first warned that the replay "does not reproduce a full pass (loss nan,
    recorded nan)", then blamed the first layer it changed."""
    model, data = _mlp(), _data()
    with caplog.at_level("WARNING", logger="mpsearch"), pytest.raises(
            ValueError, match=r"the float model's loss is not finite on calibration "
                              r"batch\(es\) \[0, 1\] \(nan\): check loss_fn and the data"):
        mpsearch.search(model, 4.0, data=data, sensitivity="qerror", slices=None,
                        loss_fn=lambda out, batch: out.sum() * float("nan"), **FAST)
    assert "does not reproduce" not in caplog.text


def test_a_model_with_a_sparse_buffer_is_searched() -> None:
    """The model-state fingerprint viewed every buffer as bytes; a sparse one (a graph's
    adjacency) has no strided storage."""
    from mpsearch._io import tensor_digest

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("adjacency", torch.eye(16).to_sparse())
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))
            return self.fc2(torch.sparse.mm(self.adjacency, h.T).T)

    sparse = torch.eye(3).to_sparse()
    assert tensor_digest([sparse]) == tensor_digest([torch.eye(3).to_sparse_csr()])
    assert tensor_digest([sparse]) != tensor_digest([(2 * torch.eye(3)).to_sparse()])
    assert tensor_digest([sparse]) != tensor_digest([torch.eye(3)])  # hashed sparse, not dense
    torch.manual_seed(0)
    res = mpsearch.search(Graph(), 4.0, data=_data(), sensitivity="fisher", slices=None,
                          **FAST)
    assert set(res.bitmap) == {"fc1", "fc2"}


def test_a_model_that_is_one_bare_layer_is_searched_and_deployed() -> None:
    """The default slices cut the model itself (name ""), which has no parent to hold its
    slices: "Cannot set the submodule without a target name"."""
    from mpsearch.hw.kernels_torch import TorchModel

    torch.manual_seed(0)
    model = nn.Linear(64, 10).eval()
    x = torch.randn(32, 64)
    res = mpsearch.search(model, 4.0, data=[x], sensitivity="fisher", **FAST)
    assert res.bitmap.slices is None and set(res.bitmap) == {""}
    dep = TorchModel(model, res.bitmap, "cpu")
    assert dep.formats[""].startswith("w4")
    ref = mpsearch.quantize(model, res.bitmap)(x).detach()
    assert float((dep.run(x) - ref).norm() / ref.norm()) < 0.01


def test_bad_solver_and_activation_bits_are_refused_before_any_work() -> None:
    """solver='ILP', a solver class and a_bits=1 were refused after the sensitivity stage
    (seconds of probes on a real model)."""
    from mpsearch import NSGA2Solver

    model = _mlp()
    data = _data()
    for kwargs, error, text in (({"solver": "ILP"}, ValueError, "unknown solver 'ILP'"),
                                ({"solver": NSGA2Solver}, TypeError,
                                 "solver=NSGA2Solver is a class: pass an instance"),
                                ({"a_bits": 1}, ValueError, "a_bits must be None or one of")):
        with pytest.raises(error, match=re.escape(text)):
            mpsearch.search(model, 4.0, data=data, sensitivity=_Refuses(), **kwargs)


class _Refuses:
    """An estimator that must never run."""

    name = "refuses"

    def estimate(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the search reached the sensitivity stage")


def test_a_shared_weight_left_out_with_its_first_name_stays_float_and_the_map_fits() -> None:
    """exclude= of a shared weight's first name made its second the layer: the map named
    'b', which the model unfiltered does not (quantize and validate refused it)."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.mid, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.mid.weight
            self.out = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.b(torch.relu(self.mid(torch.relu(self.a(x))))))

    torch.manual_seed(0)
    model = Shared().eval()
    data = [torch.randn(32, 8)]
    res = mpsearch.search(model, 4.0, data=data, exclude=["mid"], slices=None, **FAST)
    assert set(res.bitmap) == {"a", "mid", "out"} and res.bitmap["mid"].w_bits == 32
    q = mpsearch.quantize(model, res.bitmap)
    torch.testing.assert_close(q.mid.weight, model.mid.weight)
    assert q.b.weight is q.mid.weight


def test_outputs_whose_tensor_is_not_first_at_the_top_level() -> None:
    """(None, logits) — a loss that is None at inference — and a dataclass output without
    logits were refused ("cannot find a tensor"), by validate always and by the Fisher
    estimators even with loss_fn= given; a nested output with a loss_fn searches."""
    import dataclasses

    import torch.nn.functional as F

    from mpsearch.batches import first_output

    @dataclasses.dataclass
    class Out:
        note: str
        pred: torch.Tensor

    class Model(nn.Module):
        def __init__(self, shape: str) -> None:
            super().__init__()
            self.a, self.c, self.shape = nn.Linear(8, 32), nn.Linear(32, 5), shape

        def forward(self, x: torch.Tensor) -> object:
            y = self.c(F.relu(self.a(x)))
            return {"tuple": (None, y), "dataclass": Out("ok", y),
                    "nested": {"heads": {"cls": y}}}[self.shape]

    t = torch.randn(2, 3)
    assert first_output((None, t)) is t and first_output(Out("x", t)) is t
    torch.manual_seed(0)
    data = [(torch.randn(16, 8), torch.randint(0, 5, (16,))) for _ in range(2)]
    for shape in ("tuple", "dataclass"):
        model = Model(shape).eval()
        res = mpsearch.search(model, 4.0, data=data, sensitivity="fisher", **FAST)
        report = mpsearch.validate(model, res.bitmap, data=data, progress=False)
        assert report.output_divergence > 0
    nested = Model("nested").eval()
    res = mpsearch.search(nested, 4.0, data=data, sensitivity="fisher", slices=None,
                          loss_fn=lambda out, batch: F.cross_entropy(out["heads"]["cls"],
                                                                     batch[1]), **FAST)
    assert set(res.bitmap) == {"a", "c"}
    with pytest.raises(TypeError, match="validate's output divergence needs such a tensor"):
        mpsearch.validate(nested, res.bitmap, data=data, progress=False)


def test_a_forward_caching_a_buffer_and_a_scripted_submodule_search() -> None:
    """A forward that registers a buffer once and remembers it did (a lazy cache) must
    keep working through and after search (removing the new buffer, tried once, broke
    it); a scripted submodule's parameters (not leaves) made search read their .grad,
    which torch warns of (an error under -W error)."""
    import warnings

    import torch.nn.functional as F

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(8, 32), nn.Linear(32, 5)
            self.cached = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.cached:
                self.register_buffer("shift", torch.full((8,), 0.1))
                self.cached = True
            return self.c(F.relu(self.a(x - self.shift)))

    torch.manual_seed(0)
    data = [torch.randn(16, 8) for _ in range(2)]
    model = Cached()
    mpsearch.search(model, 4.0, data=data, sensitivity="fisher", slices=None, **FAST)
    model(data[0])

    class Scripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.jit.script(nn.Sequential(nn.Linear(8, 16), nn.ReLU()))
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.stem(x))

    scripted = Scripted().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not a leaf Tensor.*")
        mpsearch.search(scripted, 4.0, data=data, sensitivity="fisher", slices=None, **FAST)
