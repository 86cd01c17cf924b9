"""PyTorch's own nn.MultiheadAttention: its packed q/k/v projection is searched and
quantized, and deployments (which run PyTorch's attention kernel) keep it float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch import BitMap, Budget
from mpsearch.hw.cost import predict_latency
from mpsearch.hw.kernels_torch import TorchModel
from mpsearch.hw.runtime import deploy

FAST = {"rounds": 1, "warmup": 1, "round_s": 0.002, "progress": False}
ATTN = {"0.layers.0.self_attn", "0.layers.0.self_attn.out_proj",
        "0.layers.1.self_attn", "0.layers.1.self_attn.out_proj"}


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(32, 10)).eval()
    with torch.no_grad():  # distinct weights per layer (the encoder deep-copies one layer)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = torch.as_tensor(a)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_deployment_keeps_attention_float(backend: str) -> None:
    model = _encoder()
    x = torch.randn(4, 7, 32)
    bits = {n: 32 for n in ATTN}
    bm = BitMap.from_bits(model, bits, default=8 if backend == "torch" else 4)
    dep = deploy(model, bm, x, backend=backend)
    ref = mpsearch.quantize(model, bm)(x).detach()
    assert _rel(dep.run(x), ref) < 0.02
    if isinstance(dep, TorchModel):
        assert all(dep.formats[n] == "fp32" for n in ATTN)
        assert dep.formats["0.layers.0.linear1"] == "w8a8"
    with pytest.raises(ValueError, match="MultiheadAttention.*32 bits"):
        deploy(model, BitMap.uniform(model, 8), x, backend=backend)


def test_profile_search_keeps_attention_float() -> None:
    model = _encoder()
    x = torch.randn(4, 7, 32)
    prof = mpsearch.profile(model, x, **FAST)
    fp32 = predict_latency(prof, model, BitMap.uniform(model, 32))["latency_us"]
    res = mpsearch.search(model, Budget(avg_bits=20.0, latency_us=fp32 * 10), data=[x],
                          profile=prof, refine=False, progress=False)
    assert all(res.bitmap[n].w_bits == 32 for n in ATTN)
    assert res.bitmap["0.layers.0.linear1"].w_bits < 32
    rep = mpsearch.validate(model, res.bitmap, data=[x], profile=prof, measure_latency=True,
                            progress=False)
    assert rep.deployed_vs_simulated_rel_error is not None
    assert rep.deployed_vs_simulated_rel_error < 0.02
