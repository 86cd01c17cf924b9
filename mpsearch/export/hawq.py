"""HAWQ ``bit_config``: a flat dict of module name → bits.

Documented by example in HAWQ's own repository (Zhen-Dong/HAWQ, ``bit_config.py``:
``bit_config_dict["bit_config_resnet18_uniform4"] = {"quant_input": 8,
"stage1.unit1.quant_convbn1": 4, …}``) and consumed in ``quant_train.py``: for every
``name, m in model.named_modules()`` with ``name in bit_config``, a value that is a tuple
is read as ``(bits, act_range_momentum)``; activation quantizers (``QuantAct``) take it as
``activation_bit``, every other module as ``weight_bit``.

HAWQ's keys are the module names of *its* quantized model (``quant_convbn1`` wraps a
conv + BN), so an FQN of the float model usually needs renaming: pass ``names``
(our FQN → HAWQ module name) and, to carry activation bits, ``act_names`` (our FQN →
the HAWQ ``QuantAct`` feeding that layer). HAWQ has no "keep float" value: layers kept
float are written with 32 bits (a 32-bit grid loses nothing a float32 model can show).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mpsearch.export._common import (
    build_bitmap,
    expect_dict,
    imported_entry,
    model_layer_names,
    warn,
)

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FORMAT = "hawq"
#: HAWQ's ``QuantAct`` keys: ``quant_input``, ``quant_act_int32``, ``stage1.unit1.quant_act``
_ACT_KEY = re.compile(r"(?:^|\.)quant_(?:input|act\w*)$")


def export(bitmap: BitMap, *, names: Mapping[str, str] | None = None,
           act_names: Mapping[str, str] | None = None) -> dict[str, int]:
    """HAWQ ``bit_config``: module name → weight bits (and activation bits via ``act_names``).

    Args:
        bitmap: the bit map.
        names: our FQN → HAWQ module name; layers not in it keep their FQN.
        act_names: our FQN → name of the HAWQ activation quantizer (``QuantAct``) of that
            layer's input; its ``a_bits`` is written there. Without it, activation bits
            are not exported (a warning names the layers that had some).

    Raises:
        ValueError: two layers map to the same HAWQ name with different bits.
    """
    names = dict(names or {})
    act_names = dict(act_names or {})
    out: dict[str, int] = {}
    dropped_act: list[str] = []

    def put(key: str, bits: int, fqn: str) -> None:
        if key in out and out[key] != bits:
            raise ValueError(f"hawq: {fqn!r} maps to {key!r}, which already has "
                             f"{out[key]} bits, not {bits}; give distinct names=")
        out[key] = bits

    for fqn, entry in bitmap.items():
        put(names.get(fqn, fqn), entry.w_bits, fqn)
        if entry.a_bits is not None:
            if fqn in act_names:
                put(act_names[fqn], entry.a_bits, fqn)
            else:
                dropped_act.append(f"{fqn} (a_bits={entry.a_bits})")
    warn(FORMAT, dropped_act, "activation bits not exported (no act_names= entry)")
    return {k: out[k] for k in sorted(out)}


def import_(bit_config: Mapping[str, Any], *, model: nn.Module | None = None,
            names: Mapping[str, str] | None = None, default_bits: int | None = 32) -> BitMap:
    """A bit map from a HAWQ ``bit_config``.

    Values may be ``bits`` or ``(bits, act_range_momentum)`` as in HAWQ. With ``model``,
    HAWQ's activation quantizer keys (``quant_input``, ``…quant_act…``) are skipped, other
    keys that are not quantizable layers of it are skipped with a warning, and layers the
    config does not name take ``default_bits``; without it, every key becomes a layer.

    Args:
        bit_config: the dict.
        model: the float model the config is for (fills kinds, shapes, fingerprint).
        names: HAWQ module name → our FQN, for keys that differ.
        default_bits: bits of model layers the config does not name (None: error).

    Raises:
        TypeError: not a dict of names, or a value is not an integer bit-width (or a tuple
            starting with one).
        ValueError: bits :class:`~mpsearch.bitmap.LayerEntry` does not take (4.5, 9), or no
            key names a layer.

    Warns:
        ExportWarning: with ``model``, keys that are neither layers of it (after ``names``)
            nor activation quantizers: those layers keep ``default_bits``.
    """
    bit_config = expect_dict(FORMAT, bit_config, "bit_config")
    rename = dict(names or {})
    known = model_layer_names(model)
    settings: dict[str, LayerEntry] = {}
    unknown: list[str] = []
    for key, value in bit_config.items():
        bits = value[0] if isinstance(value, (tuple, list)) and value else value
        if isinstance(bits, bool) or not isinstance(bits, (int, float)):
            raise TypeError(f"hawq: {key!r} has {value!r}; expected bits (an int) or a "
                            "(bits, act_range_momentum) tuple")
        fqn = rename.get(key, key)
        if known is not None and fqn not in known:
            if not _ACT_KEY.search(key):
                unknown.append(key if fqn == key else f"{key} (as {fqn})")
            continue
        settings[fqn] = imported_entry(FORMAT, repr(key), bits)
    warn(FORMAT, unknown, f"skipped (not a layer of {type(model).__name__} nor a HAWQ "
         "activation quantizer; map HAWQ names to ours with names=)", unit="key(s)")
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
