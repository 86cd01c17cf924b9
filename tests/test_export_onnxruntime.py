"""ONNX Runtime export: ORT's own quantize_static must write the bit-widths of the map."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from export_maps import cycled

from mpsearch.bitmap import BitMap
from mpsearch.export import ExportWarning, dumps, loads
from mpsearch.export import onnxruntime as eo
from mpsearch.quant import QuantConfig

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnxruntime.quantization import QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

# bits asked → bits of the QDQ type ORT must store them in (32: node left float)
HELD = {2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8, 16: 32, 32: 32}


@pytest.fixture(scope="module")
def digits() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mpsearch.zoo.mnist import mnist_batches

    return mnist_batches("calib", batch_size=50, n_batches=2)


def _quantize(model: torch.nn.Module, bitmap: BitMap, batches: list, tmp: Path,
              dynamo: bool = False) -> tuple[Path, Path]:
    src, dst = tmp / "float.onnx", tmp / "quantized.onnx"
    if dynamo:
        torch.onnx.export(model.eval(), (batches[0][0],), str(src), dynamo=True,
                          input_names=["x"])
    else:
        eo.to_onnx(model, batches[0], src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        eo.quantize_static(src, dst, bitmap, eo.BatchReader(batches, src))
    return src, dst


@pytest.mark.parametrize("arch,dynamo", [("cnn", False), ("dwsep", False), ("dwsep", True)])
def test_quantize_static_stores_each_layer_at_its_bits(arch, dynamo, digits, tmp_path,
                                                        model_cache):
    """Every bit-width, through both exporters (BN-folded weights renamed or not)."""
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    from mpsearch.zoo.mnist import pretrained_mnist

    model = pretrained_mnist(arch, cache_dir=model_cache)
    bitmap = cycled(model, [4, 8, 2, 32, 3, 8, 5, 16, 6, 4])
    src, dst = _quantize(model, bitmap, digits, tmp_path, dynamo)
    got = eo.weight_bits(src, dst, bitmap)
    assert set(got) == set(bitmap)
    assert {n: b for n, (_, b) in got.items()} == {n: HELD[e.w_bits] for n, e in bitmap.items()}
    # asymmetric (our default) layers are stored unsigned
    assert {t for t, b in got.values() if b < 32} <= {"UINT4", "UINT8"}


def test_export_fed_to_ort_quantize_static_directly(mnist_cnn, digits, tmp_path):
    """The issue's check: the plain export as ORT's extra_options, no mpsearch helper."""
    bitmap = BitMap.from_bits(mnist_cnn, {"features.0": 8, "features.3": 4,
                                          "classifier.0": 4, "classifier.2": 8},
                              qconfig=QuantConfig(symmetric=True))
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    eo.to_onnx(mnist_cnn, digits[0], src)
    overrides = bitmap.export("onnxruntime", onnx_model=src)
    assert all(isinstance(o[0]["quant_type"], QuantType) for o in overrides.values())
    ort_quantize_static(str(src), str(dst), eo.BatchReader(digits, src),
                        quant_format=QuantFormat.QDQ,
                        extra_options={"TensorQuantOverrides": overrides})
    graph = onnx.load(str(dst)).graph
    inits = {i.name: i for i in graph.initializer}
    stored = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and node.input[0].endswith(".weight_quantized"):
            t = inits[node.input[0]]
            axis = [a.i for a in node.attribute if a.name == "axis"]
            stored[node.input[0].removesuffix(".weight_quantized")] = (
                onnx.TensorProto.DataType.Name(t.data_type), axis)
    assert stored == {"features.0": ("INT8", [0]), "features.3": ("INT4", [0]),
                      "classifier.0": ("INT4", [0]), "classifier.2": ("INT8", [0])}


def test_int8_and_int4_graphs_run_and_err_in_order(mnist_cnn, digits, tmp_path):
    """The quantized graphs run in ORT; int4 weights move the logits more than int8."""
    from mpsearch.zoo.mnist import mnist_batches

    evals = mnist_batches("eval", batch_size=250, n_batches=2)
    x = torch.cat([b[0] for b in evals])
    with torch.no_grad():
        ref = mnist_cnn.eval()(x).numpy()
    agree, err = {}, {}
    for bits in (8, 4):
        out = tmp_path / str(bits)
        out.mkdir()
        _src, dst = _quantize(mnist_cnn, BitMap.uniform(mnist_cnn, bits), digits, out)
        sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input_0": x.numpy()})[0]
        agree[bits] = float(np.mean(logits.argmax(1) == ref.argmax(1)))
        err[bits] = float(np.mean(np.abs(logits - ref)))
    assert agree[8] >= 0.97 and agree[4] >= 0.9
    assert err[8] < err[4]


def test_granularity_and_activation_overrides(mnist_cnn, digits, tmp_path):
    src = eo.to_onnx(mnist_cnn, digits[0], tmp_path / "m.onnx")
    bitmap = BitMap.from_bits(mnist_cnn, {"features.0": 4, "features.3": 8, "classifier.0": 8,
                                          "classifier.2": 4},
                              qconfig=QuantConfig(symmetric=True, granularity="tensor"),
                              a_bits=4)
    p = eo.plan(bitmap, src)
    weight = p.overrides["classifier.0.weight"][0]
    assert weight == {"quant_type": "QInt8", "symmetric": True}  # per tensor: no axis
    inputs = {s.activation for sites in p.sites.values() for s in sites}
    outputs = {s.output for sites in p.sites.values() for s in sites}
    assert all(p.overrides[t] == [{"quant_type": "QUInt4"}] for t in inputs)  # the map's a_bits
    assert all(p.overrides[t] == [{"quant_type": "QUInt16"}] for t in outputs)  # nearest float
    assert sorted(p.nodes_to_quantize) == sorted(s.node for sites in p.sites.values()
                                                 for s in sites)
    dst = tmp_path / "q.onnx"
    eo.quantize_static(src, dst, bitmap, eo.BatchReader(digits, src))
    graph = onnx.load(str(dst)).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    dq = producers[conv.input[0]]
    assert dq.op_type == "DequantizeLinear"
    zero_point = inits[dq.input[2]]
    assert onnx.TensorProto.DataType.Name(zero_point.data_type) == "UINT4"


def test_group_and_odd_bits_warn(mnist_cnn, digits, tmp_path):
    src = eo.to_onnx(mnist_cnn, digits[0], tmp_path / "m.onnx")
    bitmap = BitMap.from_bits(mnist_cnn, {"features.0": 3, "features.3": 8,
                                          "classifier.0": 6, "classifier.2": 32},
                              qconfig=QuantConfig(granularity="group", group_size=16))
    with pytest.warns(ExportWarning) as record:
        overrides = eo.export(bitmap, onnx_model=src, as_names=True)
    text = " ".join(str(r.message) for r in record)
    assert "features.0 (3 bits in a 4-bit type)" in text
    assert "classifier.0 (6 bits in a 8-bit type)" in text
    assert "per-group" in text and "nodes_to_exclude" in text
    assert overrides["features.0.weight"] == [{"quant_type": "QUInt4", "symmetric": False,
                                               "axis": 0}]
    assert "classifier.2.weight" not in overrides


def test_json_form_round_trips_into_quantize_static_kwargs(mnist_cnn, digits, tmp_path):
    src = eo.to_onnx(mnist_cnn, digits[0], tmp_path / "m.onnx")
    bitmap = cycled(mnist_cnn, [4, 32])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        kwargs = eo.export(bitmap, onnx_model=src, with_excludes=True, as_names=True)
    text = dumps("onnxruntime", kwargs)
    back = loads("onnxruntime", text)
    assert back == json.loads(text) == kwargs
    assert back["nodes_to_exclude"] == ["/model/classifier/classifier.2/Gemm",
                                        "/model/features/features.3/Conv"]
    assert back["nodes_to_quantize"] == ["/model/classifier/classifier.0/Gemm",
                                         "/model/features/features.0/Conv"]


def test_the_json_file_goes_to_ort_quantize_static_through_load_kwargs(
        mnist_cnn, digits, tmp_path):
    """The file the CLI writes holds QuantType names; ORT's quantize_static takes
    members: load_kwargs gives what it accepts, and it stores the map's widths."""
    src = eo.to_onnx(mnist_cnn, digits[0], tmp_path / "m.onnx")
    bitmap = BitMap.from_bits(mnist_cnn, {"features.0": 8, "features.3": 4,
                                          "classifier.0": 4, "classifier.2": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        kwargs = eo.export(bitmap, onnx_model=src, with_excludes=True, as_names=True)
    path = tmp_path / "ort.json"
    path.write_text(dumps("onnxruntime", kwargs))
    loaded = eo.load_kwargs(path)
    assert all(isinstance(d["quant_type"], QuantType) for lst in
               loaded["extra_options"]["TensorQuantOverrides"].values() for d in lst)
    dst = tmp_path / "q.onnx"
    ort_quantize_static(str(src), str(dst), eo.BatchReader(digits, src),
                        quant_format=QuantFormat.QDQ, **loaded)
    weights = {i.name: onnx.TensorProto.DataType.Name(i.data_type)
               for i in onnx.load(str(dst)).graph.initializer
               if i.name.endswith(".weight_quantized")}
    assert weights == {"features.0.weight_quantized": "UINT8",
                       "features.3.weight_quantized": "UINT4",
                       "classifier.0.weight_quantized": "UINT4"}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an onnxruntime export"):
        eo.load_kwargs(tmp_path / "bad.json")


def test_unmatched_layers_are_an_error_naming_them(mnist_cnn, mnist_dwsep, digits, tmp_path):
    src = eo.to_onnx(mnist_cnn, digits[0], tmp_path / "m.onnx")
    other = BitMap.uniform(mnist_dwsep, 4)
    with pytest.raises(ValueError, match="not matched to the ONNX graph.*tensor_names"):
        eo.plan(other, src)
    with pytest.raises(ValueError, match="no Conv, Gemm or MatMul"):
        eo.plan(BitMap.uniform(mnist_cnn, 4), src, tensor_names={"features.0": "nope"})
    wrong = {"features.0": "features.3.weight"}
    with pytest.raises(ValueError, match="channels"):
        eo.plan(BitMap.uniform(mnist_cnn, 4), src, tensor_names=wrong)
    # an already quantized graph (export_onnx's): no float weight to find, which gave an
    # empty override dict and a warning
    import mpsearch

    done = mpsearch.export_onnx(mnist_cnn, BitMap.uniform(mnist_cnn, 8), tmp_path / "q.onnx",
                                sample_batch=digits[0][0])
    with pytest.raises(ValueError, match="none of the bit map's 4 layer.*not a quantized one"):
        eo.plan(BitMap.uniform(mnist_cnn, 8), done)


@pytest.mark.slow
def test_minilm_matmul_weights_through_torchscript_scopes(minilm, tmp_path):
    """BERT: weights transposed into anonymous MatMul constants, found by module scope."""
    from mpsearch.zoo.minilm import text_batches

    model, tok = minilm
    calib = text_batches(tok, "calib", n_batches=2, batch_size=4)
    bitmap = cycled(model, [4, 8, 2, 8, 32, 5])
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    eo.to_onnx(model, calib[0], src)
    with pytest.warns(ExportWarning, match="pooler.dense"):  # unused by last_hidden_state
        eo.quantize_static(src, dst, bitmap, eo.BatchReader(calib, src))
    got = eo.weight_bits(src, dst, bitmap)
    assert len(got) == 36 and "pooler.dense" not in got
    assert {n: b for n, (_, b) in got.items()} == {n: HELD[bitmap[n].w_bits] for n in got}


@pytest.mark.slow
def test_minilm_int8_qdq_tracks_float(minilm, tmp_path):
    """Activations the map keeps float get 16 bits: all-int8 weights stay close to float."""
    from mpsearch.zoo.minilm import text_batches

    model, tok = minilm
    calib = text_batches(tok, "calib", n_batches=2, batch_size=8)
    evals = text_batches(tok, "eval", n_batches=1, batch_size=16)
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    eo.to_onnx(model, calib[0], src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        eo.quantize_static(src, dst, BitMap.uniform(model, 8), eo.BatchReader(calib, src))
    with torch.no_grad():
        ref = model(**evals[0]).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    out = sess.run(None, eo.BatchReader(evals, src).feed(evals[0]))[0]
    cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert float(cos.mean()) > 0.99


def test_a_sliced_sequential_matches_every_slice(digits, tmp_path):
    """An nn.Sequential's layers are numbered; inside the export wrapper their scopes read
    ``model.1/parts.0``, which matched no slice ``1.parts.0``: ``mpsearch apply --format
    onnx-qdq`` refused every sliced map of such a model."""
    import mpsearch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10)).eval()
    res = mpsearch.search(model, 4.0, data=digits[:1], sensitivity="fisher", slices=4,
                          bits=(2, 4, 8), refine=False, progress=False)
    assert res.bitmap.slices is not None
    src, dst = _quantize(res.sliced_model, res.bitmap, digits, tmp_path)
    got = eo.weight_bits(src, dst, res.bitmap)
    assert set(got) == set(res.bitmap)
    assert {n: b for n, (_, b) in got.items()} == {n: HELD[e.w_bits]
                                                   for n, e in res.bitmap.items()}


@pytest.mark.parametrize("names", [None, {"": "weight"}])
def test_a_model_that_is_one_linear_layer(digits, tmp_path, names):
    """A bare ``nn.Linear`` is the bit map's layer ``''``, exported as ``weight``: matched
    by name, or by ``tensor_names`` ('' counted as no name before, so both failed)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10).eval()
    batches = [(x.flatten(1), y) for x, y in digits]
    bitmap = BitMap.uniform(model, 4)
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    eo.to_onnx(model, batches[0], src)
    overrides = bitmap.export("onnxruntime", onnx_model=src, tensor_names=names)
    assert overrides["weight"][0]["quant_type"] == QuantType.QUInt4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        eo.quantize_static(src, dst, bitmap, eo.BatchReader(batches, src), tensor_names=names)
    assert {n: b for n, (_, b) in eo.weight_bits(src, dst, bitmap).items()} == {"": 4}
