"""Export bit maps to other quantization tools, and import theirs.

One module per format; this table is the registry the CLI and :meth:`BitMap.export` use.

=====================  =================================================  ========  ======
name                   what it produces                                   import    output
=====================  =================================================  ========  ======
``mpsearch``           our versioned bit map JSON                         yes       JSON
``onnxruntime``        ``TensorQuantOverrides`` for ``quantize_static``    no        JSON
``torchao``            ``FqnToConfig`` (objects, or torchao's dict form)  yes       JSON
``hawq``               HAWQ ``bit_config`` (module name → bits)           yes       JSON
``llamacpp``           ``llama-quantize --tensor-type`` lines             yes       text
``gptqmodel``          GPTQModel / vLLM ``dynamic`` rules                 yes       JSON
``compressed-tensors`` ``QuantizationConfig`` with ``config_groups``      yes       JSON
``hqq``                HQQ ``dynamic_config`` (``HqqConfig`` kwargs)      yes       JSON
=====================  =================================================  ========  ======

Every export says what it could not express exactly (bits widened to what the tool
stores, layers the tool cannot quantize) in one :class:`ExportWarning`.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsearch._io import write_text_atomic
from mpsearch.export import (
    compressed_tensors,
    gptqmodel,
    hawq,
    hqq,
    llamacpp,
    mpsearch_json,
    onnxruntime,
    torchao,
)
from mpsearch.export._common import ExportWarning, warn

if TYPE_CHECKING:
    from mpsearch.bitmap import BitMap


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        name: registry key (``--to`` of the CLI).
        summary: one line: what the tool gets.
        export: ``(bitmap, **options) -> object``.
        import_: ``(object, **options) -> BitMap``, or None where the format does not
            carry per-layer bits back.
        text: written as lines of text rather than JSON.
        needs: options an export cannot run without (e.g. ``onnx_model``).
        sliced: takes the bit map of a sliced search (``search(..., slices=n)``): the
            tool is handed the sliced model itself (torchao's ``quantize_``, an ONNX graph
            exported from it). Formats keyed by the tensors of the original checkpoint
            (llama.cpp, GPTQModel, compressed-tensors, HQQ, HAWQ) set one width per
            tensor and cannot.
    """

    name: str
    summary: str
    export: Callable[..., Any]
    import_: Callable[..., BitMap] | None = None
    text: bool = False
    needs: tuple[str, ...] = ()
    sliced: bool = False


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("mpsearch", "mpsearch bit map JSON", mpsearch_json.export, mpsearch_json.import_,
           sliced=True),
    Format("onnxruntime", "ONNX Runtime TensorQuantOverrides for quantize_static",
           onnxruntime.export, needs=("onnx_model",), sliced=True),
    Format("torchao", "torchao FqnToConfig", torchao.export, torchao.import_, sliced=True),
    Format("hawq", "HAWQ bit_config", hawq.export, hawq.import_),
    Format("llamacpp", "llama-quantize --tensor-type PATTERN=TYPE lines", llamacpp.export,
           llamacpp.import_, text=True),
    Format("gptqmodel", "GPTQModel / vLLM quantize_config with dynamic rules",
           gptqmodel.export, gptqmodel.import_),
    Format("compressed-tensors", "compressed-tensors QuantizationConfig (config_groups)",
           compressed_tensors.export, compressed_tensors.import_),
    Format("hqq", "HQQ dynamic_config (HqqConfig keyword arguments)", hqq.export, hqq.import_),
)}
EXPORTERS: dict[str, Callable[..., Any]] = {n: f.export for n, f in FORMATS.items()}
"""Format name → exporter ``(bitmap, **options) -> object``."""
IMPORTERS: dict[str, Callable[..., BitMap]] = {
    n: f.import_ for n, f in FORMATS.items() if f.import_ is not None}
"""Format name → importer ``(object, **options) -> BitMap``."""


def _format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; choose one of "
                         f"{sorted(FORMATS)}") from None


def export(bitmap: BitMap, fmt: str, **options: Any) -> Any:
    """Export ``bitmap`` as format ``fmt`` (see the module table and each module's options).

    Raises:
        ValueError: unknown format, a missing required option, or what the exporter raises.
    """
    f = _format(fmt)
    missing = [o for o in f.needs if options.get(o) is None]
    if missing:
        raise ValueError(f"{fmt} export needs {', '.join(missing)}=")
    if bitmap.slices is not None and not f.sliced:
        raise ValueError(
            f"{fmt} sets one width per tensor of the original checkpoint, and this bit map "
            "(a sliced search: slices=n, or the default slices='auto' on a model whose "
            "weights sit in a few layers) gives channel slices of a layer widths of their own: "
            "export a per-layer search (slices=None), or deploy the sliced model "
            "(SearchResult.sliced_model / mpsearch.slice_model) with "
            f"{', '.join(sorted(n for n, g in FORMATS.items() if g.sliced))} or "
            "mpsearch.export_onnx")
    if bitmap.slices is not None and fmt == "torchao":
        # its keys name the slices: on the original model they match no module
        warn(fmt, sorted(bitmap.slices.layers), "the config names channel slices "
             "(<layer>.parts.<k>): apply it to mpsearch.slice_model(model, bitmap) (or "
             "SearchResult.sliced_model), not to the original model, where torchao's "
             "quantize_ matches none of them and quantizes nothing; sliced")
    return f.export(bitmap, **options)


def import_bitmap(fmt: str, obj: Any, **options: Any) -> BitMap:
    """Read a bit map from another tool's format (``model=`` resolves patterns and shapes).

    Raises:
        ValueError: unknown format, a format without importer, or malformed input.
        TypeError: input of the wrong type (either error names the format and the key).

    Warns:
        ExportWarning: with ``model``, parts of the input that match no layer of it (and
            so set nothing).
    """
    f = _format(fmt)
    if f.import_ is None:
        raise ValueError(f"format {fmt!r} has no importer; importable: {sorted(IMPORTERS)}")
    return f.import_(obj, **options)


def _plain(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "model_dump"):
        return _plain(obj.model_dump())
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON; export with as_dict=True "
                    "or as_names=True")


def dumps(fmt: str, obj: Any) -> str:
    """The text of an export, as written to a file: lines, or sorted indented JSON."""
    if _format(fmt).text:
        return "".join(f"{line}\n" for line in obj)
    return json.dumps(_plain(obj), indent=2, sort_keys=True) + "\n"


def loads(fmt: str, text: str) -> Any:
    """Parse what :func:`dumps` wrote (the input of the importers).

    Raises:
        ValueError: unknown format, or text that is not JSON for a JSON format.
        TypeError: ``text`` is not a string.
    """
    text_format = _format(fmt).text
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if not isinstance(text, str):
        raise TypeError(f"{fmt}: loads takes the text of a file, got {type(text).__name__}")
    if text_format:
        return text.split()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{fmt}: not JSON ({exc}); expected the file an export of this "
                         "format writes") from None


def write(fmt: str, obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write an export atomically (temp file + rename); returns the path."""
    return write_text_atomic(path, dumps(fmt, obj))


__all__ = ["EXPORTERS", "FORMATS", "IMPORTERS", "ExportWarning", "Format", "dumps", "export",
           "import_bitmap", "loads", "write"]
