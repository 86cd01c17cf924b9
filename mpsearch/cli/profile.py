"""``mpsearch profile``: measure the real kernels of a model's layers on this device."""

from __future__ import annotations

import argparse
from typing import Any

from mpsearch.cli._common import EXIT_OK, add_common, add_model_args, emit, load_data, load_model


def run_profile(args: argparse.Namespace) -> int:
    """Profile every distinct layer shape of the model in every format with a kernel."""
    import mpsearch
    from mpsearch._report import markdown_table

    model = load_model(args)
    batches = load_data(args)
    sample = next(iter(batches), None)
    if sample is None:
        raise ValueError(f"--data {args.data} gave no batches: profile times one of them")
    reuse = mpsearch.HardwareProfile.load(args.reuse) if args.reuse else None
    prof = mpsearch.profile(model, sample, device=args.device, backend=args.backend,
                            bits=args.bits,
                            threads=args.threads, cache=tuple(args.cache), rounds=args.rounds,
                            reuse=reuse, seed=args.seed, progress=not (args.quiet or args.json))
    path = prof.save(args.out)
    rows = prof.table()
    payload = {"profile": str(path), "device": prof.device, "rows": rows}
    import pandas as pd

    text = (markdown_table(pd.DataFrame(rows), floatfmt=".4g") if rows else "(no layers)")
    emit(args, payload, f"{text}\n\nwrote {path}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``profile``."""
    p = sub.add_parser("profile", help="measure real kernel latencies of a model's layers",
                       description="Time every distinct layer shape of the model in every "
                                   "format that has a real kernel on the device (FP32, INT8 "
                                   "W8A8, INT4/INT2 weight-only; FP16 on the torch backend); writes a HardwareProfile "
                                   "JSON for `search --profile`.")
    add_model_args(p, data="sample")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (default) or cuda")
    p.add_argument("--backend", default=None, choices=["onnxruntime", "torch"],
                   help="kernels: onnxruntime (CPU default) or torch (CUDA default; on CPU "
                        "PyTorch's _int_mm / int4pack kernels)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8, 32],
                   help="bit-widths to measure (default 2 4 8 32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--cache", nargs="+", default=["warm"], choices=["warm", "cold"],
                   help="cache state(s) to measure (default warm)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per kernel")
    p.add_argument("--reuse", help="a profile JSON to extend (shapes in it are not re-measured)")
    p.add_argument("--out", default="hw_profiles/profile.json", help="profile JSON to write")
    add_common(p)
    p.set_defaults(run=run_profile)
