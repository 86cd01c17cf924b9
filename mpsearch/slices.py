"""Channel slices: bits per group of output channels, not only per layer.

Per-layer allocation cannot help a model whose weights sit mostly in one layer (the MNIST
CNN: 97 % in one Linear), or whose layers are about equally sensitive per weight: the
solver has nothing to trade. Inside a layer, output channels differ far more: a ReLU
unit that never fires costs nothing to quantize, and a channel the output leans on costs
a lot. Slicing splits each layer's output channels into ``n`` slices of equal size, ranked
by a per-channel Fisher score, and gives every slice its own bit-width.

It is a model rewrite, not a new kind of layer: :func:`slice_model` replaces each sliced
layer by a :class:`ChannelSlices` module holding ``n`` ordinary ``nn.Linear`` /
``nn.Conv1d`` / ``nn.Conv2d`` layers (named ``<layer>.parts.<k>``) whose outputs are
concatenated and put back in the original channel order. The sliced model computes what
the original computes (up to float rounding), so every stage after it (the estimators,
the solvers, the refinement, the quantizer, validation, ONNX export) works on it
unchanged: to them a slice is a layer. Per-channel and per-group quantization are
row-wise, so a slice at b bits holds exactly the values its rows hold in the whole
layer at b bits; uniform INT4 of the sliced model *is* uniform INT4 of the original.

The ranking: one block-Fisher pass (the ``fisher_block`` estimator's per-sample
gradients), scoring row ``j`` of each layer by ½ Σ_m c_m (g_mj · ΔW_j)², the loss its
quantization error alone would add at the reference width. Rows are sorted by that score
and cut into ``n`` equal runs, most sensitive last, so that channels which want the same
width share a slice.

What it does not slice: grouped convolutions other than depthwise, recurrent weights,
Hugging Face ``Conv1D``, multi-head attention, layers with fewer than ``2 · min_rows``
output channels, and layers that are pinned, excluded or tied. A bit map of a sliced
search names the slices and records the plan (``"slices"`` in its JSON), so
:func:`slice_model` rebuilds the same model from the original and the bit map.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mpsearch.layers import layer_weight

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.losses import Objective
    from mpsearch.quant import QuantConfig

log = logging.getLogger(__name__)

PART = "parts"
"""Attribute of :class:`ChannelSlices` holding the slices: slice k of layer ``fc`` is
``fc.parts.k``."""


def _sliceable(module: nn.Module) -> bool:
    """A plain Linear, or a plain Conv1d/Conv2d that is ungrouped or depthwise (one
    channel per group). Subclasses (``out_proj`` of attention, adapters) may compute
    something else with their weight, so they stay whole."""
    if type(module) is nn.Linear:
        return True
    if type(module) in (nn.Conv1d, nn.Conv2d):
        conv: Any = module
        return conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels
    return False


def _rows(module: nn.Module) -> int:
    return int(layer_weight(module).shape[0])


class ChannelSlices(nn.Module):
    """A layer split by output channels into ordinary layers, one per slice.

    ``parts[k]`` computes the output channels ``rows[k]`` of the original layer; the
    forward concatenates the parts and restores the original channel order.
    """

    def __init__(self, layer: nn.Module, rows: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if not _sliceable(layer):
            raise ValueError(f"cannot slice a {type(layer).__name__} (Linear, and Conv1d/"
                             "Conv2d ungrouped or depthwise, only)")
        n_out = _rows(layer)
        flat = [int(r) for part in rows for r in part]
        if sorted(flat) != list(range(n_out)) or any(len(p) == 0 for p in rows):
            raise ValueError(f"slices must partition the {n_out} output channels into "
                             "non-empty parts")
        self.depthwise = isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        device = layer_weight(layer).device
        self.parts = nn.ModuleList(_part(layer, list(map(int, p))) for p in rows)
        order = torch.tensor(flat, device=device)
        self.inverse: Tensor
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.rows = tuple(tuple(int(r) for r in p) for p in rows)
        self.in_rows: list[Tensor] = ([torch.tensor(p, device=device) for p in self.rows]
                                      if self.depthwise else [])

    def _apply(self, fn: Any, recurse: bool = True) -> ChannelSlices:  # .to(), .cuda()
        self.in_rows = [fn(t) for t in self.in_rows]
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """Run every slice, concatenate, restore the channel order."""
        if self.depthwise:
            outs = [part(x.index_select(1, rows))
                    for rows, part in zip(self.in_rows, self.parts, strict=True)]
        else:
            outs = [part(x) for part in self.parts]
        y = torch.cat(outs, dim=self.channel_dim)
        return y.index_select(self.channel_dim % y.dim(), self.inverse)

    @property
    def weight(self) -> Tensor:
        """The whole layer's weight in the original channel order, built from the slices'
        current (possibly quantized) weights, for a parent module that reads its child's
        weight instead of calling it (``nn.TransformerEncoderLayer``'s fused fast path)."""
        return torch.cat([layer_weight(p) for p in self.parts], 0).index_select(0, self.inverse)

    @property
    def bias(self) -> Tensor | None:
        """The whole layer's bias in the original channel order (None without one)."""
        biases = [b for p in self.parts if isinstance(b := getattr(p, "bias", None), Tensor)]
        if len(biases) != len(self.parts):
            return None
        return torch.cat(biases, 0).index_select(0, self.inverse)

    def merged(self) -> nn.Module:
        """One layer of the original kind holding every slice's (possibly quantized)
        weights in the original channel order."""
        with torch.no_grad():
            weight, bias = self.weight.detach(), self.bias
        return _like(self.parts[0], weight, None if bias is None else bias.detach(),
                     depthwise=self.depthwise)


def _like(template: nn.Module, weight: Tensor, bias: Tensor | None, *,
          depthwise: bool) -> nn.Module:
    """A layer of ``template``'s kind and settings holding ``weight`` (and ``bias``):
    ``weight.shape[0]`` output channels, depthwise (one channel per group) or ungrouped."""
    n = int(weight.shape[0])
    layer: Any = template
    if isinstance(template, nn.Linear):
        out: nn.Module = nn.Linear(template.in_features, n, bias=bias is not None)
    else:
        out = type(template)(n if depthwise else layer.in_channels, n, layer.kernel_size,
                             layer.stride, layer.padding, layer.dilation,
                             n if depthwise else 1, bias is not None, layer.padding_mode)
    out = out.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer_weight(out).copy_(weight)
        if bias is not None:
            out_bias: Any = out.bias
            out_bias.copy_(bias)
    out.train(template.training)
    return out


def _part(layer: nn.Module, rows: list[int]) -> nn.Module:
    """An ordinary layer computing output channels ``rows`` of ``layer``."""
    w = layer_weight(layer).detach()
    idx = torch.tensor(rows, device=w.device)
    bias = getattr(layer, "bias", None)
    return _like(layer, w.index_select(0, idx),
                 bias.detach().index_select(0, idx) if isinstance(bias, Tensor) else None,
                 depthwise=getattr(layer, "groups", 1) > 1)


@dataclass(frozen=True)
class SlicePlan:
    """Which output channels of which layer form each slice.

    Attributes:
        layers: layer FQN → one tuple of output-channel indices per slice (the slices
            partition the layer's channels; slice k becomes ``<layer>.parts.<k>``).
    """

    layers: Mapping[str, tuple[tuple[int, ...], ...]]

    def slice_names(self) -> dict[str, list[str]]:
        """Layer FQN → the FQNs of its slices."""
        return {n: [f"{n}.{PART}.{k}" for k in range(len(p))] for n, p in self.layers.items()}

    def to_dict(self) -> dict[str, list[list[int]]]:
        """Plain JSON: layer FQN → list of channel-index lists."""
        return {n: [list(p) for p in parts] for n, parts in self.layers.items()}

    @classmethod
    def from_dict(cls, d: Any) -> SlicePlan:
        """Build from :meth:`to_dict` output, checking its shape (not the model)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"slices must be an object of layer → channel lists, got "
                             f"{type(d).__name__}")
        layers: dict[str, tuple[tuple[int, ...], ...]] = {}
        for name, parts in d.items():
            if (not isinstance(name, str) or not isinstance(parts, list) or not parts
                    or not all(isinstance(p, list) and p and all(
                        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p)
                        for p in parts)):
                raise ValueError(f"slices of {name!r} must be a non-empty list of non-empty "
                                 "lists of channel indices")
            layers[name] = tuple(tuple(p) for p in parts)
        return cls(layers)


def slice_model(model: nn.Module, plan: SlicePlan | Any) -> nn.Module:
    """A copy of ``model`` with the layers of ``plan`` split into channel slices.

    Args:
        model: the original model; not modified.
        plan: a :class:`SlicePlan`, or a bit map of a sliced search (its ``slices``).

    Raises:
        ValueError: a layer of the plan is missing, not sliceable, or its channel lists do
            not partition its output channels; a bit map that is not from a sliced search.
    """
    if not isinstance(plan, SlicePlan):
        if not hasattr(plan, "slices"):
            raise TypeError(f"plan must be a SlicePlan or a BitMap, got {type(plan).__name__}")
        if plan.slices is None:
            raise ValueError("this bit map is not from a sliced search (no 'slices'); "
                             "quantize the model as it is")
        plan = plan.slices
    sliced = copy.deepcopy(model)
    for name, rows in plan.layers.items():
        try:
            layer = sliced.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the slice plan names layer {name!r}, which the model does "
                             "not have") from None
        if not _sliceable(layer):
            raise ValueError(f"the slice plan names {name!r}, a {type(layer).__name__}, "
                             "which cannot be sliced")
        try:
            replacement = ChannelSlices(layer, rows)
        except ValueError as exc:
            raise ValueError(f"slices of {name!r}: {exc}") from None
        replacement.train(layer.training)
        sliced.set_submodule(name, replacement)
    return sliced


def needs_slicing(model: nn.Module, bitmap: Any) -> bool:
    """Whether ``bitmap`` is from a sliced search and ``model`` is the original (unsliced)."""
    return (isinstance(getattr(bitmap, "slices", None), SlicePlan)
            and not any(isinstance(m, ChannelSlices) for m in model.modules()))


def for_deployment(model: nn.Module, bitmap: Any) -> tuple[nn.Module, Any]:
    """The model and bit map a deployment runs: for a sliced bit map and the original
    model, the slices of equal width merged (:func:`coalesce`: the same values, one kernel
    call per distinct width) and the model sliced as the merged map says; else as given."""
    if not needs_slicing(model, bitmap):
        return model, bitmap
    merged = coalesce(bitmap)
    return (slice_model(model, merged) if merged.slices is not None else model), merged


def merge_slices(model: nn.Module) -> nn.Module:
    """Replace every :class:`ChannelSlices` in ``model`` (in place) by one layer of the
    original kind with its slices' weights: e.g. after :func:`~mpsearch.quantize`, a model
    with the original structure whose channels hold mixed-precision values."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ChannelSlices):
            model.set_submodule(name, module.merged())
    return model


def channel_scores(model: nn.Module, modules: Mapping[str, nn.Module],
                   layers: Sequence[LayerInfo], objective: Objective, bits: int,
                   qconfig: QuantConfig, *, device: torch.device, seed: int = 0,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """Per output channel, ½ Σ_m c_m (g_mj · ΔW_j)²: the loss the channel's quantization
    error at ``bits`` alone adds, by the block Fisher (the ``fisher_block`` estimator's
    per-sample gradients, restricted to one row)."""
    from mpsearch.quant.apply import quantize_weight
    from mpsearch.sensitivity.fisher import Fisher

    names = [info.name for info in layers]
    weights = {n: layer_weight(modules[n]).detach() for n in names}
    deltas = {info.name: (quantize_weight(weights[info.name], info.kind, bits, qconfig)
                          - weights[info.name]).to(weights[info.name].dtype)
              for info in layers}
    scores = {n: np.zeros(int(weights[n].shape[0])) for n in names}
    for weight, grads in Fisher(block=True).gradients(model, weights, objective, device=device,
                                                      seed=seed, progress=progress,
                                                      desc="channel scores"):
        for n in names:
            per_row = (grads[n] * deltas[n][None]).flatten(2).sum(-1).square().sum(0)
            scores[n] += 0.5 * weight * per_row.double().cpu().numpy()
    return scores


def plan_slices(scores: Mapping[str, np.ndarray], n_slices: int, *,
                min_rows: int = 4) -> SlicePlan:
    """Cut each layer's channels, sorted by score, into ``n_slices`` equal runs (fewer
    where the layer has fewer than ``n_slices · min_rows`` channels; none below two).

    Ties in score (e.g. channels that never fire, all 0) keep their index order, so the
    plan is deterministic.
    """
    if not isinstance(n_slices, int) or isinstance(n_slices, bool) or n_slices < 2:
        raise ValueError(f"slices must be an integer >= 2, got {n_slices!r}")
    layers: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, s in scores.items():
        rows = len(s)
        k = min(n_slices, rows // min_rows)
        if k < 2:
            continue
        order = np.argsort(np.asarray(s, dtype=float), kind="stable")
        cuts = [round(i * rows / k) for i in range(k + 1)]
        layers[name] = tuple(tuple(sorted(int(r) for r in order[a:b]))
                             for a, b in itertools.pairwise(cuts))
    return SlicePlan(layers)


def sliceable_layers(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """FQNs of the layers :class:`ChannelSlices` can split: plain Linear / Conv layers
    whose weight no other module shares (slicing would untie it)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [n for n, m in modules.items()
            if _sliceable(m) and uses.get(id(layer_weight(m)), 0) <= 1]


def reference_bits(bits: Sequence[int]) -> int:
    """The width the ranking scores channels at: the candidate nearest 3 bits from above
    (where widths differ most in damage and channels in their want of bits)."""
    low = sorted(b for b in bits if b <= 8)
    if not low:
        raise ValueError(f"slices need a candidate width of 2-8 bits, got {list(bits)}")
    above = [b for b in low if b >= 3]
    return above[0] if above else low[-1]


def coalesce(bitmap: Any) -> Any:
    """The same quantization with fewer slices: slices of a layer that got the same
    settings merge into one, and a layer whose slices all agree is whole again.

    A search rates and places slices one by one, but a deployment pays per slice (one
    kernel call each, then a concatenation); merging slices of equal width changes no
    quantized value (per-channel and per-group quantization are row-wise) and leaves as many calls per
    layer as it has distinct widths. Returns a new bit map (``slices`` None if no layer
    stays sliced); build its model with :func:`slice_model` (or quantize the original
    model with it directly).
    """
    from dataclasses import replace

    from mpsearch.bitmap import BitMap
    from mpsearch.layers import fingerprint

    plan = bitmap.slices
    if plan is None:
        raise ValueError("coalesce needs the bit map of a sliced search (search(..., slices=n))")
    entries = {n: e for n, e in bitmap.items()
               if not any(n.startswith(f"{layer}.{PART}.") for layer in plan.layers)}
    layers: dict[str, tuple[tuple[int, ...], ...]] = {}
    for layer, parts in plan.layers.items():
        groups: dict[Any, list[int]] = {}
        first: dict[Any, Any] = {}
        for k, rows in enumerate(parts):
            entry = bitmap[f"{layer}.{PART}.{k}"]
            key = (entry.w_bits, entry.a_bits, entry.qconfig, entry.tie)
            groups.setdefault(key, []).extend(rows)
            first.setdefault(key, entry)
        merged = [tuple(sorted(rows)) for rows in groups.values()]
        if len(merged) > 1:
            layers[layer] = tuple(merged)
        for j, (key, rows) in enumerate(groups.items()):
            entry = first[key]
            shape = (None if entry.shape is None
                     else (len(rows), *entry.shape[1:]) if len(merged) > 1
                     else (sum(len(p) for p in parts), *entry.shape[1:]))
            name = f"{layer}.{PART}.{j}" if len(merged) > 1 else layer
            entries[name] = replace(entry, shape=shape)
    new_plan = SlicePlan(layers) if layers else None
    return BitMap(entries, model_class=bitmap.model_class,
                  fingerprint=fingerprint({n: e.shape or () for n, e in entries.items()}),
                  budget=bitmap.budget, predicted=bitmap.predicted,
                  provenance={**bitmap.provenance, "coalesced": True}, slices=new_plan)
