"""Every ONNX Runtime kernel against its dequantized reference (known answers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")

from mpsearch.hw.formats import format_for
from mpsearch.hw.kernels_ort import LayerSpec, build_layer, make_model, session
from mpsearch.quant import QuantConfig, fake_quantize, fake_quantize_activation

ASYM, SYM = QuantConfig(), QuantConfig(symmetric=True)
GROUP = QuantConfig(granularity="group", group_size=32)


def _run(spec: LayerSpec, fmt: str, cfg: QuantConfig, w: torch.Tensor, b: torch.Tensor | None,
         x: torch.Tensor, out_range: tuple[float, float] | None = None) -> torch.Tensor:
    nodes, inits = build_layer(spec, fmt, "x", "y", w, b, cfg, "layer", out_range)
    sess = session(make_model(nodes, inits, [("x", spec.input_shape)], ["y"]))
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("cfg", [ASYM, SYM], ids=["asym", "sym"])
def test_linear_kernels_match_dequantized_reference(cfg: QuantConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 200, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(2, 5, 200, generator=gen)
    spec = LayerSpec(kind="Linear", weight_shape=(48, 200), input_shape=(2, 5, 200))
    assert _rel(_run(spec, "fp32", cfg, w, b, x), F.linear(x, w, b)) < 1e-6
    # W8A8: integer GEMM on our integer weights and DynamicQuantizeLinear's activations:
    # exactly the simulated a_bits=8 model, up to float rounding.
    ref8 = F.linear(fake_quantize_activation(x, 8), fake_quantize(w, 8, cfg), b)
    assert _rel(_run(spec, "w8a8", cfg, w, b, x), ref8) < 1e-5
    # MatMulNBits at accuracy_level 4 quantizes activations to int8 per block inside.
    for fmt, bits in (("w8b128", 8), ("w4b128", 4), ("w4b32", 4), ("w2b32", 2)):
        ref = F.linear(x, fake_quantize(w, bits, cfg), b)
        assert _rel(_run(spec, fmt, cfg, w, b, x), ref) < 0.02, fmt


def test_group_and_conv1d_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(40, 96, generator=gen), torch.randn(3, 96, generator=gen)
    spec = LayerSpec(kind="Linear", weight_shape=(40, 96), input_shape=(3, 96), bias=False)
    ref = F.linear(x, fake_quantize(w, 4, GROUP))
    assert _rel(_run(spec, "w4b32", GROUP, w, None, x), ref) < 0.02
    # Hugging Face Conv1D stores (in, out)
    spec_t = LayerSpec(kind="Conv1D", weight_shape=(96, 40), input_shape=(3, 96), bias=False)
    ref8 = F.linear(fake_quantize_activation(x, 8), fake_quantize(w, 8, ASYM))
    assert _rel(_run(spec_t, "w8a8", ASYM, w.t().contiguous(), None, x), ref8) < 1e-5


@pytest.mark.parametrize("c_in,c_out,groups", [(3, 8, 1), (8, 8, 8), (8, 12, 2)])
def test_conv_kernels_match_reference(c_in: int, c_out: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(c_out, c_in // groups, 3, 3, generator=gen) * 0.3
    b = torch.randn(c_out, generator=gen)
    x = torch.randn(2, c_in, 9, 9, generator=gen)
    spec = LayerSpec(kind="Conv2d", weight_shape=tuple(w.shape), input_shape=(2, c_in, 9, 9),
                     strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 1), group=groups)
    assert _rel(_run(spec, "fp32", ASYM, w, b, x), F.conv2d(x, w, b, 2, 1, 1, groups)) < 1e-6
    for cfg in (ASYM, SYM):
        pre = F.conv2d(fake_quantize_activation(x, 8), fake_quantize(w, 8, cfg), None, 2, 1, 1,
                       groups)
        rng = (float(pre.min()), float(pre.max()))
        y = _run(spec, "w8a8", cfg, w, b, x, rng)
        # one static 8-bit rounding of the output: at most half a step of its scale
        step = (rng[1] - min(rng[0], 0.0)) / 255
        assert float((y - (pre + b.view(1, -1, 1, 1))).abs().max()) <= step / 2 + 1e-4


def test_formats_without_kernels_are_not_offered() -> None:
    assert format_for("Conv2d", 9, 4, ASYM).name is None
    assert "convolution" in format_for("Conv2d", 9, 4, ASYM).reason
    assert format_for("Linear", 768, 3, ASYM).name is None
    assert format_for("Linear", 768, 16, ASYM).name is None
    assert format_for("Linear", 768, 4, ASYM).name == "w4b128"
    assert format_for("Linear", 64, 2, ASYM).name == "w2b32"
    assert format_for("Conv2d", 9, 8, ASYM).name == "w8a8"
    assert format_for("Linear", 768, 4, QuantConfig(granularity="group", group_size=48)).name \
        is None
    assert format_for("Linear", 768, 4, ASYM, device="cuda", backend="torch").name == "w4b128"
    assert format_for("Conv2d", 9, 8, ASYM, device="cuda", backend="torch").name is None
