"""ONNX Runtime ``TensorQuantOverrides`` for ``onnxruntime.quantization.quantize_static``.

Documented in ONNX Runtime's ``onnxruntime/python/tools/quantization/quantize.py``
(``StaticQuantConfig`` docstring, ``extra_options["TensorQuantOverrides"]``: tensor name →
list of dicts with ``quant_type``, ``symmetric``, ``reduce_range``, ``scale`` /
``zero_point``, ``rmin`` / ``rmax``, and ``axis`` for per-channel weights) and validated
by ``tensor_quant_overrides.py`` (``TensorQuantOverridesHelper``). Keys are ONNX *tensor*
names, so the export needs the ONNX model: each layer's weight initializer is found as
described in :mod:`mpsearch.export._onnx_graph`.

QDQ stores weights as int4/uint4, int8/uint8 or int16/uint16 (``QuantType``): 2–3 bits are
held in a 4-bit type and 5–7 bits in an 8-bit type, with a warning; symmetric layers get
signed types, asymmetric ones unsigned. Per-channel and per-group layers are quantized
per output channel (``axis``; ORT's block size is one global option, not per tensor).
Float layers cannot be expressed as an override: their nodes go to ``nodes_to_exclude``
(:func:`quantize_static` passes them). ``a_bits`` become overrides of the layer's input
tensor (uint4 / uint8); activations of other layers take ``activation_type``, because
static quantization quantizes activations too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsearch._report import some
from mpsearch._state import unfused_attention
from mpsearch.export._common import is_float, warn, widen
from mpsearch.export._onnx_graph import WeightSite, load, weight_sites, weight_types

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.batches import Batch
    from mpsearch.bitmap import BitMap

FORMAT = "onnxruntime"
ORT_BITS = (4, 8, 16)
# ONNX element type → bits it stores
TYPE_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16,
             "FLOAT16": 16, "BFLOAT16": 16, "FLOAT": 32}
OnnxModel = str | os.PathLike[str] | Any


def quant_type_name(bits: int, symmetric: bool) -> str:
    """ORT ``QuantType`` member name for a bit-width held exactly or widened (4, 8, 16)."""
    return f"{'QInt' if symmetric else 'QUInt'}{widen(bits, ORT_BITS)}"


@dataclass(frozen=True)
class OrtPlan:
    """What ``quantize_static`` needs to apply a bit map to one ONNX graph.

    Attributes:
        overrides: ``TensorQuantOverrides`` with ``quant_type`` as ``QuantType`` names.
        nodes_to_exclude: nodes of layers kept float.
        nodes_to_quantize: nodes of the quantized layers (nothing else need be touched).
        sites: each layer's weight site(s) in the graph.
    """

    overrides: dict[str, list[dict[str, Any]]]
    nodes_to_exclude: list[str]
    nodes_to_quantize: list[str]
    sites: dict[str, list[WeightSite]] = field(repr=False)

    def tensor_quant_overrides(self) -> dict[str, list[dict[str, Any]]]:
        """The overrides with real ``QuantType`` members, as ORT expects (needs onnxruntime)."""
        from onnxruntime.quantization import QuantType

        return {t: [{**d, "quant_type": QuantType[d["quant_type"]]} for d in lst]
                for t, lst in self.overrides.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready kwargs of ``quantize_static`` (``QuantType`` as names)."""
        return {"extra_options": {"TensorQuantOverrides": self.overrides},
                "nodes_to_exclude": list(self.nodes_to_exclude),
                "nodes_to_quantize": list(self.nodes_to_quantize)}


def plan(bitmap: BitMap, onnx_model: OnnxModel, *,
         tensor_names: Mapping[str, str] | None = None, strict: bool = True,
         float_activation_bits: int | None = 16) -> OrtPlan:
    """Overrides and exclusions applying ``bitmap`` to ``onnx_model``.

    Args:
        bitmap: the bit map.
        onnx_model: path or ``onnx.ModelProto`` of the float model exported from PyTorch.
        tensor_names: FQN → weight initializer name, for layers not found automatically.
        strict: raise when layers are not found while weighted nodes matched no layer
            (a naming the matcher did not understand); ``False`` warns. Layers simply
            absent from the graph (e.g. a pooler the exported output does not use) only
            warn.
        float_activation_bits: static quantization quantizes the inputs and outputs of
            the nodes it touches; where the map keeps activations float (``a_bits`` None),
            those tensors get this many bits (16: ``QUInt16``, the closest ORT comes to
            float). ``None`` leaves them to ORT's ``activation_type`` (8 bits by default,
            which costs transformers dearly: outliers).

    Raises:
        ValueError: unmatched layers and nodes (with ``strict``), or a weight whose
            channels do not fit its layer.
    """
    graph = load(onnx_model)
    sites, missing, unclaimed = weight_sites(graph, bitmap, tensor_names=tensor_names)
    # ONNX's LSTM/GRU/RNN operators hold every matrix of the module in packed W/R inputs,
    # which quantize_static does not quantize
    recurrent = [n for n in missing if bitmap[n].kind in ("LSTM", "GRU", "RNN")]
    missing = [n for n in missing if n not in recurrent]
    missing = _folded_slices(bitmap, missing, unclaimed, strict=strict)
    warn(FORMAT, [f"{n} ({bitmap[n].w_bits} bits)" for n in recurrent
                  if not is_float(bitmap[n].w_bits)],
         "recurrent weights stay float (ONNX LSTM/GRU/RNN operators, not quantized by "
         "quantize_static)")
    if missing and unclaimed and strict:
        raise ValueError(f"onnxruntime: {len(missing)} layer(s) not matched to the ONNX graph "
                         f"({missing[:6]}) while {len(unclaimed)} weighted node(s) matched no "
                         f"layer ({unclaimed[:4]}); pass tensor_names={{fqn: initializer}} "
                         "or strict=False")
    if missing and not sites and strict:
        raise ValueError(f"onnxruntime: none of the bit map's {len(missing)} layer(s) is in the "
                         "ONNX graph (no Conv, Gemm or MatMul reads a float weight of theirs): "
                         "pass the float model exported from PyTorch (to_onnx), not a "
                         "quantized one; or tensor_names={fqn: initializer}")
    warn(FORMAT, missing, "layers not in the ONNX graph (unused by its outputs?), nothing "
         "to quantize")
    overrides: dict[str, list[dict[str, Any]]] = {}
    excluded: list[str] = []
    quantized: list[str] = []
    widened, grouped, half = [], [], []
    act_bits: dict[str, int] = {}  # the map's own a_bits, per input tensor
    float_bits: dict[str, int] = {}  # everything else a quantized node reads or writes
    for fqn, layer_sites in sites.items():
        entry = bitmap[fqn]
        if is_float(entry.w_bits):
            excluded.extend(s.node for s in layer_sites)
            if entry.w_bits == 16:
                half.append(fqn)
            continue
        held = widen(entry.w_bits, ORT_BITS)
        if held != entry.w_bits:
            widened.append(f"{fqn} ({entry.w_bits} bits in a {held}-bit type)")
        qc = entry.qconfig
        if qc.granularity == "group":
            grouped.append(f"{fqn} (groups of {qc.group_size})")
        for site in layer_sites:
            override: dict[str, Any] = {"quant_type": quant_type_name(entry.w_bits,
                                                                      qc.symmetric),
                                        "symmetric": qc.symmetric}
            if qc.granularity != "tensor":
                override["axis"] = site.axis
            overrides[site.tensor] = [override]
            quantized.append(site.node)
            if entry.a_bits is not None and not is_float(entry.a_bits):
                act_bits[site.activation] = max(act_bits.get(site.activation, 0), entry.a_bits)
            if float_activation_bits is not None:
                float_bits[site.activation] = float_bits[site.output] = float_activation_bits
    for tensor, bits in {**float_bits, **act_bits}.items():
        overrides[tensor] = [{"quant_type": quant_type_name(bits, False)}]
    warn(FORMAT, widened, "bits held in the nearest QDQ type")
    warn(FORMAT, grouped, "per-group scales not offered per tensor; per-channel used")
    warn(FORMAT, half, "float16 weights kept float32 (node excluded from quantization)")
    return OrtPlan({k: overrides[k] for k in sorted(overrides)}, sorted(set(excluded)),
                   sorted(set(quantized)), sites)


def _folded_slices(bitmap: BitMap, missing: list[str], unclaimed: list[str], *,
                   strict: bool) -> list[str]:
    """``missing`` less the float slices the exported graph folded into one tensor (a
    module reading the matrix rebuilt from them: attention's packed projection and
    ``out_proj``): nothing to quantize there. Where such slices are quantized and a node
    reads a weight no layer claims, ``strict`` raises: a QDQ model types a tensor once."""
    if bitmap.slices is None or not missing:
        return missing
    from mpsearch.slices import PART

    folded: dict[str, list[str]] = {}
    for n in missing:
        layer = next((la for la in bitmap.slices.layers if n.startswith(f"{la}.{PART}.")), None)
        if layer is not None:
            folded.setdefault(layer, []).append(n)
    quantized = {layer: names for layer, names in folded.items()
                 if not all(is_float(bitmap[n].w_bits) for n in names)}
    if quantized and unclaimed and strict:
        differ = [la for la, names in quantized.items()
                  if len({(bitmap[n].w_bits, bitmap[n].qconfig) for n in names}) > 1]
        raise ValueError(
            f"onnxruntime: the exported graph holds the slices of {some(sorted(quantized))} as "
            "one weight tensor (the module reads the matrix rebuilt from them: attention's "
            "packed projection and out_proj), which a QDQ model gives one type: export the "
            "model and bit map mpsearch.slices.for_deployment(model, bitmap) returns (slices "
            "of one width merged, as mpsearch apply does)"
            + (f"; the slices of {some(differ)} differ in width: give them one width, or "
               "search per layer (slices=None)" if differ else ""))
    dropped = {n for layer, names in folded.items() if layer not in quantized for n in names}
    return [n for n in missing if n not in dropped]


def export(bitmap: BitMap, *, onnx_model: OnnxModel,
           tensor_names: Mapping[str, str] | None = None, strict: bool = True,
           float_activation_bits: int | None = 16, with_excludes: bool = False,
           as_names: bool | None = None) -> dict[str, Any]:
    """The ``TensorQuantOverrides`` dict: ``extra_options={"TensorQuantOverrides": export}``.

    Args:
        bitmap: the bit map.
        onnx_model: path or ``onnx.ModelProto`` of the float model.
        tensor_names: FQN → weight initializer name, for layers not found automatically.
        strict: as for :func:`plan`.
        float_activation_bits: as for :func:`plan`.
        with_excludes: return ``quantize_static`` keyword arguments instead
            (``{"extra_options": {...}, "nodes_to_exclude": [...], "nodes_to_quantize":
            [...]}``), which also keep float layers and other nodes float.
        as_names: ``quant_type`` as ``QuantType`` names (JSON-ready) rather than members;
            default: members when onnxruntime is importable.

    Raises:
        ValueError: as :func:`plan`.
    """
    p = plan(bitmap, onnx_model, tensor_names=tensor_names, strict=strict,
             float_activation_bits=float_activation_bits)
    if as_names is None:
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError:
            as_names = True
        else:
            as_names = False
    overrides = p.overrides if as_names else p.tensor_quant_overrides()
    if with_excludes:
        return {"extra_options": {"TensorQuantOverrides": overrides},
                "nodes_to_exclude": p.nodes_to_exclude, "nodes_to_quantize": p.nodes_to_quantize}
    warn(FORMAT, [f"{n} (node)" for n in p.nodes_to_exclude],
         "float layers are quantized unless their nodes are excluded: pass "
         "nodes_to_exclude (with_excludes=True) or use quantize_static()")
    return overrides


def load_kwargs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an export written to JSON (``mpsearch export --to onnxruntime --out f.json``)
    back with ``QuantType`` members, which ORT's ``quantize_static`` needs where the file
    holds their names: ``quantize_static(model_in, model_out, reader, **load_kwargs(f))``.
    A file of bare overrides (no ``extra_options``) comes back as such kwargs too.

    Raises:
        ValueError: not JSON, or not an export of this format.
    """
    import json

    from onnxruntime.quantization import QuantType

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(  # noqa: TRY004  (a bad file, like every other)
            f"{path}: not an onnxruntime export (a JSON object expected)")
    kwargs = doc if "extra_options" in doc else {"extra_options": {"TensorQuantOverrides": doc}}
    overrides = kwargs["extra_options"].get("TensorQuantOverrides", {})
    try:
        kwargs["extra_options"]["TensorQuantOverrides"] = {
            t: [{**d, "quant_type": QuantType[d["quant_type"]]} if isinstance(
                d.get("quant_type"), str) else d for d in lst] for t, lst in overrides.items()}
    except (AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an onnxruntime export ({exc!r})") from None
    return kwargs


def quantize_static(onnx_in: OnnxModel, onnx_out: str | os.PathLike[str], bitmap: BitMap,
                    calibration_data_reader: Any, *,
                    tensor_names: Mapping[str, str] | None = None, strict: bool = True,
                    float_activation_bits: int | None = 16, **ort_kwargs: Any) -> OrtPlan:
    """Run ORT's own ``quantize_static`` (QDQ format) with the bit map's overrides.

    Only the bit map's quantized layers are quantized (``nodes_to_quantize``) unless
    ``ort_kwargs`` names ``nodes_to_quantize`` or ``op_types_to_quantize``; other
    ``ort_kwargs`` go to ORT (``activation_type`` defaults to ``QUInt8``; ``extra_options``
    and ``nodes_to_exclude`` are merged with ours).

    Returns:
        The plan that was applied (see :func:`weight_bits` to read back what ORT wrote).
    """
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    p = plan(bitmap, onnx_in, tensor_names=tensor_names, strict=strict,
             float_activation_bits=float_activation_bits)
    if "nodes_to_quantize" not in ort_kwargs and "op_types_to_quantize" not in ort_kwargs:
        ort_kwargs["nodes_to_quantize"] = p.nodes_to_quantize
    extra = dict(ort_kwargs.pop("extra_options", None) or {})
    extra["TensorQuantOverrides"] = {**extra.get("TensorQuantOverrides", {}),
                                     **p.tensor_quant_overrides()}
    exclude = sorted(set(ort_kwargs.pop("nodes_to_exclude", None) or []) |
                     set(p.nodes_to_exclude))
    ort_kwargs.setdefault("activation_type", QuantType.QUInt8)
    ort_kwargs.setdefault("quant_format", QuantFormat.QDQ)
    model_in: Any = onnx_in if not isinstance(onnx_in, os.PathLike) else os.fspath(onnx_in)
    ort_quantize_static(model_in, os.fspath(onnx_out), calibration_data_reader,
                        nodes_to_exclude=exclude, extra_options=extra, **ort_kwargs)
    return p


def weight_bits(onnx_float: OnnxModel, onnx_quantized: OnnxModel, bitmap: BitMap, *,
                tensor_names: Mapping[str, str] | None = None) -> dict[str, tuple[str, int]]:
    """Per layer: the ONNX type its weight is stored in after quantization, and its bits.

    Reads the quantized graph itself (``DequantizeLinear`` inputs), so it checks what ORT
    wrote, not what was asked.
    """
    sites, _, _ = weight_sites(load(onnx_float), bitmap, tensor_names=tensor_names)
    types = weight_types(load(onnx_quantized), sites)
    return {fqn: (t, TYPE_BITS.get(t, 0)) for fqn, t in types.items()}


class BatchReader:
    """ORT ``CalibrationDataReader`` over mpsearch batches (tensors, ``(x, y)`` or dicts).

    Positional inputs fill the graph inputs in order; keyword inputs go by name.
    """

    def __init__(self, batches: Iterable[Batch], onnx_model: OnnxModel) -> None:
        graph = load(onnx_model).graph
        inits = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        self._batches = list(batches)
        self._iter = iter(self._batches)

    def feed(self, batch: Batch) -> dict[str, Any]:
        """The ``{input name: numpy array}`` of one batch."""
        from torch import Tensor

        from mpsearch.batches import split_batch

        split = split_batch(batch)
        feed: dict[str, Any] = {}
        free = [n for n in self.input_names if n not in split.kwargs]
        for name, value in zip(free, split.args):
            feed[name] = value
        feed.update({k: v for k, v in split.kwargs.items() if k in self.input_names})
        return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v
                for k, v in feed.items()}

    def get_next(self) -> dict[str, Any] | None:
        """ORT's protocol: the next feed, or None at the end."""
        batch = next(self._iter, None)
        return None if batch is None else self.feed(batch)

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._iter = iter(self._batches)


def to_onnx(model: nn.Module, batch: Batch, path: str | os.PathLike[str], *,
            opset: int = 17) -> Path:
    """Export ``model`` to ONNX with the TorchScript exporter (no onnxscript needed).

    The graph's output is the model's main tensor (logits, else ``last_hidden_state``);
    weights keep their parameter names (``features.0.weight``) unless the exporter folds
    them (BatchNorm into a conv, transposes for MatMul); inputs are named after the batch's keywords (positional ones ``input_0``, …) and the
    batch dimension (and a sequence dimension for keyword inputs) is dynamic.
    """
    import torch

    from mpsearch.batches import split_batch

    split = split_batch(batch).for_model(model)
    names = [f"input_{i}" for i in range(len(split.args))] + list(split.kwargs)
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names[:len(split.args)]}
    axes.update({n: {0: "batch", 1: "sequence"} for n in split.kwargs})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = _adapter(model, len(split.args), list(split.kwargs))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), unfused_attention():
            torch.onnx.export(adapter, (*split.args, *split.kwargs.values()), os.fspath(path),
                              input_names=names, output_names=["output"], dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
    finally:
        model.train(was_training)
    _strip_prefix(path, "model.")
    return path


def _strip_prefix(path: Path, prefix: str) -> None:
    """Drop the adapter's attribute name from initializer names (``model.fc.weight``)."""
    import onnx

    proto = onnx.load(os.fspath(path))
    graph = proto.graph
    taken = {i.name for i in graph.initializer}
    rename = {i.name: i.name[len(prefix):] for i in graph.initializer
              if i.name.startswith(prefix) and i.name[len(prefix):] not in taken}
    if not rename:
        return
    for init in graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for value in graph.input:
        value.name = rename.get(value.name, value.name)
    onnx.save(proto, os.fspath(path))


def _adapter(model: nn.Module, n_args: int, keys: list[str]) -> nn.Module:
    from torch import nn

    from mpsearch.batches import first_output

    class Positional(nn.Module):
        """Calls the model with keyword inputs passed positionally; returns one tensor."""

        def __init__(self, model: nn.Module, n_args: int, keys: list[str]) -> None:
            super().__init__()
            self.model = model
            self.n_args = n_args
            self.keys = keys

        def forward(self, *inputs: Any) -> Any:
            kwargs = dict(zip(self.keys, inputs[self.n_args:]))
            return first_output(self.model(*inputs[:self.n_args], **kwargs))

    return Positional(model, n_args, keys)


__all__ = ["BatchReader", "OrtPlan", "export", "plan", "quantize_static", "to_onnx",
           "weight_bits"]
