"""compressed-tensors export: its own pydantic model and matching must give the map's bits."""

from __future__ import annotations

import copy

import pytest

from mpsearch.bitmap import BitMap, LayerEntry
from mpsearch.export import ExportWarning
from mpsearch.export import compressed_tensors as ex
from mpsearch.quant import QuantConfig

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
)


def _map(model) -> BitMap:
    base = BitMap.uniform(model, 8)
    schemes = [QuantConfig(granularity="group", group_size=64),
               QuantConfig(symmetric=True), QuantConfig(granularity="tensor")]
    entries = {}
    for i, (name, e) in enumerate(base.items()):
        bits = (2, 3, 4, 8, 32, 16)[i % 6]
        entries[name] = LayerEntry(w_bits=bits, a_bits=8 if i % 4 == 0 and bits < 16 else None,
                                   qconfig=schemes[i % 3], kind=e.kind, shape=e.shape)
    return BitMap(entries, model_class=base.model_class, fingerprint=base.fingerprint)


def test_library_validates_and_attaches_each_layers_scheme(minilm):
    model, _ = minilm
    bitmap = _map(model)
    with pytest.warns(ExportWarning, match="float16"):
        doc = bitmap.export("compressed-tensors", format="mixed-precision")
    config = QuantizationConfig.model_validate(doc)
    assert config.format == "mixed-precision"
    qmodel = copy.deepcopy(model)
    apply_quantization_config(qmodel, config, show_progress=False)
    modules = dict(qmodel.named_modules())
    for name, entry in bitmap.items():
        scheme = getattr(modules[name], "quantization_scheme", None)
        if entry.w_bits >= 16:
            assert scheme is None, name
            continue
        w, qc = scheme.weights, entry.qconfig
        assert (w.num_bits, w.strategy, w.group_size, w.symmetric) == (
            entry.w_bits, qc.granularity, qc.group_size, qc.symmetric), name
        acts = scheme.input_activations
        assert (acts.num_bits if acts else None) == entry.a_bits, name
        if acts:
            assert acts.dynamic and acts.strategy == "token"


def test_groups_share_identical_settings(minilm):
    model, _ = minilm
    doc = ex.export(BitMap.uniform(model, 4))
    assert list(doc["config_groups"]) == ["group_0"]
    assert len(doc["config_groups"]["group_0"]["targets"]) == 37
    assert doc["ignore"] == []


@pytest.mark.parametrize("with_model", [True, False])
def test_import_round_trip(minilm, with_model):
    model, _ = minilm
    bitmap = _map(model)
    with pytest.warns(ExportWarning):
        doc = ex.export(bitmap)
    back = BitMap.from_format("compressed-tensors", doc, model=model if with_model else None)
    want = {n: 32 if b == 16 else b for n, b in bitmap.bits().items()}
    assert back.bits() == want
    for name, entry in bitmap.items():
        if entry.w_bits < 16:
            assert back[name].a_bits == entry.a_bits
            assert back[name].qconfig.granularity == entry.qconfig.granularity


def test_import_resolves_class_targets_with_the_model_only(minilm):
    model, _ = minilm
    doc = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}},
           "ignore": ["pooler.dense"]}
    with pytest.raises(ValueError, match="pass model="):
        BitMap.from_format("compressed-tensors", doc)
    back = BitMap.from_format("compressed-tensors", doc, model=model)
    assert back["pooler.dense"].w_bits == 32
    assert {b for n, b in back.bits().items() if n != "pooler.dense"} == {4}


def test_a_recurrent_models_map_reads_back_with_the_model() -> None:
    """An LSTM's matrices are layers named by their parameters (``rnn.weight_ih_l0``), not
    modules: reading an export back with ``model=`` raised a bare KeyError on them."""
    import warnings

    import torch
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Tagger()
    config = ex.export(BitMap.uniform(model, 4))
    assert sorted(config["ignore"]) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]  # kept float
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # the matrices are no unmatched names
        back = ex.import_(config, model=model)
    assert back.bits() == {"rnn.weight_ih_l0": 32, "rnn.weight_hh_l0": 32, "head": 4}
