"""Helpers shared by the exporters and importers: bit widening, exact regexes, bit maps."""

from __future__ import annotations

import math
import re
import reprlib
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mpsearch.quant import QuantConfig

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FLOAT_BITS = 32
HALF_BITS = 16


class ExportWarning(UserWarning):
    """An export could not say exactly what the bit map says (bits widened, layer skipped)."""


def warn(fmt: str, problems: Sequence[str], what: str, unit: str = "layer(s)") -> None:
    """One warning for all the layers (or ``unit``) an export had to change, naming a few."""
    if not problems:
        return
    shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6
                                       else "")
    warnings.warn(f"{fmt}: {what} for {len(problems)} {unit}: {shown}", ExportWarning,
                  stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the caller's line, outside mpsearch's own frames."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
            "mpsearch."):
        frame, level = frame.f_back, level + 1
    return level


def widen(bits: int, offered: Iterable[int]) -> int:
    """The smallest offered bit-width that holds ``bits`` (the largest offered if none does)."""
    options = sorted(offered)
    for b in options:
        if b >= bits:
            return b
    return options[-1]


def is_float(bits: int) -> bool:
    """16 (half) and 32 (float) are not integer grids."""
    return bits >= HALF_BITS


def exact_pattern(name: str) -> str:
    """A regex matching exactly ``name`` (anchored, escaped)."""
    return "^" + re.escape(name) + "$"


_LITERAL = re.compile(r"\^((?:[^\\.^$*+?()\[\]{}|]|\\.)*)\$")


def literal_of(pattern: str) -> str | None:
    """The name an :func:`exact_pattern` matches, or None for any other regex."""
    m = _LITERAL.fullmatch(pattern)
    if m is None:
        return None
    return re.sub(r"\\(.)", r"\1", m.group(1))


def in_features(entry: LayerEntry) -> int | None:
    """Reduction length of a layer's weight (what a row of its matrix holds), if known."""
    if entry.shape is None:
        return None
    if entry.kind == "Conv1D":
        return int(entry.shape[0])
    return int(math.prod(entry.shape[1:])) if len(entry.shape) > 1 else int(entry.shape[0])


def out_features(entry: LayerEntry) -> int | None:
    """Output channels of a layer's weight, if known."""
    if entry.shape is None:
        return None
    return int(entry.shape[1] if entry.kind == "Conv1D" else entry.shape[0])


def build_bitmap(settings: Mapping[str, LayerEntry], *, source: str,
                 model: nn.Module | None = None, default_bits: int | None = FLOAT_BITS,
                 extra_provenance: Mapping[str, Any] | None = None) -> BitMap:
    """A bit map from imported per-layer settings.

    With ``model``, every quantizable layer gets an entry (``default_bits`` for layers the
    format did not name, kind and shape from the model) and names that are not quantizable
    layers of the model are an error. Without it, only the named layers are in the map,
    without kinds or shapes.

    Raises:
        ValueError: no settings without ``model``, a name is not a quantizable layer of
            ``model``, or a layer has no bits and ``default_bits`` is None.
    """
    from dataclasses import replace

    from mpsearch.bitmap import BitMap, LayerEntry, _provenance
    from mpsearch.layers import fingerprint, layer_kind, layer_weight, quantizable_modules

    prov = {"solver": "imported", "imported_from": source, **(extra_provenance or {})}
    if model is None:
        if not settings:
            raise ValueError(f"{source}: no layer found in the input")
        return BitMap(dict(settings), provenance=_provenance(**prov))
    if not settings:
        warnings.warn(f"{source}: the input names no layer of {type(model).__name__}: "
                      f"every layer takes default_bits={default_bits}", ExportWarning,
                      stacklevel=_caller_level())
    modules = quantizable_modules(model)
    unknown = sorted(set(settings) - set(modules))
    if unknown:
        sliced = ("; it names channel slices (<layer>.parts.<k>) of a sliced search, whose "
                  "slice plan only the mpsearch bit map JSON holds: apply or validate that "
                  "bit map (it slices the model itself)"
                  if any(".parts." in n for n in unknown) else "")
        raise ValueError(f"{source}: not quantizable layers of {type(model).__name__}: "
                         f"{unknown[:10]}; its layers are e.g. {list(modules)[:5]}{sliced}")
    entries: dict[str, LayerEntry] = {}
    missing = []
    for name, module in modules.items():
        shape = tuple(layer_weight(module).shape)
        kind = layer_kind(module)
        if name in settings:
            entries[name] = replace(settings[name], kind=kind, shape=shape)
        elif default_bits is None:
            missing.append(name)
        else:
            entries[name] = LayerEntry(w_bits=default_bits, kind=kind, shape=shape)
    if missing:
        raise ValueError(f"{source}: no bits for {len(missing)} layer(s) of "
                         f"{type(model).__name__} ({missing[:5]}); pass default_bits=")
    shapes = {n: tuple(layer_weight(m).shape) for n, m in modules.items()}
    return BitMap(entries, model_class=type(model).__name__, fingerprint=fingerprint(shapes),
                  provenance=_provenance(**prov))


def qconfig_for(granularity: str, group_size: int | None, symmetric: bool) -> QuantConfig:
    """Our quantizer config for an imported scheme (range method: our default).

    A ``"group"`` scheme without a positive group size (GPTQ's ``group_size=-1``) is per
    channel.

    Raises:
        ValueError: a granularity other than tensor, channel or group.
    """
    if granularity not in ("tensor", "channel", "group"):
        raise ValueError(f"granularity {granularity!r} is not offered; mpsearch reads "
                         "'tensor', 'channel' or 'group'")
    if granularity == "group" and group_size is not None and group_size > 0:
        return QuantConfig(symmetric=symmetric, granularity="group", group_size=group_size)
    return QuantConfig(symmetric=symmetric,
                       granularity="tensor" if granularity == "tensor" else "channel")


def expect_dict(fmt: str, value: Any, what: str) -> Mapping[str, Any]:
    """``value``, checked to be a dict with string keys.

    Raises:
        TypeError: it is not, naming ``what`` and the value seen.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{fmt}: {what} must be a dict, got {type(value).__name__} "
                        f"{reprlib.repr(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{fmt}: the keys of {what} must be strings, got {bad[:3]!r}")
    return value


def expect_names(fmt: str, value: Any, what: str, items: str = "names") -> list[str]:
    """``value``, checked to be a list of strings (a lone string is not one).

    Raises:
        TypeError: it is not, naming ``what`` and the value seen.
    """
    if (not isinstance(value, Sequence) or isinstance(value, str)
            or not all(isinstance(v, str) for v in value)):
        raise TypeError(f"{fmt}: {what} must be a list of {items}, got {reprlib.repr(value)}")
    return list(value)


def imported_entry(fmt: str, where: str, w_bits: Any, a_bits: Any = None, *,
                   granularity: str = "channel", group_size: Any = None,
                   symmetric: Any = False) -> LayerEntry:
    """A layer's entry from the values an importer read (see :func:`qconfig_for`).

    Raises:
        TypeError: bits or group size that are not numbers (``"4"`` is not read as 4).
        ValueError: values :class:`LayerEntry` or :class:`QuantConfig` refuse (4.5 bits,
            9 bits, a non-bool ``symmetric``); both name ``fmt`` and ``where``.
    """
    from mpsearch.bitmap import LayerEntry

    for what, value in (("bits", w_bits), ("activation bits", a_bits),
                        ("group_size", group_size)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise TypeError(f"{fmt}: {where}: {what} must be an integer, got {value!r}")
    try:
        return LayerEntry(w_bits=w_bits, a_bits=a_bits,
                          qconfig=qconfig_for(granularity, group_size, symmetric))
    except ValueError as exc:
        raise ValueError(f"{fmt}: {where}: {exc}") from None


def model_layer_names(model: nn.Module | None) -> list[str] | None:
    """FQNs of the quantizable layers of ``model`` (None without a model)."""
    if model is None:
        return None
    from mpsearch.layers import quantizable_modules

    return list(quantizable_modules(model))
