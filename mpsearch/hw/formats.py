"""Deployment formats: which real kernel runs a layer at a given bit-width, per device.

A *format* names one kernel family: ``fp32`` (float), ``w8a8`` (8-bit weights and 8-bit
dynamically quantized activations, integer GEMM / convolution), ``w{b}b{block}``
(weight-only ``b``-bit, blocks of ``block`` along the reduction dim, float activations),
and on CUDA ``fp16``. A bit-width without a real kernel for a layer kind on a device has
no format: it is not offered to the search, and tables say why.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpsearch.quant import QuantConfig

#: layer kinds that are matrix multiplications (weight-only low-bit kernels exist for them)
MATMUL_KINDS = frozenset({"Linear", "Conv1D"})
CONV_KINDS = frozenset({"Conv1d", "Conv2d"})
DEVICES = ("cpu", "cuda")
#: kernel backends per device; the first is the default. ``torch`` on CPU (``torch._int_mm``,
#: ``_weight_int4pack_mm_for_cpu``) is a second CPU backend, and runs the CUDA code path on
#: CPU kernels where no GPU is at hand.
BACKENDS = {"cpu": ("onnxruntime", "torch"), "cuda": ("torch",)}


@dataclass(frozen=True)
class FormatChoice:
    """The format that runs a layer at some bits, or why none does.

    Attributes:
        name: format name (``fp32``, ``w8a8``, ``w4b128``, ...) or None when no kernel.
        reason: why there is no kernel (empty when ``name`` is set).
    """

    name: str | None
    reason: str = ""


def _block_size(k: int, cfg: QuantConfig) -> int | None:
    """MatMulNBits block length: the quantizer's group, else 128 (32 for short rows).

    Per-channel (and per-tensor) scales are exact in any block length: every block of
    a row repeats the row's scale and zero point.
    """
    if cfg.granularity == "group":
        g = int(cfg.group_size or 0)
        return g if g >= 16 and g & (g - 1) == 0 else None
    return 128 if k >= 128 else 32


def format_for(kind: str, k: int, bits: int, cfg: QuantConfig, *, device: str = "cpu",
               backend: str = "onnxruntime") -> FormatChoice:
    """The format that runs a ``kind`` layer with reduction length ``k`` at ``bits``.

    Args:
        kind: layer kind (``Linear``, ``Conv1D``, ``Conv1d``, ``Conv2d``).
        k: reduction length of the weight (input features; in/groups × kernel for conv).
        bits: weight bits (32 = float).
        cfg: weight quantizer scheme.
        device: ``"cpu"`` or ``"cuda"``.
        backend: ``"onnxruntime"`` (CPU) or ``"torch"`` (CUDA, or CPU).
    """
    if device not in DEVICES or backend not in BACKENDS[device]:
        raise ValueError(f"device/backend must be one of {BACKENDS}, got {device!r}/{backend!r}")
    if bits == 32:
        return FormatChoice("fp32")
    if kind == "MultiheadAttention":
        return FormatChoice(None, "nn.MultiheadAttention runs its own fused kernel in the "
                                  "deployed graph; its packed q/k/v projection stays float")
    if kind in ("LSTM", "GRU", "RNN"):
        return FormatChoice(None, f"the deployed graph runs the {kind} as one fused float "
                                  "operator; its weights stay float")
    if backend == "torch":
        return _format_torch(kind, k, bits, cfg)
    if bits == 16:
        return FormatChoice(None, "no fp16 kernel faster than fp32 in onnxruntime on CPU")
    if bits not in (2, 4, 8):
        return FormatChoice(None, f"no {bits}-bit kernel in onnxruntime (MatMulNBits: 2, 4, 8)")
    if bits == 8 and cfg.granularity != "group":
        return FormatChoice("w8a8")
    if kind not in MATMUL_KINDS:
        return FormatChoice(None, f"no {bits}-bit {'grouped ' if bits == 8 else ''}"
                                  f"convolution kernel in onnxruntime on CPU")
    block = _block_size(k, cfg)
    if block is None:
        return FormatChoice(None, f"MatMulNBits needs a power-of-two group >= 16, "
                                  f"got group_size={cfg.group_size}")
    return FormatChoice(f"w{bits}b{block}")


def _format_torch(kind: str, k: int, bits: int, cfg: QuantConfig) -> FormatChoice:
    """PyTorch kernels: fp16, ``torch._int_mm`` (w8a8), ``_weight_int4pack_mm`` (w4)."""
    if bits == 16:
        return FormatChoice("fp16")
    if kind not in MATMUL_KINDS:
        return FormatChoice(None, f"no {bits}-bit convolution kernel in PyTorch")
    if bits == 8:
        return (FormatChoice("w8a8") if cfg.granularity != "group" else
                FormatChoice(None, "torch._int_mm takes per-channel weight scales, not groups"))
    if bits != 4:
        return FormatChoice(None, f"no {bits}-bit kernel in PyTorch (int8: _int_mm, "
                                  "int4: _weight_int4pack_mm)")
    if cfg.granularity == "group":
        block = int(cfg.group_size or 0)
        if block not in (32, 64, 128, 256) or k % block:
            return FormatChoice(None, f"_weight_int4pack_mm needs groups of 32, 64, 128 or 256 "
                                      f"dividing K={k}, got group_size={cfg.group_size}")
        return FormatChoice(f"w4b{block}")
    for block in (128, 64, 32):  # per-channel scales repeat in every group
        if k % block == 0:
            return FormatChoice(f"w4b{block}")
    return FormatChoice(None, f"_weight_int4pack_mm needs K divisible by 32, got K={k}")


def parse_weight_only(name: str) -> tuple[int, int] | None:
    """``(bits, block)`` of a weight-only format name such as ``w4b128``, else None."""
    if not name.startswith("w") or "b" not in name or name == "w8a8":
        return None
    bits_s, _, block_s = name[1:].partition("b")
    if not (bits_s.isdigit() and block_s.isdigit()):
        return None
    return int(bits_s), int(block_s)
