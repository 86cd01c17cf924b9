"""``export_onnx``: the mixed-precision model as ONNX, each layer on its real kernel.

The float model is traced by PyTorch's TorchScript ONNX exporter (``dynamo=False``: the
dynamo exporter needs onnxscript, which is not a dependency) with every quantizable layer
replaced, for the trace only, by a marker node ``mpsearch::Layer`` carrying its FQN. Each
marker is then rewritten into the nodes of its format (:mod:`mpsearch.hw.kernels_ort`),
with weights quantized by our quantizer, so the ONNX model computes what
:func:`mpsearch.quantize` simulates (with 8-bit layers' activations quantized too: the
``w8a8`` kernels quantize their input per tensor, as ``a_bits=8`` does).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch._io import atomic_file
from mpsearch._state import outside_inference_mode, unfused_attention
from mpsearch.batches import Batch, first_output, split_batch
from mpsearch.bitmap import BitMap, require_bitmap
from mpsearch.export._common import warn
from mpsearch.hw.formats import format_for
from mpsearch.hw.kernels_ort import OPSET, build_layer
from mpsearch.hw.specs import batch_from_spec, fused_stay_float, model_inputs, model_specs
from mpsearch.layers import (
    RecurrentMatrix,
    fingerprint,
    layer_kind,
    layer_weight,
    model_shapes,
    quantizable_modules,
    require_values,
)

log = logging.getLogger(__name__)

_MARKER_DOMAIN = "mpsearch"
# The tracer accepts only tensors and constants as Function arguments, and no module
# parameter may be touched inside: each marked layer is looked up by FQN during a trace
# and run functionally on the tensors passed in.
_ORIGINAL: dict[str, Any] = {}
_SHAPES: dict[str, tuple[int, ...]] = {}


class _Marker(torch.autograd.Function):
    """Runs a layer in eager mode; traces to one ``mpsearch::Layer`` node."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor,
                fqn: str) -> Tensor:
        out = _functional(_ORIGINAL[fqn], x, weight, bias if bias.numel() else None)
        _SHAPES[fqn] = tuple(out.shape)
        return out

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, fqn: str) -> Any:
        out = g.op(f"{_MARKER_DOMAIN}::Layer", x, fqn_s=fqn)
        # Give the marker its output type, or ONNX shape inference warns once per layer.
        if fqn in _SHAPES and x.type().scalarType() is not None:
            out.setType(x.type().with_sizes(list(_SHAPES[fqn])))
        return out


def _functional(module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out: Tensor = module._conv_forward(x, w, b)
        return out
    if isinstance(module, nn.Linear):
        return F.linear(x, w, b)
    # Hugging Face Conv1D: weight (in, out)
    y = x.reshape(-1, x.shape[-1]) @ w
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[1])


class _Flat(nn.Module):
    """Positional tensors in, the model's first output tensor out (what ONNX can trace)."""

    def __init__(self, model: nn.Module, names: list[str], consts: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.consts = consts

    def forward(self, *tensors: Tensor) -> Tensor:
        args = [t for n, t in zip(self.names, tensors) if n.startswith("input_")]
        kwargs = {n: t for n, t in zip(self.names, tensors) if not n.startswith("input_")}
        out: Tensor = first_output(self.model(*args, **kwargs, **self.consts))
        return out


@contextlib.contextmanager
def _marked(model: nn.Module) -> Iterator[None]:
    # nn.MultiheadAttention and recurrent modules run their own fused operators: no marker
    modules = {n: m for n, m in quantizable_modules(model).items()
               if not isinstance(m, (nn.MultiheadAttention, RecurrentMatrix))}
    try:
        for name, module in modules.items():
            _ORIGINAL[name] = module

            def forward(x: Tensor, *rest: Any, _fqn: str = name, **kw: Any) -> Tensor:
                if rest or kw:
                    raise ValueError(f"layer {_fqn!r} is called with extra arguments; "
                                     "export_onnx supports single-input layers")
                m = modules[_fqn]
                b = getattr(m, "bias", None)
                out: Tensor = _Marker.apply(x, layer_weight(m),
                                            b if isinstance(b, Tensor) else x.new_empty(0), _fqn)
                return out

            module.forward = forward
        yield
    finally:
        for name, module in modules.items():
            module.__dict__.pop("forward", None)
            _ORIGINAL.pop(name, None)


def _trace(model: nn.Module, batch: Batch) -> tuple[Any, list[str]]:
    import onnx

    names, tensors, consts = model_inputs(batch)
    flat = _Flat(model, names, consts).eval()
    buf = io.BytesIO()
    with _marked(model), warnings.catch_warnings(), torch.no_grad(), unfused_attention():
        warnings.simplefilter("ignore")
        torch.onnx.export(flat, tuple(tensors), buf,  # type: ignore[arg-type]
                          dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["output"], do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue()), names


def _conv_output_ranges(model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
    """(min, max) of each convolution's output before its bias, on ``batch``."""
    ranges: dict[str, tuple[float, float]] = {}
    handles = []
    for name, module in quantizable_modules(model).items():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            continue

        def hook(m: nn.Module, _a: Any, out: Tensor, _n: str = name) -> None:
            if isinstance(m.bias, Tensor):
                out = out - m.bias.view(1, -1, *([1] * (out.dim() - 2)))
            lo, hi = float(out.amin()), float(out.amax())
            old = ranges.get(_n, (lo, hi))
            ranges[_n] = (min(lo, old[0]), max(hi, old[1]))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            split = split_batch(batch).for_model(model)
            model(*split.args, **split.kwargs)
    finally:
        for h in handles:
            h.remove()
    return ranges


def build_onnx(model: nn.Module, bitmap: BitMap, batch: Batch) -> Any:
    """The mixed-precision ``onnx.ModelProto`` of ``model`` under ``bitmap``.

    Args:
        model: the float model (left untouched).
        bitmap: bits per layer; 32 keeps a layer float.
        batch: a sample batch: the traced input shapes (fixed in the graph).

    Raises:
        BitMapError: the bit map does not fit the model.
        ValueError: a layer's bits have no real kernel for its kind (the message says why),
            or the model is not float32.
    """
    from onnx import helper

    bitmap.check_model(model, as_is=True)
    require_values(model)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(f"export_onnx writes float32 graphs (its int8/int4 kernels take "
                         f"float32 activations); the model holds "
                         f"{', '.join(sorted(str(d) for d in dtypes))} weights: export "
                         f"model.float() with a float32 sample batch")
    fused_stay_float(model, bitmap)
    was_training = model.training
    model.eval()
    try:
        specs = model_specs(model, batch)
        ranges = _conv_output_ranges(model, batch)
        proto, _ = _trace(model, batch)
    finally:
        model.train(was_training)
    modules = quantizable_modules(model)
    graph = proto.graph
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    seen: dict[str, int] = {}
    other_acts: list[str] = []
    for node in graph.node:
        if node.domain != _MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        fqn = next(a.s.decode() for a in node.attribute if a.name == "fqn")
        spec, _ = specs[fqn]
        entry = bitmap[fqn]
        choice = format_for(spec.kind, spec.reduction, entry.w_bits, entry.qconfig)
        if choice.name is None:
            raise ValueError(f"layer {fqn!r} ({spec.kind}) at {entry.w_bits} bits: "
                             f"{choice.reason}; use 32, 8 or (Linear) 4/2 bits")
        if entry.a_bits is not None and (choice.name, entry.a_bits) != ("w8a8", 8) \
                and fqn not in seen:
            other_acts.append(f"{fqn} (a_bits={entry.a_bits}; its {choice.name} kernel "
                              + ("quantizes its input to 8 bits)" if choice.name == "w8a8"
                                 else "takes float input)"))
        module = modules[fqn]
        seen[fqn] = seen.get(fqn, 0) + 1
        prefix = fqn if seen[fqn] == 1 else f"{fqn}#{seen[fqn]}"
        bias = getattr(module, "bias", None)
        part_of = getattr(module, "slice_of", None)  # a slice by input features
        quantized = (None if part_of is None or entry.qconfig.granularity == "group" else
                     functools.partial(part_of.quantized_tensor, qconfig=entry.qconfig))
        nodes, inits = build_layer(spec, choice.name, node.input[0], node.output[0],
                                   layer_weight(module), bias if isinstance(bias, Tensor) else None,
                                   entry.qconfig, prefix, ranges.get(fqn), quantized)
        new_nodes.extend(nodes)
        new_inits.extend(inits)
    warn("export_onnx", other_acts, "activation bits the kernels do not apply (the graph "
         "computes other values than quantize() simulates)")
    used = {i for n in new_nodes for i in n.input}
    kept = [_tied(i, modules, bitmap, seen) for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.value_info[:]
    opsets = [o for o in proto.opset_import if o.domain not in (_MARKER_DOMAIN, "com.microsoft")]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets + [helper.make_opsetid("com.microsoft", 1)])
    proto.producer_name = "mpsearch"
    # Which layers the graph runs (a layer whose output the first output does not need,
    # e.g. a BERT pooler, is traced away): the latency model counts these only.
    helper.set_model_props(proto, {"mpsearch.layers": json.dumps(sorted(seen))})
    return proto


def _tied(init: Any, modules: dict[str, nn.Module], bitmap: BitMap,
          layers: dict[str, int]) -> Any:
    """A float initializer the graph still reads, or, where it is the weight of a layer
    quantized here that another module shares (an embedding tied to its LM head), that
    weight's quantized values: :func:`mpsearch.quantize` quantizes the one shared tensor,
    so the embedding lookup reads quantized values there too."""
    from onnx import numpy_helper

    from mpsearch.quant.apply import quantize_weight

    value = None
    for fqn in layers:
        entry, module = bitmap[fqn], modules[fqn]
        if entry.w_bits >= 32:
            continue
        weight = layer_weight(module).detach()
        if tuple(init.dims) != tuple(weight.shape):
            continue
        if value is None:
            value = numpy_helper.to_array(init)
        if value.dtype == weight.numpy().dtype and (value == weight.numpy()).all():
            log.info("export_onnx: %s is layer %r's weight, shared with another module: "
                     "written with its %d-bit values", init.name, fqn, entry.w_bits)
            kind = entry.kind or layer_kind(module) or "Linear"
            q = quantize_weight(weight, kind, entry.w_bits, entry.qconfig, module)
            return numpy_helper.from_array(q.numpy(), init.name)
    return init


def graph_layers(proto: Any) -> list[str]:
    """FQNs of the quantizable layers an exported graph runs."""
    for prop in proto.metadata_props:
        if prop.key == "mpsearch.layers":
            return list(json.loads(prop.value))
    raise ValueError("not a graph from mpsearch's build_onnx (no mpsearch.layers property)")


@outside_inference_mode
def export_onnx(model: nn.Module, bitmap: BitMap, path: str | os.PathLike[str], *,
                sample_batch: Batch | None = None, profile: Any = None) -> Path:
    """Write the mixed-precision model as ONNX, each layer on its format's real kernel.

    fp32 layers run ``MatMul``/``Conv``; 8-bit layers run W8A8 ``MatMulInteger`` /
    ``QLinearConv`` with dynamically quantized activations; 4- and 2-bit Linear layers run
    ``MatMulNBits`` (weight-only, ``accuracy_level=4``). Weights are quantized by
    mpsearch's quantizer with each layer's ``qconfig``.

    Args:
        model: the float model (left untouched).
        bitmap: bits per layer.
        path: where to write the ``.onnx`` file (atomically).
        sample_batch: an input batch fixing the graph's input shapes; if None, the input
            shapes recorded for this model in ``profile`` are used.
        profile: a :class:`~mpsearch.HardwareProfile` that profiled this model.

    A bit map of a sliced search may come with the original model: its slices of equal
    width are merged first (:func:`~mpsearch.coalesce`, the same quantized values with
    one kernel call per distinct width) and the model sliced as the merged map says.

    Raises:
        ValueError: no sample batch and no profile record of the model, or a layer's bits
            have no real kernel.
    """
    from mpsearch.hw.profile_data import require_profile
    from mpsearch.slices import for_deployment

    require_values(model)
    bitmap = require_bitmap(bitmap)
    require_profile(profile)
    model, bitmap = for_deployment(model, bitmap)
    if sample_batch is None:
        fp = fingerprint(model_shapes(model))
        rec = profile.model_record(fp) if profile is not None else None
        if rec is None:
            raise ValueError("export_onnx needs sample_batch= (the input shapes to trace), or "
                             "profile= a HardwareProfile that profiled this model")
        sample_batch = batch_from_spec(rec["inputs"])
    proto = build_onnx(model, bitmap, sample_batch)
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    log.info("export_onnx: %s (%d nodes)", path, len(proto.graph.node))
    return path
