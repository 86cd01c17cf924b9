"""``mpsearch export`` and ``mpsearch import``: other tools' formats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mpsearch.cli._common import (
    EXIT_OK,
    UsageError,
    add_common,
    collected_warnings,
    emit,
    load_model,
    steps,
)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Format options: the named flags, then ``--set KEY=JSON`` pairs."""
    opts: dict[str, Any] = {}
    if getattr(args, "onnx_model", None):
        opts["onnx_model"] = args.onnx_model
    if getattr(args, "arch", None):
        opts["arch"] = args.arch
    for item in getattr(args, "set", None) or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--set takes KEY=VALUE (VALUE as JSON, or a plain string), "
                             f"got {item!r}")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw
    return opts


def run_export(args: argparse.Namespace) -> int:
    """Write a bit map in another tool's format."""
    from mpsearch import BitMap
    from mpsearch.export import FORMATS, dumps, export, write

    if args.list:
        payload = {n: f.summary for n, f in FORMATS.items()}
        emit(args, payload, "\n".join(f"{n:20} {s}" for n, s in payload.items()))
        return EXIT_OK
    if not args.bitmap or not args.to:
        raise UsageError("export needs --bitmap and --to (or --list)")
    options = _options(args)
    # JSON-ready forms for files: torchao's dict, ORT's kwargs with QuantType names
    if args.to == "torchao":
        options.setdefault("as_dict", True)
    if args.to == "onnxruntime":
        options.setdefault("as_names", True)
        options.setdefault("with_excludes", True)
    warned: list[str] = []
    with steps(args, 2, f"export {args.to}") as advance, collected_warnings(args, warned):
        bitmap = BitMap.load(args.bitmap)
        result = export(bitmap, args.to, **options)
        advance("exported")
        if args.out:
            write(args.to, result, args.out)
        advance("written")
    text = dumps(args.to, result)
    if args.json:
        emit(args, {"format": args.to, "out": args.out, "warnings": warned,
                    "export": json.loads(text) if not FORMATS[args.to].text
                    else text.splitlines()})
    elif args.out:
        print(f"wrote {args.out} ({args.to}, {len(bitmap)} layers)")
        if args.to == "onnxruntime":
            print("ORT's quantize_static takes QuantType members, not their names: "
                  "quantize_static(model_in, model_out, reader, "
                  f"**mpsearch.export.onnxruntime.load_kwargs({args.out!r}))")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def run_import(args: argparse.Namespace) -> int:
    """Read another tool's format into an mpsearch bit map."""
    from mpsearch.export import import_bitmap, loads

    options = _options(args)
    warned: list[str] = []
    with steps(args, 3, f"import {args.from_}") as advance, collected_warnings(args, warned):
        if args.model:
            options["model"] = load_model(args)
        advance("model")
        obj = loads(args.from_, Path(args.input).read_text(encoding="utf-8"))
        bitmap = import_bitmap(args.from_, obj, **options)
        advance("imported")
        path = bitmap.save(args.out)
        advance("saved")
    emit(args, {"format": args.from_, "bitmap": str(path), "bits": bitmap.bits(),
                "warnings": warned}, f"wrote {path}: {bitmap!r}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``export`` and ``import``."""
    from mpsearch.export import FORMATS, IMPORTERS

    fmts = ", ".join(FORMATS)
    e = sub.add_parser("export", help="write a bit map in another tool's format",
                       description=f"Export a bit map. Formats: {fmts}. Warnings name every "
                                   "layer a format could not say exactly (bits widened, "
                                   "layers the tool does not quantize).")
    e.add_argument("--bitmap", help="bit map JSON")
    e.add_argument("--to", choices=list(FORMATS), help="target format")
    e.add_argument("--out", help="file to write (default: print to stdout)")
    e.add_argument("--onnx-model", help="onnxruntime: the float ONNX model the overrides are for")
    e.add_argument("--arch", help="llamacpp: tensor naming, llama | bert | auto")
    e.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="other exporter options, VALUE as JSON (e.g. strict=false)")
    e.add_argument("--list", action="store_true", help="list the formats and exit")
    add_common(e)
    e.set_defaults(run=run_export)

    i = sub.add_parser("import", help="read another tool's format into a bit map",
                       description="Import a bit map from: " + ", ".join(IMPORTERS) + ". "
                                   "--model fills shapes and resolves regex/tag formats.")
    i.add_argument("--from", dest="from_", required=True, choices=list(IMPORTERS),
                   help="source format")
    i.add_argument("--input", required=True, help="file in that format")
    i.add_argument("--out", default="bitmap.json",
                   help="bit map JSON to write (default: bitmap.json)")
    i.add_argument("--model", help="package.module:factory (or zoo:…) the map is for")
    i.add_argument("--model-args", metavar="JSON", help="keyword arguments of the factory")
    i.add_argument("--arch", help="llamacpp: tensor naming, llama | bert")
    i.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="other importer options")
    add_common(i)
    i.set_defaults(run=run_import)
