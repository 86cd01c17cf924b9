"""``mpsearch search`` and ``mpsearch demo``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, Literal

from mpsearch.cli._common import (
    EXIT_OK,
    UsageError,
    add_common,
    add_model_args,
    add_threads,
    emit,
    load_data,
    load_model,
)


def _pins(items: Sequence[str] | None) -> dict[str, int]:
    out = {}
    for item in items or ():
        name, _, bits = item.rpartition("=")
        if not name or not bits.isdigit():
            raise ValueError(f"--pin takes NAME=BITS, got {item!r}")
        out[name] = int(bits)
    return out


_REFINE: dict[str, bool | Literal["auto"]] = {"auto": "auto", "on": True, "off": False}


def _at_least_two(text: str, what: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 2:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return count


def _probes(text: str) -> int:
    """``--max-probes``: an integer of at least 2 (the standard error needs two)."""
    return _at_least_two(text, "an integer >= 2 (a standard error needs two probes)")


def _slices(text: str) -> int | Literal["auto"] | None:
    """``--slices``: a count of at least 2, ``auto`` or ``none``."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return "auto" if low == "auto" else None
    return _at_least_two(text, "an integer >= 2, 'auto' or 'none'")


def _budget(args: argparse.Namespace) -> Any:
    from mpsearch import Budget

    limits = {k: getattr(args, k) for k in ("avg_bits", "size_bytes", "bops", "latency_us",
                                            "latency_ratio")
              if getattr(args, k) is not None}
    if not limits:
        raise UsageError("give a budget: --avg-bits, --size-bytes, --bops, --latency-us "
                         "and/or --latency-ratio")
    return Budget(**limits)


def run_search(args: argparse.Namespace) -> int:
    """Search a bit map and write it."""
    import mpsearch

    model = load_model(args)
    data = load_data(args)
    estimator: Any = args.sensitivity
    if args.sensitivity == "hutchinson":
        estimator = mpsearch.Hutchinson(tol=args.tol, max_probes=args.max_probes,
                                         min_probes=min(8, args.max_probes))
    elif args.sensitivity.endswith(".json"):
        estimator = mpsearch.SensitivityTable.load(args.sensitivity)
    profile = mpsearch.HardwareProfile.load(args.profile) if args.profile else None
    res = mpsearch.search(model, _budget(args), data=data, bits=args.bits, seed=args.seed,
                          sensitivity=estimator, solver=args.solver, include=args.include,
                          exclude=args.exclude, pin=_pins(args.pin),
                          tie="fused" if args.tie_fused else None, a_bits=args.a_bits,
                          refine=_REFINE[args.refine], loss_fn=args.loss,
                          profile=profile, progress=not (args.quiet or args.json),
                          slices=args.slices)
    if args.save_sensitivity:
        res.sensitivity.save(args.save_sensitivity)
    path = res.bitmap.save(args.out)
    payload = {"bitmap": str(path), "avg_bits": res.bitmap.avg_bits(),
               "bits": res.bitmap.bits(), "predicted": res.bitmap.predicted,
               "status": res.front.status, "timings_s": res.timings_s}
    from mpsearch._report import markdown_table, width_name

    refined = ""
    if (r := res.refinement) is not None:
        payload["refinement"] = {"measured_before": r.measured_before,
                                 "measured_after": r.measured_after, "moves": len(r.moves),
                                 "evaluations": r.evaluations, "passes": r.passes,
                                 "time_s": r.time_s, "stopped_by": r.stopped_by,
                                 "uniform_bits": r.uniform_bits,
                                 "uniform_measured": r.uniform_measured,
                                 "uniform_ratio": _finite(r.uniform_ratio),
                                 "uniform_samples": r.uniform_samples,
                                 "samples": r.samples}
        refined = (f"\nrefinement: measured calibration loss increase {r.measured_before:.4g}"
                   f" -> {r.measured_after:.4g}, {len(r.moves)} move(s), {r.evaluations} maps "
                   f"measured ({r.passes:.1f} passes, {r.time_s:.1f} s; {r.stopped_by})")
        if r.uniform_measured is not None:
            if r.uniform_ratio is None:  # the uniform map measured no damage: no ratio
                gain = (f"the searched map's is {r.measured_after:.4g}, "
                        f"{'lower' if r.measured_after < r.uniform_measured else 'not lower'}")
            elif math.isfinite(r.uniform_ratio):
                gain = f"{r.uniform_ratio:.2f}x the searched map's loss increase"
            else:
                gain = "the searched map measured no loss increase"
            width = width_name(r.uniform_bits or 32)
            refined += (f"\nagainst uniform {width} within the budget, measured on the "
                        f"calibration data: {r.uniform_measured:.4g} ({gain})"
                        + ("; float itself fits this budget (on this device its quantized "
                           "kernels are no faster)" if width == "float" else ""))
            if r.uniform_samples is not None:
                refined += (f"; its damage is carried by about {r.uniform_samples:.0f} of the "
                            f"{r.samples} calibration samples")
    sliced = ""
    if res.bitmap.slices is not None:
        payload["slices"] = {n: len(p) for n, p in res.bitmap.slices.layers.items()}
        why = res.bitmap.provenance.get("slices_auto")
        sliced = (f"\nchannel slices in {len(res.bitmap.slices.layers)} layer(s)"
                  + (f" (--slices auto: {why})" if why else "")
                  + "; --slices none searches per layer")
    elif why := res.bitmap.provenance.get("slices_auto"):
        sliced = f"\n--slices auto: {why}; --slices N cuts N channel slices per layer"
    loss = res.bitmap.provenance.get("loss")
    text = (markdown_table(res.table, index=True, floatfmt=".3g")
            + f"\n\n{res.bitmap!r}\nloss: {_LOSS_WORDS.get(str(loss), loss)}"
            + f"\npredicted: {res.bitmap.predicted}{refined}{sliced}"
            + f"\nwrote {path}")
    emit(args, payload, text)
    return EXIT_OK


#: the search's loss (``provenance["loss"]``) in words
_LOSS_WORDS = {
    "kl": "KL divergence of the output from the float model's (over its last dimension)",
    "mse": "mean squared error of the output from the float model's (an output that is not "
           "class logits)",
    "cross_entropy": "cross-entropy to the data's labels",
    "hf_loss": "the model's own loss",
}


def _finite(x: float | None) -> float | None:
    """``x``, or None where it is not finite (strict JSON has no inf)."""
    return x if x is not None and math.isfinite(x) else None


def run_demo(args: argparse.Namespace) -> int:
    """Search, validate and plot on an embedded real model."""
    from mpsearch._report import markdown_table
    from mpsearch.demo import run_demo as demo

    out = demo(args.model, args.budgets, out_dir=args.out, seed=args.seed,
               progress=not (args.quiet or args.json))
    table = out.result.table
    cols = ["kind", "params", "w_bits"] + [c for c in table.columns
                                          if c.startswith("omega_") and "stderr" not in c]
    extra = [c for c in ("trace", "trace_stderr") if c in table.columns]
    payload = {"summary": out.summary.to_dict(orient="records"),
               "files": {k: str(v) for k, v in out.files.items()}}
    text = "\n".join([
        f"\nPer-layer bits at {out.result.bitmap.avg_bits():.2f} average bits:\n",
        markdown_table(table[cols + extra], index=True, floatfmt=".3g"),
        "\nSearched vs uniform maps on held-out data:\n", markdown_table(out.summary),
        "\nWrote:", *(f"  {p}" for p in out.files.values())])
    emit(args, payload, text)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``search`` and ``demo``."""
    s = sub.add_parser("search", help="search a bit map for a model within a budget",
                       description="Search the per-layer bit-widths that lose the least within "
                                   "a budget; writes the bit map JSON.")
    add_model_args(s)
    s.add_argument("--avg-bits", type=float, help="average weight bits budget")
    s.add_argument("--size-bytes", type=float, help="weight bytes budget (scales included)")
    s.add_argument("--bops", type=float, help="bit operations per sample budget")
    s.add_argument("--latency-us", type=float, help="latency budget (needs --profile)")
    s.add_argument("--latency-ratio", type=float,
                   help="latency budget as a fraction of the all-INT8 latency (needs --profile)")
    s.add_argument("--profile", help="HardwareProfile JSON from `mpsearch profile`")
    s.add_argument("--bits", type=int, nargs="+", default=None,
                   help="candidate bits (default 2 3 4 5 6 8; with --profile 2 3 4 8 32; "
                        "with a saved --sensitivity table, its bits)")
    # None unless given: a reused --sensitivity table then keeps its own loss, no float pass
    s.add_argument("--loss", default=None, choices=["divergence", "task"],
                   help="divergence from the float model's output (default; labels unused) "
                        "or the task loss on the data's targets")
    s.add_argument("--sensitivity", default="qerror",
                   help="qerror (default) | fisher_block | fisher | hutchinson, or a table "
                        "JSON saved with --save-sensitivity (then only the solve runs)")
    s.add_argument("--save-sensitivity", metavar="JSON",
                   help="write the sensitivity table, to reuse at other budgets")
    s.add_argument("--solver", default="ilp", choices=["ilp", "greedy", "nsga2"],
                   help="allocation solver (default ilp)")
    s.add_argument("--refine", default="auto", choices=["auto", "on", "off"],
                   help="measured refinement of the solved map: auto (default) and on are "
                        "the same (a work limit of 64 passes over the calibration data, or "
                        "two per unit searched, or more for a cheap model, up to 1,024; a "
                        "120 s cap); off: the solver's map as it is")
    s.add_argument("--a-bits", type=int, default=None, help="activation bits (default: float)")
    s.add_argument("--include", nargs="*", help="glob patterns of layers to search")
    s.add_argument("--exclude", nargs="*", help="glob patterns of layers to keep float")
    s.add_argument("--pin", nargs="*", help="NAME=BITS (NAME may be a glob)")
    s.add_argument("--tie-fused", action="store_true",
                   help="layers reading the same input (q/k/v, gate/up) share bits")
    s.add_argument("--slices", type=_slices, default="auto", metavar="N|auto|none",
                   help="give each of N slices of a layer's output channels (or of a Linear's "
                        "input features, where that is predicted to lose less) its own width "
                        "(e.g. 8); the bit map then names the slices and exports to "
                        "mpsearch/torchao/onnxruntime only (`mpsearch apply` slices the "
                        "model itself). auto (default): 16 slices where the weights sit in "
                        "fewer than 5 layers' worth, per layer otherwise; none: per layer")
    s.add_argument("--tol", type=float, default=0.1,
                   help="Hutchinson: relative standard error every layer must reach (0.1)")
    s.add_argument("--max-probes", type=_probes, default=200,
                   help="Hutchinson: most Hessian-vector products (200)")
    s.add_argument("--out", default="bitmap.json",
                   help="bit map JSON to write (default: bitmap.json)")
    add_threads(s)
    add_common(s)
    s.set_defaults(run=run_search)

    d = sub.add_parser("demo", help="search, validate and plot on an embedded real model",
                       description="The embedded demo: a real model and data, searched at "
                                   "several budgets against uniform maps; writes results/.")
    d.add_argument("--model", default="dwsep", choices=["dwsep", "cnn", "minilm"],
                   help="dwsep: MobileNet-style CNN on MNIST (default); cnn: plain CNN; "
                        "minilm: all-MiniLM-L6-v2 on real English text")
    d.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0],
                   help="average weight bits to search at")
    d.add_argument("--out", default="results", help="output folder (default: results)")
    add_threads(d)
    add_common(d)
    d.set_defaults(run=run_demo)
