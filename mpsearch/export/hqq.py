"""HQQ ``dynamic_config``: quantization settings per *linear tag*.

Documented in Hugging Face transformers' ``HqqConfig`` (``dynamic_config``: "a dict of
linear tag → quant config") and implemented in ``transformers/integrations/hqq.py`` and
HQQ's ``hqq/models/base.py``: a module's linear tag is its name without ``model``,
``layers`` and the numeric parts (``model.layers.31.self_attn.k_proj`` →
``self_attn.k_proj``); Linear layers whose tag is in ``dynamic_config`` get that config,
the others stay float (as do all but ``nn.Linear`` layers). Each config is ``BaseQuantizeConfig(nbits, group_size)``, nbits in
HQQ's ``Quantizer.SUPPORTED_BITS`` (8, 6, 5, 4, 3, 2, 1).

A tag is shared by the same layer in every block, so HQQ cannot give ``blk 0`` and
``blk 5`` of one projection different bits: the export gives a tag the most bits any of
its layers has (and the finest groups) and warns, naming the layers that were widened.
The result is ``HqqConfig(**export)``-ready: ``dynamic_config`` and ``skip_modules``
(tags whose layers are all float, replacing HqqConfig's default ``["lm_head"]``).
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
    widen,
)

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FORMAT = "hqq"
HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)


def linear_tag(name: str) -> str:
    """HQQ's tag of a module name (as ``name_to_linear_tag`` in HQQ and transformers)."""
    return ".".join(n for n in name.split(".")
                    if n not in ("model", "layers") and not n.isnumeric())


def _group(entry: LayerEntry) -> int | None:
    qc = entry.qconfig
    return qc.group_size if qc.granularity == "group" else None


def export(bitmap: BitMap) -> dict[str, Any]:
    """``{"dynamic_config": {tag: {"nbits", "group_size"}}, "skip_modules": [...]}``.

    ``group_size`` is None for per-channel layers (one group per output row).

    Raises:
        ValueError: a group size is not a multiple of 8 (HQQ's requirement).
    """
    by_tag: dict[str, list[tuple[str, LayerEntry]]] = {}
    not_linear = []
    for fqn, entry in bitmap.items():
        if entry.kind not in ("Linear", None):
            not_linear.append(f"{fqn} ({entry.kind})")
            continue
        by_tag.setdefault(linear_tag(fqn), []).append((fqn, entry))
    warn(FORMAT, not_linear, "HQQ quantizes nn.Linear only; left float")
    dynamic: dict[str, dict[str, Any]] = {}
    skip, widened, shared, per_tensor = [], [], [], []
    for tag, members in sorted(by_tag.items()):
        quantized = [(f, e) for f, e in members if not is_float(e.w_bits)]
        if not quantized:
            skip.append(tag)
            continue
        nbits = max(widen(e.w_bits, HQQ_BITS) for _, e in quantized)
        groups = [_group(e) for _, e in quantized]
        group = min((g for g in groups if g is not None), default=None)
        if group is not None and group % 8:
            raise ValueError(f"hqq: group_size {group} of tag {tag!r} is not a multiple of 8")
        for fqn, entry in members:
            if is_float(entry.w_bits):
                shared.append(f"{fqn} (float, quantized with tag {tag!r} at {nbits} bits)")
            elif entry.w_bits != nbits:
                widened.append(f"{fqn} ({entry.w_bits} → {nbits} bits, tag {tag!r})")
            elif entry.qconfig.granularity == "tensor":
                per_tensor.append(fqn)
        dynamic[tag] = {"nbits": nbits, "group_size": group}
    warn(FORMAT, widened, "bits widened (HQQ keys settings by linear tag, shared by all "
         "blocks; the tag gets its widest layer)")
    warn(FORMAT, shared, "float layers quantized (their tag has quantized layers)")
    warn(FORMAT, per_tensor, "per-tensor scales not offered; per-channel used")
    acts = [f for f, e in bitmap.items() if e.a_bits is not None and not is_float(e.a_bits)]
    warn(FORMAT, acts, "activation bits dropped (HQQ quantizes weights only)")
    return {"dynamic_config": dynamic, "skip_modules": skip}


def import_(config: Mapping[str, Any], *, model: nn.Module | None = None,
            layer_names: list[str] | None = None, default_bits: int | None = 32) -> BitMap:
    """A bit map from an HQQ ``dynamic_config`` (or ``{"dynamic_config": …}``).

    Tags stand for every layer sharing them, so the layer names come from ``model`` (or
    ``layer_names``); layers whose tag is absent or skipped are float. Each tag's setting
    is ``{"nbits", "group_size"}`` or ``{"weight_quant_params": {…}}`` (as HQQ stores it).

    Raises:
        ValueError: neither ``model`` nor ``layer_names`` given; a setting without
            ``nbits``, or with bits or a group size mpsearch does not take; HqqConfig
            arguments without ``dynamic_config``.
        TypeError: the config, ``dynamic_config``, a setting or ``skip_modules`` of the
            wrong type.

    Warns:
        ExportWarning: tags that no layer has (their settings are ignored).
    """
    config = expect_dict(FORMAT, config, "the config")
    if "dynamic_config" in config:
        dynamic = expect_dict(FORMAT, config["dynamic_config"], "dynamic_config")
        skip = set(expect_names(FORMAT, config.get("skip_modules") or [], "skip_modules"))
    elif "nbits" in config:
        raise ValueError("hqq: HqqConfig arguments without dynamic_config (one setting for "
                         "every layer); mpsearch imports a dynamic_config (tag -> setting)")
    else:
        dynamic, skip = config, set()
    names = model_layer_names(model) or layer_names
    if names is None:
        raise ValueError("hqq: tags stand for many layers; pass model= or layer_names=")
    names = expect_names(FORMAT, names, "layer_names")
    by_tag: dict[str, LayerEntry] = {}
    for tag, cfg in dynamic.items():
        where = f"dynamic_config[{tag!r}]"
        wq = expect_dict(FORMAT, expect_dict(FORMAT, cfg, where).get("weight_quant_params", cfg),
                         f"{where}['weight_quant_params']")
        if "nbits" not in wq:
            raise ValueError(f"hqq: {where} has no 'nbits'; expected e.g. "
                             f"{{'nbits': 4, 'group_size': 64}}, got {cfg!r}")
        by_tag[tag] = imported_entry(FORMAT, where, wq["nbits"], granularity="group",
                                     group_size=wq.get("group_size"))
    settings: dict[str, LayerEntry] = {}
    for name in names:
        tag = linear_tag(name)
        entry = by_tag.get(tag) if tag not in skip else None
        settings[name] = entry or imported_entry(FORMAT, repr(name), 32)
    tags = {linear_tag(n) for n in names}
    warn(FORMAT, sorted(set(by_tag) - tags), "ignored (no layer has the tag; HQQ's tag of "
         "'model.layers.0.self_attn.q_proj' is 'self_attn.q_proj')", unit="tag(s)")
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
