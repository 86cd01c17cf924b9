"""Plain files: sorted JSON written atomically, and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dumps(doc: Any) -> str:
    """Sorted, indented, standard JSON (no NaN/Infinity tokens: see :func:`finite`)."""
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def tensor_digest(tensors: Iterable[Tensor]) -> str:
    """sha256 of the shapes, dtypes and contents of tensors, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        t = t.detach().cpu()
        if t.layout != torch.strided:  # a sparse buffer (a graph's adjacency): its entries,
            # never its dense form (which may not fit in memory)
            t = t.to_sparse_coo().coalesce()
            h.update(f"{t.layout};".encode())
            parts = [t.indices(), t.values()]
        else:
            parts = [t]
        for part in parts:
            # flat: a channels_last (O, I, 1, 1) weight is "contiguous" with stride(-1) != 1
            flat = part.contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return "sha256:" + h.hexdigest()


def batch_tensors(value: Any) -> Iterable[Tensor]:
    """Every tensor inside a batch (tensor, tuple/list, dict), in a fixed order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from batch_tensors(v)
    elif isinstance(value, dict):
        for k in sorted(value):
            yield from batch_tensors(value[k])
