"""Layer specs (shapes + convolution attributes) of a model's quantizable layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mpsearch._report import some
from mpsearch.batches import Batch, split_batch
from mpsearch.hw.kernels_ort import LayerSpec
from mpsearch.layers import (
    RNN_KINDS,
    LayerInfo,
    RecurrentMatrix,
    discover,
    layer_kind,
    layer_weight,
    quantizable_modules,
)


def _conv_pads(module: Any, nd: int) -> tuple[int, ...]:
    padding = module.padding
    kernel = tuple(module.kernel_size)
    dilation = tuple(module.dilation)
    if padding == "valid":
        return (0,) * (2 * nd)
    if padding == "same":  # stride 1 only (PyTorch's rule): extra padding at the end
        total = [dilation[i] * (kernel[i] - 1) for i in range(nd)]
        return tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    pads = tuple(int(p) for p in padding)
    return pads + pads


def layer_spec(module: Any, input_shape: Sequence[int]) -> LayerSpec:
    """The :class:`LayerSpec` of a quantizable module called on ``input_shape``.

    Raises:
        ValueError: the module is not quantizable, or a convolution pads other than zeros.
    """
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a quantizable layer")
    weight = layer_weight(module)
    bias = isinstance(getattr(module, "bias", None), Tensor)
    if kind in ("Conv1d", "Conv2d"):
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"{kind} with padding_mode={module.padding_mode!r} has no ONNX "
                             "kernel here; only padding_mode='zeros'")
        nd = weight.dim() - 2
        return LayerSpec(kind=kind, weight_shape=tuple(weight.shape),
                         input_shape=tuple(int(s) for s in input_shape), bias=bias,
                         strides=tuple(int(s) for s in module.stride),
                         pads=_conv_pads(module, nd),
                         dilations=tuple(int(d) for d in module.dilation),
                         group=int(module.groups))
    return LayerSpec(kind=kind, weight_shape=tuple(weight.shape),
                     input_shape=tuple(int(s) for s in input_shape), bias=bias)


def model_specs(model: nn.Module, batch: Batch,
                layers: Sequence[LayerInfo] | None = None) -> dict[str, tuple[LayerSpec, int]]:
    """FQN → (spec of the layer's first call on ``batch``, calls per forward pass).

    Layers that do not run on ``batch`` are left out, and so are those the deployed graph
    does not run as kernels of their own (``nn.MultiheadAttention`` and its ``out_proj``).
    """
    infos = list(layers) if layers is not None else discover(model, batch)
    modules = quantizable_modules(model)
    out = {}
    for info in infos:
        if (info.input_shape is None or info.calls == 0 or info.read_by
                or info.kind == "MultiheadAttention" or info.kind in RNN_KINDS):
            continue
        out[info.name] = (layer_spec(modules[info.name], info.input_shape), info.calls)
    return out


def model_inputs(batch: Batch) -> tuple[list[str], list[Tensor], dict[str, Any]]:
    """Names and tensors of a batch's model inputs (targets dropped), and its constants.

    Positional tensors are named ``input_<i>``; keyword tensors keep their keyword
    (``labels`` excepted). Non-tensor keyword values are returned as constants.
    """
    split = split_batch(batch)
    names, tensors, consts = [], [], {}
    for i, a in enumerate(split.args):
        if not isinstance(a, Tensor):
            raise TypeError(f"positional input {i} is a {type(a).__name__}; ONNX export needs "
                             "tensor inputs")
        names.append(f"input_{i}")
        tensors.append(a)
    for k, v in split.kwargs.items():
        if k == "labels":
            continue
        if isinstance(v, Tensor):
            names.append(k)
            tensors.append(v)
        else:
            consts[k] = v
    return names, tensors, consts


def input_spec(batch: Batch) -> list[dict[str, Any]]:
    """JSON-ready names, shapes and dtypes of a batch's model inputs."""
    names, tensors, _ = model_inputs(batch)
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in zip(names, tensors)]


def batch_from_spec(spec: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Tensor] | Tensor:
    """A synthetic batch matching :func:`input_spec` (floats normal, integers 0, masks 1)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for item in spec:
        dtype = getattr(torch, item["dtype"])
        shape = tuple(item["shape"])
        if dtype.is_floating_point:
            out[item["name"]] = torch.randn(shape, generator=gen).to(dtype)
        elif "mask" in item["name"]:
            out[item["name"]] = torch.ones(shape, dtype=dtype)
        else:
            out[item["name"]] = torch.zeros(shape, dtype=dtype)
    if list(out) == ["input_0"]:
        return out["input_0"]
    if any(n.startswith("input_") for n in out):
        raise ValueError("a synthetic batch with several positional inputs is not supported; "
                         "pass sample_batch=")
    return out


def fused_layers(model: nn.Module) -> set[str]:
    """FQNs of the layers a deployment runs inside a fused float operator: those of
    ``nn.MultiheadAttention`` modules (the attention itself, for its packed
    ``in_proj_weight``, and its ``out_proj``) and the matrices of recurrent modules. No
    low-bit kernel can be swapped in for them."""
    modules = quantizable_modules(model)
    out = {n for n, m in modules.items() if isinstance(m, RecurrentMatrix)}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            proj = f"{name}.out_proj" if name else "out_proj"
            # (and its slices, proj.parts.k, in a sliced model)
            out |= {name} | {n for n in modules if n == proj or n.startswith(f"{proj}.")}
    return out


def fused_stay_float(model: nn.Module, bitmap: Any) -> set[str]:
    """:func:`fused_layers` of ``model``, checked to be float in ``bitmap``.

    Raises:
        ValueError: some of them have fewer than 32 bits (naming them).
    """
    layers = fused_layers(model)
    low = [f"{n} ({bitmap[n].w_bits} bits)" for n in sorted(layers)
           if n in bitmap and bitmap[n].w_bits < 32]
    if low:
        raise ValueError(
            f"{some(low)}: a deployment runs these inside a fused float operator "
            "(PyTorch's attention kernel for nn.MultiheadAttention's in_proj_weight and "
            "out_proj.weight, one LSTM/GRU/RNN operator for recurrent weights) and cannot "
            "swap in a low-bit kernel; give these layers 32 bits (search(profile=...) does)")
    return layers
