"""Helpers shared by the exporters and importers: bit widening, exact regexes, bit maps."""

from __future__ import annotations

import math
import re
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


def warn(fmt: str, problems: Sequence[str], what: str) -> None:
    """One warning for all the layers an export had to change, naming a few of them."""
    if not problems:
        return
    shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6
                                       else "")
    # point at the caller's line, not at mpsearch's own frames
    level, frame = 1, sys._getframe(0)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
            "mpsearch."):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{fmt}: {what} for {len(problems)} layer(s): {shown}", ExportWarning,
                  stacklevel=level)


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
        ValueError: a name is not a quantizable layer of ``model``, or a layer has no bits
            and ``default_bits`` is None.
    """
    from dataclasses import replace

    from mpsearch.bitmap import BitMap, LayerEntry, _provenance
    from mpsearch.layers import fingerprint, layer_kind, layer_weight, quantizable_modules

    prov = {"solver": "imported", "imported_from": source, **(extra_provenance or {})}
    if model is None:
        if not settings:
            raise ValueError(f"{source}: no layer found in the input")
        return BitMap(dict(settings), provenance=_provenance(**prov))
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
    """Our quantizer config for an imported scheme (range method: our default)."""
    if granularity == "group" and group_size is not None and group_size > 0:
        return QuantConfig(symmetric=symmetric, granularity="group", group_size=group_size)
    return QuantConfig(symmetric=symmetric,
                       granularity="tensor" if granularity == "tensor" else "channel")


def model_layer_names(model: nn.Module | None) -> list[str] | None:
    """FQNs of the quantizable layers of ``model`` (None without a model)."""
    if model is None:
        return None
    from mpsearch.layers import quantizable_modules

    return list(quantizable_modules(model))
