"""torchao ``FqnToConfig``: per-module quantization configs keyed by fully-qualified name.

Documented in torchao's ``torchao/quantization/quant_api.py`` (``FqnToConfig``: keys are
module or parameter FQNs, ``re:`` regexes or ``_default``; a value of ``None`` leaves the
module alone) and applied with ``torchao.quantization.quantize_(model, config,
filter_fn=None)``. Each quantized layer gets

- ``IntxWeightOnlyConfig(weight_dtype=torch.int<b>, granularity=PerAxis(0) | PerGroup(g),
  mapping_type=SYMMETRIC | ASYMMETRIC)`` (weights of 1–8 bits, activations in float), or
- ``Int8DynamicActivationIntxWeightConfig(weight_dtype=…, weight_granularity=…,
  weight_mapping_type=…)`` where the layer has ``a_bits`` (dynamic int8 activations).

Without torchao, the same configs come in torchao's own serialised form
(``torchao.core.config.config_to_dict``: ``{"_type", "_version", "_data"}``), which
``config_from_dict`` reads back and Hugging Face ``TorchAoConfig`` stores in config.json.

Limits (torchao 0.18, measured): the Intx configs quantize ``nn.Linear`` (and
embedding) weights only — on a ``Conv2d`` ``quantize_`` fails — so convolutions and
Hugging Face ``Conv1D`` layers are left out (``None``) with a warning; per-tensor scales
are not offered (``PerAxis(0)`` is used); activations are 8-bit only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mpsearch.export._common import build_bitmap, is_float, qconfig_for, warn

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FORMAT = "torchao"
_VERSION = 2  # of IntxWeightOnlyConfig / Int8DynamicActivationIntxWeightConfig in torchao 0.18
_LINEAR_KINDS = frozenset({"Linear", None})


def _enum(type_name: str, value: str) -> dict[str, Any]:
    return {"_type": type_name, "_data": value}


def _granularity_dict(entry: LayerEntry) -> dict[str, Any]:
    qc = entry.qconfig
    if qc.granularity == "group":
        return {"_type": "PerGroup", "_version": 1, "_data": {"group_size": qc.group_size}}
    return {"_type": "PerAxis", "_version": 1, "_data": {"axis": 0}}


def _config_dict(entry: LayerEntry) -> dict[str, Any]:
    """One layer's config in ``config_to_dict`` form (torchao 0.18 field names)."""
    mapping = _enum("MappingType", "SYMMETRIC" if entry.qconfig.symmetric else "ASYMMETRIC")
    common = {
        "intx_packing_format": _enum("IntxPackingFormat", "UNPACKED_TO_INT8"),
        "intx_choose_qparams_algorithm": _enum("IntxChooseQParamsAlgorithm", "AFFINE"),
    }
    dtype = {"_type": "torch.dtype", "_data": f"int{entry.w_bits}"}
    if entry.a_bits is not None and not is_float(entry.a_bits):
        data = {"weight_dtype": dtype, "weight_granularity": _granularity_dict(entry),
                "weight_mapping_type": mapping, "weight_scale_dtype": None,
                "act_mapping_type": _enum("MappingType", "ASYMMETRIC"), **common}
        return {"_type": "Int8DynamicActivationIntxWeightConfig", "_version": _VERSION,
                "_data": data}
    data = {"weight_dtype": dtype, "granularity": _granularity_dict(entry),
            "mapping_type": mapping, "scale_dtype": None, **common}
    return {"_type": "IntxWeightOnlyConfig", "_version": _VERSION, "_data": data}


def _config_object(entry: LayerEntry) -> Any:
    import torch
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerAxis,
        PerGroup,
    )

    qc = entry.qconfig
    gran = PerGroup(qc.group_size) if qc.granularity == "group" else PerAxis(0)
    mapping = MappingType.SYMMETRIC if qc.symmetric else MappingType.ASYMMETRIC
    dtype = getattr(torch, f"int{entry.w_bits}")
    if entry.a_bits is not None and not is_float(entry.a_bits):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=gran, weight_mapping_type=mapping)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran, mapping_type=mapping)


def _torchao_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def export(bitmap: BitMap, *, as_dict: bool | None = None) -> Any:
    """torchao ``FqnToConfig`` for the bit map.

    Args:
        bitmap: the bit map.
        as_dict: ``True``: torchao's serialised dict form (``config_to_dict``); ``False``:
            torchao objects (needs torchao); ``None`` (default): objects when torchao is
            importable, else the dict.

    Raises:
        ImportError: ``as_dict=False`` without torchao.
    """
    objects = _torchao_available() if as_dict is None else not as_dict
    configs: dict[str, Any] = {}
    skipped, per_tensor, act_widened, half = [], [], [], []
    for fqn, entry in bitmap.items():
        if is_float(entry.w_bits):
            if entry.w_bits == 16:
                half.append(fqn)
            configs[fqn] = None
            continue
        if entry.kind not in _LINEAR_KINDS:
            skipped.append(f"{fqn} ({entry.kind}, {entry.w_bits} bits)")
            configs[fqn] = None
            continue
        if entry.qconfig.granularity == "tensor":
            per_tensor.append(fqn)
        if entry.a_bits is not None and entry.a_bits < 8:
            act_widened.append(f"{fqn} (a_bits={entry.a_bits})")
        configs[fqn] = _config_object(entry) if objects else _config_dict(entry)
    warn(FORMAT, skipped, "torchao's Intx configs quantize nn.Linear only; left float")
    warn(FORMAT, per_tensor, "per-tensor scales not offered; per-channel PerAxis(0) used")
    warn(FORMAT, act_widened, "activations quantized to 8 bits (torchao's only dynamic "
         "activation width here)")
    warn(FORMAT, half, "float16 weights not offered; left in the model's dtype")
    if objects:
        from torchao.quantization import FqnToConfig

        return FqnToConfig(OrderedDict(configs))
    return {"_type": "FqnToConfig", "_version": 1,
            "_data": {"fqn_to_config": configs, "module_fqn_to_config": configs}}


def _entry_from_dict(key: str, cfg: Mapping[str, Any]) -> LayerEntry:
    from mpsearch.bitmap import LayerEntry

    kind = cfg.get("_type")
    data = cfg.get("_data") or {}
    if kind == "IntxWeightOnlyConfig":
        dtype, gran, mapping, a_bits = (data.get("weight_dtype"), data.get("granularity"),
                                        data.get("mapping_type"), None)
    elif kind == "Int8DynamicActivationIntxWeightConfig":
        dtype, gran, mapping, a_bits = (data.get("weight_dtype"),
                                        data.get("weight_granularity"),
                                        data.get("weight_mapping_type"), 8)
    else:
        raise ValueError(f"torchao: {key!r} has a {kind!r} config; mpsearch reads "
                         "IntxWeightOnlyConfig and Int8DynamicActivationIntxWeightConfig")
    name = (dtype or {}).get("_data", "")
    if not (isinstance(name, str) and name.startswith("int") and name[3:].isdigit()):
        raise ValueError(f"torchao: {key!r} has weight_dtype {dtype!r}; expected torch.intN")
    gran = gran or {}
    group = gran.get("_data", {}).get("group_size") if gran.get("_type") == "PerGroup" else None
    symmetric = (mapping or {}).get("_data", "SYMMETRIC") != "ASYMMETRIC"
    return LayerEntry(w_bits=int(name[3:]), a_bits=a_bits,
                      qconfig=qconfig_for("group" if group else "channel", group, symmetric))


def import_(config: Any, *, model: nn.Module | None = None,
            default_bits: int | None = 32) -> BitMap:
    """A bit map from an ``FqnToConfig`` (object or its ``config_to_dict`` form).

    Keys must be module FQNs (``re:`` patterns and ``_default`` are not resolved); a
    ``None`` config means float. With ``model``, layers not named take ``default_bits``.

    Raises:
        ValueError: a key is a pattern, or a config is not one of the two Intx configs.
    """
    if not isinstance(config, Mapping):
        from torchao.core.config import config_to_dict

        config = config_to_dict(config)
    data = config.get("_data", config) if isinstance(config, Mapping) else {}
    table = data.get("fqn_to_config") or data.get("module_fqn_to_config") or {}
    if not isinstance(table, Mapping):
        raise TypeError(f"torchao: expected an FqnToConfig, got {type(config).__name__}")
    from mpsearch.bitmap import LayerEntry

    settings: dict[str, LayerEntry] = {}
    for key, cfg in table.items():
        if key.startswith("re:") or key == "_default":
            raise ValueError(f"torchao: key {key!r} is a pattern; mpsearch imports FQN keys")
        settings[key] = LayerEntry(w_bits=32) if cfg is None else _entry_from_dict(key, cfg)
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
