"""HQQ export: transformers' HqqConfig + prepare_for_hqq_linear must give the map's nbits."""

from __future__ import annotations

import copy

import pytest
import torch
from export_maps import with_bits

from mpsearch.bitmap import BitMap
from mpsearch.export import ExportWarning
from mpsearch.export import hqq as ex
from mpsearch.quant import QuantConfig

pytest.importorskip("hqq")
transformers = pytest.importorskip("transformers")

# one setting per HQQ tag (shared by the six BERT blocks), so HQQ can say it exactly
TAG_BITS = {"attention.self.query": 3, "attention.self.key": 4, "attention.self.value": 8,
            "attention.output.dense": 2, "intermediate.dense": 5, "output.dense": 6}


def _per_tag_map(model: torch.nn.Module) -> BitMap:
    base = BitMap.uniform(model, 8, qconfig=QuantConfig(granularity="group", group_size=64))
    bits = {n: next((b for t, b in TAG_BITS.items() if n.endswith(t) and (
        t != "output.dense" or "attention" not in n)), 32) for n in base}
    return with_bits(base, bits)


def _nbits_applied(model: torch.nn.Module, cfg: dict) -> dict[str, int | None]:
    from transformers.integrations.hqq import prepare_for_hqq_linear

    qmodel = prepare_for_hqq_linear(copy.deepcopy(model),
                                    quantization_config=transformers.HqqConfig(**cfg))
    return {n: (m.quant_config["weight_quant_params"]["nbits"]
                if getattr(m, "quant_config", None) else None)
            for n, m in qmodel.named_modules() if isinstance(m, torch.nn.Linear)}


def test_transformers_hqq_applies_each_layers_nbits(minilm):
    model, _ = minilm
    bitmap = _per_tag_map(model)
    cfg = bitmap.export("hqq")
    assert cfg["skip_modules"] == ["pooler.dense"]
    applied = _nbits_applied(model, cfg)
    assert applied == {n: (b if b < 16 else None) for n, b in bitmap.bits().items()}


def test_blocks_that_differ_are_widened_with_a_warning(minilm):
    model, _ = minilm
    bitmap = with_bits(_per_tag_map(model), {"encoder.layer.3.attention.self.query": 6,
                                             "encoder.layer.1.intermediate.dense": 32})
    with pytest.warns(ExportWarning) as record:
        cfg = ex.export(bitmap)
    text = " ".join(str(r.message) for r in record)
    assert "encoder.layer.0.attention.self.query (3 → 6 bits" in text
    assert "encoder.layer.1.intermediate.dense (float" in text
    applied = _nbits_applied(model, cfg)
    assert applied["encoder.layer.0.attention.self.query"] == 6
    assert applied["encoder.layer.1.intermediate.dense"] == 5


def test_import_round_trip(minilm):
    model, _ = minilm
    bitmap = _per_tag_map(model)
    back = BitMap.from_format("hqq", ex.export(bitmap), model=model)
    assert back.bits() == bitmap.bits()
    assert back["encoder.layer.2.attention.self.key"].qconfig.group_size == 64
    with pytest.raises(ValueError, match="layer_names"):
        BitMap.from_format("hqq", ex.export(bitmap))
