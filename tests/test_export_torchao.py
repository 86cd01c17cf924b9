"""torchao export: torchao's own quantize_ must give each layer the bits of the map."""

from __future__ import annotations

import copy

import pytest
import torch

from mpsearch.bitmap import BitMap, LayerEntry
from mpsearch.export import ExportWarning, dumps, loads
from mpsearch.export import torchao as ex
from mpsearch.quant import QuantConfig

torchao = pytest.importorskip("torchao")


def _minilm_map(model: torch.nn.Module) -> BitMap:
    """Bits 2–8 and float; groups of 32, or symmetric per-channel with int8 activations."""
    base = BitMap.uniform(model, 8)
    grouped = QuantConfig(granularity="group", group_size=32)
    entries = {}
    for i, (name, e) in enumerate(base.items()):
        bits = (2, 3, 4, 5, 6, 7, 8, 32)[i % 8]
        act = i % 3 == 0 and bits < 16
        entries[name] = LayerEntry(w_bits=bits, a_bits=8 if act else None,
                                   qconfig=QuantConfig(symmetric=True) if act else grouped,
                                   kind=e.kind, shape=e.shape)
    return BitMap(entries, model_class=base.model_class, fingerprint=base.fingerprint)


def test_quantize_applies_each_layers_dtype_granularity_and_activations(minilm):
    from torchao.quantization import quantize_

    model, _ = minilm
    bitmap = _minilm_map(model)
    qmodel = copy.deepcopy(model)
    quantize_(qmodel, bitmap.export("torchao"), filter_fn=None)
    modules = dict(qmodel.named_modules())
    for name, entry in bitmap.items():
        weight = modules[name].weight
        if entry.w_bits >= 16:
            assert type(weight) is torch.nn.Parameter, name
            continue
        assert weight.target_dtype == getattr(torch, f"int{entry.w_bits}"), name
        cols = weight.shape[1]
        block = 32 if entry.qconfig.granularity == "group" else cols
        assert tuple(weight.block_size) == (1, block), name
        assert (weight.activation_quantization is not None) == (entry.a_bits == 8), name
    ids = torch.tensor([[101, 7592, 2088, 102]])
    out = qmodel(input_ids=ids).last_hidden_state
    ref = model(input_ids=ids).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_dict_form_is_torchaos_own_serialisation(minilm):
    from torchao.core.config import config_from_dict, config_to_dict

    model, _ = minilm
    bitmap = _minilm_map(model)
    objects = ex.export(bitmap)
    as_dict = ex.export(bitmap, as_dict=True)
    assert config_to_dict(objects) == loads("torchao", dumps("torchao", as_dict))
    assert config_to_dict(config_from_dict(as_dict)) == config_to_dict(objects)


def test_convolutions_are_left_float_with_a_warning(mnist_cnn):
    bitmap = BitMap.uniform(mnist_cnn, 4)
    with pytest.warns(ExportWarning, match="features.0 .Conv2d, 4 bits."):
        cfg = ex.export(bitmap, as_dict=True)
    table = cfg["_data"]["fqn_to_config"]
    assert table["features.0"] is None and table["features.3"] is None
    assert table["classifier.0"]["_data"]["weight_dtype"]["_data"] == "int4"


@pytest.mark.parametrize("as_dict", [True, False])
def test_import_round_trip(minilm, as_dict):
    model, _ = minilm
    bitmap = _minilm_map(model)
    back = BitMap.from_format("torchao", ex.export(bitmap, as_dict=as_dict), model=model)
    assert back.bits() == bitmap.bits()
    for name, entry in bitmap.items():
        if entry.w_bits < 16:
            got = back[name]
            assert got.a_bits == entry.a_bits
            assert (got.qconfig.granularity, got.qconfig.group_size, got.qconfig.symmetric) == (
                entry.qconfig.granularity, entry.qconfig.group_size, entry.qconfig.symmetric)
    assert back.fingerprint == bitmap.fingerprint


def test_import_rejects_patterns():
    with pytest.raises(ValueError, match="pattern"):
        BitMap.from_format("torchao", {"_type": "FqnToConfig", "_data": {
            "fqn_to_config": {"re:.*q_proj": None}}})
