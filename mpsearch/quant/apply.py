"""Apply a bit map to a model: simulated (fake) quantization of weights and activations."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mpsearch._report import some
from mpsearch._state import outside_inference_mode
from mpsearch.layers import (
    RecurrentMatrix,
    bake_parametrizations,
    copy_model,
    layer_kind,
    layer_weight,
    parametrized_layers,
    quantizable_modules,
    require_values,
)
from mpsearch.quant.quantizer import QuantConfig, fake_quantize, fake_quantize_activation

if TYPE_CHECKING:
    from mpsearch.bitmap import BitMap

log = logging.getLogger(__name__)


_CACHE: contextvars.ContextVar[dict[tuple[Any, ...], Tensor] | None] = contextvars.ContextVar(
    "mpsearch_weight_cache", default=None)


@contextlib.contextmanager
def weight_cache() -> Iterator[None]:
    """Within this block, :func:`quantize_weight` computes each (weight, bits, config) once.

    A search quantizes every layer at every candidate width in several stages (sensitivity,
    refinement); the MSE range search makes that the costliest part of a probe. Weights
    must not change inside the block (the key includes the tensor's version counter).
    """
    token = _CACHE.set({})
    try:
        yield
    finally:
        _CACHE.reset(token)


def quantize_weight(w: Tensor, kind: str | None, bits: int, cfg: QuantConfig,
                    module: nn.Module | None = None) -> Tensor:
    """Fake-quantized copy of a layer weight, channels taken along the output dimension.

    Hugging Face ``Conv1D`` stores its weight ``(in, out)``; it is transposed so that
    channels are output channels for every layer kind. ``module``: the layer ``w`` belongs
    to; a slice of a layer sliced by input features (:class:`mpsearch.slices.ChannelSlices`)
    is quantized with its rows' ranges in the whole layer, not its own.
    """
    part_of = getattr(module, "slice_of", None)
    if part_of is not None:
        return part_of.quantized(bits, cfg).to(w.dtype)
    cache = _CACHE.get()
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, kind, bits, cfg)
    if cache is not None and key in cache:
        return cache[key]
    if kind == "Conv1D":
        out = fake_quantize(w.detach().t(), bits, cfg).t().contiguous()
    else:
        out = fake_quantize(w.detach(), bits, cfg)
    if cache is not None:
        cache[key] = out
    return out


def weight_error_sq(w: Tensor, kind: str | None, bits: int, cfg: QuantConfig,
                    module: nn.Module | None = None) -> float:
    """‖Q_b(W) − W‖² for a layer weight (``module``: see :func:`quantize_weight`)."""
    if bits >= 32:
        return 0.0
    diff = quantize_weight(w, kind, bits, cfg, module).double() - w.detach().double()
    return float(diff.pow(2).sum())


class ActivationQuantizer:
    """Forward pre-hook that fake-quantizes a layer's input (dynamic, per tensor)."""

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        self.bits = bits
        self.symmetric = symmetric

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            return None
        return (fake_quantize_activation(args[0], self.bits, self.symmetric), *args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantizer(bits={self.bits}, symmetric={self.symmetric})"


@outside_inference_mode
def quantize_(model: nn.Module, bitmap: BitMap) -> nn.Module:
    """Quantize ``model`` in place as the bit map says, and return it.

    Weights are replaced by their fake-quantized values; layers with ``a_bits`` get a
    forward pre-hook that fake-quantizes their input.

    A bit map of a sliced search (``search(..., slices=n)``) applies to the original
    model too: each layer's channels take their slice's width, with the very values the
    sliced model would hold (per-channel and per-group scales are row-wise).

    Raises:
        BitMapError: the bit map does not fit the model (naming the layers), or gives the
            slices of one layer different activation widths (apply it to the sliced model,
            :func:`mpsearch.slice_model`, instead).
    """
    from mpsearch.bitmap import require_bitmap
    from mpsearch.slices import needs_slicing

    require_values(model)
    bitmap = require_bitmap(bitmap)
    if needs_slicing(model, bitmap):
        return _quantize_sliced_(model, bitmap)
    bitmap.check_model(model)
    baked = [n for n in parametrized_layers(model) if n in bitmap and bitmap[n].w_bits < 32]
    if baked:  # the quantized values are stored; a parametrization would recompute them
        bake_parametrizations(model, baked)
    modules = quantizable_modules(model)

    def quantized(name: str) -> Tensor:
        entry = bitmap[name]
        return quantize_weight(layer_weight(modules[name]), entry.kind or layer_kind(
            modules[name]), entry.w_bits, entry.qconfig, modules[name])
    todo = [n for n, e in bitmap.items() if e.w_bits < 32]
    with torch.no_grad():
        # slices by input features take their ranges from the whole layer's weight: all of
        # them are quantized before any is written
        ready = {n: quantized(n) for n in todo
                 if getattr(modules[n], "slice_of", None) is not None}
        for name in todo:
            layer_weight(modules[name]).copy_(ready.pop(name) if name in ready
                                              else quantized(name))
    _hook_inputs(model, modules, {n: e.a_bits for n, e in bitmap.items()})
    return model


def _hook_inputs(model: nn.Module, modules: dict[str, nn.Module],
                 a_bits: dict[str, int | None]) -> None:
    """Fake-quantize the input of each named layer to its width (None, 32: float)."""
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj; recurrent
    # modules read their matrices themselves
    projections = tuple(f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
                        if isinstance(m, nn.MultiheadAttention))
    # (and a sliced out_proj's slices, out_proj.parts.k)
    unhooked = {n for n in modules
                if n in projections or n.startswith(tuple(f"{p}." for p in projections))}
    unhooked |= {n for n, m in modules.items() if isinstance(m, RecurrentMatrix)}
    skipped = []
    # a slice by input features reads some of its layer's input: the layer's whole input
    # is quantized, as the unsliced layer's would be, so its slices must agree (float too)
    parents: dict[int, tuple[Any, set[int | None]]] = {}
    for name, bits in a_bits.items():
        part_of = getattr(modules[name], "slice_of", None)
        parent = None if part_of is None else part_of.parent
        module = modules[name]
        if isinstance(module, RecurrentMatrix) and module.kind == "MultiheadAttention":
            # a slice of a sliced attention's packed projection: the attention's input is
            # its input, quantized as the unsliced attention's is
            parent = model.get_submodule(name.rpartition(".parts.")[0])
        if parent is not None:
            widths = parents.setdefault(id(parent), (parent, set()))[1]
            widths.add(bits if bits is not None and bits < 32 else None)
            if len(widths) > 1:
                from mpsearch.bitmap import BitMapError

                raise BitMapError(f"the slices of the layer holding {name!r} (by input "
                                  "features, or of an attention's packed projection) "
                                  "quantize their input to different widths "
                                  f"{sorted(widths, key=str)}; the layer has one input")
            continue
        if bits is not None and bits < 32:
            if name in unhooked:
                skipped.append(name)
                continue
            modules[name].register_forward_pre_hook(ActivationQuantizer(bits))
    for parent, widths in parents.values():
        (width,) = widths
        if width is not None:
            parent.register_forward_pre_hook(ActivationQuantizer(width))
    if skipped:
        log.warning("a_bits not applied to %s: their weight is read by an enclosing module "
                    "(nn.MultiheadAttention, a recurrent module), so no input of their own "
                    "can be quantized", some(skipped))


def _quantize_sliced_(model: nn.Module, bitmap: BitMap) -> nn.Module:
    """:func:`quantize_` of a sliced bit map on the original model: quantize the sliced
    copy, merge its slices back and write each layer's weight into ``model``."""
    from mpsearch.bitmap import BitMapError
    from mpsearch.slices import merge_slices, slice_model

    assert bitmap.slices is not None
    a_bits = {n: e.a_bits for n, e in bitmap.items()}  # per original layer, below
    for layer, parts in bitmap.slices.slice_names().items():
        widths = {a_bits.pop(p) for p in parts if p in a_bits}
        if len(widths) > 1:
            raise BitMapError(f"the slices of {layer!r} quantize their input to different "
                              f"widths {sorted(widths, key=str)}, but the layer has one "
                              "input" + ("" if layer in bitmap.slices.inputs else
                                         ": apply this bit map to mpsearch.slice_model("
                                         "model, bitmap) instead"))
        a_bits[layer] = widths.pop() if widths else None
    merged = merge_slices(quantize_(slice_model(model, bitmap), bitmap))
    baked = [n for n in parametrized_layers(model) if n in a_bits]
    if baked:
        bake_parametrizations(model, baked)
    source, target = quantizable_modules(merged), quantizable_modules(model)
    with torch.no_grad():
        for name in a_bits:
            layer_weight(target[name]).copy_(layer_weight(source[name]))
    _hook_inputs(model, target, a_bits)
    return model


@outside_inference_mode
def quantize(model: nn.Module, bitmap: BitMap) -> nn.Module:
    """A quantized copy of ``model``; the argument is left untouched.

    A bit map of a sliced search (``search(..., slices=n)``) applied to the original model
    returns the quantized channel-sliced copy (:func:`mpsearch.slice_model`); pass it to
    :func:`mpsearch.merge_slices` for the original structure.

    Raises:
        BitMapError: the bit map does not fit the model (naming the layers).
        ValueError: the model's weights are on the meta device (no values).
    """
    from mpsearch.bitmap import require_bitmap
    from mpsearch.slices import needs_slicing, slice_model

    require_values(model)
    bitmap = require_bitmap(bitmap)
    if needs_slicing(model, bitmap):
        return quantize_(slice_model(model, bitmap), bitmap)
    bitmap.check_model(model)
    return quantize_(copy_model(model), bitmap)

