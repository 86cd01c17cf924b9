"""Slices of ``nn.MultiheadAttention``: its packed q/k/v projection sliced by rows (the
attention reads the matrix rebuilt from its slices) and its ``out_proj`` by output
features (the attention reads the slices' weight and bias)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch import BitMap, SlicePlan
from mpsearch.hw.specs import fused_layers
from mpsearch.layers import quantizable_modules
from mpsearch.slices import (
    ChannelSlices,
    SlicedMultiheadAttention,
    is_sliced,
    merge_slices,
    slice_model,
)
from tests.test_search import _assert_same, _state
from tests.test_slices import quantized_in_place


class _Attention(nn.Module):
    """Sequence-first attention with a learned-free pooling, a fused transformer layer
    (batch first: PyTorch's fast path reads the weights itself under no_grad), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (time, batch, 16)
        h = x + self.attn(x, x, x, need_weights=False)[0]
        h = self.enc(h.transpose(0, 1))
        return self.head(h.mean(1))


def _cut(n: int, parts: int, gen: torch.Generator) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(sorted(c.tolist())) for c in torch.randperm(n, generator=gen).chunk(parts))


def _plan(seed: int = 0) -> SlicePlan:
    gen = torch.Generator().manual_seed(seed)
    return SlicePlan({"attn": _cut(48, 3, gen), "attn.out_proj": _cut(16, 2, gen),
                      "enc.self_attn": _cut(48, 4, gen), "enc.self_attn.out_proj": _cut(16, 2, gen),
                      "enc.linear1": _cut(32, 2, gen)})


def test_sliced_attention_computes_what_the_original_does() -> None:
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(5, 4, 16)
    plan = _plan()
    sliced = slice_model(model, plan)
    assert not is_sliced(model) and is_sliced(sliced)
    assert type(model.attn) is nn.MultiheadAttention
    assert isinstance(sliced.attn, SlicedMultiheadAttention)
    assert isinstance(sliced.enc.self_attn.out_proj, ChannelSlices)
    names = set(quantizable_modules(sliced))
    assert {"attn.parts.2", "attn.out_proj.parts.1", "enc.self_attn.parts.3"} <= names
    assert "attn" not in names and "attn.out_proj" not in names
    assert "attn.in_proj_weight" not in sliced.state_dict()
    torch.testing.assert_close(sliced(x), model(x))
    with torch.no_grad():  # the fused fast paths read the rebuilt weights
        torch.testing.assert_close(sliced(x), model(x))
    with torch.inference_mode():
        torch.testing.assert_close(sliced(x), model(x))
    # the slices are layers the attention reads; their MACs are their share of its own
    infos = {i.name: i for i in mpsearch.discover(sliced, x)}
    whole = {i.name: i for i in mpsearch.discover(model, x)}
    part = infos["attn.parts.1"]
    assert (part.kind, part.read_by, part.weight_shape) == ("MultiheadAttention", "attn", (16, 16))
    assert part.macs * 3 == whole["attn"].macs
    proj = infos["enc.self_attn.out_proj.parts.0"]
    assert (proj.kind, proj.read_by) == ("Linear", "enc.self_attn")
    assert proj.macs * 2 == whole["enc.self_attn.out_proj"].macs
    # gradients reach each slice: its rows of the whole matrix's gradient
    sliced(x).sum().backward()
    model(x).sum().backward()
    rows = list(plan.layers["attn"][1])
    assert model.attn.in_proj_weight.grad is not None
    torch.testing.assert_close(sliced.attn.parts[1].weight.grad,
                               model.attn.in_proj_weight.grad[rows])
    # a substituted slice acts like the same rows substituted in the whole matrix
    new = torch.randn(len(rows), 16)
    matrix = model.attn.in_proj_weight.detach().clone()
    matrix[rows] = new
    torch.testing.assert_close(
        torch.func.functional_call(sliced, {"attn.parts.1.weight": new}, (x,)),
        torch.func.functional_call(model, {"attn.in_proj_weight": matrix}, (x,)))
    torch.testing.assert_close(sliced(x), model(x))  # and leaves no trace
    # a deep copy runs its own slices
    copied = copy.deepcopy(sliced)
    with torch.no_grad():
        copied.attn.parts[0].weight.zero_()
    torch.testing.assert_close(sliced(x), model(x))
    assert not torch.allclose(copied(x), model(x))
    # merging gives the original classes and parameters back, in their order
    merged = merge_slices(copy.deepcopy(sliced))
    assert [type(m) for m in merged.modules()] == [type(m) for m in model.modules()]
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(merged.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(merged(x), model(x))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x))


def test_quantized_attention_slices_hold_the_rows_of_the_whole_matrix() -> None:
    torch.manual_seed(1)
    model = _Attention().eval()
    x = torch.randn(5, 3, 16)
    plan = _plan(1)
    in_place, widths = quantized_in_place(model, plan, x)
    assert type(in_place.attn) is nn.MultiheadAttention
    for layer, weight in (("attn", "in_proj_weight"), ("attn.out_proj", "weight")):
        for k, rows in enumerate(plan.layers[layer]):
            bits = widths[f"{layer}.parts.{k}"]
            uniform = mpsearch.quantize(model, BitMap.uniform(model, bits))
            got = getattr(in_place.get_submodule(layer), weight)[list(rows)]
            torch.testing.assert_close(got, getattr(uniform.get_submodule(layer), weight)[list(rows)])
    # a deployment keeps attention float: its slices are among the fused layers
    fused = fused_layers(slice_model(model, plan))
    assert {"attn.parts.0", "attn.out_proj.parts.1", "enc.self_attn.parts.3"} <= fused


class _Attend(nn.Module):
    """Attention's packed input projection holds 72 % of the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_auto_slices_an_attention_model() -> None:
    """Its weights sit in 1.72 layers' worth, most of them in the attention: "auto" cuts
    the attention's projections (it could not before, and searched per layer)."""
    torch.manual_seed(0)
    model = _Attend().eval()
    data = [torch.randn(8, 6, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = _state(model)
    result = mpsearch.search(model, 4.0, data=data, sensitivity="fisher", progress=False,
                             refine=False)
    _assert_same(before, model)
    assert result.bitmap.slices is not None
    assert set(result.bitmap.slices.layers) == {"attn", "attn.out_proj", "head"}
    assert result.sliced_model is not None
    torch.testing.assert_close(result.sliced_model(data[0]), model(data[0]))
    assert result.bitmap.avg_bits() <= 4.0
    report = mpsearch.validate(model, result.bitmap, data=data, progress=False)
    uniform = mpsearch.validate(model, BitMap.uniform(model, 4), data=data, progress=False)
    assert report.output_divergence < uniform.output_divergence
    # the bit map round-trips and rebuilds the same sliced model from the original
    again = BitMap.from_json(result.bitmap.to_json())
    torch.testing.assert_close(slice_model(model, again)(data[0]), model(data[0]))


def test_attention_that_slicing_would_break_stays_whole() -> None:
    """A subclass of nn.MultiheadAttention may compute something else with its matrix;
    separate q/k/v matrices (kdim != embed_dim) are not a layer at all."""

    class Scaled(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out, w = super().forward(*args, **kwargs)
            return out * self.in_proj_weight.norm(), w

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Scaled(32, 4, batch_first=True)
            self.cross = nn.MultiheadAttention(32, 4, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.attn(x, x, x, need_weights=False)[0]
            h = h + self.cross(h, x[..., :8], x[..., :8], need_weights=False)[0]
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model = Model().eval()
    data = [torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = mpsearch.search(model, 4.0, data=data, sensitivity="fisher", slices=2,
                             progress=False, refine=False)
    assert result.bitmap.slices is not None
    assert "attn" in result.bitmap and "attn" not in result.bitmap.slices.layers
    assert "attn.out_proj" in result.bitmap  # the subclass reads it: whole too
    assert "cross" not in result.bitmap and "cross.out_proj" in result.bitmap.slices.layers
    with pytest.raises(ValueError, match="cannot be sliced"):
        slice_model(model, SlicePlan({"attn": (tuple(range(48)), tuple(range(48, 96)))}))
    with pytest.raises(ValueError, match="by rows only"):
        slice_model(_Attend(), SlicePlan({"attn": ((0,), tuple(range(1, 192)))},
                                         frozenset({"attn"})))


def test_ort_qdq_of_sliced_attention(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The exported graph folds attention's slices into one weight tensor (the attention
    reads the rebuilt matrix), which a QDQ model types once: slices of one width merge and
    are quantized; slices of several widths are refused by name, not matched to nothing."""
    pytest.importorskip("onnxruntime")
    import warnings

    from mpsearch.export import ExportWarning
    from mpsearch.export import onnxruntime as eo
    from mpsearch.slices import coalesce, for_deployment

    torch.manual_seed(0)
    model = _Attend().eval()
    data = [torch.randn(8, 6, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan = SlicePlan({"attn": (tuple(range(0, 192, 2)), tuple(range(1, 192, 2))),
                      "head": (tuple(range(5)), tuple(range(5, 10)))})
    sliced = slice_model(model, plan)
    mixed = BitMap.from_bits(sliced, {"attn.parts.0": 4, "attn.parts.1": 8,
                                      "attn.out_proj": 8, "head.parts.0": 4,
                                      "head.parts.1": 8})
    mixed.slices = plan
    src = tmp_path / "float.onnx"
    eo.to_onnx(sliced, data[0], src)
    with pytest.raises(ValueError, match=r"slices of attn as one weight tensor.*differ in width"):
        eo.quantize_static(src, tmp_path / "q.onnx", mixed, eo.BatchReader(data, src))
    # float slices (as deployments keep attention) have nothing to quantize: no refusal
    floats = BitMap.from_bits(sliced, {**mixed.bits(), "attn.parts.0": 32, "attn.parts.1": 32})
    floats.slices = plan
    assert set(eo.plan(floats, src).sites) == {"attn.out_proj", "head.parts.0", "head.parts.1"}
    # one width for the attention's slices: deployed as one tensor again
    agreed = BitMap.from_bits(sliced, {**mixed.bits(), "attn.parts.1": 4})
    agreed.slices = plan
    deployed, merged = for_deployment(model, agreed)
    assert merged.bits() == coalesce(agreed, model).bits()
    assert "attn" in merged and merged.slices is not None
    assert set(merged.slices.layers) == {"head"}
    src = tmp_path / "merged.onnx"
    eo.to_onnx(deployed, data[0], src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        eo.quantize_static(src, tmp_path / "q.onnx", merged, eo.BatchReader(data, src))
    stored = eo.weight_bits(src, tmp_path / "q.onnx", merged)
    assert {n: b for n, (_, b) in stored.items()} == {
        "attn": 4, "attn.out_proj": 8, "head.parts.0": 4, "head.parts.1": 8}


def test_attention_activations_and_costs_match_the_unsliced_attention() -> None:
    """``a_bits`` quantizes a sliced attention's input as the unsliced attention's (so
    ``quantize`` of the sliced model and ``quantize_`` into the original agree), and a
    cross-attention's slices are charged the MACs of the key and value their rows
    multiply."""
    from mpsearch.costs import cost_tables
    from mpsearch.quant import QuantConfig

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cross = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 8)

        def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            # called with keywords: the attention still runs as a layer of the search
            out = self.cross(tgt, key=memory, value=memory, need_weights=False)[0]
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = Decoder().eval()
    batch = ((torch.randn(2, 4, 32), torch.randn(2, 64, 32)),)  # 4 queries, 64 memory tokens
    plan = SlicePlan({"cross": (tuple(range(0, 96, 2)), tuple(range(1, 96, 2))),
                      "cross.out_proj": (tuple(range(16)), tuple(range(16, 32)))})
    sliced = slice_model(model, plan)
    whole = {i.name: i for i in mpsearch.discover(model, batch)}
    parts = {i.name: i for i in mpsearch.discover(sliced, batch)}
    assert whole["cross"].calls == 1 and whole["cross"].macs == (4 + 64 + 64) * 32 * 32
    assert parts["cross.parts.0"].macs + parts["cross.parts.1"].macs == whole["cross"].macs
    assert parts["cross.parts.0"].input_quantizable
    assert not parts["cross.out_proj.parts.0"].input_quantizable
    bops = {name: cost_tables(list(infos.values()), [4], QuantConfig(), 8)["bops"].sum()
            for name, infos in (("whole", whole), ("sliced", parts))}
    assert bops["sliced"] == pytest.approx(bops["whole"])
    widths = {n: 4 for n in quantizable_modules(sliced)}
    bitmap = BitMap.from_bits(sliced, widths, a_bits=8)
    bitmap.slices = plan
    x = batch[0]
    with torch.no_grad():
        torch.testing.assert_close(mpsearch.quantize_(copy.deepcopy(model), bitmap)(*x),
                                   mpsearch.quantize(model, bitmap)(*x))
        float_input = BitMap.from_bits(sliced, widths)
        float_input.slices = plan
        assert not torch.allclose(mpsearch.quantize(model, float_input)(*x),
                                  mpsearch.quantize(model, bitmap)(*x))
    # a search with a_bits gives the slices the attention's input width
    result = mpsearch.search(model, 4.0, data=[batch] * 2, sensitivity="fisher", a_bits=8,
                             slices=2, progress=False, refine=False)
    assert result.bitmap["cross.parts.0"].a_bits == 8
    assert result.bitmap["cross.out_proj.parts.0"].a_bits is None


@pytest.mark.slow
def test_default_search_beats_uniform_int4_fourfold_on_attention_pooling() -> None:
    """The attention-pooling model of ``results/unseen_models.md`` (trained here on the
    real digits; 64 % of its weights in the attentions' projections): per layer 2.1×
    below uniform INT4 held out, and the default Fisher search, which now slices the
    attentions, measured 5.15×."""
    pytest.importorskip("scipy")
    from tests.test_benchmark_fidelity import _load

    unseen = _load("unseen_models")
    model, calib, held_out = unseen.trained("attn_pool")
    before = _state(model)
    uniform = mpsearch.validate(model, BitMap.uniform(model, 4), data=held_out,
                                progress=False).output_divergence
    result = mpsearch.search(model, 4.0, data=calib, sensitivity="fisher", progress=False)
    _assert_same(before, model)
    assert result.bitmap.slices is not None
    assert {"attn", "attn.out_proj", "pool", "pool.out_proj"} <= set(result.bitmap.slices.layers)
    assert result.bitmap.avg_bits() <= 4.0
    searched = mpsearch.validate(model, result.bitmap, data=held_out,
                                 progress=False).output_divergence
    assert uniform / searched >= 4.0
