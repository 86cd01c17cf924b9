"""Discover the quantizable layers of a model.

Quantizable: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (grouped and depthwise too),
Hugging Face's ``Conv1D`` (GPT-2 style, weight stored ``(in, out)``), the packed q/k/v
input projection of ``nn.MultiheadAttention`` (``in_proj_weight``, ``(3·E, E)``, keyed by the
attention module's FQN; its ``out_proj`` is an ``nn.Linear`` of its own) and each weight
matrix of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (:class:`RecurrentWeight`, keyed by the
parameter's name, ``rnn.weight_hh_l0``; in a model sliced by :mod:`mpsearch.slices`, its
row slices, :class:`RecurrentPart`, ``rnn.weight_hh_l0.parts.0``, as are those of a sliced
attention's input projection, ``attn.parts.0``). Layers are keyed by
fully-qualified name (FQN) everywhere.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from mpsearch._report import some, warn_once
from mpsearch._state import preserved
from mpsearch.batches import Batch, call, model_device, split_batch, to_device

log = logging.getLogger(__name__)

Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer.

    Attributes:
        name: fully-qualified module name.
        kind: ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv1D"`` (Hugging Face),
            ``"MultiheadAttention"`` (its ``in_proj_weight``) or ``"LSTM"`` / ``"GRU"`` /
            ``"RNN"`` (one weight matrix of that module).
        weight_shape: shape of the weight tensor as stored.
        params: number of weight elements (what gets quantized).
        bias_params: number of bias elements (kept in float).
        groups: convolution groups (1 for linear layers).
        macs: multiply-accumulates per sample, summed over every call in one forward pass
            (0 when the layer was not called, or no sample batch was given).
        calls: how many times the layer ran in the sample forward pass.
        input_shape: shape of the layer's input on the first call (with the batch dim).
        output_shape: shape of the layer's output on the first call.
        fused_group: name of the group of layers that read the same input tensor, or None.
        read_by: for a layer whose own ``forward`` never ran but whose weight an enclosing
            module reads directly (``nn.MultiheadAttention.out_proj``, PyTorch's fused
            transformer fast path, a recurrent module's matrices), that module's FQN; ``calls``, MACs and shapes are then
            inferred from its input. None for layers that run themselves.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    bias_params: int = 0
    groups: int = 1
    macs: int = 0
    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    fused_group: str | None = None
    read_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def transposed(self) -> bool:
        """True for Hugging Face ``Conv1D``, whose weight is stored ``(in, out)``."""
        return self.kind == "Conv1D"

    @property
    def input_quantizable(self) -> bool:
        """Whether ``a_bits`` can quantize this layer's input: it runs itself, or it is a
        slice of a sliced attention's packed projection, whose input is the attention's
        (quantized as the unsliced attention's is). Not for other layers an enclosing
        module reads (``out_proj``, recurrent matrices)."""
        return self.read_by is None or self.kind == "MultiheadAttention"


#: kinds of the weight matrices of recurrent modules (see :class:`RecurrentWeight`)
RNN_KINDS = frozenset({"LSTM", "GRU", "RNN"})
_PARTS = "parts"  # mpsearch.slices.PART: slice k of layer ``fc`` is ``fc.parts.k``


class RecurrentMatrix(nn.Module):
    """A weight matrix (or some rows of one) that an enclosing module reads itself: a
    recurrent module multiplies it at every time step (or an attention, the slices of its
    input projection), so its layer never runs, and no input of its own can be hooked.
    ``kind``: ``"LSTM"``, ``"GRU"``, ``"RNN"`` or ``"MultiheadAttention"``."""

    kind: str

    def forward(self, *_: Any) -> Tensor:
        raise RuntimeError(f"{type(self).__name__} is read by the module holding it, "
                           "never called")


class RecurrentPart(RecurrentMatrix):
    """Some rows of a weight matrix an enclosing module reads, held as a parameter of
    their own: a slice of a recurrent layer (:class:`mpsearch.slices.RecurrentSlices`),
    keyed ``f"{rnn_fqn}.{attr}.parts.{k}"``, or of an attention's packed input projection
    (:class:`mpsearch.slices.SlicedMultiheadAttention`), keyed
    ``f"{attention_fqn}.parts.{k}"``."""

    def __init__(self, weight: Tensor, kind: str, *, requires_grad: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)
        self.kind = kind

    def extra_repr(self) -> str:
        return f"{self.kind}, rows={self.weight.shape[0]}"


class RecurrentWeight(RecurrentMatrix):
    """One weight matrix of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (``weight_ih_l0``,
    ``weight_hh_l1_reverse``, ...) seen as a layer, keyed ``f"{rnn_fqn}.{attr}"``.

    The recurrent module's own forward reads all its matrices, so each is a layer of its
    own (rows are gate outputs: per-channel scales are per gate row). A view made by
    :func:`quantizable_modules`, never part of the model: ``weight`` is the module's
    parameter itself, and hooks on the view never run.
    """

    owner: nn.RNNBase
    attr: str

    def __init__(self, owner: nn.RNNBase, attr: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not registered as a submodule
        object.__setattr__(self, "attr", attr)

    @property
    def weight(self) -> Tensor:
        w: Tensor = getattr(self.owner, self.attr)
        return w

    @property
    def kind(self) -> str:  # type: ignore[override]
        return ("LSTM" if isinstance(self.owner, nn.LSTM)
                else "GRU" if isinstance(self.owner, nn.GRU) else "RNN")

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.attr}"


def _recurrent_weights(name: str, module: nn.Module) -> list[tuple[str, RecurrentWeight]]:
    if not isinstance(module, nn.RNNBase):
        return []
    prefix = f"{name}." if name else ""
    return [(prefix + attr, RecurrentWeight(module, attr)) for attr in module._flat_weights_names
            if attr.startswith("weight_") and isinstance(getattr(module, attr, None), Tensor)]


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in ``old``'s place under every name ``old`` has in ``model``: a module
    registered twice (``self.alias = self.head``) is called through either name."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    if not names:
        raise ValueError(f"{type(old).__name__} to replace is not a submodule of the "
                         f"{type(model).__name__}")
    for name in names:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, new)


def weight_attr(module: nn.Module) -> str:
    """The attribute holding a quantizable module's weight (``in_proj_weight`` for
    ``nn.MultiheadAttention``, else ``weight``): ``f"{fqn}.{weight_attr(m)}"`` is its
    parameter's name, e.g. for :func:`torch.func.functional_call`."""
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def _weight_identity(module: nn.Module) -> int:
    """What two modules sharing one weight have in common (a parametrized weight is a new
    tensor on every access, so its parametrization stands for it)."""
    from torch.nn.utils import parametrize

    attr = weight_attr(module)
    if parametrize.is_parametrized(module, attr):
        plist: Any = module.parametrizations
        return id(plist[attr])
    return id(layer_weight(module))


def _weight_hook(module: nn.Module, attr: str) -> tuple[int, Any] | None:
    """The forward pre-hook of torch's that computes ``module.<attr>`` before each call
    (``torch.nn.utils.prune``; the old-style ``weight_norm`` / ``spectral_norm``), as
    ``(hook id, hook)``, or None."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, BasePruningMethod) and hook._tensor_name == attr:
            return key, hook
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == attr:
            return key, hook
    return None


def _computed(module: nn.Module, attr: str) -> bool:
    """Whether a parametrization or one of torch's weight hooks computes ``module.<attr>``."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module, attr) or _weight_hook(module, attr) is not None


def parametrized_layers(model: nn.Module) -> list[str]:
    """FQNs of quantizable layers whose weight is computed: by a parametrization
    (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``) or by one of
    torch's forward pre-hooks (``torch.nn.utils.prune``, the old-style
    ``torch.nn.utils.weight_norm`` / ``spectral_norm``)."""
    out = []
    for name, module in model.named_modules():
        if layer_kind(module) is not None and _computed(module, weight_attr(module)):
            out.append(name)
        elif isinstance(module, nn.RNNBase):  # a recurrent matrix's layer is its parameter
            out += [f"{name}.{attr}" if name else attr for attr in module._flat_weights_names
                    if attr.startswith("weight_") and _computed(module, attr)]
    return out


def _bake_hook(module: nn.Module, attr: str, key: int, hook: Any) -> None:
    """Replace the weight one of torch's pre-hooks computes by a plain parameter holding
    its current value, in place: the hook and the tensors it computes from go."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm

    with torch.no_grad():
        if isinstance(hook, BasePruningMethod):
            value = hook.apply_mask(module)
            sources = [f"{attr}_orig", f"{attr}_mask"]
        elif isinstance(hook, WeightNorm):
            value = hook.compute_weight(module)
            sources = [f"{attr}_g", f"{attr}_v"]
        else:  # SpectralNorm: the last power iteration's estimate, as in eval mode
            value = hook.compute_weight(module, do_power_iteration=False)
            sources = [f"{attr}_orig", f"{attr}_u", f"{attr}_v"]
        value = value.detach().clone()
    trainable = any(getattr(module, s).requires_grad for s in sources if hasattr(module, s))
    del module._forward_pre_hooks[key]
    for source in sources:
        if hasattr(module, source):
            delattr(module, source)
    if hasattr(module, attr):
        delattr(module, attr)
    module.register_parameter(attr, nn.Parameter(value, requires_grad=trainable))
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def bake_parametrizations(model: nn.Module, names: Sequence[str]) -> None:
    """Replace the computed weights of layers ``names`` (:func:`parametrized_layers`) by
    plain parameters holding their current values, in place (a quantized weight must be
    stored, not recomputed).

    ``torch.nn.utils.parametrize.remove_parametrizations`` is not used: it deletes the
    property from the parametrized class, which a deep copy shares with the original
    model, and would break the user's model when baking a copy.
    """
    for name in names:
        try:
            module = model.get_submodule(name)
            attr = weight_attr(module)
        except AttributeError:  # a recurrent matrix: "rnn.weight_hh_l0"
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
        found = _weight_hook(module, attr)
        if found is not None:
            _bake_hook(module, attr, *found)
            continue
        with torch.no_grad():
            value = getattr(module, attr).detach().clone()
        cls = type(module)
        plist: Any = module.parametrizations  # a ModuleDict of ParametrizationLists
        trainable = any(p.requires_grad for p in plist[attr].parameters())
        del plist[attr]
        if len(plist):  # others stay: this instance gets its own class
            module.__class__ = type(cls.__name__, cls.__bases__,
                                    {k: v for k, v in vars(cls).items() if k != attr})
        else:
            del module.parametrizations
            module.__class__ = cls.__bases__[0]
        module.register_parameter(attr, nn.Parameter(value, requires_grad=trainable))
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()


def copy_model(model: nn.Module, *, meta: bool = False) -> nn.Module:
    """``copy.deepcopy(model)``, also for a model with weights torch's hooks compute
    (``prune``, the old-style ``weight_norm``), whose computed tensor (not a graph leaf)
    deepcopy refuses: it is detached for the copy and put back. ``meta=True``: its
    parameters and buffers on the meta device (no memory; shapes only, to check a plan)."""
    import copy

    computed = []
    for module in model.modules():
        for key in list(module._forward_pre_hooks):
            hook = module._forward_pre_hooks[key]
            attr = getattr(hook, "_tensor_name", None) or getattr(hook, "name", None)
            if (isinstance(attr, str) and _weight_hook(module, attr) is not None
                    and isinstance(value := module.__dict__.get(attr), Tensor)
                    and not value.is_leaf):
                computed.append((module, attr, value))
    memo: dict[int, Any] = {}
    if meta:
        for t in (*model.parameters(), *model.buffers()):
            if id(t) not in memo:
                empty = t.detach().to("meta")
                memo[id(t)] = (nn.Parameter(empty, requires_grad=t.requires_grad)
                               if isinstance(t, nn.Parameter) else empty)
    try:
        for module, attr, value in computed:
            module.__dict__[attr] = value.detach()
        return copy.deepcopy(model, memo)
    finally:
        for module, attr, value in computed:
            module.__dict__[attr] = value


def plain_weights(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy with every parametrized layer weight baked into a plain
    parameter: probes substitute weights, which a parametrization would recompute."""
    names = parametrized_layers(model)
    if not names:
        return model
    log.info("%d layer(s) have computed weights (%s: parametrized, pruned); searching a "
             "copy with their current values baked in", len(names), ", ".join(names[:3]))
    work = copy_model(model)
    bake_parametrizations(work, names)
    return work


def weight_key(model: nn.Module, name: str) -> str:
    """The parameter name of layer ``name``'s weight in ``model`` (``"fc.weight"``; a
    recurrent weight's layer name is its parameter's, ``"rnn.weight_hh_l0"``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        model.get_parameter(name)  # raises for a name that is neither
        return name
    return f"{name}.{weight_attr(module)}"


def layer_weight(module: nn.Module) -> Tensor:
    """The weight tensor of a quantizable module.

    A parametrized weight is computed with its parametrizations in eval mode: reading it
    must not advance their state (a train-mode ``spectral_norm`` steps its power iteration
    on every access).
    """
    from torch.nn.utils import parametrize

    attr = weight_attr(module)
    if parametrize.is_parametrized(module, attr):
        plist: Any = module.parametrizations
        modes = [(m, m.training) for m in plist[attr].modules()]
        plist[attr].eval()
        try:
            w = getattr(module, attr, None)
        finally:
            for m, mode in modes:
                m.training = mode
    else:
        w = getattr(module, attr, None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a quantizable module, or None if mpsearch does not quantize it."""
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Conv1d):
        return "Conv1d"
    if isinstance(module, nn.Linear):
        return "Linear"
    if (isinstance(module, nn.MultiheadAttention) and isinstance(module.in_proj_weight, Tensor)
            and not getattr(type(module), "in_proj_sliced", False)):  # (its slices are layers)
        return "MultiheadAttention"  # separate q/k/v_proj_weight (kdim != embed_dim): float
    if isinstance(module, RecurrentMatrix):
        return module.kind
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
        return "Conv1D"
    return None


def as_patterns(p: object, option: str = "include / exclude") -> list[str] | None:
    """Glob patterns as a list (one string is one pattern; a generator is read here).

    Raises:
        TypeError: neither a string nor an iterable of strings.
    """
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    values = list(p) if isinstance(p, Iterable) else None
    if values is None or not all(isinstance(g, str) for g in values):
        raise TypeError(f"{option} must be a glob pattern (str) or a list of them, got {p!r}")
    return values


def quantizable_modules(model: nn.Module, include: Patterns = None,
                        exclude: Patterns = None) -> dict[str, nn.Module]:
    """Quantizable submodules by FQN, filtered by glob patterns on the FQN.

    Args:
        model: the model.
        include: keep only layers matching one of these patterns (``fnmatch`` globs such as
            ``"encoder.*"``); None keeps all.
        exclude: then drop layers matching one of these patterns.

    Raises:
        ValueError: no quantizable layer is left, saying what was found and filtered.
    """
    inc, exc = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    found: dict[str, nn.Module] = {}
    seen_params: dict[int, str] = {}
    n_all = 0
    candidates = ((n, m) for name, module in model.named_modules()
                  for n, m in [(name, module), *_recurrent_weights(name, module)])
    def kept(name: str) -> bool:
        return ((inc is None or any(fnmatch.fnmatchcase(name, pat) for pat in inc))
                and not (exc is not None and any(fnmatch.fnmatchcase(name, pat)
                                                 for pat in exc)))

    for name, module in candidates:
        if layer_kind(module) is None:
            continue
        n_all += 1
        # A shared weight is the layer of its first name, whatever the filters keep: a map
        # naming another of its names would not fit the model unfiltered.
        wid = _weight_identity(module)
        if wid in seen_params:
            # (said once: a search looks the layers up many times, and it came 42 times)
            owner = seen_params[wid]
            if kept(name) and not kept(owner):
                warn_once(log, f"{name} shares its weight with {owner}, which include=/"
                               f"exclude= leave out: it stays float with it (filter by "
                               f"{owner!r} to quantize it)")
            elif kept(name):
                warn_once(log, f"{name} shares its weight with {owner}; it is quantized "
                               f"once, as {owner}")
            continue
        seen_params[wid] = name
        if kept(name):
            found[name] = module
    if not found:
        if n_all == 0:
            raise ValueError(
                f"{type(model).__name__} has no quantizable layer: mpsearch quantizes "
                "nn.Linear, nn.Conv1d, nn.Conv2d, Hugging Face Conv1D modules, "
                "nn.MultiheadAttention's packed input projection and the weight matrices of "
                "nn.LSTM / nn.GRU / nn.RNN"
            )
        raise ValueError(
            f"include={include!r} / exclude={exclude!r} left none of the {n_all} quantizable "
            f"layers of {type(model).__name__}"
        )
    return found


def unsearched_weights(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, int]:
    """Parameters by module kind of the weights (2-D or more) that no quantizable module
    holds: embeddings, transposed and 3-D convolutions and the like, which stay float (a
    custom module's own parameter by its name: ``pos_embedding``).

    A weight shared with a quantizable layer (tied embeddings) counts as covered; layers
    of a quantizable kind left out by ``include``/``exclude`` are the user's choice and do
    not count.
    """
    covered = {id(layer_weight(m)) for m in modules.values()}
    out: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if layer_kind(module) is not None:
            continue
        for attr, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in covered:
                # torch's modules by kind (Embedding); a model's own parameter by name
                kind = (type(module).__name__ if type(module).__module__.startswith("torch.")
                        else f"{prefix}.{attr}" if prefix else attr)
                out[kind] = out.get(kind, 0) + p.numel()
    return out


def weight_matrix_shape(kind: str, shape: Sequence[int]) -> tuple[int, int]:
    """(output channels, reduction length) of a weight, whatever its storage layout."""
    if kind == "Conv1D":
        return int(shape[1]), int(shape[0])
    return int(shape[0]), int(math.prod(shape[1:]))


def require_values(model: object) -> None:
    """Raise ValueError where the model's weights have no values (the meta device), or
    where it is a ``torch.compile`` wrapper (whose every hooked pass recompiles), a
    (Distributed)DataParallel wrapper or a TorchScript module; a TypeError where it is no
    module at all."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError(  # noqa: TRY004 (the model is unusable as given, as below)
            f"the model is a {type(model).__name__} wrapper: pass the module it wraps "
            "(model.module); its replicas would not see the weights the search swaps")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(  # noqa: TRY004
            "the model is a TorchScript module (torch.jit.script/trace): pass the Python "
            "nn.Module it was made from; a compiled graph's layers cannot be hooked, "
            "swapped or quantized one by one")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise ValueError(  # noqa: TRY004 (the model is unusable as given, as below)
            "the model is torch.compile's wrapper: pass the module it wraps "
            "(model._orig_mod), and compile the quantized model afterwards; the search "
            "hooks and swaps weights on every pass, which would recompile it each time")
    lazy = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if is_lazy(t)]
    if lazy:
        raise ValueError(f"{len(lazy)} weight(s) of the {type(model).__name__} are not "
                         f"initialized yet ({some(lazy)}: lazy modules such as nn.LazyLinear): "
                         "run one forward pass on a sample batch first")
    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} weight(s) of the {type(model).__name__} are on the "
                         f"meta device, with shapes but no values ({some(meta)}): load the "
                         "model's weights first (model.to_empty(device='cpu') and "
                         "load_state_dict)")


def check_finite(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Raise ValueError naming every layer whose weight holds NaN or inf (or no value)."""
    require_values(model)
    bad = [name for name, m in modules.items()
           if not bool(torch.isfinite(layer_weight(m)).all())]
    if bad:
        raise ValueError(
            f"non-finite (NaN/inf) weights in {len(bad)} layer(s): {', '.join(bad[:10])}"
            + (" …" if len(bad) > 10 else "") + "; fix or exclude them before searching"
        )


def _macs(kind: str, module: nn.Module, out: Tensor) -> int:
    w = layer_weight(module)
    if kind in ("Linear", "Conv1D"):
        fan_in = w.shape[1] if kind == "Linear" else w.shape[0]
        return int(out.numel()) * int(fan_in)
    # conv: (out, in/groups, *kernel)
    return int(out.numel()) * int(math.prod(w.shape[1:]))


def _tensor_key(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))


def discover(model: nn.Module, batch: Batch | None = None, *, include: Patterns = None,
             exclude: Patterns = None, warn: bool = True) -> list[LayerInfo]:
    """List the quantizable layers, with shapes, MACs and fusion groups.

    With a sample ``batch``, one forward pass (eval mode, no grad) records each layer's
    input/output shapes, MACs per sample and the groups of layers that read the same input
    tensor (q/k/v, gate/up): connected components of a networkx graph. The model is left
    as it was found. ``warn``: log the layers that did not run in that pass.

    Raises:
        ValueError: no quantizable layer, or non-finite weights (naming the layers).
    """
    modules = quantizable_modules(model, include, exclude)
    check_finite(model, modules)
    stats: dict[str, dict[str, Any]] = {n: {"macs": 0, "calls": 0} for n in modules}
    edges: dict[tuple[int, tuple[int, ...], tuple[int, ...], int], list[str]] = {}
    batch_size = 1
    if batch is not None:
        keep_alive: list[Tensor] = []  # holding inputs stops storage reuse faking a shared input
        device = model_device(model)
        split = to_device(split_batch(batch), device)
        batch_size = max(split.batch_size, 1)

        def make_hooks(name: str, kind: str, module: nn.Module) -> None:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
                if args and isinstance(args[0], Tensor):
                    keep_alive.append(args[0])
                    edges.setdefault(_tensor_key(args[0]), []).append(name)
                    stats[name].setdefault("input_shape", tuple(args[0].shape))

            def post(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     out: Any) -> None:
                if kind == "MultiheadAttention":
                    # query, key and value each projected E -> E by a third of
                    # in_proj_weight
                    qkv = _attention_inputs(args, kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    if qkv is not None and isinstance(out, Tensor):
                        s = stats[name]
                        e = int(layer_weight(module).shape[1])
                        s["macs"] += sum(math.prod(t[:-1]) for t in qkv) * e * e
                        s["calls"] += 1
                        s.setdefault("output_shape", (*out.shape[:-1], 3 * e))
                    return
                if isinstance(out, Tensor):
                    s = stats[name]
                    s["macs"] += _macs(kind, module, out)
                    s["calls"] += 1
                    s.setdefault("output_shape", tuple(out.shape))

            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post, with_kwargs=True)

        # Enclosing modules' inputs: a layer whose weight its parent reads directly
        # (nn.MultiheadAttention.out_proj, an LSTM's matrices) never runs its own forward.
        named = dict(model.named_modules())
        ancestors = {".".join(n.split(".")[:k])
                     for n in modules for k in range(n.count(".") + 1)}
        seen: dict[str, list[tuple[int, ...]]] = {a: [] for a in ancestors if a in named}
        # an attention's query, key and value shapes per call (its slices' rows multiply
        # one of the three each)
        attended: dict[str, list[tuple[tuple[int, ...], ...]]] = {}

        def watch(name: str) -> Callable[..., None]:
            def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if isinstance(_m, nn.MultiheadAttention):
                    qkv = _attention_inputs(args, kwargs)
                    if qkv is not None:
                        attended.setdefault(name, []).append(qkv)
                first = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(first, nn.utils.rnn.PackedSequence):
                    first = first.data  # (time steps of every sequence, features)
                if isinstance(first, Tensor):
                    # a nested tensor (nn.TransformerEncoder's fast path with a padding
                    # mask) has no one shape: its padded one
                    seen[name].append(tuple((first.to_padded_tensor(0.0) if first.is_nested
                                             else first).shape))
            return pre

        handles = [named[a].register_forward_pre_hook(watch(a), with_kwargs=True) for a in seen]
        with preserved(model), torch.no_grad():
            model.eval()
            for name, module in modules.items():
                kind = layer_kind(module)
                assert kind is not None
                make_hooks(name, kind, module)
            try:
                call(model, split)  # a TypeError says how batches of several inputs look
            finally:
                for h in handles:
                    h.remove()
        keep_alive.clear()
        never = [n for n, s in stats.items() if s["calls"] == 0]
        for name in never:
            _infer_from_reader(name, modules[name], stats[name], seen, attended, named)
        unknown = [n for n in never if "read_by" not in stats[n]]
        if unknown and warn:
            log.warning("%d layer(s) did not run in the sample forward pass (MACs unknown): %s",
                        len(unknown), some(unknown))
    groups = _fusion_groups(list(modules), list(edges.values()))
    infos = []
    for name, module in modules.items():
        kind = layer_kind(module)
        assert kind is not None
        s = stats[name]
        bias = getattr(module, "in_proj_bias" if kind == "MultiheadAttention" else "bias", None)
        infos.append(LayerInfo(
            name=name, kind=kind, weight_shape=tuple(layer_weight(module).shape),
            params=int(layer_weight(module).numel()),
            bias_params=bias.numel() if isinstance(bias, Tensor) else 0,
            groups=int(getattr(module, "groups", 1)),
            macs=round(s["macs"] / batch_size), calls=int(s["calls"]),
            input_shape=s.get("input_shape"), output_shape=s.get("output_shape"),
            fused_group=groups.get(name), read_by=s.get("read_by"),
        ))
    return infos


def idle_layers(model: nn.Module, layers: Sequence[LayerInfo],
                batches: Sequence[Batch]) -> list[str]:
    """The layers of ``layers`` that take no part in the forward pass on any batch.

    ``layers`` come from :func:`discover` on ``batches[0]``; a layer that did not run there
    (and whose weight no enclosing module read) is looked for in the other batches, one
    forward pass each, stopping as soon as every such layer has run. A layer idle on all
    of them (an unused head, an expert no calibration token reaches) cannot change the
    loss on this data, so no estimator can rate it.
    """
    pending = [i.name for i in layers if i.calls == 0 and i.read_by is None]
    for batch in batches[1:]:
        if not pending:
            break
        ran = {i.name for i in discover(model, batch, include=pending, warn=False)
               if i.calls or i.read_by}
        pending = [n for n in pending if n not in ran]
    return pending


def weights_read(model: nn.Module, batch: Batch, modules: Mapping[str, nn.Module]) -> set[str]:
    """Of the layers ``modules`` (FQN → module of ``model``), those whose weight some
    operation of a forward pass on ``batch`` reads: for a layer that never ran, a model
    that calls ``F.linear(x, layer.weight)`` itself, bypassing the layer."""
    from torch.overrides import TorchFunctionMode

    weights = {id(layer_weight(m)): n for n, m in modules.items()}
    found: set[str] = set()

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            for value in itertools.chain(args, (kwargs or {}).values()):
                if id(value) in weights:
                    found.add(weights[id(value)])
            return func(*args, **(kwargs or {}))

    split = to_device(split_batch(batch), model_device(model))
    with preserved(model), torch.no_grad(), Reads():
        model.eval()
        call(model, split)
    return found


def _attention_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]
                      ) -> tuple[tuple[int, ...], ...] | None:
    """The shapes of an ``nn.MultiheadAttention`` call's query, key and value (positional
    or keyword; a nested tensor's padded shape), or None."""
    given = [*args[:3], *(kwargs.get(k) for k in ("query", "key", "value")[len(args[:3]):])]
    if len(given) != 3 or not all(isinstance(t, Tensor) for t in given):
        return None
    return tuple(tuple((t.to_padded_tensor(0.0) if t.is_nested else t).shape) for t in given)


def _infer_attention_part(name: str, module: nn.Module, stats: dict[str, Any],
                          attended: Mapping[str, list[tuple[tuple[int, ...], ...]]],
                          named: Mapping[str, nn.Module]) -> None:
    """A slice of a sliced attention's packed projection (``attn.parts.k``): each of its
    rows multiplies the query, the key or the value (rows ``[0, E)``, ``[E, 2E)``,
    ``[2E, 3E)``), on every call of the attention."""
    owner, _, k = name.rpartition(f".{_PARTS}.")
    calls = attended.get(owner)
    slices: Any = getattr(named.get(owner), "rows", None)  # SlicedMultiheadAttention.rows
    if not calls or slices is None or not k.isdigit():
        return
    n_out, n_in = layer_weight(module).shape
    rows = slices[int(k)]
    per = [sum(1 for r in rows if r // n_in == j) for j in range(3)]  # q, k, v rows
    query = calls[0][0]
    stats.update(read_by=owner, calls=len(calls), input_shape=(*query[:-1], n_in),
                 output_shape=(*query[:-1], n_out),
                 macs=sum(count * math.prod(shape[:-1]) * n_in
                          for qkv in calls for count, shape in zip(per, qkv, strict=True)))


def _infer_from_reader(name: str, module: nn.Module, stats: dict[str, Any],
                       seen: Mapping[str, list[tuple[int, ...]]],
                       attended: Mapping[str, list[tuple[tuple[int, ...], ...]]],
                       named: Mapping[str, nn.Module]) -> None:
    """A Linear (or attention projection) that never ran: its weight read by the nearest
    enclosing module that ran on inputs whose last dimension is its input width
    (MultiheadAttention's query; PyTorch's fused transformer layer)."""
    if not isinstance(module, (nn.Linear, nn.MultiheadAttention, RecurrentMatrix)):
        return
    if isinstance(module, RecurrentPart) and module.kind == "MultiheadAttention":
        _infer_attention_part(name, module, stats, attended, named)
        return
    n_out, n_in = layer_weight(module).shape
    if isinstance(module, RecurrentMatrix):
        # every time step of every sequence multiplies the matrix once (per direction: the
        # reverse direction has matrices of its own); a slice of one is named
        # f"{owner}.{attr}.parts.{k}"
        atoms = name.split(".")[:-3 if isinstance(module, RecurrentPart) else -1]
        owner = ".".join(atoms)
        inputs = [s for s in seen.get(owner, []) if len(s) >= 2]
        if inputs:
            stats.update(read_by=owner, calls=len(inputs),
                         input_shape=(*inputs[0][:-1], n_in),
                         output_shape=(*inputs[0][:-1], n_out),
                         macs=sum(math.prod(s[:-1]) for s in inputs) * n_in * n_out)
        return
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        reader = ".".join(parts[:k])
        shapes = seen.get(reader)
        if not shapes:
            continue
        if shapes[0] and shapes[0][-1] == n_in:
            stats["read_by"] = reader
            stats["calls"] = len(shapes)
            stats["input_shape"] = shapes[0]
            stats["output_shape"] = (*shapes[0][:-1], n_out)
            stats["macs"] = sum(math.prod(s[:-1]) for s in shapes) * n_in * n_out
        return


def _fusion_groups(names: list[str], readers: list[list[str]]) -> dict[str, str]:
    """Connected components of "reads the same tensor", named by their common FQN prefix."""
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(names)
    for group in readers:
        for a, b in itertools.pairwise(group):
            if a != b:
                graph.add_edge(a, b)
    order = {n: i for i, n in enumerate(names)}
    result: dict[str, str] = {}
    used: set[str] = set()
    for comp in sorted(nx.connected_components(graph), key=lambda c: min(order[n] for n in c)):
        if len(comp) < 2:
            continue
        members = sorted(comp, key=order.__getitem__)
        prefix = members[0].rsplit(".", 1)[0] if "." in members[0] else ""
        for m in members[1:]:
            while prefix and not m.startswith(prefix + "."):
                prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        label = f"{prefix}.*" if prefix else "*"
        base, k = label, 1
        while label in used:
            k += 1
            label = f"{base}#{k}"
        used.add(label)
        for m in members:
            result[m] = label
    return result


def fingerprint(layers: Sequence[LayerInfo] | dict[str, tuple[int, ...]]) -> str:
    """sha256 of the sorted (FQN, weight shape) pairs: which model a bit map fits."""
    if isinstance(layers, dict):
        pairs = sorted((n, tuple(s)) for n, s in layers.items())
    else:
        pairs = sorted((layer.name, tuple(layer.weight_shape)) for layer in layers)
    text = "\n".join(f"{n}:{'x'.join(map(str, s))}" for n, s in pairs)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def model_shapes(model: nn.Module, include: Patterns = None,
                 exclude: Patterns = None) -> dict[str, tuple[int, ...]]:
    """Weight shape of every quantizable layer, by FQN (no forward pass)."""
    return {n: tuple(layer_weight(m).shape)
            for n, m in quantizable_modules(model, include, exclude).items()}
