"""Find, in an ONNX graph exported from PyTorch, the weight tensor of each bit-map layer.

ONNX Runtime's overrides are keyed by tensor name, so every layer FQN must be matched to
the initializer its Conv / Gemm / MatMul node reads. Exporters name things differently:

1. the initializer keeps the parameter name (``features.0.weight``; both exporters,
   unless a constant fold renames it);
2. the dynamo exporter records each node's module path in the metadata property
   ``pkg.torch.onnx.name_scopes`` (``['', 'fc1', 'linear']``), also when the weight was
   transposed into a new constant (``val_0``);
3. the TorchScript exporter names nodes by module scope: each module contributes its
   name from the last non-numeric atom on (``/blocks/blocks.0/dw/dw.0/Conv`` for
   ``blocks.0.dw.0``; a ModuleList never called is absent), also when BatchNorm
   folding renamed the weight (``onnx::Conv_106``).

``tensor_names`` (FQN → initializer) overrides all three.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

    from mpsearch.bitmap import BitMap

# op type → input slots that may hold the weight (in order of preference)
_WEIGHTED = {"Conv": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class WeightSite:
    """Where one layer's weight enters the graph.

    Attributes:
        fqn: the layer.
        node: name of the node reading the weight.
        op_type: ``Conv``, ``Gemm`` or ``MatMul``.
        index: input slot of the weight on that node.
        tensor: initializer name.
        axis: output-channel axis of the initializer (per-channel quantization axis).
        activation: the node's data input (what ``a_bits`` quantizes).
        output: the node's output tensor.
    """

    fqn: str
    node: str
    op_type: str
    index: int
    tensor: str
    axis: int
    activation: str
    output: str


def load(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """An ONNX model from a path (external data not loaded) or as given."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    from google.protobuf.json_format import ParseError
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(os.fspath(model), load_external_data=False)
    except (DecodeError, ParseError) as exc:  # not an ONNX file (or .json of another)
        raise ValueError(f"{os.fspath(model)} is not an ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None


def _unqualified(name: str) -> str:
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def _chain(fqn: str) -> list[str]:
    atoms = fqn.split(".")
    return [_unqualified(".".join(atoms[:k])) for k in range(1, len(atoms) + 1)]


def _scope_score(segments: list[str], chain: list[str]) -> tuple[int, int]:
    """(scope segments matched, modules of the FQN skipped) reading from the end; (0, 0): none.

    Leading segments that match nothing are wrapper modules; a module of the FQN may be
    missing from the scope (a ModuleList is never called), so fewer skips rank higher.
    """
    if not segments or segments[-1] != chain[-1]:
        return 0, 0
    j, matched, skipped = len(chain) - 1, 1, 0
    for seg in reversed(segments[:-1]):
        k = next((k for k in range(j - 1, -1, -1) if _same_module(seg, chain[k])), None)
        if k is None:
            break
        j, matched, skipped = k, matched + 1, skipped + (j - k - 1)
    return matched, -skipped


def _same_module(segment: str, link: str) -> bool:
    """A scope segment names the module of a chain link; a numbered child of a container
    is scoped with its parent's attribute (``model.1`` for ``1`` of the ``nn.Sequential``
    an export wrapper holds as ``model``)."""
    return segment == link or (link.isnumeric() and segment.endswith("." + link))


def _best(candidates: Mapping[str, Any]) -> str | None:
    if not candidates:
        return None
    top = max(candidates.values())
    winners = [n for n, s in candidates.items() if s == top]
    return winners[0] if len(winners) == 1 else None


def _layer_of(node: onnx.NodeProto, tensor: str, fqns: list[str],
              chains: dict[str, list[str]]) -> str | None:
    # a model that is itself the layer ('' in the bit map) exports its weight as "weight"
    by_name = {f: len(f) for f in fqns
               if tensor == (f + ".weight" if f else "weight")
               or (f and tensor.endswith("." + f + ".weight"))}
    if by_name:
        return _best(by_name)
    props = {p.key: p.value for p in node.metadata_props}
    if NAME_SCOPES in props:
        try:
            scopes = [str(s) for s in ast.literal_eval(props[NAME_SCOPES])]
        except (ValueError, SyntaxError):
            scopes = []
        for scope in reversed(scopes):
            hits = {f: len(f) for f in fqns if scope == f or scope.endswith("." + f)}
            if hits:
                return _best(hits)
    if node.name.startswith("/"):
        segments = node.name.split("/")[1:-1]
        return _best({f: s for f in fqns if (s := _scope_score(segments, chains[f]))[0]})
    return None


def _axis(node: onnx.NodeProto, index: int, rank: int) -> int:
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        trans = attrs.get("transB" if index == 1 else "transA", 0)
        if index == 1:
            return 0 if trans else 1
        return 1 if trans else 0
    if node.op_type == "MatMul":
        return rank - 1 if index == 1 else rank - 2
    return 0


def weight_sites(model: onnx.ModelProto, bitmap: BitMap, *,
                 tensor_names: Mapping[str, str] | None = None) -> tuple[
                     dict[str, list[WeightSite]], list[str], list[str]]:
    """Each bit-map layer's weight site(s), the layers not found, and the weighted nodes
    no layer was matched to.

    Raises:
        ValueError: a layer's initializer does not have the layer's output channels on
            the per-channel axis (a wrong match), or ``tensor_names`` names a tensor that
            no Conv/Gemm/MatMul reads.
    """
    inits = {i.name: i for i in model.graph.initializer}
    explicit = {t: f for f, t in (tensor_names or {}).items()}
    fqns = [f for f in bitmap if f not in (tensor_names or {})]
    chains = {f: _chain(f) for f in fqns}
    sites: dict[str, list[WeightSite]] = {}
    unclaimed: list[str] = []
    for node in model.graph.node:
        for index in _WEIGHTED.get(node.op_type, ()):
            if index >= len(node.input) or node.input[index] not in inits:
                continue
            tensor = node.input[index]
            fqn = explicit[tensor] if tensor in explicit else _layer_of(node, tensor, fqns,
                                                                         chains)
            if fqn is None:
                unclaimed.append(f"{node.name} ({node.op_type} reading {tensor})")
                break
            dims = list(inits[tensor].dims)
            axis = _axis(node, index, len(dims))
            _check_axis(bitmap, fqn, tensor, dims, axis)
            data = node.input[1 - index] if node.op_type != "Conv" else node.input[0]
            sites.setdefault(fqn, []).append(WeightSite(
                fqn=fqn, node=node.name, op_type=node.op_type, index=index, tensor=tensor,
                axis=axis, activation=data, output=node.output[0]))
            break
    unread = sorted(set(explicit.values()) - set(sites))
    if unread:
        raise ValueError(f"onnxruntime: tensor_names gives {unread} tensors no Conv, Gemm or "
                         "MatMul node reads")
    return sites, [f for f in bitmap if f not in sites], unclaimed


def _check_axis(bitmap: BitMap, fqn: str, tensor: str, dims: list[int], axis: int) -> None:
    from mpsearch.export._common import out_features

    want = out_features(bitmap[fqn])
    if want is not None and dims[axis] != want:
        raise ValueError(f"onnxruntime: {fqn!r} matched tensor {tensor!r} of shape {dims}, "
                         f"whose axis {axis} has {dims[axis]} channels, not the layer's "
                         f"{want}; pass tensor_names={{{fqn!r}: '<initializer>'}}")


def weight_types(quantized: onnx.ModelProto,
                 sites: Mapping[str, list[WeightSite]]) -> dict[str, str]:
    """ONNX element type each layer's weight is stored in, in a quantized graph.

    A weight read through ``DequantizeLinear`` reports its quantized initializer's type
    (``INT4``, ``UINT8``, …); one read directly reports ``FLOAT`` (or its float type).
    """
    import onnx

    nodes = {n.name: n for n in quantized.graph.node}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    inits = {i.name: i for i in quantized.graph.initializer}
    out: dict[str, str] = {}
    for fqn, layer_sites in sites.items():
        kinds = set()
        for site in layer_sites:
            node = nodes.get(site.node)
            if node is None:
                kinds.add("MISSING")
                continue
            name = node.input[site.index]
            producer = producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                name = producer.input[0]
            init: Any = inits.get(name)
            kinds.add(onnx.TensorProto.DataType.Name(init.data_type) if init is not None
                      else "UNKNOWN")
        out[fqn] = "/".join(sorted(kinds))
    return out
