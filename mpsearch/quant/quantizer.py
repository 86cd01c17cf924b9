"""Affine quantizer: ``X_int = clamp(round(X/s) + z, qmin, qmax)``, ``X̂ = s(X_int − z)``.

Weight layout: dim 0 is the output channel and every other dim is flattened into the
reduction dim, so one code path serves Linear ``(out, in)``, Conv1d/2d ``(out, in/g, *k)``
and 1-D tensors (one channel). Bits 2–8 are integer grids, 16 is a float16 round trip,
32 keeps float.

Defaults (asymmetric, per-channel, MSE range) were chosen by measurement: relative error
sqrt(Σ‖Q(W) − W‖² / Σ‖W‖²) over the 37 ``nn.Linear`` weights of all-MiniLM-L6-v2:

range   grid   per channel: 2 / 3 / 4 / 8 bits   per group of 128: 2 / 3 / 4 / 8 bits
minmax  asym   .621  .283  .134  .0083          .524  .229  .107  .0063
minmax  sym    .662  .310  .147  .0099          .577  .257  .121  .0072
mse     asym   .394  .211  .116  .0082          .379  .197  .101  .0063
mse     sym    .399  .216  .120  .0098          .395  .209  .110  .0071
p99.99  asym   .617  .281  .132  .0113          .523  .228  .107  .0065
p99.9   asym   .585  .264  .133  .0571          .514  .224  .105  .0142

MSE cuts the 2-bit error of min-max by a third and is never worse; asymmetric beats
symmetric everywhere; percentiles gain little at low bits and lose at 8 bits. Groups of
128 help most at 2–4 bits but cost scale storage and kernel support, so per-channel
(which fits every layer kind) is the default. MSE takes about 0.35 s of one CPU core
on a 4096×4096 weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Granularity = Literal["tensor", "channel", "group"]
RangeMethod = Literal["minmax", "mse", "percentile"]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16, 32)
"""Weight/activation bit-widths: 2–8 integer grids, 16 float16 round trip, 32 float."""

_INT_BITS = frozenset(range(2, 9))
_CONFIG_KEYS = ("symmetric", "granularity", "group_size", "range_method", "percentile")
# MSE search: a coarse grid of shrink factors α of the min-max range, then halving steps
# around each row's best so far. α = 1 (plain min-max) is always a candidate, so the MSE
# range is never worse than min-max on the same grid.
_MSE_COARSE = tuple(round(1.0 - 0.1 * i, 2) for i in range(10))  # 1.0, 0.9, .., 0.1
_MSE_REFINE = (0.05, 0.025, 0.0125, 0.00625)
_MSE_ALPHA_MIN = 0.05
# The MSE search runs on chunks of rows of about this many elements, so that its ~27
# passes hit cache rather than memory: 0.34 s for 4096² on one core, against 0.72 s
# unchunked and 0.43 s / 0.56 s with 2^18 / 2^16 (measured, torch 2.13 CPU).
_MSE_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How weights are quantized (the bit-width is given separately, per layer).

    Attributes:
        symmetric: ``True``: grid ``[−2^(b−1), 2^(b−1)−1]``, zero point 0, scale from the
            absolute maximum. ``False``: grid ``[0, 2^b−1]`` with an integer zero point;
            the range always includes 0 so zero is exact.
        granularity: one scale per ``"tensor"``, per output ``"channel"`` (row of dim 0),
            or per ``"group"`` of ``group_size`` consecutive values of a row.
        group_size: group length, required (≥ 1) iff ``granularity == "group"``. A row
            whose length is not a multiple has a shorter last group.
        range_method: ``"minmax"``; ``"mse"`` (per row or group, shrink the min-max
            range by the α minimising ‖X − X̂‖²: α on 0.1, 0.2, …, 1, then refined by
            halving steps down to ±0.006); ``"percentile"`` (clip to the p-th percentile
            of |x|, or for asymmetric to the (100 − p)-th and p-th percentiles).
        percentile: in (50, 100]; used only by ``range_method="percentile"``.
    """

    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    range_method: RangeMethod = "mse"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if type(self.symmetric) is not bool:  # ints such as 1 are not accepted either
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.granularity not in get_args(Granularity):
            raise ValueError(f"granularity must be one of {get_args(Granularity)}, "
                             f"got {self.granularity!r}")
        if self.granularity == "group":
            if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                    or self.group_size < 1):
                raise ValueError("granularity='group' needs an integer group_size >= 1 "
                                 f"(e.g. 128), got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size!r} is only used with "
                             f"granularity='group'; got granularity={self.granularity!r} "
                             "(set group_size=None or granularity='group')")
        if self.range_method not in get_args(RangeMethod):
            raise ValueError(f"range_method must be one of {get_args(RangeMethod)}, "
                             f"got {self.range_method!r}")
        p = self.percentile
        if (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p)
                or not 50.0 < p <= 100.0):
            raise ValueError(f"percentile must be a number in (50, 100], e.g. 99.99, got {p!r}")
        object.__setattr__(self, "percentile", float(p))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return {"symmetric": self.symmetric, "granularity": self.granularity,
                "group_size": self.group_size, "range_method": self.range_method,
                "percentile": self.percentile}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Build and validate a config from :meth:`to_dict` output.

        Missing keys take their defaults; unknown keys are an error.

        Raises:
            ValueError: unknown key or invalid value.
        """
        unknown = sorted(set(d) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown QuantConfig key(s) {unknown}; known: {list(_CONFIG_KEYS)}")
        return cls(**{k: d[k] for k in _CONFIG_KEYS if k in d})


class _Layout(NamedTuple):
    rows: int  # output channels (1 for "tensor" and for 1-D weights)
    cols: int  # flattened reduction length of a row
    n_groups: int  # scales per row
    group_len: int  # padded length of one group


def _layout(shape: tuple[int, ...], cfg: QuantConfig) -> _Layout:
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and cfg.granularity != "tensor" else 1
    cols = numel // rows if rows else 0
    if cfg.granularity == "group" and cfg.group_size:
        # A group longer than the row is the row itself (no padding to group_size).
        group_len = min(cfg.group_size, max(cols, 1))
        return _Layout(rows, cols, -(-cols // group_len), group_len)
    return _Layout(rows, cols, 1, cols)


def n_scale_groups(weight_shape: tuple[int, ...], cfg: QuantConfig) -> int:
    """Number of (scale, zero point) pairs a weight of this shape needs under ``cfg``.

    1 per tensor; ``shape[0]`` per channel; ``shape[0] · ceil(cols / group_size)`` per
    group, with ``cols`` the product of the other dims (a 1-D shape is one row).
    """
    lay = _layout(tuple(int(s) for s in weight_shape), cfg)
    return lay.rows * lay.n_groups


def _to_groups(x2: Tensor, lay: _Layout) -> tuple[Tensor, int]:
    """(rows, cols) → (rows, n_groups, group_len), zero-padding a short last group."""
    pad = lay.n_groups * lay.group_len - lay.cols
    return (F.pad(x2, (0, pad)) if pad else x2).view(lay.rows, lay.n_groups, lay.group_len), pad


def _check_bits(bits: int, allowed: tuple[int, ...] | frozenset[int], what: str) -> None:
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"{what} bits must be one of {tuple(sorted(allowed))}, got {bits!r}")


def _check_finite_float(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    # amin/amax propagate NaN and see ±inf, at a fraction of the cost of isfinite().all().
    if x.numel() and not bool(torch.isfinite(x.amin()) & torch.isfinite(x.amax())):
        raise ValueError(f"{what} of shape {tuple(x.shape)} has non-finite values "
                         f"({int(torch.isnan(x).sum())} NaN, {int(torch.isinf(x).sum())} inf); "
                         "only finite tensors can be quantized")


def _to_half(x: Tensor, what: str) -> Tensor:
    amax = max(-float(x.amin()), float(x.amax())) if x.numel() else 0.0
    if amax > torch.finfo(torch.float16).max:
        raise ValueError(f"{what}: bits=16 would overflow float16 (max |x| = {amax:.4g} > "
                         "65504); keep this tensor at 32 bits")
    return x.to(torch.float16).to(x.dtype)


def _round_(t: Tensor) -> Tensor:
    """Round half to even in place, for |t| < 2^22 (float32) or 2^51 (float64).

    Adding and removing 1.5 · 2^mantissa leaves no fractional bits, so IEEE addition does
    the rounding. Used instead of torch.round, whose CPU kernel forks threads from 2048
    elements up and stalls for milliseconds per call when the cores are shared.
    """
    magic = 1.5 / torch.finfo(t.dtype).eps  # 1.5 · 2^23 for float32
    return t.add_(magic).sub_(magic)


def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _scale_zero(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and (integer-valued, float) zero point from a range; lo ≤ 0 ≤ hi per row."""
    levels = (1 << bits) - 1
    if symmetric:
        # absmax / ((2^b − 1) / 2): the grid's half-width, so ±absmax are within s/2 of
        # a grid point (as PyTorch's symmetric observers and GPTQ do).
        scale = torch.maximum(-lo, hi) * (2.0 / levels)
    else:
        scale = (hi - lo) / levels
    # An all-zero row (or a denormal range) must not give s = 0 / inf / NaN: any s
    # quantizes zeros exactly, and 1 keeps x / s finite.
    scale = torch.where(scale >= torch.finfo(scale.dtype).tiny, scale, torch.ones_like(scale))
    if symmetric:
        return scale, torch.zeros_like(scale)
    return scale, _round_(-lo / scale).clamp_(0, levels)  # -lo / scale is in [0, levels]


def _kth_percentile(x: Tensor, p: float) -> Tensor:
    """Row-wise p-th percentile (linear interpolation, as torch.quantile) via kthvalue.

    torch.quantile refuses inputs over 2^24 elements; kthvalue has no such limit.
    """
    n = x.shape[1]
    pos = p / 100.0 * (n - 1)
    k_lo = math.floor(pos)
    frac = pos - k_lo
    v_lo = torch.kthvalue(x, k_lo + 1, dim=1).values
    if frac == 0.0 or k_lo + 1 >= n:
        return v_lo
    v_hi = torch.kthvalue(x, k_lo + 2, dim=1).values
    return v_lo + (v_hi - v_lo) * frac


def _mse_sq_err(x: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool,
                buf: tuple[Tensor, Tensor]) -> Tensor:
    """Per-row ‖X − X̂‖² for ranges (lo, hi); ``buf`` holds two scratch tensors like x."""
    qmin, qmax = _grid(bits, symmetric)
    scale, zero = _scale_zero(lo, hi, bits, symmetric)
    # ‖X − X̂‖² = s² ‖clamp(round(u)) − u‖² with u = x/s + z. Only scalar-bound, in-place
    # kernels here: tensor-bound clamp and fused addcdiv are several times slower on CPU.
    u, q = buf
    torch.div(x, scale[:, None], out=u)
    if not symmetric:
        u.add_(zero[:, None])
    torch.clamp(u, qmin, qmax, out=q)
    _round_(q).sub_(u)
    return torch.linalg.vector_norm(q, dim=1).square_() * scale.square()


def _mse_range(x: Tensor, lo: Tensor, hi: Tensor, bits: int,
               symmetric: bool) -> tuple[Tensor, Tensor]:
    """Shrink each row's range (lo, hi) by the searched α minimising ‖X − X̂‖²."""
    alpha = torch.ones_like(lo)
    step = max(1, _MSE_CHUNK_ELEMENTS // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        xc, lc, hc = x[r0:r0 + step], lo[r0:r0 + step], hi[r0:r0 + step]
        buf = (torch.empty_like(xc), torch.empty_like(xc))
        best_a = torch.ones_like(lc)
        best_e = _mse_sq_err(xc, lc, hc, bits, symmetric, buf)
        coarse = [torch.full_like(lc, a) for a in _MSE_COARSE[1:]]
        for level in [None, *_MSE_REFINE]:
            cands = coarse if level is None else [(best_a + d).clamp_(_MSE_ALPHA_MIN, 1.0)
                                                  for d in (-level, level)]
            for a in cands:
                e = _mse_sq_err(xc, lc * a, hc * a, bits, symmetric, buf)
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_a = torch.where(better, a, best_a)
        alpha[r0:r0 + step] = best_a
    return lo * alpha, hi * alpha


def _ranges(x: Tensor, bits: int, cfg: QuantConfig) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi), lo ≤ 0 ≤ hi, for a (rows, n) matrix."""
    if cfg.range_method == "percentile" and cfg.symmetric:
        hi = _kth_percentile(x.abs(), cfg.percentile)
        lo = -hi
    elif cfg.range_method == "percentile":
        lo, hi = _kth_percentile(x, 100.0 - cfg.percentile), _kth_percentile(x, cfg.percentile)
    else:
        # amin + amax: torch.aminmax is several times slower on CPU.
        lo, hi = x.amin(dim=1), x.amax(dim=1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if cfg.symmetric:
        a = torch.maximum(-lo, hi)
        lo, hi = -a, a
    if cfg.range_method == "mse":
        lo, hi = _mse_range(x, lo, hi, bits, cfg.symmetric)
    return lo, hi


def _quantize3(w: Tensor, bits: int, cfg: QuantConfig) -> tuple[Tensor, Tensor, Tensor, _Layout]:
    """Integer values (as floats), scales and zero points in the (rows, groups, len) layout."""
    lay = _layout(tuple(w.shape), cfg)
    x2 = w.detach().reshape(lay.rows, lay.cols)
    x2 = x2.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    # Zero padding is neutral: ranges always include 0, and 0 quantizes to exactly 0, so
    # padded zeros change neither min-max nor the MSE search (percentiles are fixed below).
    x3, pad = _to_groups(x2, lay)
    lo, hi = _ranges(x3.view(-1, lay.group_len), bits, cfg)
    if pad and cfg.range_method == "percentile":
        tail_lo, tail_hi = _ranges(x2[:, (lay.n_groups - 1) * lay.group_len:], bits, cfg)
        lo.view(lay.rows, lay.n_groups)[:, -1] = tail_lo
        hi.view(lay.rows, lay.n_groups)[:, -1] = tail_hi
    scale, zero = _scale_zero(lo, hi, bits, cfg.symmetric)
    scale = scale.view(lay.rows, lay.n_groups, 1)
    zero = zero.view(lay.rows, lay.n_groups, 1)
    qmin, qmax = _grid(bits, cfg.symmetric)
    # The first clamp only bounds |x/s| for _round_; it cannot change the result, since
    # round(x/s) + z ∉ [qmin, qmax] whenever |x/s| > 2^bits.
    t = torch.div(x3, scale).clamp_(-(1 << bits), 1 << bits)
    q3 = _round_(t).add_(zero).clamp_(qmin, qmax)
    return q3, scale, zero, lay


def _dequantize3(q3: Tensor, scale: Tensor, zero: Tensor, lay: _Layout,
                 shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    # The one dequantization path, shared by fake_quantize and QuantizedTensor, so the two
    # agree bit for bit. Consumes q3 (in place: these are 64 MB passes on a 4096² weight).
    x3 = q3.sub_(zero).mul_(scale)
    return x3.view(lay.rows, -1)[:, :lay.cols].reshape(shape).to(dtype)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer values and quantization parameters of one weight.

    Attributes:
        int_values: integer tensor of the weight's shape, ``torch.int8`` (symmetric) or
            ``torch.uint8`` (asymmetric), within the grid of ``bits``.
        scale: float32 (float64 for float64 weights) scales, shaped by granularity:
            ``"tensor"``: ``()``; ``"channel"``: ``(out, 1, …, 1)`` with ``w.ndim`` dims
            (broadcasts against the weight); ``"group"``: ``(out, n_groups)``, entry
            ``[r, j]`` covering ``w.reshape(out, -1)[r, j·group_size:(j+1)·group_size]``
            (a 1-D weight is one row: ``out = 1``).
        zero_point: ``torch.int32``, same shape as ``scale``; all zeros when symmetric.
        bits: 2–8.
        cfg: the config used.
        dtype: dtype of the original weight, returned by :meth:`dequantize`.
    """

    int_values: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int
    cfg: QuantConfig
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> Tensor:
        """``scale · (int_values − zero_point)`` in the original dtype and shape."""
        shape = tuple(self.int_values.shape)
        lay = _layout(shape, self.cfg)
        q3, _ = _to_groups(self.int_values.reshape(lay.rows, lay.cols).to(self.scale.dtype), lay)
        scale = self.scale.reshape(lay.rows, lay.n_groups, 1)
        zero = self.zero_point.reshape(lay.rows, lay.n_groups, 1).to(self.scale.dtype)
        return _dequantize3(q3, scale, zero, lay, shape, self.dtype)


def quantize_tensor(w: Tensor, bits: int, cfg: QuantConfig) -> QuantizedTensor:
    """Quantize a weight to integers plus scales and zero points.

    Args:
        w: floating-point weight, output channels along dim 0. Not modified.
        bits: integer bit-width, 2–8.
        cfg: quantization scheme.

    Returns:
        The integer values and parameters; ``.dequantize()`` equals
        ``fake_quantize(w, bits, cfg)`` exactly.

    Raises:
        ValueError: ``bits`` not in 2–8, ``w`` empty, not floating point or not finite.
    """
    _check_bits(bits, _INT_BITS, "integer")
    _check_finite_float(w, "weight")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
    with torch.no_grad():
        q3, scale, zero, lay = _quantize3(w, bits, cfg)
        shape = tuple(w.shape)
        int_dtype = torch.int8 if cfg.symmetric else torch.uint8
        int_values = q3.view(lay.rows, -1)[:, :lay.cols].reshape(shape).to(int_dtype)
        p_shape = {"tensor": (), "channel": (lay.rows,) + (1,) * (max(len(shape), 1) - 1),
                   "group": (lay.rows, lay.n_groups)}[cfg.granularity]
        return QuantizedTensor(int_values=int_values, scale=scale.reshape(p_shape),
                               zero_point=zero.reshape(p_shape).to(torch.int32), bits=bits,
                               cfg=cfg, dtype=w.dtype)


def fake_quantize(w: Tensor, bits: int, cfg: QuantConfig) -> Tensor:
    """Quantize and dequantize a weight: ``s · (clamp(round(w/s) + z, qmin, qmax) − z)``.

    Args:
        w: floating-point weight, output channels along dim 0 (all other dims are the
            reduction dim). Not modified; the result has no autograd history.
        bits: one of :data:`SUPPORTED_BITS`. 16 rounds through float16; 32 returns a copy.
        cfg: quantization scheme.

    Returns:
        A new tensor of ``w``'s shape and dtype.

    Raises:
        ValueError: bad ``bits``; ``w`` not floating point, empty (bits 2–8) or holding
            NaN/inf; ``|w|`` beyond the float16 range at 16 bits.
    """
    _check_bits(bits, SUPPORTED_BITS, "weight")
    _check_finite_float(w, "weight")
    with torch.no_grad():
        if bits == 32:
            return w.detach().clone()
        if bits == 16:
            return _to_half(w.detach(), "weight")
        if w.numel() == 0:
            raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
        q3, scale, zero, lay = _quantize3(w, bits, cfg)
        return _dequantize3(q3, scale, zero, lay, tuple(w.shape), w.dtype)


def quant_error_sq(w: Tensor, bits: int, cfg: QuantConfig) -> float:
    """‖fake_quantize(w, bits, cfg) − w‖², accumulated in float64."""
    w_hat = fake_quantize(w, bits, cfg)
    with torch.no_grad():
        return float((w_hat.double() - w.detach().double()).square_().sum())


# Activations use the weight operator on the whole tensor with its min-max range.
_ACT_CFG = {sym: QuantConfig(symmetric=sym, granularity="tensor", range_method="minmax")
            for sym in (False, True)}


def fake_quantize_activation(x: Tensor, bits: int, symmetric: bool = False) -> Tensor:
    """Dynamic per-tensor min-max fake quantization of an activation.

    Gradients pass straight through (the derivative of the rounding is taken as 1):
    where autograd records, the result is ``x + (x̂ − x).detach()``, equal to ``x̂`` up
    to one rounding of the addition; otherwise it is ``x̂`` itself.

    Args:
        x: floating-point activation, any shape. Not modified.
        bits: one of :data:`SUPPORTED_BITS`; 16 rounds through float16, 32 returns ``x``
            unchanged (a copy, still connected to the graph).
        symmetric: symmetric grid (z = 0) instead of asymmetric min-max with zero in range.

    Raises:
        ValueError: bad ``bits``; ``x`` not floating point or holding NaN/inf.
    """
    _check_bits(bits, SUPPORTED_BITS, "activation")
    _check_finite_float(x, "activation")
    if bits == 32:
        return x.clone()
    with torch.no_grad():
        xd = x.detach()
        if bits == 16:
            x_hat = _to_half(xd, "activation")
        elif x.numel() == 0:
            x_hat = xd.clone()
        else:
            x_hat = _dequantize3(*_quantize3(xd, bits, _ACT_CFG[bool(symmetric)]), tuple(x.shape),
                                 x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (x_hat - xd)
    return x_hat
