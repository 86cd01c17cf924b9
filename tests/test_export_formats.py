"""Every registered exporter: one contract; HAWQ and GPTQModel/vLLM known answers."""

from __future__ import annotations

import json
import re
import warnings

import pytest
from export_maps import cycled

from mpsearch.bitmap import BitMap
from mpsearch.export import (
    EXPORTERS,
    FORMATS,
    IMPORTERS,
    ExportWarning,
    dumps,
    export,
    import_bitmap,
    loads,
    write,
)
from mpsearch.export import gptqmodel as gq
from mpsearch.quant import QuantConfig


def _options(fmt: str, model, tmp_path) -> dict:
    if fmt == "onnxruntime":
        pytest.importorskip("onnxruntime")
        from mpsearch.export.onnxruntime import to_onnx
        from mpsearch.zoo.mnist import mnist_batches

        return {"onnx_model": to_onnx(model, mnist_batches("calib", n_batches=1)[0],
                                      tmp_path / "m.onnx"), "as_names": True}
    if fmt == "torchao":
        return {"as_dict": True}
    if fmt == "llamacpp":
        return {"names": {n: f"blk.{i}.ffn_up" for i, n in enumerate(BitMap.uniform(model, 8))}}
    return {}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_contract(fmt, mnist_cnn, tmp_path):
    """Each export is deterministic, serialises, and (where importable) reads back."""
    bitmap = cycled(mnist_cnn, [4, 8, 2, 32])
    options = _options(fmt, mnist_cnn, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        first = export(bitmap, fmt, **options)
        second = bitmap.export(fmt, **options)
    text = dumps(fmt, first)
    assert text == dumps(fmt, second)
    path = write(fmt, first, tmp_path / f"out.{fmt}")
    assert path.read_text() == text
    if not FORMATS[fmt].text:
        assert json.loads(text) == loads(fmt, text)
    if fmt in ("mpsearch", "hawq", "gptqmodel"):  # these can say this map exactly
        back = import_bitmap(fmt, loads(fmt, text), model=mnist_cnn)
        assert back.bits() == bitmap.bits()


def test_registry_tables_agree():
    assert set(EXPORTERS) == set(FORMATS)
    assert set(IMPORTERS) == {n for n, f in FORMATS.items() if f.import_ is not None}
    assert "onnxruntime" not in IMPORTERS
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(BitMap.uniform.__self__, "tflite")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="needs onnx_model="):
        export(None, "onnxruntime")  # type: ignore[arg-type]


def test_mpsearch_json_is_lossless(mnist_dwsep):
    bitmap = cycled(mnist_dwsep, [2, 3, 4, 16, 32], qconfig=QuantConfig(symmetric=True))
    back = BitMap.from_format("mpsearch", loads("mpsearch", dumps("mpsearch",
                                                                    bitmap.export("mpsearch"))))
    assert back.to_dict() == bitmap.to_dict()


def test_hawq_known_answer_and_round_trip(mnist_cnn):
    bitmap = BitMap.from_bits(mnist_cnn, {"features.0": 8, "features.3": 4, "classifier.0": 2,
                                          "classifier.2": 32}, a_bits=8)
    with pytest.warns(ExportWarning, match="activation bits not exported"):
        plain = bitmap.export("hawq")
    assert plain == {"classifier.0": 2, "classifier.2": 32, "features.0": 8, "features.3": 4}
    cfg = bitmap.export("hawq", names={"features.0": "quant_init_block_convbn"},
                        act_names={n: f"{n}.quant_act" for n in bitmap})
    assert cfg["quant_init_block_convbn"] == 8 and cfg["features.3.quant_act"] == 8
    # HAWQ's own value forms: ints and (bits, act_range_momentum) tuples; QuantAct keys skipped
    hawq_style = {**cfg, "features.3": (4, 0.99)}
    back = BitMap.from_format("hawq", hawq_style, model=mnist_cnn,
                              names={"quant_init_block_convbn": "features.0"})
    assert back.bits() == bitmap.bits()
    with pytest.raises(TypeError, match="expected bits"):
        BitMap.from_format("hawq", {"features.0": "4"})


def test_gptq_rules_resolve_as_gptqmodel_and_vllm_read_them(minilm):
    model, _ = minilm
    bitmap = cycled(model, [2, 3, 4, 8, 32, 5],
                    qconfig=QuantConfig(granularity="group", group_size=128, symmetric=True))
    with pytest.warns(ExportWarning, match=r"\(5 → 8 bits\)"):
        cfg = bitmap.export("gptqmodel")
    # base: the most common setting (8 bits: the 8-bit layers and the widened 5-bit ones)
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (8, 128, True, False)
    for name, entry in bitmap.items():
        # the lookup both tools run: first key whose regex re.match-es the module name
        got = gq.resolve(cfg, name)
        if entry.w_bits >= 16:
            assert got is None
        else:
            assert got == {"bits": {5: 8}.get(entry.w_bits, entry.w_bits), "group_size": 128,
                           "sym": True}
    negative = [k for k in cfg["dynamic"] if k.startswith("-:")]
    assert all(re.match(k[2:], "encoder.layer.0.attention.self.query") is None
               for k in negative)
    back = BitMap.from_format("gptqmodel", cfg)
    assert back.bits() == {n: {5: 8}.get(b, b) for n, b in bitmap.bits().items()}
    general = {"bits": 4, "group_size": 128, "sym": True,
               "dynamic": {r"-:.*pooler.*": {}, r"+:.*\.0\..*": {"bits": 8}}}
    with pytest.raises(ValueError, match="pass model="):
        BitMap.from_format("gptqmodel", general)
    resolved = BitMap.from_format("gptqmodel", general, model=model)
    assert resolved["pooler.dense"].w_bits == 32
    assert resolved["encoder.layer.0.output.dense"].w_bits == 8
    assert resolved["encoder.layer.1.output.dense"].w_bits == 4
