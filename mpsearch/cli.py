"""``mpsearch`` command line: ``demo``, ``search``, ``validate``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _load_object(spec: str, what: str) -> Any:
    """Call ``package.module:function`` (no arguments) and return what it returns."""
    if ":" not in spec:
        raise ValueError(f"{what} must look like package.module:function, got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {what}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{module_name} has no callable {func_name!r} for {what}")
    return func()


def _pins(items: Sequence[str] | None) -> dict[str, int]:
    out = {}
    for item in items or ():
        name, _, bits = item.rpartition("=")
        if not name or not bits.isdigit():
            raise ValueError(f"--pin takes NAME=BITS, got {item!r}")
        out[name] = int(bits)
    return out


def _budget(args: argparse.Namespace) -> Any:
    from mpsearch import Budget

    limits = {k: getattr(args, k) for k in ("avg_bits", "size_bytes", "bops")
              if getattr(args, k) is not None}
    if not limits:
        raise ValueError("give a budget: --avg-bits, --size-bytes and/or --bops")
    return Budget(**limits)


def _cmd_demo(args: argparse.Namespace) -> int:
    from mpsearch._report import markdown_table
    from mpsearch.demo import run_demo

    out = run_demo(args.model, args.budgets, out_dir=args.out, seed=args.seed,
                   progress=not args.quiet)
    table = out.result.table
    cols = ["kind", "params", "w_bits"] + [c for c in table.columns
                                          if c.startswith("omega_") and "stderr" not in c]
    extra = [c for c in ("trace", "trace_stderr") if c in table.columns]
    if args.json:
        print(json.dumps({"summary": out.summary.to_dict(orient="records"),
                          "files": {k: str(v) for k, v in out.files.items()}}, indent=2))
        return EXIT_OK
    print(f"\nPer-layer bits at {out.result.bitmap.avg_bits():.2f} average bits:\n")
    print(markdown_table(table[cols + extra], index=True, floatfmt=".3g"))
    print("\nSearched vs uniform maps on held-out data:\n")
    print(markdown_table(out.summary))
    print("\nWrote:")
    for path in out.files.values():
        print(f"  {path}")
    return EXIT_OK


def _cmd_search(args: argparse.Namespace) -> int:
    import mpsearch

    model = _load_object(args.model, "--model")
    data = _load_object(args.data, "--data")
    estimator = mpsearch.Hutchinson(tol=args.tol, max_probes=args.max_probes,
                                     min_probes=min(8, args.max_probes))
    res = mpsearch.search(model, _budget(args), data=data, bits=args.bits, seed=args.seed,
                          sensitivity=estimator,
                          include=args.include, exclude=args.exclude, pin=_pins(args.pin),
                          tie="fused" if args.tie_fused else None, a_bits=args.a_bits,
                          progress=not args.quiet)
    res.bitmap.save(args.out)
    if args.json:
        print(json.dumps({"bitmap": str(args.out), "predicted": res.bitmap.predicted,
                          "status": res.front.status, "timings_s": res.timings_s}, indent=2))
    else:
        from mpsearch._report import markdown_table

        print(markdown_table(res.table, index=True, floatfmt=".3g"))
        print(f"\n{res.bitmap!r}\npredicted: {res.bitmap.predicted}\nwrote {args.out}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    import mpsearch

    model = _load_object(args.model, "--model")
    data = _load_object(args.data, "--data")
    report = mpsearch.validate(model, mpsearch.BitMap.load(args.bitmap), data=data,
                               progress=not args.quiet)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="mpsearch", description="Mixed-precision bit-allocation "
                                "search for PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="search, validate and plot on an embedded real model")
    d.add_argument("--model", default="dwsep", choices=["dwsep", "cnn", "minilm"],
                   help="dwsep: MobileNet-style CNN on MNIST (default); cnn: plain CNN; "
                        "minilm: all-MiniLM-L6-v2 on real English text")
    d.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0],
                   help="average weight bits to search at")
    d.add_argument("--out", default="results", help="output folder (default: results)")

    s = sub.add_parser("search", help="search a bit map for a model")
    s.add_argument("--model", required=True, help="package.module:factory returning the model")
    s.add_argument("--data", required=True,
                   help="package.module:loader returning a list of calibration batches")
    s.add_argument("--avg-bits", type=float, help="average weight bits budget")
    s.add_argument("--size-bytes", type=float, help="weight bytes budget (scales included)")
    s.add_argument("--bops", type=float, help="bit operations per sample budget")
    s.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="candidate bits")
    s.add_argument("--a-bits", type=int, default=None, help="activation bits (default: float)")
    s.add_argument("--include", nargs="*", help="glob patterns of layers to search")
    s.add_argument("--exclude", nargs="*", help="glob patterns of layers to keep float")
    s.add_argument("--pin", nargs="*", help="NAME=BITS (NAME may be a glob)")
    s.add_argument("--tie-fused", action="store_true",
                   help="layers reading the same input (q/k/v, gate/up) share bits")
    s.add_argument("--tol", type=float, default=0.1,
                   help="Hutchinson: relative standard error every layer must reach (0.1)")
    s.add_argument("--max-probes", type=int, default=200,
                   help="Hutchinson: most Hessian-vector products (200)")
    s.add_argument("--out", default="bitmap.json", help="bit map JSON to write")

    v = sub.add_parser("validate", help="float vs quantized metrics of a bit map")
    v.add_argument("--model", required=True, help="package.module:factory returning the model")
    v.add_argument("--data", required=True, help="package.module:loader returning eval batches")
    v.add_argument("--bitmap", required=True, help="bit map JSON")

    for sp in (d, s, v):
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--json", action="store_true", help="print JSON for scripts")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpsearch`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"demo": _cmd_demo, "search": _cmd_search, "validate": _cmd_validate}
    from mpsearch.errors import InfeasibleBudget

    try:
        return commands[args.command](args)
    except InfeasibleBudget as exc:
        print(f"mpsearch: infeasible budget: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        print(f"mpsearch: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
