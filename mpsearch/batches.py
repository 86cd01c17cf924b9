"""What a batch is, and how a model is called on one.

A batch is one of:

- a tensor: the model's single positional input;
- a tuple or list ``(inputs, targets)``: ``inputs`` a tensor (or a tuple/list of positional
  tensors, or a dict of keyword tensors), ``targets`` a tensor or ``None``; a 1-tuple is
  ``(inputs,)`` without targets;
- a dict: keyword arguments (a Hugging Face tokenizer's output). A ``labels`` entry is the
  target; it is passed to the model too where its ``forward`` takes ``labels`` (or any
  keyword), so Hugging Face models compute their own ``.loss``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Batch = Any


@dataclass(frozen=True)
class SplitBatch:
    """A batch taken apart into what the model is called with and the targets."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Tensor | None
    attention_mask: Tensor | None

    def for_model(self, model: nn.Module) -> SplitBatch:
        """This batch as ``model`` is called with it: without a dict batch's ``labels``
        where its ``forward`` takes no such keyword (they stay the targets)."""
        if "labels" not in self.kwargs or _takes_labels(model):
            return self
        return dataclasses.replace(self, kwargs={k: v for k, v in self.kwargs.items()
                                                 if k != "labels"})

    @property
    def batch_size(self) -> int:
        """Leading dimension of the first tensor input (1 if there is none)."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor) and value.dim() > 0:
                return int(value.shape[0])
        return 1


def split_batch(batch: Batch) -> SplitBatch:
    """Take one batch apart.

    Raises:
        TypeError: the batch is not a tensor, tuple/list or dict.
    """
    if isinstance(batch, Tensor):
        return SplitBatch((batch,), {}, None, None)
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        targets = kwargs.get("labels")
        mask = kwargs.get("attention_mask")
        return SplitBatch((), kwargs, targets if isinstance(targets, Tensor) else None,
                          mask if isinstance(mask, Tensor) else None)
    if isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise TypeError(
                f"a tuple/list batch must be (inputs,) or (inputs, targets), got length {len(batch)}"
            )
        inputs = batch[0]
        targets = batch[1] if len(batch) == 2 else None
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"batch targets must be a tensor or None, got {type(targets).__name__}")
        if isinstance(inputs, Tensor):
            return SplitBatch((inputs,), {}, targets, None)
        if isinstance(inputs, Mapping):
            kwargs = dict(inputs)
            mask = kwargs.get("attention_mask")
            return SplitBatch((), kwargs, targets, mask if isinstance(mask, Tensor) else None)
        if isinstance(inputs, (tuple, list)):
            return SplitBatch(tuple(inputs), {}, targets, None)
        raise TypeError(f"batch inputs must be a tensor, tuple or dict, got {type(inputs).__name__}")
    raise TypeError(
        f"a batch must be a tensor, a tuple/list (inputs, targets) or a dict of keyword "
        f"tensors, got {type(batch).__name__}"
    )


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def to_device(split: SplitBatch, device: torch.device) -> SplitBatch:
    """Move every tensor of a split batch to ``device``."""
    return SplitBatch(
        _to(split.args, device), _to(split.kwargs, device),
        _to(split.targets, device), _to(split.attention_mask, device),
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


#: what a model that takes several inputs was most likely given, said with its TypeError
TWO_INPUTS_HINT = (
    "mpsearch calls the model on batch[0] alone: a 2-item tuple/list batch is "
    "(inputs, targets); for several inputs give ((x1, x2), targets), ((x1, x2),) or a dict "
    "of keyword arguments, and data is a list of such batches: one batch goes in a list, "
    "[batch]")


LABELS_HINT = (
    "mpsearch passes a dict batch's 'labels' entry to the model too, as Hugging Face "
    "models take it; for a model that does not, give (dict_of_inputs, labels) batches")


def _takes_labels(model: nn.Module) -> bool:
    """Whether ``model``'s ``forward`` takes a ``labels`` keyword (or any keyword); True
    where its signature cannot be read. Cached for a class's own ``forward`` only: one set
    on the instance (accelerate's hooks, a closure) may hold the model."""
    forward = model.forward
    func = getattr(forward, "__func__", None)
    if func is not None and getattr(type(model), "forward", None) is func:
        return _signature_takes_labels(func)
    return _signature_takes_labels.__wrapped__(forward)


@functools.lru_cache(maxsize=256)
def _signature_takes_labels(forward: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "labels" and p.kind is not p.POSITIONAL_ONLY
               or p.kind is p.VAR_KEYWORD for p in params)


def call(model: nn.Module, split: SplitBatch) -> Any:
    """Call the model on a split batch (already on the right device).

    Raises:
        TypeError: the model's own, with :data:`TWO_INPUTS_HINT` where the model was
            called on one input and missed an argument (the batch's second item, taken
            for targets, may have been meant as an input), or :data:`LABELS_HINT` where
            it does not take a dict batch's ``labels`` after all (a ``forward`` of
            ``**kwargs`` that hands them on). A dict batch's ``labels`` are passed only to
            a ``forward`` that takes them (by name, or any keyword)."""
    split = split.for_model(model)
    try:
        return model(*split.args, **split.kwargs)
    except TypeError as exc:
        text = str(exc)
        if (len(split.args) == 1 and not split.kwargs and split.targets is not None
                and "positional argument" in text and TWO_INPUTS_HINT not in text):
            raise TypeError(f"{exc} ({TWO_INPUTS_HINT})") from exc
        if ("labels" in split.kwargs and "unexpected keyword argument 'labels'" in text
                and LABELS_HINT not in text):
            raise TypeError(f"{exc} ({LABELS_HINT})") from exc
        raise


def materialize(data: Iterable[Batch] | None, what: str = "data") -> list[Batch]:
    """Check ``data`` is a non-empty re-iterable of batches and return it as a list.

    Raises:
        ValueError: ``data`` is None, empty, or a one-shot iterator.
    """
    if data is None:
        raise ValueError(f"{what} is required: pass a list (or DataLoader) of batches")
    if isinstance(data, (Tensor, Mapping)):
        # ValueError like every other bad `data` (callers catch one kind of error)
        raise ValueError(  # noqa: TRY004
            f"{what} must be a re-iterable of batches (e.g. [batch] or a DataLoader), "
            f"got a single {type(data).__name__}; wrap it in a list"
        )
    if isinstance(data, Iterator):  # not iter(data) is data: that starts a DataLoader
        raise ValueError(  # noqa: TRY004 (callers catch one kind of error for bad data)
            f"{what} must be re-iterable (a list or DataLoader), got a one-shot "
            f"{type(data).__name__}; pass list(...) of it"
        )
    # a shuffling DataLoader draws its order from torch's global generator: put it back,
    # as every verb leaves the generator as it found it
    rng = torch.get_rng_state()
    try:
        batches = [_normal_tensors(b) for b in data]
    finally:
        torch.set_rng_state(rng)
    if not batches:
        raise ValueError(f"{what} is empty: give at least one batch")
    kinds = {_kind(b) for b in batches}
    if (isinstance(data, tuple) and len(batches) == 2 and kinds == {"a tensor"}
            and (batches[0].dtype != batches[1].dtype
                 or batches[0].shape[1:] != batches[1].shape[1:])):
        # batches of one model differ at most in their number of samples; float targets
        # of another width (a regressor's (N, 1)) are not a second batch
        raise ValueError(
            f"{what} is a tuple of two unlike tensors ({_describe(batches[0])} and "
            f"{_describe(batches[1])}): if it is one (inputs, targets) batch, wrap it in a "
            "list, [(inputs, targets)]; batches of one model are alike (two batches of "
            "another length each go in a list)")
    if isinstance(data, tuple) and len(kinds) > 1:  # a list may mix x and (x,) batches
        raise ValueError(
            f"{what} must be a list of batches, got a tuple of "
            f"{' and '.join(sorted(kinds))}: if it is one batch (e.g. ((x1, x2), targets)), "
            "wrap it in a list, [batch]")
    for i, b in enumerate(batches):
        try:
            split = split_batch(b)
        except TypeError as exc:
            raise TypeError(f"{what}[{i}]: {exc}") from None
        if split.batch_size == 0:
            raise ValueError(f"{what}[{i}] holds no sample (its inputs have 0 rows): drop "
                             "empty batches")
    return batches


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _kind(batch: Any) -> str:
    return ("a tensor" if isinstance(batch, Tensor) else "a tuple/list"
            if isinstance(batch, (tuple, list)) else "a mapping" if isinstance(batch, Mapping)
            else type(batch).__name__)


def _normal_tensors(batch: Any) -> Any:
    """``batch`` with any tensor made under ``torch.inference_mode`` cloned to a normal one
    (autograd cannot save inference tensors for backward); unchanged if it holds none."""
    if isinstance(batch, Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, (tuple, list)):
        items = [_normal_tensors(x) for x in batch]
        if all(a is b for a, b in zip(items, batch)):
            return batch
        return type(batch)(items) if type(batch) in (tuple, list) else tuple(items)
    if isinstance(batch, Mapping):
        values = {k: _normal_tensors(v) for k, v in batch.items()}
        return batch if all(values[k] is v for k, v in batch.items()) else values
    return batch


def first_output(output: Any) -> Any:
    """The tensor a loss or a divergence is computed on.

    Logits where the output has them, else ``last_hidden_state``, else the first tensor of
    a tuple or list (``(None, logits)``: the logits), of a dict's values or of a
    dataclass's fields; a plain tensor is itself.
    """
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, Mapping):
            value = output.get(key)
        if isinstance(value, Tensor):
            return value
    values: Iterable[Any] = ()
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        values = output
    elif isinstance(output, Mapping):
        values = output.values()
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        values = (getattr(output, f.name) for f in dataclasses.fields(output))
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(
        f"cannot find a tensor in the model's output of type {type(output).__name__} "
        "(mpsearch reads logits or last_hidden_state, or the first tensor of a tuple, list, "
        "dict or dataclass); loss_fn=... scores it in a search, but validate's output "
        "divergence needs such a tensor"
    )


def ignored_outputs(output: Any) -> list[str]:
    """The other tensors of a plain tuple, list or dict output, which :func:`first_output`
    leaves out, as ``"[1] (8, 10)"`` / ``"'boxes' (8, 4)"`` (a plain dict with a
    ``logits`` entry: every other one). For Hugging Face's outputs only ``pooler_output``,
    which a layer of its own computes: the rest are hidden states, attentions and caches,
    not further predictions. Empty for a tensor."""
    if isinstance(output, Tensor):
        return []
    def get(key: str) -> Any:
        value = getattr(output, key, None)
        return output.get(key) if value is None and isinstance(output, Mapping) else value
    named = next((k for k in ("logits", "last_hidden_state") if isinstance(get(k), Tensor)), None)
    if named is not None and isinstance(output, Mapping) and not type(
            output).__module__.startswith("transformers"):
        # the user's own dict: its other entries are predictions too
        return [f"{k!r} {tuple(v.shape)}" for k, v in output.items()
                if k != named and isinstance(v, Tensor)]
    if named is not None:
        pooled = get("pooler_output")
        return ([f"'pooler_output' {tuple(pooled.shape)}"] if isinstance(pooled, Tensor)
                and not isinstance(get("logits"), Tensor) else [])
    if isinstance(output, Mapping):
        items = [(repr(k), v) for k, v in output.items()]
    elif isinstance(output, Sequence) and not isinstance(output, str):
        items = [(f"[{i}]", v) for i, v in enumerate(output)]
    else:
        return []
    tensors = [(k, v) for k, v in items if isinstance(v, Tensor)]
    return [f"{k} {tuple(v.shape)}" for k, v in tensors[1:]]


def output_kind(output: Any) -> str:
    """``"logits"`` (KL divergence applies) or ``"hidden"`` (mean squared error applies).

    Named outputs decide (``logits``; ``last_hidden_state``); else the shape of the first
    tensor: ``(N, C)`` and ``(N, T, C)`` with ``C > 1`` are class logits over their last
    dimension; a value per sample (``(N,)``, ``(N, 1)``, ``(N, T, 1)``: a regression) and
    outputs of four or more dimensions (images, score maps: an autoencoder's
    ``(N, 1, H, W)``, whose last dimension is a width, not classes) are compared by MSE.
    """
    has = (lambda k: isinstance(getattr(output, k, None), Tensor)
           or (isinstance(output, Mapping) and isinstance(output.get(k), Tensor)))
    if not isinstance(output, Tensor):
        if has("logits"):
            return "logits"
        if has("last_hidden_state"):
            return "hidden"
    first = first_output(output)
    if isinstance(first, Tensor) and (first.dim() < 2 or first.dim() > 3
                                      or first.shape[-1] == 1):
        return "hidden"
    return "logits"


def _slice(value: Any, start: int, stop: int, rows: int) -> Any:
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, start, stop, rows) for v in value)
    if isinstance(value, Mapping):
        return {k: _slice(v, start, stop, rows) for k, v in value.items()}
    return value


def batch_rows(batch: Batch) -> int:
    """Number of samples in a batch (leading dimension of its first tensor input)."""
    return split_batch(batch).batch_size


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of a batch, in the same form (tensor, tuple or dict).

    Every tensor whose leading dimension is the batch size is sliced; other values
    (scalars, tensors shared by all samples) are kept as they are.
    """
    return _slice(batch, start, stop, batch_rows(batch))


def rechunk(batches: Sequence[Batch], rows: int) -> list[Batch]:
    """Split every batch into pieces of at most ``rows`` samples.

    Pieces of one batch differ in size only when ``rows`` does not divide it; a
    per-batch mean loss then weights samples slightly unequally, so callers pick ``rows``
    dividing the batch size where they can.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    out: list[Batch] = []
    for batch in batches:
        n = batch_rows(batch)
        if n <= rows:
            out.append(batch)
            continue
        out.extend(slice_batch(batch, s, min(s + rows, n)) for s in range(0, n, rows))
    return out
