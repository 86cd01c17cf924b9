"""Our own bit map JSON (``format: mpsearch.bitmap``), as an export format like the others.

The format is described in ``docs/architecture.md`` and validated by
:meth:`mpsearch.BitMap.from_dict`; exporting and importing it is a lossless round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap


def export(bitmap: BitMap) -> dict[str, Any]:
    """The bit map's JSON document (plain dicts and lists)."""
    return bitmap.to_dict()


def import_(doc: Any, *, model: nn.Module | None = None) -> BitMap:
    """Validate a bit map document; with ``model``, also check that it fits the model.

    Raises:
        BitMapError: malformed document, or (with ``model``) layers that do not fit.
    """
    from mpsearch.bitmap import BitMap

    bitmap = BitMap.from_dict(doc)
    if model is not None:
        bitmap.check_model(model)
    return bitmap
