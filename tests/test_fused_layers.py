"""Layers a module reads itself — nn.MultiheadAttention's packed q/k/v projection and
out_proj, the matrices of nn.LSTM/GRU — are searched and quantized; deployments, which run
fused float operators for them, keep them float."""

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
    with pytest.raises(ValueError, match="fused float operator.*32 bits"):
        deploy(model, BitMap.uniform(model, 8), x, backend=backend)


def test_profile_search_keeps_attention_float() -> None:
    model = _encoder()
    x = torch.randn(4, 7, 32)
    prof = mpsearch.profile(model, x, **FAST)
    fp32 = predict_latency(prof, model, BitMap.uniform(model, 32))["latency_us"]
    res = mpsearch.search(model, Budget(avg_bits=20.0, latency_us=fp32 * 10), data=[x],
                          profile=prof, refine=False, progress=False, slices=None)
    assert all(res.bitmap[n].w_bits == 32 for n in ATTN)
    assert res.bitmap["0.layers.0.linear1"].w_bits < 32
    rep = mpsearch.validate(model, res.bitmap, data=[x], profile=prof, measure_latency=True,
                            progress=False)
    assert rep.deployed_vs_simulated_rel_error is not None
    assert rep.deployed_vs_simulated_rel_error < 0.02


class _Tagger(nn.Module):
    """A two-layer bidirectional LSTM tagger."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.rnn = nn.LSTM(16, 24, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(48, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(ids))
        h, _ = self.gru(h)
        return self.head(h)


def test_recurrent_weights_are_layers() -> None:
    torch.manual_seed(0)
    model = _Tagger().eval()
    infos = {i.name: i for i in mpsearch.discover(model, torch.randint(0, 40, (3, 7)))}
    names = {f"rnn.weight_{a}_l{k}{d}" for a in ("ih", "hh") for k in (0, 1)
             for d in ("", "_reverse")} | {"gru.weight_ih_l0", "gru.weight_hh_l0", "head"}
    assert set(infos) == names
    hh = infos["rnn.weight_hh_l1_reverse"]
    assert (hh.kind, hh.weight_shape, hh.read_by, hh.calls) == ("LSTM", (96, 24), "rnn", 1)
    assert hh.macs == 7 * 96 * 24  # per sample: 7 steps x (4 gates x 24) x 24
    assert infos["rnn.weight_ih_l1"].macs == 7 * 96 * 48
    assert infos["gru.weight_ih_l0"].kind == "GRU" and infos["gru.weight_ih_l0"].macs == 7 * 24 * 48


def test_recurrent_weights_read_from_packed_sequences() -> None:
    """A recurrent module called on a PackedSequence runs its matrices once per time step
    of every sequence (not "did not run")."""

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3, 2], batch_first=True)
            return self.head(self.rnn(packed)[1][0][-1])

    infos = {i.name: i for i in mpsearch.discover(Packed().eval(), torch.randn(3, 5, 6))}
    hh = infos["rnn.weight_hh_l0"]
    assert (hh.read_by, hh.calls) == ("rnn", 1)
    assert hh.macs == round((5 + 3 + 2) * 32 * 8 / 3)  # per sample: 10 steps of 3 sequences


def test_parametrized_recurrent_matrices_are_quantized_and_searched() -> None:
    """A recurrent matrix under a parametrization (weight norm, orthogonal) is quantized
    as its computed value and searched on a copy with that value baked in."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 0.5 * w

    from tests.test_slices import LastStepGRU

    torch.manual_seed(0)
    model = LastStepGRU(6, 16, 3).eval()
    parametrize.register_parametrization(model.rnn, "weight_hh_l0", Scale())
    from mpsearch.quant.apply import quantize_weight

    q = mpsearch.quantize(model, BitMap.uniform(model, 2))
    assert torch.equal(q.rnn.weight_hh_l0, quantize_weight(
        model.rnn.weight_hh_l0.detach(), "GRU", 2, mpsearch.QuantConfig()))
    assert parametrize.is_parametrized(model.rnn, "weight_hh_l0")  # the original's stays
    data = [torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for slices in (None, 4):
        res = mpsearch.search(model, 4.0, data=data, sensitivity="fisher", slices=slices,
                              progress=False, refine=False)
        assert "rnn.weight_hh_l0" in (res.bitmap.slices.layers if slices else res.bitmap)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("estimator", ["qerror", "fisher"])
def test_recurrent_search_quantize_and_deploy(estimator: str) -> None:
    torch.manual_seed(0)
    model = _Tagger().eval()
    data = [torch.randint(0, 40, (4, 7)) for _ in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = mpsearch.search(model, 4.0, data=data, sensitivity=estimator, progress=False, slices=None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    row = res.table.loc["rnn.weight_hh_l0"]
    assert row["omega_2"] > row[f"omega_{res.problem.bits[-1]}"] >= 0
    q = mpsearch.quantize(model, BitMap.uniform(model, 2))
    from mpsearch.quant.apply import quantize_weight

    assert torch.equal(q.rnn.weight_hh_l0, quantize_weight(model.rnn.weight_hh_l0.detach(),
                                                           "LSTM", 2, mpsearch.QuantConfig()))
    rep = mpsearch.validate(model, res.bitmap, data=data, progress=False)
    assert rep.output_divergence > 0
    # deployments run the LSTM operator in float
    x = data[0]
    recurrent = {n for n in res.bitmap if ".weight_" in n}
    bm = BitMap.from_bits(model, {n: 32 for n in recurrent}, default=8)
    for backend in ("torch", "onnxruntime"):
        dep = deploy(model, bm, x, backend=backend)
        assert _rel(dep.run(x), mpsearch.quantize(model, bm)(x).detach()) < 0.02
        with pytest.raises(ValueError, match="fused float operator"):
            deploy(model, BitMap.uniform(model, 8), x, backend=backend)
