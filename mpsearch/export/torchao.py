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

from mpsearch.export._common import build_bitmap, expect_dict, imported_entry, is_float, warn

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


#: config type → its fields of weight dtype, granularity and mapping, its activation bits
#: and its granularity by default (torchao 0.18; both default to int8, SYMMETRIC)
_READ: dict[str, tuple[tuple[str, str, str], int | None, dict[str, Any]]] = {
    "IntxWeightOnlyConfig": (("weight_dtype", "granularity", "mapping_type"), None,
                             {"_type": "PerAxis", "_data": {"axis": 0}}),
    "Int8DynamicActivationIntxWeightConfig": (
        ("weight_dtype", "weight_granularity", "weight_mapping_type"), 8,
        {"_type": "PerGroup", "_data": {"group_size": 32}}),
}
_GRANULARITY = {"PerAxis": "channel", "PerRow": "channel", "PerGroup": "group",
                "PerTensor": "tensor"}


def _entry_from_dict(key: str, cfg: Any) -> LayerEntry:
    where = f"the config of {key!r}"
    kind = expect_dict(FORMAT, cfg, where).get("_type")
    if not isinstance(kind, str) or kind not in _READ:
        raise ValueError(f"torchao: {key!r} has a {kind!r} config; mpsearch reads "
                         f"{' and '.join(_READ)}")
    (f_dtype, f_gran, f_map), a_bits, default_gran = _READ[kind]
    data = expect_dict(FORMAT, cfg.get("_data") or {}, f"'_data' of {where}")

    def field(name: str, default: dict[str, Any]) -> tuple[Any, Any]:
        value = expect_dict(FORMAT, data.get(name) or default, f"{name} of {key!r}")
        return value.get("_type"), value.get("_data")

    _, dtype = field(f_dtype, {"_data": "int8"})
    if not (isinstance(dtype, str) and dtype.startswith("int") and dtype[3:].isdigit()):
        raise ValueError(f"torchao: {key!r} has weight_dtype {dtype!r}; expected torch.intN")
    gran, params = field(f_gran, default_gran)
    params = expect_dict(FORMAT, params or {}, f"{f_gran} of {key!r}")
    granularity = _GRANULARITY.get(gran) if isinstance(gran, str) else None
    if granularity is None or (gran == "PerAxis" and params.get("axis", 0) != 0):
        raise ValueError(f"torchao: {key!r} has {f_gran} {gran}({params}); mpsearch reads "
                         "PerAxis(0), PerRow, PerGroup and PerTensor")
    _, mapping = field(f_map, {"_data": "SYMMETRIC"})
    if mapping not in ("SYMMETRIC", "SYMMETRIC_NO_CLIPPING_ERR", "ASYMMETRIC"):
        raise ValueError(f"torchao: {key!r} has {f_map} {mapping!r}; expected SYMMETRIC or "
                         "ASYMMETRIC")
    return imported_entry(FORMAT, repr(key), int(dtype[3:]), a_bits,
                          granularity=granularity, group_size=params.get("group_size"),
                          symmetric=mapping != "ASYMMETRIC")


def import_(config: Any, *, model: nn.Module | None = None,
            default_bits: int | None = 32) -> BitMap:
    """A bit map from an ``FqnToConfig`` (object or its ``config_to_dict`` form).

    Keys must be module FQNs (``re:`` patterns and ``_default`` are not resolved); a
    ``None`` config means float. Fields a config dict leaves out take torchao's defaults.
    With ``model``, layers not named take ``default_bits``.

    Raises:
        ValueError: not an FqnToConfig, a key is a pattern, a config is not one of the two
            Intx configs, or has settings mpsearch does not take.
        TypeError: a part of the wrong type (not a torchao config, a config not a dict).
    """
    if not isinstance(config, Mapping):
        from torchao.core.config import AOBaseConfig, config_to_dict

        if not isinstance(config, AOBaseConfig):
            raise TypeError(f"torchao: expected an FqnToConfig (or its config_to_dict form), "
                            f"got {type(config).__name__}")
        config = config_to_dict(config)
    config = expect_dict(FORMAT, config, "the FqnToConfig")
    form = "{'_type': 'FqnToConfig', '_data': {'fqn_to_config': {fqn: config}}}"
    if config.get("_type", "FqnToConfig") not in ("FqnToConfig", "ModuleFqnToConfig"):
        raise ValueError(f"torchao: expected an FqnToConfig, got a {config['_type']!r} "
                         f"(the dict form is {form})")
    data = expect_dict(FORMAT, config.get("_data", config), "'_data' of the FqnToConfig")
    if not {"fqn_to_config", "module_fqn_to_config"} & set(data):
        raise ValueError(f"torchao: no 'fqn_to_config' in {sorted(data)[:5]}; expected {form}")
    table = expect_dict(FORMAT, data.get("fqn_to_config") or data.get("module_fqn_to_config")
                        or {}, "fqn_to_config")
    settings: dict[str, LayerEntry] = {}
    for key, cfg in table.items():
        if key.startswith("re:") or key == "_default":
            raise ValueError(f"torchao: key {key!r} is a pattern; mpsearch imports FQN keys")
        settings[key] = (imported_entry(FORMAT, repr(key), 32) if cfg is None
                         else _entry_from_dict(key, cfg))
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
