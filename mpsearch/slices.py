"""Channel slices: bits per group of output channels (or input features), not only per
layer.

Per-layer allocation cannot help a model whose weights sit mostly in one layer (the MNIST
CNN: 97 % in one Linear), or whose layers are about equally sensitive per weight: the
solver has nothing to trade. Inside a layer, output channels differ far more: a ReLU
unit that never fires costs nothing to quantize, and a channel the output leans on costs
a lot. Slicing splits each layer's output channels into ``n`` slices of equal size, ranked
by a per-channel Fisher score, and gives every slice its own bit-width.

It is a model rewrite, not a new kind of layer: :func:`slice_model` replaces each sliced
layer by a :class:`ChannelSlices` module holding ``n`` ordinary ``nn.Linear`` /
``nn.Conv1d`` / ``nn.Conv2d`` layers (named ``<layer>.parts.<k>``) whose outputs are
concatenated and put back in the original channel order; it answers the replaced layer's
settings (``in_features``, ``kernel_size``, ``dilation``, ...) for a forward that reads
them. The sliced model computes what the original computes (up to float rounding), so every stage after it (the estimators,
the solvers, the refinement, the quantizer, validation, ONNX export) works on it
unchanged: to them a slice is a layer. Per-channel and per-group quantization are
row-wise, so a slice at b bits holds exactly the values its rows hold in the whole
layer at b bits; uniform INT4 of the sliced model *is* uniform INT4 of the original.

The ranking: one block-Fisher pass (the ``fisher_block`` estimator's per-sample
gradients), scoring row ``j`` of each layer by ½ Σ_m c_m (g_mj · ΔW_j)², the loss its
quantization error alone would add at the reference width. Rows are sorted by that score
and cut into ``n`` equal runs, most sensitive last, so that channels which want the same
width share a slice.

By input features: a ``nn.Linear`` can instead be cut by its columns (``inputs=True``:
bias-free parts reading some of the input features, summed). Input features often differ
more than output units: the border pixels of a digit are always 0, a few hidden units
carry most of the signal. The same pass scores column ``i`` by ½ Σ_m c_m (Σ_j g_mji
ΔW_ji)², and :func:`plan_slices` cuts the layer the way :func:`predicted_gain` says
loses less (by :data:`INPUTS_OVER_ROWS` at least). A column slice is quantized with its
rows' ranges in the *whole* layer (one scale per row, as per-channel quantization of the
layer has), so here too a slice at b bits holds exactly what its weights hold in the
whole layer at b bits, and uniform INT4 stays uniform INT4: only where the bits go
changes. On MNIST MLPs this took the worst estimator from 3.1-4.8× to 6.1-8.2× below
uniform INT4 (``results/unseen_models.md``).

Recurrent weights (each matrix of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) are sliced
by rows (gate units) too, though the recurrent module multiplies them itself: the matrix
becomes a :class:`RecurrentSlices` module on the recurrent module, which (now a
:class:`SlicedGRU`, say) hands its kernel the matrix rebuilt from the slices on each call. A GRU that holds 97 % of its weights
in two matrices went from 1.00× (per layer, no better than uniform INT4) to 2.7-3.5×.

Hugging Face's ``Conv1D`` (GPT-2's layers, a Linear whose weight is stored ``(in, out)``)
is cut by its output features into ``nn.Linear`` slices (merged back, a ``Conv1D``): on a
two-block GPT-2 trained on the Lee corpus, the default search went from 3.85× below
uniform INT4 (held out; per layer, when Conv1D could not be cut) to 8.3-10.1×.

Attention (a plain ``nn.MultiheadAttention`` with one packed ``in_proj_weight``) is
sliced the same way: its q/k/v projection by rows, held as slices on the attention
(``attn.parts.k``), which (now a :class:`SlicedMultiheadAttention`) reads the matrix
rebuilt from them (rows grouped by score, as everywhere: a slice may hold rows of q, k
and v, of several heads), and its ``out_proj``, which the attention reads without
calling, by output features (the :class:`ChannelSlices` answers the weight and bias it
reads). On a
model pooling the rows of a digit by attention (64 % of its weights in the projections)
the default search went from 2.1-2.2× (per layer: nothing else to cut) to
4.9-6.1× below uniform INT4 held out. Deployments still run attention in float.

What it does not slice: grouped convolutions other than depthwise, subclasses of the
layer kinds above (they may compute something else with their weights), attention with
separate q/k/v matrices, layers with fewer than ``2 · min_rows``
output channels, layers that are pinned, excluded or tied, and a model that is itself one
bare layer (no parent to hold its slices); by input features, only
``nn.Linear``, and not with per-group scales (``granularity="group"``: a column slice
would cut the groups). A bit map of a sliced
search names the slices and records the plan (``"slices"`` in its JSON), so
:func:`slice_model` rebuilds the same model from the original and the bit map.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mpsearch._state import outside_inference_mode
from mpsearch.layers import (
    RecurrentPart,
    RecurrentWeight,
    layer_kind,
    layer_weight,
    replace_module,
)

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.losses import Objective
    from mpsearch.quant import QuantConfig, QuantizedTensor

log = logging.getLogger(__name__)

PART = "parts"
"""Attribute of :class:`ChannelSlices` holding the slices: slice k of layer ``fc`` is
``fc.parts.k``."""


def _sliceable(module: nn.Module) -> bool:
    """A plain Linear (or Hugging Face Conv1D, or attention's ``out_proj``), a plain
    Conv1d/Conv2d that is ungrouped or depthwise (one channel per group), the packed input
    projection of a plain ``nn.MultiheadAttention`` (by rows:
    :class:`SlicedMultiheadAttention`), or a weight matrix of a recurrent module (by rows:
    :class:`RecurrentSlices`).
    Other subclasses (adapters, LoRA) may compute something else with their weight, so
    they stay whole."""
    if type(module) in (nn.Linear, NonDynamicallyQuantizableLinear) or _is_conv1d(module):
        return True
    if type(module) is nn.MultiheadAttention:
        return layer_kind(module) == "MultiheadAttention"  # packed: one in_proj_weight
    if isinstance(module, RecurrentWeight):  # a plain LSTM / GRU / RNN's matrix
        return type(module.owner) in (*_SLICED_CLASS, *_SLICED_CLASS.values())
    if type(module) in (nn.Conv1d, nn.Conv2d):
        conv: Any = module
        return conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels
    return False


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    return layer_kind(module) == "Conv1D"


def _rows(module: nn.Module) -> int:
    w = layer_weight(module)
    return int(w.shape[1] if _is_conv1d(module) else w.shape[0])


def _as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a Hugging Face ``Conv1D`` computes (its weight
    transposed): its slices are Linear layers, whose rows are its output features."""
    w = layer_weight(conv1d).detach()
    bias = getattr(conv1d, "bias", None)
    linear = nn.Linear(int(w.shape[0]), int(w.shape[1]), bias=isinstance(bias, Tensor),
                       device="meta", dtype=w.dtype).to_empty(device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if isinstance(bias, Tensor):
            linear.bias.copy_(bias.detach())
    linear.train(conv1d.training)
    return linear


#: settings of a Linear / Conv layer that a :class:`ChannelSlices` in its place still answers
_LAYER_SETTINGS = ("in_features", "out_features", "nf", "nx", "in_channels", "out_channels",
                   "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
                   "output_padding", "transposed")


class ChannelSlices(nn.Module):
    """A layer split by output channels (or by input features) into ordinary layers, one
    per slice.

    By output channels (default): ``parts[k]`` computes the output channels ``rows[k]`` of
    the original layer; the forward concatenates the parts and restores the original
    channel order.

    By input features (``inputs=True``, ``nn.Linear`` only): ``parts[k]`` is a bias-free
    Linear reading the input features ``rows[k]``; the forward sums the parts and adds the
    layer's bias. Each part is quantized with its rows' ranges in the *whole* layer
    (:meth:`quantized_part`), so a part at b bits holds exactly the values its columns
    hold in the whole layer at b bits: uniform INT4 of the sliced model is still uniform
    INT4 of the original, and the slices change nothing but where the bits go.
    """

    def __init__(self, layer: nn.Module, rows: Sequence[Sequence[int]], *,
                 inputs: bool = False) -> None:
        super().__init__()
        if (not _sliceable(layer) or isinstance(layer, RecurrentWeight)
                or (inputs and type(layer) is not nn.Linear)):
            raise ValueError(f"cannot slice a {type(layer).__name__} (Linear, and Conv1d/"
                             "Conv2d ungrouped or depthwise, only; by input features, "
                             "Linear only)")
        #: the Hugging Face Conv1D class this layer was (sliced as its Linear), or None
        self.conv1d: type[nn.Module] | None = type(layer) if _is_conv1d(layer) else None
        #: attention's out_proj class (a Linear the attention reads), restored on merging
        self.linear_class: type[nn.Linear] | None = (
            NonDynamicallyQuantizableLinear if type(layer) is NonDynamicallyQuantizableLinear
            else None)
        settings = {k: getattr(layer, k) for k in _LAYER_SETTINGS if hasattr(layer, k)}
        if self.conv1d is not None:
            layer = _as_linear(layer)
        w = layer_weight(layer).detach()
        n_out = int(w.shape[1]) if inputs else _rows(layer)
        flat = [int(r) for part in rows for r in part]
        what = "input features" if inputs else "output channels"
        if sorted(flat) != list(range(n_out)) or any(len(p) == 0 for p in rows):
            raise ValueError(f"slices must partition the {n_out} {what} into non-empty parts")
        self.inputs = inputs
        # the layer's own settings (in_features, kernel_size, dilation, ...), for a model
        # whose forward reads them from the layer it holds (see __getattr__)
        self.layer_settings: dict[str, Any] = settings
        self.depthwise = isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        device = w.device
        self.rows = tuple(tuple(int(r) for r in p) for p in rows)
        order = torch.tensor(flat, device=device)
        self.inverse: Tensor
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.in_rows: list[Tensor] = ([torch.tensor(p, device=device) for p in self.rows]
                                      if self.depthwise or inputs else [])
        self.shared_bias: nn.Parameter | None = None
        # the whole layer's weight built from the parts' current ones, and what it was
        # built from (each part's weight tensor and version): the parts' quantization
        # ranges come from it (see class doc), and reusing one tensor while the parts are
        # unchanged lets quantize_weight's cache serve every part of a layer at a width
        self._whole: tuple[tuple[tuple[int, int], ...], Tensor, list[Tensor]] | None = None
        if inputs:
            linear: Any = layer
            self.parts = nn.ModuleList(
                _like(layer, w.index_select(1, idx), None, depthwise=False)
                for idx in self.in_rows)
            if isinstance(linear.bias, Tensor):
                self.shared_bias = nn.Parameter(linear.bias.detach().clone(),
                                                requires_grad=linear.bias.requires_grad)
            for k, part in enumerate(self.parts):
                object.__setattr__(part, "slice_of", _PartOf(self, k))  # not a submodule
        else:
            self.parts = nn.ModuleList(_part(layer, list(map(int, p))) for p in rows)

    def __getattr__(self, name: str) -> Any:
        """The sliced layer's settings, read as from the layer itself (``conv.dilation``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            settings = self.__dict__.get("layer_settings")
            if settings is not None and name in settings:
                return settings[name]
            raise

    def _apply(self, fn: Any, recurse: bool = True) -> ChannelSlices:  # .to(), .cuda()
        self.in_rows = [fn(t) for t in self.in_rows]
        self._whole = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """Run every slice, concatenate (or sum), restore the channel order."""
        if self.inputs:
            y = sum(part(x.index_select(x.dim() - 1, cols))
                    for cols, part in zip(self.in_rows, self.parts, strict=True))
            assert isinstance(y, Tensor)
            return y if self.shared_bias is None else y + self.shared_bias
        if self.depthwise:
            outs = [part(x.index_select(1, rows))
                    for rows, part in zip(self.in_rows, self.parts, strict=True)]
        else:
            outs = [part(x) for part in self.parts]
        y = torch.cat(outs, dim=self.channel_dim)
        return y.index_select(self.channel_dim % y.dim(), self.inverse)

    def quantized_part(self, k: int, bits: int, qconfig: QuantConfig) -> Tensor:
        """Part ``k`` of a layer sliced by input features, fake-quantized at ``bits`` with
        the ranges of the whole layer's rows: its columns of the whole layer at ``bits``."""
        from mpsearch.quant.apply import quantize_weight

        assert self.inputs
        whole = quantize_weight(self._whole_weight(), "Linear", bits, qconfig)
        return whole.index_select(1, self.in_rows[k])

    def _whole_weight(self) -> Tensor:
        """The whole layer's weight from the parts' current weights (rebuilt only when a
        part's weight changed: trained, loaded, written in place)."""
        weights = [layer_weight(p) for p in self.parts]
        key = tuple((id(w), w._version) for w in weights)
        if self._whole is None or self._whole[0] != key:
            whole = torch.cat([w.detach() for w in weights], 1).index_select(1, self.inverse)
            # the weights are held, so their ids stay theirs while the key is kept
            self._whole = (key, whole, weights)
        return self._whole[1]

    def quantized_tensor_part(self, k: int, bits: int, qconfig: QuantConfig) -> QuantizedTensor:
        """The integers and scales of :meth:`quantized_part` (per-channel or per-tensor
        scales: a part's rows keep the whole layer's), for a runtime kernel."""
        from mpsearch.quant import quantize_tensor

        assert self.inputs
        if qconfig.granularity == "group":
            raise ValueError("a slice by input features cuts per-group scales; it has no "
                             "integer form of its own with granularity='group'")
        whole = quantize_tensor(self._whole_weight(), bits, qconfig)
        return dataclasses.replace(whole, int_values=whole.int_values.index_select(
            1, self.in_rows[k]))

    @property
    def weight(self) -> Tensor:
        """The whole layer's weight in the original channel order, built from the slices'
        current (possibly quantized) weights, for a parent module that reads its child's
        weight instead of calling it (``nn.TransformerEncoderLayer``'s fused fast path)."""
        dim = 1 if self.inputs else 0
        whole = torch.cat([layer_weight(p) for p in self.parts], dim).index_select(
            dim, self.inverse)
        return whole.t() if self.conv1d is not None else whole  # Conv1D stores (in, out)

    @property
    def bias(self) -> Tensor | None:
        """The whole layer's bias in the original channel order (None without one)."""
        if self.inputs:
            return self.shared_bias
        biases = [b for p in self.parts if isinstance(b := getattr(p, "bias", None), Tensor)]
        if len(biases) != len(self.parts):
            return None
        return torch.cat(biases, 0).index_select(0, self.inverse)

    def merged(self) -> nn.Module:
        """One layer of the original kind holding every slice's (possibly quantized)
        weights in the original channel order."""
        with torch.no_grad():
            weight, bias = self.weight.detach(), self.bias
        if self.conv1d is not None:  # Hugging Face's Conv1D(nf, nx), weight (in, out)
            with torch.device("meta"):  # no random initialisation from the global RNG
                out: Any = self.conv1d(int(weight.shape[1]), int(weight.shape[0]))
            out = out.to_empty(device=weight.device).to(weight.dtype)
            with torch.no_grad():
                out.weight.copy_(weight)
                if bias is not None:
                    out.bias.copy_(bias.detach())
                else:
                    out.bias = None
            return out.train(self.parts[0].training)
        template = self.parts[0]
        if self.inputs:
            template = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=False,
                                 device="meta")
            template.train(self.parts[0].training)
        out = _like(template, weight, None if bias is None else bias.detach(),
                    depthwise=self.depthwise)
        if self.linear_class is not None:
            out.__class__ = self.linear_class
        return out


class _PartOf:
    """Where a part of a layer sliced by input features belongs (``part.slice_of``): its
    quantization takes the whole layer's row ranges (:meth:`ChannelSlices.quantized_part`).
    A plain attribute, not a submodule, so the parent is not registered twice."""

    def __init__(self, parent: ChannelSlices, index: int) -> None:
        self.parent = parent
        self.index = index

    def quantized(self, bits: int, qconfig: QuantConfig) -> Tensor:
        return self.parent.quantized_part(self.index, bits, qconfig)

    def quantized_tensor(self, bits: int, qconfig: QuantConfig) -> QuantizedTensor:
        return self.parent.quantized_tensor_part(self.index, bits, qconfig)


class RecurrentSlices(nn.Module):
    """A weight matrix of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` split by rows (gate
    units) into parts, each a layer of its own (:class:`~mpsearch.layers.RecurrentPart`).

    The recurrent module multiplies its matrices itself, so the matrix cannot become
    separate layers the way :class:`ChannelSlices` makes them: this module takes the
    matrix's place on the recurrent module (``rnn.weight_hh_l0`` is this module; slice k
    is ``rnn.weight_hh_l0.parts.k``), and the recurrent module, now a
    :class:`SlicedGRU` (or LSTM, RNN), hands its kernel the whole matrix rebuilt from the
    parts' current weights (quantized, substituted by ``torch.func.functional_call``,
    trained) in the original row order on every call.
    Rows are quantized row-wise, so uniform INT4 of the parts is uniform INT4 of the
    matrix.
    """

    def __init__(self, weight: Tensor, kind: str, rows: Sequence[Sequence[int]], *,
                 requires_grad: bool = True) -> None:
        super().__init__()
        n = int(weight.shape[0])
        flat = [int(r) for part in rows for r in part]
        if sorted(flat) != list(range(n)) or any(len(p) == 0 for p in rows):
            raise ValueError(f"slices must partition the {n} rows into non-empty parts")
        self.rows = tuple(tuple(int(r) for r in p) for p in rows)
        self.inverse: Tensor
        self.register_buffer("inverse", torch.argsort(torch.tensor(flat, device=weight.device)),
                             persistent=False)
        w = weight.detach()
        self.parts = nn.ModuleList(
            RecurrentPart(w.index_select(0, torch.tensor(p, device=w.device)), kind,
                          requires_grad=requires_grad) for p in self.rows)

    @property
    def weight(self) -> Tensor:
        """The whole matrix in the original row order, from the parts' current weights."""
        return torch.cat([layer_weight(p) for p in self.parts], 0).index_select(0, self.inverse)

    def forward(self, *_: Any) -> Tensor:
        raise RuntimeError("RecurrentSlices is read by its recurrent module, never called")


class _SlicedRecurrent(nn.RNNBase):
    """What a recurrent module with sliced matrices becomes (its class is swapped for
    :class:`SlicedLSTM` / :class:`SlicedGRU` / :class:`SlicedRNN`): the list of matrices its
    kernel reads, ``_flat_weights``, is built on every read, from the current parameters
    and the sliced matrices rebuilt from their parts, and never stored. So quantized,
    substituted (``torch.func.functional_call``) and trained parts act at once, and
    concurrent forward passes share no state."""

    @property
    def _flat_weights(self) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for name in self._flat_weights_names:
            held = self._modules.get(name)
            out.append(held.weight if isinstance(held, RecurrentSlices)
                       else getattr(self, name, None))
        return out

    @_flat_weights.setter
    def _flat_weights(self, _value: Any) -> None:  # RNNBase keeps it up to date: no need
        pass

    def _init_flat_weights(self) -> None:
        # nothing to cache (``_weights_have_changed`` then never asks for a rebuild)
        self._flat_weight_refs = [None] * len(self._flat_weights_names)

    def flatten_parameters(self) -> None:
        """No single cuDNN buffer: the matrices are rebuilt on each call."""


class SlicedLSTM(_SlicedRecurrent, nn.LSTM):
    """An ``nn.LSTM`` some of whose matrices are :class:`RecurrentSlices`."""


class SlicedGRU(_SlicedRecurrent, nn.GRU):
    """An ``nn.GRU`` some of whose matrices are :class:`RecurrentSlices`."""


class SlicedRNN(_SlicedRecurrent, nn.RNN):
    """An ``nn.RNN`` some of whose matrices are :class:`RecurrentSlices`."""


#: the recurrent classes whose matrices can be sliced, and what they become
_SLICED_CLASS: dict[type[nn.RNNBase], type[nn.RNNBase]] = {
    nn.LSTM: SlicedLSTM, nn.GRU: SlicedGRU, nn.RNN: SlicedRNN}


def _slice_recurrent(model: nn.Module, name: str, rows: Sequence[Sequence[int]]) -> None:
    """Replace recurrent weight ``name`` (``rnn.weight_hh_l0``) of ``model`` in place by
    :class:`RecurrentSlices` of ``rows``."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    assert isinstance(owner, nn.RNNBase)
    view = RecurrentWeight(owner, attr)
    weight = view.weight
    holder = RecurrentSlices(weight, view.kind, rows, requires_grad=weight.requires_grad)
    holder.train(owner.training)
    if type(owner) in _SLICED_CLASS:
        owner.__class__ = _SLICED_CLASS[type(owner)]
        owner.__dict__.pop("_flat_weights", None)  # the class builds it now
    delattr(owner, attr)
    owner.add_module(attr, holder)
    owner._init_flat_weights()


def _merge_recurrent(owner: nn.RNNBase) -> None:
    """Put plain parameters back in place of ``owner``'s :class:`RecurrentSlices` (holding
    their current, possibly quantized, rows), in the original order, and give it back its
    own class."""
    for attr in owner._flat_weights_names:
        held = owner._modules.get(attr)
        if isinstance(held, RecurrentSlices):
            with torch.no_grad():
                weight = held.weight.detach().clone()
            trainable = any(p.weight.requires_grad for p in held.parts)
            del owner._modules[attr]
            owner.register_parameter(attr, nn.Parameter(weight, requires_grad=trainable))
    for attr in owner._flat_weights_names:  # parameters in the order the module made them
        if attr in owner._parameters:
            owner._parameters[attr] = owner._parameters.pop(attr)
    plain = {v: k for k, v in _SLICED_CLASS.items()}.get(type(owner))
    if plain is not None:
        owner.__class__ = plain
    owner._init_flat_weights()


class SlicedMultiheadAttention(nn.MultiheadAttention):
    """What an ``nn.MultiheadAttention`` whose packed input projection is sliced becomes
    (its class is swapped): ``in_proj_weight`` is no longer a parameter but its rows held
    as slices, ``parts[k]`` (a :class:`~mpsearch.layers.RecurrentPart` of kind
    ``"MultiheadAttention"``: slice k of attention ``attn`` is ``attn.parts.k``), and the
    attention's forward (and ``nn.TransformerEncoderLayer``'s fused fast path, which reads
    it) gets the whole matrix rebuilt from the parts' current weights (quantized,
    substituted by ``torch.func.functional_call``, trained) in the original row order on
    every read. Rows are quantized row-wise, so uniform INT4 of the parts is uniform INT4
    of the projection. The rebuilt matrix is a new tensor: write into the parts
    (``nn.init`` on ``in_proj_weight`` does not reach them), or :func:`merge_slices`
    first."""

    #: read by :func:`mpsearch.layers.layer_kind`: the attention is no longer a layer
    #: itself (its slices are)
    in_proj_sliced = True
    in_proj_inverse: Tensor

    @property
    def in_proj_weight(self) -> Tensor:  # type: ignore[override]
        """The whole packed q/k/v projection, from the slices' current weights."""
        parts: Any = self._modules["parts"]
        return torch.cat([p.weight for p in parts], 0).index_select(0, self.in_proj_inverse)

    @property
    def rows(self) -> tuple[tuple[int, ...], ...]:
        """The rows of ``in_proj_weight`` each slice holds."""
        order = torch.argsort(self.in_proj_inverse).tolist()
        parts: Any = self._modules["parts"]
        out, start = [], 0
        for p in parts:
            n = int(p.weight.shape[0])
            out.append(tuple(sorted(int(r) for r in order[start:start + n])))
            start += n
        return tuple(out)


def _slice_attention(attn: nn.MultiheadAttention, rows: Sequence[Sequence[int]]) -> None:
    """Split ``attn``'s ``in_proj_weight`` in place into slices of ``rows``
    (:class:`SlicedMultiheadAttention`)."""
    weight = layer_weight(attn)
    n = int(weight.shape[0])
    flat = [int(r) for part in rows for r in part]
    if sorted(flat) != list(range(n)) or any(len(p) == 0 for p in rows):
        raise ValueError(f"slices must partition the {n} rows into non-empty parts")
    w = weight.detach()
    parts = nn.ModuleList(
        RecurrentPart(w.index_select(0, torch.tensor(list(p), device=w.device)),
                      "MultiheadAttention", requires_grad=weight.requires_grad)
        for p in rows).train(attn.training)
    del attn._parameters["in_proj_weight"]
    attn.add_module(PART, parts)
    attn.register_buffer("in_proj_inverse",
                         torch.argsort(torch.tensor(flat, device=w.device)), persistent=False)
    attn.__class__ = SlicedMultiheadAttention


def _merge_attention(attn: SlicedMultiheadAttention) -> None:
    """Put a plain ``in_proj_weight`` parameter back in place of ``attn``'s slices (their
    current, possibly quantized, rows in the original order), and its own class."""
    with torch.no_grad():
        weight = attn.in_proj_weight.detach().clone()
    parts: Any = attn._modules[PART]
    trainable = any(p.weight.requires_grad for p in parts)
    del attn._modules[PART]
    del attn._buffers["in_proj_inverse"]
    plain: Any = attn
    plain.__class__ = nn.MultiheadAttention
    # first, as nn.MultiheadAttention registers it (positional consumers of parameters())
    params = dict(attn._parameters)
    attn._parameters.clear()
    attn._parameters["in_proj_weight"] = nn.Parameter(weight, requires_grad=trainable)
    attn._parameters.update(params)


def is_sliced(model: nn.Module) -> bool:
    """Whether ``model`` holds channel slices (a model :func:`slice_model` made)."""
    return any(isinstance(m, (ChannelSlices, RecurrentSlices, SlicedMultiheadAttention))
               for m in model.modules())


def plan_of(model: nn.Module) -> SlicePlan | None:
    """The slice plan ``model`` was sliced by (read from its slices), or None where it
    holds none."""
    layers: dict[str, tuple[tuple[int, ...], ...]] = {}
    inputs = set()
    for name, m in model.named_modules():
        if isinstance(m, (ChannelSlices, RecurrentSlices, SlicedMultiheadAttention)):
            layers[name] = tuple(tuple(p) for p in m.rows)
            if isinstance(m, ChannelSlices) and m.inputs:
                inputs.add(name)
    return SlicePlan(layers, frozenset(inputs)) if layers else None


def _like(template: nn.Module, weight: Tensor, bias: Tensor | None, *,
          depthwise: bool) -> nn.Module:
    """A layer of ``template``'s kind and settings holding ``weight`` (and ``bias``):
    ``weight.shape[0]`` output channels, depthwise (one channel per group) or ungrouped."""
    n = int(weight.shape[0])
    layer: Any = template
    # built on the meta device: no random initialisation (which would draw from torch's
    # global generator) of values overwritten below
    meta = {"device": "meta", "dtype": weight.dtype}
    if isinstance(template, nn.Linear):
        out: nn.Module = nn.Linear(int(weight.shape[1]), n, bias=bias is not None, **meta)
    else:
        out = type(template)(n if depthwise else layer.in_channels, n, layer.kernel_size,
                             layer.stride, layer.padding, layer.dilation,
                             n if depthwise else 1, bias is not None, layer.padding_mode,
                             **meta)
    out = out.to_empty(device=weight.device)
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
    """Which output channels (or input features) of which layer form each slice.

    Attributes:
        layers: layer FQN → one tuple of output-channel indices per slice (the slices
            partition the layer's channels; slice k becomes ``<layer>.parts.<k>``).
        inputs: the layers of ``layers`` sliced by input features instead: their tuples
            hold input-feature (column) indices.
    """

    layers: Mapping[str, tuple[tuple[int, ...], ...]]
    inputs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.inputs <= set(self.layers):
            raise ValueError(f"layers sliced by input features are not in the plan: "
                             f"{sorted(self.inputs - set(self.layers))}")

    def slice_names(self) -> dict[str, list[str]]:
        """Layer FQN → the FQNs of its slices."""
        return {n: [f"{n}.{PART}.{k}" for k in range(len(p))] for n, p in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: layer FQN → list of output-channel index lists, or, for a layer
        sliced by input features, ``{"inputs": [list of input-feature index lists]}``."""
        return {n: {"inputs": [list(p) for p in parts]} if n in self.inputs
                else [list(p) for p in parts] for n, parts in self.layers.items()}

    @classmethod
    def from_dict(cls, d: Any) -> SlicePlan:
        """Build from :meth:`to_dict` output, checking its shape (not the model)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"slices must be an object of layer → channel lists, got "
                             f"{type(d).__name__}")
        layers: dict[str, tuple[tuple[int, ...], ...]] = {}
        inputs = set()
        for name, parts in d.items():
            if isinstance(parts, Mapping) and set(parts) == {"inputs"}:
                inputs.add(name)
                parts = parts["inputs"]
            if (not isinstance(name, str) or not isinstance(parts, list) or not parts
                    or not all(isinstance(p, list) and p and all(
                        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p)
                        for p in parts)):
                raise ValueError(f"slices of {name!r} must be a non-empty list of non-empty "
                                 "lists of channel indices (or {'inputs': such a list})")
            layers[name] = tuple(tuple(p) for p in parts)
        return cls(layers, frozenset(inputs))


@outside_inference_mode
def slice_model(model: nn.Module, plan: SlicePlan | Any) -> nn.Module:
    """A copy of ``model`` with the layers of ``plan`` split into channel slices.

    Args:
        model: the original model; not modified.
        plan: a :class:`SlicePlan`, or a bit map of a sliced search (its ``slices``).

    Raises:
        ValueError: a layer of the plan is missing, not sliceable, or its channel lists do
            not partition its output channels; a bit map that is not from a sliced search.
            For a bit map, :class:`mpsearch.BitMapError` (a ``ValueError``): the bit map
            does not fit the model.
    """
    if isinstance(plan, SlicePlan):
        return _slice_model(model, plan)
    if not hasattr(plan, "slices"):
        raise TypeError(f"plan must be a SlicePlan or a BitMap, got {type(plan).__name__}")
    from mpsearch.errors import BitMapError

    if plan.slices is None:
        raise BitMapError("this bit map is not from a sliced search (no 'slices'); "
                          "quantize the model as it is")
    try:
        return _slice_model(model, plan.slices)
    except BitMapError:
        raise
    except ValueError as exc:
        raise BitMapError(f"the bit map's slice plan does not fit this "
                          f"{type(model).__name__}: {exc}") from None


#: a module's hook dicts that a layer's replacement takes over (forward, pre-forward and
#: backward hooks, with their kwargs / always-called flags)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a layer's replacement) the hooks registered on ``source``: a hook
    the user put on a layer runs on its slices' output (or input) as on the layer's.

    Not torch's own weight-computing hooks (``torch.nn.utils.prune``, the old-style
    ``weight_norm`` / ``spectral_norm``): they rebuild the layer's weight, which the slices
    already hold as plain values."""
    for attr in _HOOK_DICTS:
        hooks = getattr(source, attr, None)
        if hooks:
            # (the *_with_kwargs / *_always_called dicts hold flags, keyed as the hooks)
            getattr(target, attr).update(
                (k, h) for k, h in hooks.items()
                if not type(h).__module__.startswith("torch.nn.utils"))
    if getattr(source, "_is_full_backward_hook", None) is not None:
        target._is_full_backward_hook = source._is_full_backward_hook


def _slice_model(model: nn.Module, plan: SlicePlan) -> nn.Module:
    from mpsearch.layers import (
        bake_parametrizations,
        copy_model,
        parametrized_layers,
        quantizable_modules,
    )

    sliced = copy_model(model)
    # a parametrized layer (weight_norm) is sliced with its current weight baked in, as
    # the search saw it (it searches such a model with the weights baked: plain_weights)
    baked = [n for n in parametrized_layers(sliced) if n in plan.layers]
    if baked:
        bake_parametrizations(sliced, baked)
    recurrent = {n: m for n, m in quantizable_modules(sliced).items()
                 if isinstance(m, RecurrentWeight)}
    for name, rows in plan.layers.items():
        if name in recurrent:
            if not _sliceable(recurrent[name]):
                raise ValueError(f"the slice plan names {name!r}, a matrix of a "
                                 f"{type(recurrent[name].owner).__name__}, which cannot be "
                                 "sliced (nn.LSTM, nn.GRU and nn.RNN themselves only)")
            if name in plan.inputs:
                raise ValueError(f"the slice plan cuts {name!r}, a recurrent weight, by "
                                 "input features; recurrent weights are sliced by rows only")
            try:
                _slice_recurrent(sliced, name, rows)
            except ValueError as exc:
                raise ValueError(f"slices of {name!r}: {exc}") from None
            continue
        try:
            layer = sliced.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the slice plan names layer {name!r}, which the model does "
                             "not have") from None
        if not _sliceable(layer):
            raise ValueError(f"the slice plan names {name!r}, a {type(layer).__name__}, "
                             "which cannot be sliced")
        if isinstance(layer, nn.MultiheadAttention):
            if name in plan.inputs:
                raise ValueError(f"the slice plan cuts {name!r}, an attention's input "
                                 "projection, by input features; it is sliced by rows only")
            try:
                _slice_attention(layer, rows)
            except ValueError as exc:
                raise ValueError(f"slices of {name!r}: {exc}") from None
            continue
        try:
            replacement = ChannelSlices(layer, rows, inputs=name in plan.inputs)
        except ValueError as exc:
            raise ValueError(f"slices of {name!r}: {exc}") from None
        replacement.train(layer.training)
        _carry_hooks(layer, replacement)
        replace_module(sliced, layer, replacement)
    return sliced


def needs_slicing(model: nn.Module, bitmap: Any) -> bool:
    """Whether ``bitmap`` is from a sliced search and ``model`` is the original (unsliced)."""
    plan = getattr(bitmap, "slices", None)
    return (isinstance(plan, SlicePlan) and bool(plan.layers)  # an empty plan slices nothing
            and not is_sliced(model))


def for_deployment(model: nn.Module, bitmap: Any) -> tuple[nn.Module, Any]:
    """The model and bit map a deployment runs: for a sliced bit map and the original
    model, the slices of equal width merged (:func:`coalesce`: the same values, one kernel
    call per distinct width) and the model sliced as the merged map says; else as given."""
    if not needs_slicing(model, bitmap):
        return model, bitmap
    merged = coalesce(bitmap, model)
    return (slice_model(model, merged) if merged.slices is not None else model), merged


def merge_slices(model: nn.Module) -> nn.Module:
    """Replace every :class:`ChannelSlices` in ``model`` (in place) by one layer of the
    original kind with its slices' weights: e.g. after :func:`~mpsearch.quantize`, a model
    with the original structure whose channels hold mixed-precision values."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ChannelSlices):
            merged = module.merged()
            _carry_hooks(module, merged)
            replace_module(model, module, merged)
        elif isinstance(module, nn.RNNBase) and any(
                isinstance(m, RecurrentSlices) for m in module.children()):
            _merge_recurrent(module)
        elif isinstance(module, SlicedMultiheadAttention):
            _merge_attention(module)
    return model


def channel_scores(model: nn.Module, modules: Mapping[str, nn.Module],
                   layers: Sequence[LayerInfo], objective: Objective, bits: int,
                   qconfig: QuantConfig, *, device: torch.device, seed: int = 0,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """Per output channel, ½ Σ_m c_m (g_mj · ΔW_j)²: the loss the channel's quantization
    error at ``bits`` alone adds, by the block Fisher (the ``fisher_block`` estimator's
    per-sample gradients, restricted to one row)."""
    return slice_scores(model, modules, layers, objective, bits, qconfig, device=device,
                        seed=seed, progress=progress, inputs=False)[0]


def slice_scores(model: nn.Module, modules: Mapping[str, nn.Module],
                 layers: Sequence[LayerInfo], objective: Objective, bits: int,
                 qconfig: QuantConfig, *, device: torch.device, seed: int = 0,
                 progress: bool = False, inputs: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`channel_scores`, and (``inputs=True``) per input feature of each
    ``nn.Linear`` the same for its column, ½ Σ_m c_m (Σ_j g_mji ΔW_ji)², from the same
    gradients."""
    from mpsearch.quant.apply import quantize_weight
    from mpsearch.sensitivity.fisher import Fisher

    names = [info.name for info in layers]
    kinds = {info.name: info.kind for info in layers}
    weights = {n: layer_weight(modules[n]).detach() for n in names}
    deltas = {info.name: (quantize_weight(weights[info.name], info.kind, bits, qconfig)
                          - weights[info.name]).to(weights[info.name].dtype)
              for info in layers}
    scores = {n: np.zeros(_rows(modules[n])) for n in names}
    columns = {n: np.zeros(int(weights[n].shape[1])) for n in names
               if inputs and type(modules[n]) is nn.Linear}
    for weight, grads in Fisher(block=True).gradients(model, weights, objective, device=device,
                                                      seed=seed, progress=progress,
                                                      desc="channel scores"):
        for n in names:
            products = grads[n] * deltas[n][None]
            if kinds[n] == "Conv1D":  # stored (in, out): rows are its output features
                products = products.transpose(1, 2)
            per_row = products.flatten(2).sum(-1).square().sum(0)
            scores[n] += 0.5 * weight * per_row.double().cpu().numpy()
            if n in columns:
                per_col = products.sum(1).square().sum(0)
                columns[n] += 0.5 * weight * per_col.double().cpu().numpy()
    return scores, columns


def _cut(s: np.ndarray, k: int) -> tuple[tuple[int, ...], ...]:
    """Indices sorted by score (ties in index order), cut into ``k`` equal runs."""
    order = np.argsort(np.asarray(s, dtype=float), kind="stable")
    cuts = [round(i * len(s) / k) for i in range(k + 1)]
    return tuple(tuple(sorted(int(r) for r in order[a:b])) for a, b in itertools.pairwise(cuts))


def predicted_gain(scores: np.ndarray, parts: Sequence[Sequence[int]], bits: Sequence[int],
                   reference: int) -> float:
    """How much less loss one layer's slices would lose than the layer at uniform
    ``reference`` + 1 bits, with the same average width, were each slice's loss its score
    at ``reference`` bits × 4^(reference − b) (each bit quarters the squared error).

    Solved exactly over the candidate widths by a Lagrange multiplier on the slices'
    widths (weighted by their sizes). Ranks the two ways to slice a layer (by output
    channels or input features); not a promise of what the search will find.
    """
    widths = np.array(sorted({b for b in bits if b <= 8}), dtype=float)
    target = reference + 1
    if len(widths) < 2 or len(parts) < 2:
        return 1.0
    size = np.array([len(p) for p in parts], dtype=float)
    loss = np.array([float(np.sum(np.asarray(scores)[list(p)])) for p in parts])
    uniform = float(loss.sum()) * 4.0 ** (reference - target)
    if uniform <= 0:
        return 1.0
    table = loss[:, None] * 4.0 ** (reference - widths[None, :])  # slices × widths
    budget = target * size.sum()

    def pick(lam: float) -> np.ndarray:
        return np.argmin(table + lam * size[:, None] * widths[None, :], axis=1)

    lo, hi = 0.0, float(table.max() + 1.0) * 4.0
    for _ in range(100):  # the smallest multiplier whose choice fits the budget
        mid = 0.5 * (lo + hi)
        if float(size @ widths[pick(mid)]) <= budget:
            hi = mid
        else:
            lo = mid
    best = float(table[np.arange(len(parts)), pick(hi)].sum())
    return uniform / best if best > 0 else float("inf")


#: slicing a Linear by input features instead of output channels must be predicted to
#: lose this many times less (:func:`predicted_gain`), or the layer keeps the output
#: channels, the way measured on many more models (``results/slices.md``)
INPUTS_OVER_ROWS = 1.25


def plan_slices(scores: Mapping[str, np.ndarray], n_slices: int, *,
                min_rows: int = 4, input_scores: Mapping[str, np.ndarray] | None = None,
                bits: Sequence[int] = (2, 3, 4, 5, 6, 8)) -> SlicePlan:
    """Cut each layer's channels, sorted by score, into ``n_slices`` equal runs (fewer
    where the layer has fewer than ``n_slices · min_rows`` channels; none below two).

    Ties in score (e.g. channels that never fire, all 0) keep their index order, so the
    plan is deterministic. ``input_scores`` (per input feature, for the layers that can be
    sliced so): such a layer is cut by input features instead where that is predicted to
    lose :data:`INPUTS_OVER_ROWS` times less (:func:`predicted_gain` at the candidate
    ``bits``) than cutting its output channels.
    """
    if not isinstance(n_slices, int) or isinstance(n_slices, bool) or n_slices < 2:
        raise ValueError(f"slices must be an integer >= 2, got {n_slices!r}")
    layers: dict[str, tuple[tuple[int, ...], ...]] = {}
    inputs = set()
    reference = reference_bits(bits)
    for name, s in scores.items():
        k = min(n_slices, len(s) // min_rows)
        rows = _cut(s, k) if k >= 2 else None
        cols = (input_scores or {}).get(name)
        k_in = 0 if cols is None else min(n_slices, len(cols) // min_rows)
        if cols is not None and k_in >= 2:
            by_inputs = _cut(cols, k_in)
            gain_in = predicted_gain(cols, by_inputs, bits, reference)
            gain_rows = predicted_gain(s, rows, bits, reference) if rows else 1.0
            if gain_in > INPUTS_OVER_ROWS * gain_rows:
                layers[name] = by_inputs
                inputs.add(name)
                continue
        if rows:
            layers[name] = rows
    return SlicePlan(layers, frozenset(inputs))


def sliceable_layers(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """FQNs of the layers :class:`ChannelSlices` can split: plain Linear / Conv layers
    whose weight no other module shares (slicing would untie it). A module registered
    under two names is one module: its slices replace it under both."""
    uses: dict[int, int] = {}
    for module in model.modules():  # each module once, whatever its names
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    # the model itself (one bare layer) has no parent to hold its slices: searched whole
    return [n for n, m in modules.items()
            if n and _sliceable(m) and uses.get(id(layer_weight(m)), 0) <= 1]


def reference_bits(bits: Sequence[int]) -> int:
    """The width the ranking scores channels at: the candidate nearest 3 bits from above
    (where widths differ most in damage and channels in their want of bits)."""
    low = sorted(b for b in bits if b <= 8)
    if not low:
        raise ValueError(f"slices need a candidate width of 2-8 bits, got {list(bits)}")
    above = [b for b in low if b >= 3]
    return above[0] if above else low[-1]


def coalesce(bitmap: Any, model: nn.Module | None = None) -> Any:
    """The same quantization with fewer slices: slices of a layer that got the same
    settings merge into one, and a layer whose slices all agree is whole again.

    ``model``: the original model. A layer made whole again takes its kind and shape
    from it; without it, from its slices, which is right for every layer but Hugging
    Face's ``Conv1D`` (GPT-2), whose slices are ``nn.Linear`` of the transposed shape
    (:func:`for_deployment` and :func:`~mpsearch.export_onnx` pass the model).

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
    whole: dict[str, tuple[str | None, tuple[int, ...]]] = {}
    if model is not None:
        from mpsearch.layers import quantizable_modules

        modules = quantizable_modules(model)
        whole = {n: (layer_kind(modules[n]), tuple(layer_weight(modules[n]).shape))
                 for n in plan.layers if n in modules}
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
            n = len(rows) if len(merged) > 1 else sum(len(p) for p in parts)
            shape = (None if entry.shape is None
                     else (entry.shape[0], n) if layer in plan.inputs
                     else (n, *entry.shape[1:]))
            name = f"{layer}.{PART}.{j}" if len(merged) > 1 else layer
            entries[name] = replace(entry, shape=shape)
            if name == layer and layer in whole:  # the original layer's own kind and shape
                entries[name] = replace(entry, kind=whole[layer][0], shape=whole[layer][1])
    new_plan = SlicePlan(layers, plan.inputs & set(layers)) if layers else None
    return BitMap(entries, model_class=bitmap.model_class,
                  fingerprint=fingerprint({n: e.shape or () for n, e in entries.items()}),
                  budget=bitmap.budget, predicted=bitmap.predicted,
                  provenance={**bitmap.provenance, "coalesced": True}, slices=new_plan)
