"""Layer discovery: kinds, MACs, fusion groups, patterns, bad models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.layers import discover, fingerprint, quantizable_modules


class HFConv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D, re-declared: weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1)


HFConv1D.__name__ = "Conv1D"


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)
        self.c = HFConv1D(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.q(x) * self.k(x) + self.v(x)
        return self.c(self.o(a))


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 1, groups=4)
        self.c1 = nn.Conv1d(16, 4, 2)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.grouped(self.dw(self.stem(x))))
        return self.c1(y.flatten(2)[..., :10])


def test_kinds_and_macs_known_answers() -> None:
    model = Convs()
    infos = {i.name: i for i in discover(model, torch.randn(2, 3, 5, 5))}
    assert [i for i in infos] == ["stem", "dw", "grouped", "c1"]
    assert infos["stem"].kind == "Conv2d"
    assert infos["stem"].macs == 8 * 5 * 5 * 3 * 9  # per sample: out elems × in × k²
    assert infos["dw"].macs == 8 * 25 * 1 * 9 and infos["dw"].groups == 8
    assert infos["grouped"].macs == 16 * 25 * 2
    assert infos["c1"].kind == "Conv1d" and infos["c1"].macs == 4 * 9 * 16 * 2
    assert infos["stem"].params == 8 * 3 * 9 and infos["stem"].bias_params == 8
    assert infos["c1"].input_shape == (2, 16, 10)


def test_linear_hf_conv1d_and_fusion_groups() -> None:
    model = Attn()
    infos = {i.name: i for i in discover(model, torch.randn(3, 5, 8))}
    assert infos["c"].kind == "Conv1D" and infos["c"].transposed
    assert infos["c"].macs == 5 * 6 * 8
    assert infos["q"].macs == 5 * 8 * 8
    assert infos["q"].fused_group == infos["k"].fused_group == infos["v"].fused_group
    assert infos["q"].fused_group is not None
    assert infos["o"].fused_group is None and infos["c"].fused_group is None


def test_patterns_and_no_layers() -> None:
    model = Attn()
    assert list(quantizable_modules(model, include="q")) == ["q"]
    assert list(quantizable_modules(model, exclude=["q", "k", "v"])) == ["o", "c"]
    with pytest.raises(ValueError, match="left none"):
        quantizable_modules(model, include="nothing*")
    with pytest.raises(ValueError, match="no quantizable layer"):
        discover(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_nan_weights_are_named() -> None:
    model = Attn()
    with torch.no_grad():
        model.k.weight[0, 0] = float("nan")
        model.o.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"k, o"):
        discover(model)


def test_discover_leaves_model_untouched() -> None:
    model = Convs().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover(model, torch.randn(2, 3, 5, 5))
    assert model.training and model.bn.training
    assert not model.stem._forward_hooks and not model.stem._forward_pre_hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats too


def test_fingerprint_depends_on_names_and_shapes() -> None:
    a = fingerprint({"x": (2, 3), "y": (4,)})
    assert a == fingerprint({"y": (4,), "x": (2, 3)})
    assert a != fingerprint({"x": (3, 2), "y": (4,)})
    assert a.startswith("sha256:")


def test_weight_read_by_its_parent_gets_shapes_and_macs() -> None:
    """MultiheadAttention's out_proj never runs its own forward: discover infers its calls,
    shapes and MACs from the attention's query, and names the reader."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    infos = {i.name: i for i in discover(model, torch.randn(3, 5, 16))}
    out = infos["layers.1.self_attn.out_proj"]
    assert out.read_by == "layers.1.self_attn"
    assert (out.calls, out.input_shape, out.output_shape) == (1, (3, 5, 16), (3, 5, 16))
    assert out.macs == 5 * 16 * 16  # per sample: 5 tokens x 16 in x 16 out
    assert infos["layers.1.linear1"].read_by is None
    assert infos["layers.1.linear1"].macs == 5 * 16 * 32
    # the attention's packed q/k/v projection is a layer of its own
    qkv = infos["layers.1.self_attn"]
    assert (qkv.kind, qkv.weight_shape, qkv.bias_params) == ("MultiheadAttention", (48, 16), 48)
    assert qkv.macs == 3 * 5 * 16 * 16 and qkv.read_by is None and qkv.calls == 1
