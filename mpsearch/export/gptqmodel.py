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
    is_float,
    literal_of,
    model_layer_names,
    qconfig_for,
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


def resolve(config: Mapping[str, Any], module_name: str) -> dict[str, Any] | None:
    """Settings GPTQModel/vLLM give ``module_name``: base merged with the first matching rule.

    Returns None where a ``-:`` rule excludes the module.
    """
    base = {k: config[k] for k in ("bits", "group_size", "sym") if k in config}
    for pattern, overrides in (config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), module_name):
                return None
        elif re.match(pattern.removeprefix("+:"), module_name):
            return {**base, **overrides}
    return base


def import_(config: Mapping[str, Any], *, model: nn.Module | None = None,
            default_bits: int | None = 32) -> BitMap:
    """A bit map from a GPTQ quantize config with ``dynamic`` rules.

    With ``model``, every quantizable layer is resolved as GPTQModel/vLLM would
    (:func:`resolve`); ``lm_head`` stays float unless ``config["lm_head"]``. Without it,
    only rules naming one module exactly (as :func:`export` writes) are read.

    Raises:
        ValueError: no model and a rule is a general regex; or invalid bits.
    """
    from mpsearch.bitmap import LayerEntry

    if not isinstance(config, Mapping):
        raise TypeError(f"gptqmodel: expected a quantize config dict, got "
                         f"{type(config).__name__}")
    names = model_layer_names(model)
    if names is None:
        names = []
        for pattern in config.get("dynamic") or {}:
            name = literal_of(pattern.removeprefix("-:").removeprefix("+:"))
            if name is None:
                raise ValueError(f"gptqmodel: rule {pattern!r} is a general regex; pass "
                                 "model= to resolve it against the model's layers")
            names.append(name)
    settings: dict[str, LayerEntry] = {}
    for name in names:
        got = resolve(config, name)
        if got is None or "bits" not in got or (name == "lm_head"
                                                and not config.get("lm_head", False)):
            settings[name] = LayerEntry(w_bits=32)
            continue
        gs = got.get("group_size", -1)
        settings[name] = LayerEntry(
            w_bits=int(got["bits"]),
            qconfig=qconfig_for("group" if gs and gs > 0 else "channel", gs,
                                bool(got.get("sym", True))))
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
