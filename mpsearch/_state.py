"""Leave the user's model exactly as it was found."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block on ``model`` and restore its modes, flags, grads and hooks afterwards.

    Restored on exit, also after an exception: every module's ``training`` flag, every
    parameter's ``requires_grad`` and ``.grad``, and the hook dictionaries of every module
    (hooks the block added are removed; the user's own are kept). Weights are not copied:
    mpsearch never writes to the user's weights, and the tests check that.
    """
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    grads = {name: p.grad for name, p in model.named_parameters()}
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
            if name in flags:
                p.requires_grad_(flags[name])
                p.grad = grads[name]


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
