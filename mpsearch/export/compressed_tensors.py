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

from mpsearch.export._common import (
    build_bitmap,
    expect_dict,
    expect_names,
    imported_entry,
    is_float,
    model_layer_names,
    warn,
)

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
    it, only exact-name ``targets`` are read. Missing ``QuantizationArgs`` fields take
    compressed-tensors' defaults (``num_bits=8``, ``type="int"``, ``symmetric=True``).

    Raises:
        ValueError: no model and a target is a regex or class name; a group without
            ``targets``; a config compressed-tensors refuses; non-integer weights; bits or
            a strategy mpsearch does not take.
        TypeError: a field of the wrong type (``config_groups`` not a dict, ``targets`` not
            a list of names, ``num_bits`` not a number, …).

    Warns:
        ExportWarning: with ``model``, ``targets`` and ``ignore`` entries that match no
            module of it.
    """
    if not isinstance(config, Mapping) and hasattr(config, "model_dump"):
        config = config.model_dump()
    config = expect_dict(FORMAT, config, "the quantization config")
    schemes: dict[str, Mapping[str, Any]]
    if model is not None:
        schemes = _schemes_on(model, config)
    else:
        schemes = {}
        groups = expect_dict(FORMAT, config.get("config_groups") or {}, "config_groups")
        for name, group in groups.items():
            group = expect_dict(FORMAT, group, f"config_groups[{name!r}]")
            if "targets" not in group:
                raise ValueError(f"compressed-tensors: config_groups[{name!r}] has no "
                                 "'targets'")
            for target in expect_names(FORMAT, group["targets"], f"the targets of {name!r}"):
                if target.startswith("re:") or "." not in target:
                    raise ValueError(f"compressed-tensors: target {target!r} of {name!r} is "
                                     "a pattern or class name; pass model= to resolve it")
                schemes[target] = group
        for target in expect_names(FORMAT, config.get("ignore") or [], "ignore"):
            schemes[target] = {}
    settings: dict[str, LayerEntry] = {}
    for fqn, scheme in schemes.items():
        where = f"the scheme of {fqn!r}"
        weights = expect_dict(FORMAT, scheme.get("weights") or {}, f"the weights of {where}")
        if not weights:
            settings[fqn] = imported_entry(FORMAT, repr(fqn), 32)
            continue
        if weights.get("type", "int") != "int":
            raise ValueError(f"compressed-tensors: {fqn!r} has {weights.get('type')!r} "
                             "weights; mpsearch reads integer schemes")
        acts = expect_dict(FORMAT, scheme.get("input_activations") or {},
                           f"the input_activations of {where}")
        settings[fqn] = imported_entry(
            FORMAT, repr(fqn), weights.get("num_bits", 8),
            acts.get("num_bits", 8) if acts else None,
            granularity=weights.get("strategy") or "tensor",
            group_size=weights.get("group_size"), symmetric=weights.get("symmetric", True))
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)


def _schemes_on(model: nn.Module, config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each quantizable layer's scheme as compressed-tensors itself assigns it."""
    import copy

    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.utils import is_match

    try:
        validated = QuantizationConfig.model_validate(dict(config))
    except (ValueError, TypeError, KeyError) as exc:  # pydantic: ValidationError(ValueError)
        raise ValueError(f"compressed-tensors: not a valid QuantizationConfig: {exc}") from None
    names = model_layer_names(model) or []
    shadow = copy.deepcopy(model)
    apply_quantization_config(shadow, validated, show_progress=False)
    modules = dict(shadow.named_modules())
    wanted = [t for g in validated.config_groups.values() for t in g.targets]
    # a recurrent matrix ("rnn.weight_ih_l0", as export writes it to 'ignore') is a layer
    # of ours but no module of torch's: it stays float, and its name is not unmatched
    unmatched = [t for t in dict.fromkeys(wanted + list(validated.ignore or []))
                 if t not in modules and t not in names
                 and not any(is_match(n, m, t) for n, m in modules.items())]
    warn(FORMAT, unmatched, f"ignored (matches no module of {type(model).__name__})",
         unit="target(s)")
    out: dict[str, Mapping[str, Any]] = {}
    for name in names:
        scheme = getattr(modules.get(name), "quantization_scheme", None)
        out[name] = scheme.model_dump() if scheme is not None else {}
    return out
