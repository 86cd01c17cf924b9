"""The ``mpsearch`` command line.

``mpsearch search | profile | apply | validate | export | import | demo`` — each with ``--help``,
progress bars on stderr (``-q`` hides them), ``--json`` for scripts, and exit codes
0 (done), 1 (an error, one line on stderr saying what and what would work) and 2 (bad
usage). Models are given as ``package.module:factory`` (``--model-args`` JSON for its
keyword arguments) and data as ``package.module:loader``; ``zoo:…`` names the real models
and data that ship with mpsearch.

Each subcommand lives in a module with ``add_parsers(sub)``; :data:`COMMAND_MODULES` lists
them in ``--help`` order (search, profile, apply, export).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from mpsearch.cli._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError

COMMAND_MODULES = ("mpsearch.cli.search", "mpsearch.cli.profile", "mpsearch.cli.apply",
                   "mpsearch.cli.export")
"""Modules registering subcommands (``add_parsers(sub)``)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="mpsearch", description="Mixed-precision bit-allocation "
                                "search for PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpsearch`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from mpsearch.errors import InfeasibleBudget

    try:
        threads = getattr(args, "torch_threads", None)
        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads must be at least 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        out = getattr(args, "out", None)
        if out and args.command != "demo" and Path(out).is_dir():  # before the work
            raise IsADirectoryError(f"--out {out} is a folder; give a file path to write")
        code: int = args.run(args)
    except UsageError as exc:
        print(f"mpsearch {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InfeasibleBudget as exc:
        print(f"mpsearch: infeasible budget: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError, ImportError, OSError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mpsearch: error: {message}", file=sys.stderr)
        if args.verbose:  # a bug of ours shows where, for the report
            traceback.print_exc()
        return EXIT_ERROR
    except RuntimeError as exc:  # mostly the user's model failing on the data
        lines = str(exc).strip().splitlines()
        print(f"mpsearch: error: {lines[0] if lines else type(exc).__name__}"
              + ("" if args.verbose else " (-v prints the traceback)"), file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return EXIT_ERROR
    return code


__all__ = ["COMMAND_MODULES", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
