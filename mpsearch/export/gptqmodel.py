"""GPTQModel / vLLM ``dynamic``: per-module overrides of a GPTQ ``quantize_config``.

Documented in GPTQModel's ``QuantizeConfig`` (``gptqmodel/quantization/config.py``,
``dynamic_get``) and read by vLLM (``vllm/model_executor/layers/quantization/utils/
gptq_utils.py``, ``get_dynamic_override``) from the checkpoint's quantization config:
``dynamic`` maps a regex to a dict of overrides (``bits``, ``group_size``, ``sym``,
``desc_act``); a key starting ``-:`` excludes matching modules from quantization, ``+:``
(or no prefix) applies the overrides. Both tools test the keys in order with
``re.match(pattern, module_name)`` and stop at the first match.

Every layer gets its own anchored rule (``+:^model\\.layers\\.0\\.mlp\\.up_proj$``), so the
result does not depend on rule order. GPTQ stores 2, 3, 4 or 8 bits (vLLM's ``gptq``
kernel checks exactly these; ``gptq_marlin`` only 4 and 8 symmetric): 5–7 bits are
widened to 8, float layers get a ``-:`` rule; activations stay float (GPTQ is
weight-only). vLLM looks rules up under its *fused* module names (``qkv_proj``,
``gate_up_proj``), so layers it fuses should share their bits (``search(tie="fused")``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mpsearch.export._common import (
    build_bitmap,
    exact_pattern,
    expect_dict,
    imported_entry,
    is_float,
    literal_of,
    model_layer_names,
    warn,
    widen,
)

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FORMAT = "gptqmodel"
GPTQ_BITS = (2, 3, 4, 8)
#: kinds whose weight is not a Linear/Conv module's (a packed attention projection, the
#: matrices of recurrent modules)
_NOT_MODULES = frozenset({"MultiheadAttention", "LSTM", "GRU", "RNN"})


def _settings(entry: LayerEntry) -> dict[str, Any]:
    qc = entry.qconfig
    return {"bits": widen(entry.w_bits, GPTQ_BITS),
            "group_size": qc.group_size if qc.granularity == "group" else -1,
            "sym": qc.symmetric}


def export(bitmap: BitMap, *, desc_act: bool = False) -> dict[str, Any]:
    """A GPTQ ``quantize_config`` fragment: base ``bits``/``group_size``/``sym`` + ``dynamic``.

    The base settings are the most common ones among quantized layers; every layer still
    has its own rule. ``group_size=-1`` means one scale per output channel.

    Args:
        bitmap: the bit map.
        desc_act: GPTQ's activation-order flag for the base config.

    Raises:
        ValueError: every layer of the map is float (nothing to quantize).
    """
    dynamic: dict[str, dict[str, Any]] = {}
    widened, per_tensor, acts, unsupported = [], [], [], []
    quantized: list[tuple[int, int, bool]] = []
    for fqn, entry in bitmap.items():
        if entry.kind in _NOT_MODULES and not is_float(entry.w_bits):
            # GPTQModel finds nn.Linear / Conv modules; these weights are not theirs
            unsupported.append(f"{fqn} ({entry.kind}, {entry.w_bits} bits)")
        if is_float(entry.w_bits) or entry.kind in _NOT_MODULES:
            dynamic["-:" + exact_pattern(fqn)] = {}
            continue
        rule = _settings(entry)
        if rule["bits"] != entry.w_bits:
            widened.append(f"{fqn} ({entry.w_bits} → {rule['bits']} bits)")
        if entry.qconfig.granularity == "tensor":
            per_tensor.append(fqn)
        if entry.a_bits is not None and not is_float(entry.a_bits):
            acts.append(f"{fqn} (a_bits={entry.a_bits})")
        dynamic["+:" + exact_pattern(fqn)] = rule
        quantized.append((rule["bits"], rule["group_size"], rule["sym"]))
    if not quantized:
        raise ValueError("gptqmodel: every layer of the bit map is float; nothing to quantize")
    warn(FORMAT, unsupported, "GPTQModel quantizes Linear and convolution modules only; "
                              "excluded (left float)")
    warn(FORMAT, widened, "bits widened to what GPTQ stores (2, 3, 4, 8)")
    warn(FORMAT, per_tensor, "per-tensor scales not offered; per-channel (group_size=-1) used")
    warn(FORMAT, acts, "activation bits dropped (GPTQ quantizes weights only)")
    bits, group_size, sym = Counter(quantized).most_common(1)[0][0]
    out: dict[str, Any] = {"bits": bits, "group_size": group_size, "sym": sym,
                           "desc_act": desc_act, "dynamic": dynamic}
    if "lm_head" in bitmap and not is_float(bitmap["lm_head"].w_bits):
        out["lm_head"] = True
    return out


def _regex(pattern: str) -> str:
    return pattern[2:] if pattern.startswith(("-:", "+:")) else pattern


def _first_rule(dynamic: Mapping[str, Any], module_name: str) -> str | None:
    """The key of the rule both tools apply to ``module_name`` (the first that matches)."""
    return next((p for p in dynamic if re.match(_regex(p), module_name)), None)


def resolve(config: Mapping[str, Any], module_name: str) -> dict[str, Any] | None:
    """Settings GPTQModel/vLLM give ``module_name``: base merged with the first matching rule.

    Returns None where a ``-:`` rule excludes the module.
    """
    base = {k: config[k] for k in ("bits", "group_size", "sym") if k in config}
    dynamic = config.get("dynamic") or {}
    pattern = _first_rule(dynamic, module_name)
    if pattern is None:
        return base
    return None if pattern.startswith("-:") else {**base, **dynamic[pattern]}


def import_(config: Mapping[str, Any], *, model: nn.Module | None = None,
            default_bits: int | None = 32) -> BitMap:
    """A bit map from a GPTQ quantize config with ``dynamic`` rules.

    With ``model``, every quantizable layer is resolved as GPTQModel/vLLM would
    (:func:`resolve`); ``lm_head`` stays float unless ``config["lm_head"]``. Without it,
    only rules naming one module exactly (as :func:`export` writes) are read.

    Raises:
        TypeError: the config, ``dynamic`` or a rule's overrides are not dicts; bits or a
            group size that are not numbers.
        ValueError: no model and a rule is a general regex; a rule that is not a regex; a
            quantized layer without bits (no base ``bits``, none in its rule); bits,
            group size or ``sym`` mpsearch does not take.

    Warns:
        ExportWarning: with ``model``, rules that decide no layer of it (they match none,
            or only layers an earlier rule decides).
    """
    config = expect_dict(FORMAT, config, "the quantize config")
    dynamic = expect_dict(FORMAT, config.get("dynamic") or {}, "'dynamic'")
    for pattern, overrides in dynamic.items():
        expect_dict(FORMAT, overrides, f"the overrides of rule {pattern!r}")
        try:
            re.compile(_regex(pattern))
        except re.error as exc:
            raise ValueError(f"gptqmodel: rule {pattern!r} is not a regex: {exc}") from None
    names = model_layer_names(model)
    if names is None:
        names = []
        for pattern in dynamic:
            name = literal_of(_regex(pattern))
            if name is None:
                raise ValueError(f"gptqmodel: rule {pattern!r} is a general regex; pass "
                                 "model= to resolve it against the model's layers")
            names.append(name)
    settings: dict[str, LayerEntry] = {}
    for name in names:
        got = resolve(config, name)
        if got is None or (name == "lm_head" and not config.get("lm_head", False)):
            settings[name] = imported_entry(FORMAT, repr(name), 32)
            continue
        if "bits" not in got:
            raise ValueError(f"gptqmodel: no bits for {name!r}: the config has no base 'bits' "
                             "and no rule giving it some; expected e.g. {'bits': 4, …}")
        settings[name] = imported_entry(FORMAT, repr(name), got["bits"], granularity="group",
                                        group_size=got.get("group_size", -1),
                                        symmetric=got.get("sym", True))
    used = {_first_rule(dynamic, n) for n in names}
    warn(FORMAT, [p for p in dynamic if p not in used], "ignored (decides no layer: matches "
         "none, or only layers an earlier rule decides)", unit="rule(s)")
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
