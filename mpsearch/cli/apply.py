"""``mpsearch apply`` and ``mpsearch validate``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mpsearch._io import atomic_file
from mpsearch.cli._common import (
    EXIT_OK,
    add_common,
    add_model_args,
    add_threads,
    collected_warnings,
    emit,
    load_data,
    load_model,
    steps,
)

APPLY_FORMATS = ("state_dict", "onnx", "onnx-qdq")


def _save_state_dict(model: Any, path: Path) -> None:
    import torch

    tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        torch.save(tensors, tmp)


def run_apply(args: argparse.Namespace) -> int:
    """Apply a bit map: a fake-quantized state_dict or ONNX file, or ORT's QDQ model."""
    import mpsearch

    out = Path(args.out)
    inferred = args.format is None
    if inferred:  # from the file's extension: .onnx → onnx, else state_dict
        args.format = "onnx" if out.suffix.lower() == ".onnx" else "state_dict"
    elif args.format == "state_dict" and out.suffix.lower() == ".onnx":
        raise ValueError(f"--format state_dict writes a torch file, not ONNX: --out {out} "
                         "(use --format onnx or onnx-qdq, or a .pt name)")
    payload: dict[str, Any] = {"format": args.format, "out": str(out)}
    warned: list[str] = []
    if args.format != "state_dict" and not args.data:
        raise ValueError(f"--format {args.format}{' (from --out .onnx)' * inferred} needs "
                         f"--data (a sample batch"
                         f"{' and calibration data' if args.format == 'onnx-qdq' else ''})")
    total = {"state_dict": 3, "onnx": 4, "onnx-qdq": 5}[args.format]
    with steps(args, total, "apply") as advance, collected_warnings(args, warned):
        model = load_model(args)
        bitmap = mpsearch.BitMap.load(args.bitmap)
        if args.format == "state_dict":
            # in place, so that a sliced map's values land in the original layers: the
            # state_dict loads into the model's own class
            advance("loaded")
            qmodel = mpsearch.quantize_(model, bitmap)
            advance("quantized")
            _save_state_dict(qmodel, out)
            advance("saved")
        else:
            if bitmap.slices is not None:  # a sliced search: its layers are the model's slices
                # (those of one width merged, as deployed: one tensor where they all agree)
                from mpsearch.slices import for_deployment

                model, bitmap = for_deployment(model, bitmap)
            bitmap.check_model(model, as_is=True)
            advance("loaded")
            from mpsearch.export import onnxruntime as ort_export

            batches = list(load_data(args))
            advance("data")
            if args.format == "onnx":
                ort_export.to_onnx(mpsearch.quantize(model, bitmap), batches[0], out)
                advance("exported")
            else:
                float_onnx = out.with_name(out.stem + ".float.onnx")
                ort_export.to_onnx(model, batches[0], float_onnx)
                advance("exported")
                calib = batches[:args.calib_batches]
                ort_export.quantize_static(float_onnx, out, bitmap,
                                           ort_export.BatchReader(calib, float_onnx))
                advance("quantized")
                stored = ort_export.weight_bits(float_onnx, out, bitmap)
                payload["float_onnx"] = str(float_onnx)
                payload["stored"] = {n: {"type": t, "bits": b} for n, (t, b) in stored.items()}
            advance("saved")
    payload["warnings"] = warned
    lines = [f"wrote {out} ({args.format}) for {bitmap!r}"]
    if "stored" in payload:
        lines += [f"  {n}: asked {bitmap[n].w_bits} bits, stored {s['type']}"
                  for n, s in payload["stored"].items()]
    emit(args, payload, "\n".join(lines))
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    """Float vs quantized metrics of a bit map on evaluation data."""
    import mpsearch

    model = load_model(args)
    data = load_data(args)
    report = mpsearch.validate(model, mpsearch.BitMap.load(args.bitmap), data=data,
                               progress=not (args.quiet or args.json))
    emit(args, report.to_dict(), str(report))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``apply`` and ``validate``."""
    a = sub.add_parser("apply", help="write the quantized model (state_dict, ONNX, ORT QDQ)",
                       description="Apply a bit map to a model. state_dict: weights "
                                   "fake-quantized by mpsearch's quantizer, saved with "
                                   "torch.save (tensors only). onnx: that model exported to "
                                   "ONNX. onnx-qdq: the float model exported to ONNX and "
                                   "quantized by ONNX Runtime's quantize_static with the bit "
                                   "map's per-tensor overrides (real int4/int8 weights).")
    add_model_args(a, data=None)
    a.add_argument("--data", help="package.module:loader (or zoo:…) of batches: a sample for "
                                  "ONNX export, calibration for onnx-qdq")
    a.add_argument("--data-args", metavar="JSON", help="keyword arguments of the loader")
    a.add_argument("--bitmap", required=True, help="bit map JSON")
    a.add_argument("--format", choices=APPLY_FORMATS, default=None,
                   help="what to write (default: onnx for an --out ending in .onnx, "
                        "state_dict otherwise)")
    a.add_argument("--calib-batches", type=int, default=8,
                   help="onnx-qdq: calibration batches ORT runs (default 8)")
    a.add_argument("--out", required=True, help="file to write (.pt or .onnx)")
    add_threads(a)
    add_common(a)
    a.set_defaults(run=run_apply)

    v = sub.add_parser("validate", help="float vs quantized metrics of a bit map",
                       description="Quantize a copy of the model as the bit map says and "
                                   "compare it with the float model on evaluation data.")
    add_model_args(v, data="evaluation")
    v.add_argument("--bitmap", required=True, help="bit map JSON")
    add_threads(v)
    add_common(v)
    v.set_defaults(run=run_validate)
