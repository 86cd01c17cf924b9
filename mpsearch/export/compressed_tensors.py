"""compressed-tensors ``QuantizationConfig`` (``config_groups``), as read by vLLM and llm-compressor.

Documented by the pydantic models of compressed-tensors
(``compressed_tensors/quantization/quant_config.py``: ``QuantizationConfig`` with
``config_groups: dict[str, QuantizationScheme]``, ``ignore``, ``quant_method``,
``format``; ``quant_scheme.py``: ``QuantizationScheme(targets, weights,
input_activations)``; ``quant_args.py``: ``QuantizationArgs(num_bits, type, symmetric,
strategy, group_size, dynamic)``). ``targets`` are exact module names, ``re:`` regexes or
class names; ``compressed_tensors.quantization.apply_quantization_config`` attaches each
module's scheme (``module.quantization_scheme``) — to ``nn.Linear`` and ``nn.Embedding``
modules only (``lifecycle/apply.py``), so other layers are listed in ``ignore`` with a
warning.

Layers with identical settings share one group whose ``targets`` list their exact names;
float layers go to ``ignore``. Activation bits become dynamic per-token ``input_activations``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mpsearch.export._common import build_bitmap, is_float, model_layer_names, qconfig_for, warn

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FORMAT = "compressed-tensors"


def _weights(entry: LayerEntry) -> dict[str, Any]:
    qc = entry.qconfig
    args: dict[str, Any] = {"num_bits": entry.w_bits, "type": "int",
                            "symmetric": qc.symmetric, "strategy": qc.granularity,
                            "group_size": qc.group_size, "dynamic": False}
    return args


def _activations(entry: LayerEntry) -> dict[str, Any] | None:
    if entry.a_bits is None or is_float(entry.a_bits):
        return None
    return {"num_bits": entry.a_bits, "type": "int", "symmetric": False, "strategy": "token",
            "dynamic": True}


def export(bitmap: BitMap, *, format: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` dict (validates as ``QuantizationConfig``).

    Args:
        bitmap: the bit map.
        format: the ``format`` field (e.g. ``"pack-quantized"``, ``"int-quantized"``,
            ``"mixed-precision"``); None leaves compressed-tensors' default.

    Raises:
        ValueError: every layer of the map is float.
    """
    groups: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    ignore, half, not_linear = [], [], []
    for fqn, entry in bitmap.items():
        if entry.kind not in ("Linear", None) and not is_float(entry.w_bits):
            ignore.append(fqn)
            not_linear.append(f"{fqn} ({entry.kind}, {entry.w_bits} bits)")
            continue
        if is_float(entry.w_bits):
            ignore.append(fqn)
            if entry.w_bits == 16:
                half.append(fqn)
            continue
        scheme = {"weights": _weights(entry), "input_activations": _activations(entry)}
        key = repr(sorted((k, sorted(v.items()) if v else v) for k, v in scheme.items()))
        if key not in keys:
            keys[key] = f"group_{len(keys)}"
            groups[keys[key]] = {"targets": [], **scheme}
        groups[keys[key]]["targets"].append(fqn)
    if not groups:
        raise ValueError("compressed-tensors: every layer of the bit map is float")
    warn(FORMAT, half, "float16 weights listed in 'ignore' (kept in the model's dtype)")
    warn(FORMAT, not_linear, "compressed-tensors quantizes nn.Linear only; listed in 'ignore'")
    out: dict[str, Any] = {"quant_method": "compressed-tensors", "config_groups": groups,
                           "ignore": ignore}
    if format is not None:
        out["format"] = format
    return out


def import_(config: Any, *, model: nn.Module | None = None,
            default_bits: int | None = 32) -> BitMap:
    """A bit map from a compressed-tensors quantization config (dict or pydantic object).

    With ``model``, compressed-tensors' own matching assigns each quantizable layer its
    scheme (``apply_quantization_config`` on a copy; needs compressed-tensors); without
    it, only exact-name ``targets`` are read.

    Raises:
        ValueError: no model and a target is a regex or class name; unsupported args.
    """
    from mpsearch.bitmap import LayerEntry

    if not isinstance(config, Mapping):
        config = config.model_dump()
    groups = config.get("config_groups") or {}
    if model is not None:
        schemes = _schemes_on(model, config)
    else:
        schemes = {}
        for name, group in groups.items():
            for target in group.get("targets", []):
                if target.startswith("re:") or "." not in target:
                    raise ValueError(f"compressed-tensors: target {target!r} of {name!r} is "
                                     "a pattern or class name; pass model= to resolve it")
                schemes[target] = group
        for target in config.get("ignore") or []:
            schemes[target] = {}
    settings: dict[str, LayerEntry] = {}
    for fqn, scheme in schemes.items():
        weights = scheme.get("weights") if scheme else None
        if not weights:
            settings[fqn] = LayerEntry(w_bits=32)
            continue
        if weights.get("type", "int") != "int":
            raise ValueError(f"compressed-tensors: {fqn!r} has {weights.get('type')!r} "
                             "weights; mpsearch reads integer schemes")
        acts = scheme.get("input_activations")
        strategy = weights.get("strategy") or "tensor"
        settings[fqn] = LayerEntry(
            w_bits=int(weights["num_bits"]), a_bits=int(acts["num_bits"]) if acts else None,
            qconfig=qconfig_for(strategy, weights.get("group_size"),
                                bool(weights.get("symmetric", True))))
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)


def _schemes_on(model: nn.Module, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each quantizable layer's scheme as compressed-tensors itself assigns it."""
    import copy

    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    names = model_layer_names(model) or []
    shadow = copy.deepcopy(model)
    apply_quantization_config(shadow, QuantizationConfig.model_validate(dict(config)),
                              show_progress=False)
    modules = dict(shadow.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        scheme = getattr(modules[name], "quantization_scheme", None)
        out[name] = scheme.model_dump() if scheme is not None else {}
    return out
