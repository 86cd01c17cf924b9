"""Quantization: the uniform affine quantizer and applying bit maps to models."""

from mpsearch.quant.quantizer import (
    SUPPORTED_BITS,
    QuantConfig,
    QuantizedTensor,
    fake_quantize,
    fake_quantize_activation,
    n_scale_groups,
    quant_error_sq,
    quantize_tensor,
)

__all__ = [
    "SUPPORTED_BITS",
    "QuantConfig",
    "QuantizedTensor",
    "fake_quantize",
    "fake_quantize_activation",
    "n_scale_groups",
    "quant_error_sq",
    "quantize_tensor",
]
