"""Known-answer tests for the uniform affine quantizer."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from mpsearch.quant import (
    SUPPORTED_BITS,
    QuantConfig,
    fake_quantize,
    fake_quantize_activation,
    n_scale_groups,
    quant_error_sq,
    quantize_tensor,
)

MINMAX_ASYM = QuantConfig(symmetric=False, range_method="minmax")
MINMAX_SYM = QuantConfig(symmetric=True, range_method="minmax")
ROW = torch.tensor([[-1.0, -0.2, 0.3, 2.0]])

CONFIGS = [
    QuantConfig(),
    MINMAX_ASYM,
    MINMAX_SYM,
    QuantConfig(symmetric=True),
    QuantConfig(range_method="percentile", percentile=99.0),
    QuantConfig(symmetric=True, range_method="percentile", percentile=99.0),
    QuantConfig(granularity="tensor"),
    QuantConfig(granularity="group", group_size=16),
    QuantConfig(symmetric=True, granularity="group", group_size=7, range_method="minmax"),
]


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Hand-computed: asym range [-1, 2]; sym absmax 2, s = 2·absmax / (2^b − 1).
@pytest.mark.parametrize(("bits", "cfg", "scale", "zero", "ints"), [
    (2, MINMAX_ASYM, 1.0, 1, [0, 1, 1, 3]),           # x/s = -1, -.2, .3, 2
    (3, MINMAX_ASYM, 3 / 7, 2, [0, 2, 3, 7]),         # x/s = -2.33, -.47, .7, 4.67
    (2, MINMAX_SYM, 4 / 3, 0, [-1, 0, 0, 1]),         # x/s = -.75, -.15, .225, 1.5 → 2 → 1
    (3, MINMAX_SYM, 4 / 7, 0, [-2, 0, 1, 3]),         # x/s = -1.75, -.35, .525, 3.5 → 4 → 3
])
def test_hand_computed_row(bits: int, cfg: QuantConfig, scale: float, zero: int,
                           ints: list[int]) -> None:
    qt = quantize_tensor(ROW, bits, cfg)
    assert qt.scale.shape == (1, 1)
    assert qt.scale.item() == pytest.approx(scale, rel=1e-6)
    assert qt.zero_point.item() == zero
    assert qt.int_values.tolist() == [ints]
    expected = torch.tensor([[scale * (q - zero) for q in ints]])
    torch.testing.assert_close(fake_quantize(ROW, bits, cfg), expected)


@pytest.mark.parametrize("cfg", [MINMAX_ASYM, MINMAX_SYM,
                                 QuantConfig(granularity="group", group_size=10,
                                             range_method="minmax")])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_error_at_most_half_step(bits: int, cfg: QuantConfig) -> None:
    w = _gauss(8, 50)
    qt = quantize_tensor(w, bits, cfg)
    s = qt.scale if cfg.granularity != "group" else qt.scale.repeat_interleave(10, dim=1)
    err = (qt.dequantize() - w).abs()
    assert bool((err <= s / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("cfg", [MINMAX_ASYM, QuantConfig(), QuantConfig(granularity="tensor"),
                                 QuantConfig(granularity="group", group_size=3)], ids=str)
def test_grid_values_round_trip_exactly(cfg: QuantConfig) -> None:
    # 2-bit asymmetric grid s = 0.25, z = 1: {-0.25, 0, 0.25, 0.5}; every row (and group
    # of 3) spans the whole grid, so min-max recovers s and z and MSE keeps α = 1.
    w = torch.tensor([[-0.25, 0.5, 0.0, 0.5, -0.25, 0.25],
                      [0.5, 0.25, -0.25, -0.25, 0.5, 0.0]])
    qt = quantize_tensor(w, 2, cfg)
    assert torch.equal(qt.dequantize(), w)
    assert torch.equal(qt.int_values, torch.round(w / 0.25).to(torch.uint8) + 1)
    assert bool((qt.scale == 0.25).all()) and bool((qt.zero_point == 1).all())


@pytest.mark.parametrize("cfg", [c for c in CONFIGS
                                 if not c.symmetric and c.range_method != "percentile"], ids=str)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_quantization_is_idempotent(cfg: QuantConfig, bits: int) -> None:
    # Min-max of an asymmetric output spans exactly [−z·s, (qmax − z)·s]. (Symmetric
    # outputs are not fixed points: their absmax is a whole number of steps, while the
    # scale formula puts absmax half a step beyond the last one.)
    w = fake_quantize(_gauss(6, 40), bits, cfg)
    torch.testing.assert_close(fake_quantize(w, bits, cfg), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_int_values_on_grid_and_fake_equals_dequantize(bits: int, cfg: QuantConfig) -> None:
    w = _gauss(12, 45) * 3
    qt = quantize_tensor(w, bits, cfg)
    assert qt.int_values.shape == w.shape
    assert qt.int_values.dtype == (torch.int8 if cfg.symmetric else torch.uint8)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if cfg.symmetric else (0, 2**bits - 1)
    assert int(qt.int_values.min()) >= qmin and int(qt.int_values.max()) <= qmax
    assert qt.zero_point.dtype == torch.int32
    assert bool((qt.scale > 0).all())
    assert torch.equal(fake_quantize(w, bits, cfg), qt.dequantize())


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_error_non_increasing_with_bits(cfg: QuantConfig) -> None:
    w = _gauss(32, 256)
    errs = [quant_error_sq(w, b, cfg) for b in (2, 3, 4, 8, 16, 32)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_never_worse_than_minmax(symmetric: bool, granularity: str, bits: int) -> None:
    w = _gauss(16, 300)
    w[0, 0] = 12.0  # an outlier: min-max wastes the grid, MSE clips it
    kw: dict[str, Any] = {"symmetric": symmetric, "granularity": granularity,
          "group_size": 64 if granularity == "group" else None}
    mse = quant_error_sq(w, bits, QuantConfig(range_method="mse", **kw))
    minmax = quant_error_sq(w, bits, QuantConfig(range_method="minmax", **kw))
    assert mse <= minmax * (1 + 1e-6)
    if bits <= 3 and granularity == "channel":
        assert mse < 0.8 * minmax


def test_mse_at_least_as_good_as_every_coarse_alpha() -> None:
    # Brute force: the search grid contains α = 0.1, 0.2, …, 1.0 for every row.
    w = _gauss(4, 200)
    best = quant_error_sq(w, 2, QuantConfig())
    per_row = []
    for r in range(4):
        x = w[r]
        errs = []
        for a in [0.1 * k for k in range(1, 11)]:
            lo, hi = a * min(float(x.min()), 0.0), a * max(float(x.max()), 0.0)
            s = (hi - lo) / 3
            z = round(-lo / s)
            x_hat = s * ((torch.round(x / s) + z).clamp(0, 3) - z)
            errs.append(float((x_hat - x).double().square().sum()))
        per_row.append(min(errs))
    assert best <= sum(per_row) * (1 + 1e-5)


def test_percentile_matches_torch_quantile() -> None:
    w = _gauss(3, 1001)
    for sym in (False, True):
        cfg = QuantConfig(symmetric=sym, range_method="percentile", percentile=99.0)
        qt = quantize_tensor(w, 4, cfg)
        if sym:
            a = torch.quantile(w.abs(), 0.99, dim=1)
            expected = a * 2 / 15
        else:
            lo = torch.quantile(w, 0.01, dim=1).clamp(max=0)
            hi = torch.quantile(w, 0.99, dim=1).clamp(min=0)
            expected = (hi - lo) / 15
        torch.testing.assert_close(qt.scale.flatten(), expected)


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_with_short_last_group_equals_per_slice(method: Any, symmetric: bool) -> None:
    w = _gauss(3, 10)
    cfg = QuantConfig(symmetric=symmetric, granularity="group", group_size=4,
                      range_method=method, percentile=90.0)
    per_channel = QuantConfig(symmetric=symmetric, range_method=method, percentile=90.0)
    expected = torch.cat([fake_quantize(w[:, i:i + 4], 3, per_channel)
                          for i in (0, 4, 8)], dim=1)
    torch.testing.assert_close(fake_quantize(w, 3, cfg), expected, rtol=0, atol=0)
    qt = quantize_tensor(w, 3, cfg)
    assert qt.scale.shape == (3, 3)
    assert torch.equal(qt.dequantize(), expected)


def test_conv_weight_flattens_reduction_dims() -> None:
    w = _gauss(8, 3, 3, 3)
    for cfg in (QuantConfig(), QuantConfig(granularity="group", group_size=5)):
        out = fake_quantize(w, 4, cfg)
        assert out.shape == w.shape
        torch.testing.assert_close(out, fake_quantize(w.reshape(8, 27), 4, cfg).reshape(w.shape),
                                   rtol=0, atol=0)
    assert quantize_tensor(w, 4, QuantConfig()).scale.shape == (8, 1, 1, 1)
    assert quantize_tensor(w, 4, QuantConfig(granularity="tensor")).scale.shape == ()
    assert quantize_tensor(w, 4, QuantConfig(granularity="group", group_size=5)).scale.shape \
        == (8, 6)


def test_one_dim_tensor_is_one_channel() -> None:
    w = _gauss(20)
    torch.testing.assert_close(fake_quantize(w, 3, QuantConfig()),
                               fake_quantize(w[None], 3, QuantConfig())[0], rtol=0, atol=0)
    assert quantize_tensor(w, 3, QuantConfig()).scale.shape == (1,)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_all_zero_rows_stay_exactly_zero(cfg: QuantConfig) -> None:
    w = _gauss(4, 32)
    w[1] = 0.0
    w[3, :16] = 0.0
    out = fake_quantize(w, 2, cfg)
    assert bool(torch.isfinite(out).all())
    assert bool((out[1] == 0).all())
    if cfg.granularity == "group":
        assert bool((out[3, :16] == 0).all())
    out0 = fake_quantize(torch.zeros(3, 5), 4, cfg)
    assert torch.equal(out0, torch.zeros(3, 5))
    qt = quantize_tensor(torch.zeros(3, 5), 4, cfg)
    assert bool((qt.scale > 0).all()) and bool(torch.isfinite(qt.scale).all())


def test_half_and_float_bits_and_input_untouched() -> None:
    w = _gauss(5, 7) * 100
    before = w.clone()
    assert torch.equal(fake_quantize(w, 16, QuantConfig()), w.half().float())
    out = fake_quantize(w, 32, QuantConfig())
    assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()
    for b in SUPPORTED_BITS[:-2]:
        fake_quantize(w, b, QuantConfig())
        quantize_tensor(w, b, QuantConfig())
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="overflow float16"):
        fake_quantize(torch.tensor([1e6]), 16, QuantConfig())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_preserved(dtype: torch.dtype) -> None:
    w = _gauss(4, 16).to(dtype)
    out = fake_quantize(w, 4, QuantConfig())
    assert out.dtype == dtype
    assert quantize_tensor(w, 4, QuantConfig()).dequantize().dtype == dtype
    assert fake_quantize_activation(w, 4).dtype == dtype


def test_no_autograd_graph_and_non_contiguous_input() -> None:
    w = _gauss(6, 9).requires_grad_()
    out = fake_quantize(w.t(), 4, QuantConfig())
    assert not out.requires_grad
    torch.testing.assert_close(out, fake_quantize(w.detach().t().contiguous(), 4, QuantConfig()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises(bad: float) -> None:
    w = _gauss(3, 4)
    w[1, 2] = bad
    name = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=f"non-finite.*1 {name}"):
        fake_quantize(w, 4, QuantConfig())
    with pytest.raises(ValueError, match="non-finite"):
        quantize_tensor(w, 4, QuantConfig())
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize_activation(w, 8)


@pytest.mark.parametrize("bits", [1, 9, 0, 64, True])
def test_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        fake_quantize(_gauss(2, 2), bits, QuantConfig())
    with pytest.raises(ValueError, match="bits must be one of"):
        fake_quantize_activation(_gauss(2, 2), bits)


@pytest.mark.parametrize("bits", [16, 32])
def test_quantize_tensor_only_for_integer_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=r"integer bits must be one of \(2, 3"):
        quantize_tensor(_gauss(2, 2), bits, QuantConfig())


def test_empty_and_non_float_weights_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        fake_quantize(torch.zeros(0, 4), 4, QuantConfig())
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.ones(2, 2, dtype=torch.int64), 4, QuantConfig())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"granularity": "group"}, "needs an integer group_size"),
    ({"granularity": "group", "group_size": 0}, "group_size >= 1"),
    ({"granularity": "channel", "group_size": 128}, "only used with granularity='group'"),
    ({"granularity": "row"}, "granularity must be one of"),
    ({"range_method": "kl"}, "range_method must be one of"),
    ({"percentile": 50.0}, r"percentile must be a number in \(50, 100\]"),
    ({"percentile": 100.5}, "got 100.5"),
    ({"percentile": float("nan")}, "percentile"),
    ({"symmetric": 1}, "symmetric must be True or False"),
])
def test_bad_config_raises(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_config_dict_round_trip() -> None:
    for cfg in CONFIGS:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict({"symmetric": True}) == QuantConfig(symmetric=True)
    with pytest.raises(ValueError, match="unknown QuantConfig key"):
        QuantConfig.from_dict({"bits": 4})
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig.from_dict({"granularity": "group"})


def test_defaults() -> None:
    cfg = QuantConfig()
    assert (cfg.symmetric, cfg.granularity, cfg.group_size, cfg.range_method) \
        == (False, "channel", None, "mse")


@pytest.mark.parametrize(("shape", "cfg", "n"), [
    ((768, 384), QuantConfig(), 768),
    ((768, 384), QuantConfig(granularity="tensor"), 1),
    ((768, 384), QuantConfig(granularity="group", group_size=128), 768 * 3),
    ((10, 300), QuantConfig(granularity="group", group_size=128), 10 * 3),
    ((8, 3, 3, 3), QuantConfig(granularity="group", group_size=4), 8 * 7),
    ((8, 3, 3, 3), QuantConfig(), 8),
    ((5,), QuantConfig(), 1),
    ((5,), QuantConfig(granularity="group", group_size=2), 3),
])
def test_n_scale_groups(shape: tuple[int, ...], cfg: QuantConfig, n: int) -> None:
    assert n_scale_groups(shape, cfg) == n
    fast = dataclasses.replace(cfg, range_method="minmax")
    assert quantize_tensor(torch.ones(shape), 4, fast).scale.numel() == n


def test_activation_is_per_tensor_minmax_with_straight_through_gradient() -> None:
    x = (_gauss(4, 6) * 2).requires_grad_()
    y = fake_quantize_activation(x, 4)
    torch.testing.assert_close(
        y.detach(), fake_quantize(x.detach(), 4, QuantConfig(granularity="tensor",
                                                             range_method="minmax")))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    assert not torch.equal(y.detach(), x.detach())


@pytest.mark.parametrize("bits", [16, 32])
def test_activation_float_bits_pass_gradients(bits: int) -> None:
    x = _gauss(3, 3).requires_grad_()
    y = fake_quantize_activation(x, bits, symmetric=True)
    expected = x.detach().half().float() if bits == 16 else x.detach()
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_activation_hand_computed_without_grad() -> None:
    # Per-tensor asym 2-bit: same as the hand-computed row above.
    y = fake_quantize_activation(ROW.reshape(2, 2), 2)
    assert torch.equal(y, torch.tensor([[-1.0, 0.0], [0.0, 2.0]]))
    y = fake_quantize_activation(ROW, 3, symmetric=True)
    torch.testing.assert_close(y, torch.tensor([[-8 / 7, 0.0, 4 / 7, 12 / 7]]))
