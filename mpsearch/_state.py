"""Leave the user's model exactly as it was found."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block on ``model`` and restore its modes, flags, grads and hooks afterwards.

    Restored on exit, also after an exception: every module's ``training`` flag, every
    parameter's ``requires_grad`` and ``.grad``, every buffer (a forward that updates a
    counter or a cache of its own runs many times), the hook dictionaries of every module
    (hooks the block added are removed; the user's own are kept) and torch's global CPU
    random number generator (building layers draws from it). Weights are not copied:
    mpsearch never writes to the user's weights, and the tests check that.

    Within the block, ``nn.TransformerEncoder`` does not turn padded batches into nested
    tensors (its ``use_nested_tensor``, put back after): the layers inside would receive
    tensors without a shape, which no hook can record or replay. Padded positions are then
    computed, not zeroed; a divergence masked by ``attention_mask`` ignores them.
    """
    rng = torch.get_rng_state()
    # buffers a model's own forward updates (a step counter, a cache); BatchNorm's running
    # statistics too, were a module left in train mode
    buffers = [(m, name, t, t.detach().clone()) for m in model.modules()
               for name, t in m._buffers.items() if isinstance(t, Tensor) and not t.is_meta]
    nested = [m for m in model.modules()
              if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)]
    for encoder in nested:
        encoder.use_nested_tensor = False
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    # (.grad of a non-leaf, e.g. a scripted module's, only warns: it has none to keep)
    grads = {name: p.grad for name, p in model.named_parameters() if p.is_leaf}
    hooks = {
        name: {attr: dict(getattr(m, attr)) for attr in _HOOK_DICTS if hasattr(m, attr)}
        for name, m in model.named_modules()
    }
    try:
        yield model
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]
            for attr, saved in hooks.get(name, {}).items():
                current = getattr(m, attr)
                for key in [k for k in current if k not in saved]:
                    del current[key]
        for name, p in model.named_parameters():
            if name in flags and not is_lazy(p):  # a lazy module's has no flag to set
                if p.is_leaf:
                    p.requires_grad_(flags[name])
                if name in grads:
                    p.grad = grads[name]
        for encoder in nested:
            encoder.use_nested_tensor = True
        for owner, name, t, copied in buffers:
            if owner._buffers.get(name) is not t:
                owner._buffers[name] = t
            if t.layout != torch.strided:  # sparse: no torch.equal; put the copy back
                if t.shape != copied.shape or bool((t - copied).coalesce().values().any()):
                    owner._buffers[name] = copied
                continue
            if t.shape != copied.shape:
                with torch.no_grad():
                    t.set_(copied)  # type: ignore[call-overload]
            elif not torch.equal(t, copied):
                with torch.no_grad():
                    t.copy_(copied)
        torch.set_rng_state(rng)


@contextmanager
def backward_hooks_off(model: nn.Module) -> Iterator[None]:
    """Suspend the backward hooks of ``model``'s modules and torch's global module
    backward hooks within the block (put back after, in their order).

    Sensitivities are gradients of the loss itself; a user's backward hook (gradient
    clipping, scaling, logging that zeroes) would change them: one that zeroed a layer's
    input gradients made every layer before it look free to quantize to 2 bits. Forward
    hooks stay: they are part of the function the model computes.
    """
    from torch.nn.modules import module as torch_module

    dicts = [getattr(m, attr) for m in model.modules()
             for attr in ("_backward_hooks", "_backward_pre_hooks") if hasattr(m, attr)]
    dicts += [getattr(torch_module, attr, {}) for attr in ("_global_backward_hooks",
                                                           "_global_backward_pre_hooks")]
    saved = [(d, dict(d)) for d in dicts if d]
    if saved:
        log.info("the model's backward hooks do not run during the search (%d hook "
                 "dictionaries suspended): sensitivities are gradients of the loss itself",
                 len(saved))
    for d, _ in saved:
        d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            added = dict(d)
            d.clear()
            d.update(items)
            d.update(added)


def outside_inference_mode(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with ``torch.inference_mode`` off, also when the caller has it on.

    The public verbs quantize copies of weights, cache them by version counter and take
    gradients (Fisher, Hutchinson); inference tensors allow none of that. Inputs the user
    made under inference mode are cloned where gradients need them
    (:func:`mpsearch.batches.materialize`).
    """
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


@contextmanager
def unfused_attention() -> Iterator[None]:
    """Turn off PyTorch's fused transformer fast path within the block (restored after).

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` may run ``aten::_transformer_encoder_layer_fwd`` /
    ``_native_multi_head_attention``, which the ONNX exporter cannot express.
    """
    import torch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def functional_call(module: nn.Module, tensors: dict[str, Tensor], args: Any,
                    kwargs: dict[str, Any] | None = None, *, strict: bool = False) -> Any:
    """:func:`torch.func.functional_call` that leaves the user's parameters in their slots.

    torch's own restores a module reachable under two attribute names (``self.alias =
    self.head``) through the second name's record of the swapped-in tensor, so the module
    kept the substituted tensor (a quantized copy, or a functorch wrapper) in place of the
    user's Parameter. Here every module holding a tensor that is swapped — the owners of
    the names given and, as torch ties them, every other holder of those tensors (a T5's
    shared embedding under three names, tied to its LM head) — has its slots put back
    after the call where they still hold a swapped-in tensor (a buffer the forward itself
    re-registered, such as a growing cache, is the forward's to keep).
    """
    originals: set[int] = set()
    for key in tensors:
        path, _, attr = key.rpartition(".")
        try:
            owner = module.get_submodule(path) if path else module
        except AttributeError:  # torch's own call says what is wrong with the name
            continue
        value = owner._parameters.get(attr, owner._buffers.get(attr))
        if value is not None:
            originals.add(id(value))
    holders = [m for m in module.modules()
               if any(id(v) in originals for v in itertools.chain(m._parameters.values(),
                                                                  m._buffers.values()))]
    swapped = {id(t) for t in tensors.values()}
    saved = [(slots, dict(slots)) for m in holders for slots in (m._parameters, m._buffers)]
    try:
        return torch.func.functional_call(module, tensors, args, kwargs, strict=strict)
    finally:
        for slots, before in saved:
            for key, value in before.items():
                current = slots.get(key)
                if current is not value and id(current) in swapped:
                    slots[key] = value  # type: ignore[assignment]
