"""Plain files: sorted JSON written atomically, and content fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path`` to write; when the block ends without error it is
    renamed onto ``path`` with the mode a plain write gets (0666 less the umask:
    ``mkstemp`` makes files private), otherwise removed. ``path``'s folder is created.

    Raises:
        IsADirectoryError: ``path`` is a folder (checked first, naming it).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # an existing file keeps its mode, as a plain write leaves it
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask: read where the system shows it (Linux), else set and put back
    (which another thread creating a file in between would see)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def dumps(doc: Any) -> str:
    """Sorted, indented, standard JSON (no NaN/Infinity tokens: a non-finite number raises
    ``ValueError``; :func:`json_safe` makes them null)."""
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an infinite standard error of one sample, a
    NaN) replaced by None, through dicts, lists and tuples: strict JSON has no such
    numbers (Python writes ``Infinity``, which ``JSON.parse`` and most readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
