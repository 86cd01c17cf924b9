"""What channel slices cost at run time: the same widths, whole layers against slices.

Each model is deployed on ONNX Runtime's real CPU kernels (``mpsearch.export_onnx``'s
graph: ``MatMulInteger`` / ``QLinearConv`` W8A8 at 8 bits, ``MatMulNBits`` at 4 bits
for Linear layers, convolutions then at 8 as ORT has no INT4 convolution on CPU) three ways with the *same* width for every weight — the
original model, its copies cut into 4 and 8 slices per layer by output channels (each
slice its own kernel call, then ``Concat`` and a ``Gather`` back to the channel order),
and its copies with the Linear layers cut into 4 and 8 slices by input features (a
``Gather`` of each part's input columns, a kernel call per part, the parts' outputs
added) — so the difference is the cost of the slicing alone, not of the widths a search
picks. The five graphs of a model are timed interleaved in one run (shuffled rounds, one thread, lower
quartile), and the ratio sliced / whole is the figure to read on this noisy machine. Each
deployment's output error against the float model is reported beside it: the same weights
at the same widths, but a depthwise slice, and a part of a layer cut by input features,
quantizes only its own channels' or columns' activations (W8A8 takes one dynamic range
per input tensor), so sliced and whole graphs are not bit-identical (MiniLM at W8A8: 0.135
whole, 0.06-0.08 by inputs).

Which channels form a slice does not change the work, so the plan here ranks channels by
a seeded random score (a search ranks them by Fisher, see ``mpsearch/slices.py``).

Then a searched map, per layer against 8 slices and those slices coalesced
(:func:`mpsearch.coalesce`), on MiniLM and the MNIST CNN.

Writes ``results/slices_latency.{md,csv}`` and ``results/slices_latency_searched.csv``.

    python benchmarks/slices_latency.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from mpsearch import BitMap
from mpsearch.hw.runtime import OrtModel
from mpsearch.hw.timing import central, stats_us, time_interleaved
from mpsearch.layers import quantizable_modules
from mpsearch.slices import SlicePlan, plan_slices, slice_model, sliceable_layers

SLICES = (4, 8)


def cases() -> dict[str, tuple[torch.nn.Module, Any, str]]:
    """Model, one input batch, description."""
    from mpsearch.zoo.imagenet import imagenet_batches, load_mobilenet_v2
    from mpsearch.zoo.minilm import load_minilm, text_batches
    from mpsearch.zoo.mnist import mnist_batches, pretrained_mnist

    model, tok = load_minilm()
    text = text_batches(tok, "calib", n_batches=1, batch_size=1, max_length=128)[0]
    return {
        "mnist_cnn": (pretrained_mnist("cnn"), mnist_batches("calib", batch_size=64)[0][0],
                      "MNIST CNN, batch 64"),
        "mobilenet_v2": (load_mobilenet_v2(), imagenet_batches("calib", batch_size=1)[0],
                         "ImageNet MobileNetV2, 1 × 224²"),
        "minilm": (model, text, "all-MiniLM-L6-v2, one sentence"),
    }


def random_plan(model: torch.nn.Module, n: int, seed: int = 0, *,
                inputs: bool = False) -> SlicePlan:
    """``n`` slices per layer by output channels, or (``inputs``) the Linear layers by
    input features (the other layers whole)."""
    rng = np.random.default_rng(seed)
    modules = quantizable_modules(model)
    names = sliceable_layers(model, modules)
    if inputs:
        names = [k for k in names if isinstance(modules[k], torch.nn.Linear)]
    plan = plan_slices({k: rng.random(modules[k].weight.shape[1 if inputs else 0])
                        for k in names}, n)
    return SlicePlan(plan.layers, frozenset(plan.layers) if inputs else frozenset())


def measure(name: str, model: torch.nn.Module, batch: Any, bits: int) -> list[dict[str, Any]]:
    model.eval()
    graphs: dict[str, OrtModel] = {}
    units: dict[str, int] = {}
    variants = [(1, "rows"), *((n, "rows") for n in SLICES),
                *((n, "inputs") for n in SLICES)]
    for n, axis in variants:
        m = model if n == 1 else slice_model(model, random_plan(model, n,
                                                                inputs=axis == "inputs"))
        bitmap = BitMap.from_bits(m, {k: bits if isinstance(v, torch.nn.Linear) else 8
                                      for k, v in quantizable_modules(m).items()})
        key = f"{n} {axis}"
        graphs[key] = OrtModel(m, bitmap, batch, threads=1)
        units[key] = sum(1 for e in bitmap.values() if e.w_bits < 32)
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    ref = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).numpy()
    errors = {}  # relative error of each deployment against the float model
    for k, g in graphs.items():
        errors[k] = float(np.linalg.norm(g.run(batch) - ref) / np.linalg.norm(ref))
    feeds = {k: g.feed(batch) for k, g in graphs.items()}
    samples = time_interleaved({k: (lambda g=g, f=feeds[k]: g.session.run(None, f))
                                for k, g in graphs.items()}, rounds=15, warmup=3,
                               round_s=0.1, seed=bits)
    whole = central(stats_us(samples["1 rows"]))
    return [{"model": name, "bits": bits, "slices": int(k.split()[0]),
             "axis": k.split()[1], "layers": units[k],
             "latency_us": central(stats_us(v)), "p10_us": float(np.percentile(v, 10)),
             "p90_us": float(np.percentile(v, 90)),
             "ratio_to_whole": central(stats_us(v)) / whole, "rel_error_vs_float": errors[k]}
            for k, v in samples.items()]


def searched(name: str, model: torch.nn.Module, calib: Any, batch: Any,
             include: list[str] | None) -> list[dict[str, Any]]:
    """A searched map (``fisher``, bits 2/4/8 — widths with a real ORT kernel for Linear
    layers — at 4.0 average bits, no refinement) deployed per layer, with 8 slices, and
    with those slices coalesced (:func:`mpsearch.coalesce`)."""
    import mpsearch

    model.eval()
    opts = {"data": calib, "sensitivity": "fisher", "bits": (2, 4, 8), "refine": False,
            "include": include, "progress": False}
    per_layer = mpsearch.search(model, 4.0, slices=None, **opts).bitmap
    sliced = mpsearch.search(model, 4.0, slices=8, **opts).bitmap
    small = mpsearch.coalesce(sliced)
    variants = {"per layer": (model, per_layer), "slices=8": (slice_model(model, sliced), sliced),
                "slices=8, coalesced": ((slice_model(model, small) if small.slices else model),
                                        small)}
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    ref = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).numpy()
    graphs = {k: OrtModel(m, bm, batch, threads=1) for k, (m, bm) in variants.items()}
    errors = {k: float(np.linalg.norm(g.run(batch) - ref) / np.linalg.norm(ref))
              for k, g in graphs.items()}
    feeds = {k: g.feed(batch) for k, g in graphs.items()}
    samples = time_interleaved({k: (lambda g=g, f=feeds[k]: g.session.run(None, f))
                                for k, g in graphs.items()}, rounds=15, warmup=3,
                               round_s=0.1, seed=1)
    base = central(stats_us(samples["per layer"]))
    return [{"model": name, "map": k, "avg_bits": variants[k][1].avg_bits(),
             "layers": sum(1 for e in variants[k][1].values() if e.w_bits < 32),
             "cut_by_inputs": len(variants[k][1].slices.inputs) if variants[k][1].slices else 0,
             "latency_us": central(stats_us(v)), "ratio_to_per_layer": central(stats_us(v)) / base,
             "rel_error_vs_float": errors[k]} for k, v in samples.items()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    rows, descs = [], {}
    for name, (model, batch, desc) in cases().items():
        descs[name] = desc
        for bits in (8, 4):
            rows += measure(name, model, batch, bits)
            print(f"[{time.strftime('%H:%M:%S')}] {name} {bits} bits done", file=sys.stderr,
                  flush=True)
    from mpsearch.zoo.minilm import load_minilm, text_batches
    from mpsearch.zoo.mnist import mnist_batches

    all_cases = cases()
    tok = load_minilm()[1]
    search_rows = searched("minilm", all_cases["minilm"][0],
                           text_batches(tok, "calib", n_batches=4, batch_size=8),
                           all_cases["minilm"][1], None)
    search_rows += searched("mnist_cnn", all_cases["mnist_cnn"][0],
                            mnist_batches("calib", batch_size=100), all_cases["mnist_cnn"][1],
                            ["classifier.*"])
    print(f"[{time.strftime('%H:%M:%S')}] searched maps done", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "slices_latency.csv", index=False)
    lines = [
        "# What channel slices cost at run time", "",
        (f"`python benchmarks/slices_latency.py` — {time.strftime('%Y-%m-%d %H:%M')}, "
         f"{(time.perf_counter() - start) / 60:.1f} min; onnxruntime, one thread, "
         f"{platform.machine()}, {os.cpu_count()} CPUs; load average {load0:.1f} at the start, "
         f"{os.getloadavg()[0]:.1f} at the end."), "",
        ("Every weight at the same width (8: W8A8 `MatMulInteger`/`QLinearConv`; 4: "
        "`MatMulNBits` for Linear layers, convolutions float as ORT has no INT4 convolution "
        "on CPU); the original model against its copies with 4 and 8 slices per layer by "
        "output channels, and with its Linear layers cut into 4 and 8 slices by input "
        "features (bias-free parts: a `Gather` of the input columns, a kernel call per "
        "part, the parts' outputs added; its other layers whole). "
        "Lower-quartile latency of interleaved calls; **ratio** = sliced / whole, same run."),
        "", "Models: " + "; ".join(f"`{k}`: {v}" for k, v in descs.items()) + ".", "",
        ("| model | bits | slices | kernel calls (quantized) | latency µs (p10–p90) | ratio | "
        "‖y − y_float‖ / ‖y_float‖ |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in frame.itertuples():
        cut = "whole" if r.slices == 1 else f"{r.slices} by {'inputs' if r.axis == 'inputs' else 'channels'}"
        lines.append(f"| {r.model} | {r.bits} | {cut} | "
                     f"{r.layers} | {r.latency_us:,.0f} ({r.p10_us:,.0f}–{r.p90_us:,.0f}) | "
                     f"{r.ratio_to_whole:.2f}× | {r.rel_error_vs_float:.3f} |")
    lines += [
        "", "## A searched map: per layer, sliced, coalesced", "",
        ("`fisher` + ILP at 4.0 average bits over bits 2/4/8 (a real ORT kernel for each on "
        "Linear layers; the MNIST CNN's convolutions left float), no refinement: the "
        "per-layer map, the map with 8 slices, and that map coalesced "
        "(`mpsearch.coalesce`: slices of a layer with the same width merged, so a layer "
        "costs one kernel call per distinct width; the same quantized values); the search "
        "cuts a Linear layer by input features where that is predicted to lose less. Ratio = "
        "latency / the per-layer map's, same run."), "",
        ("| model | map | avg bits | quantized kernel calls | layers cut by inputs | "
         "latency µs | ratio | ‖y − y_float‖ / ‖y_float‖ |"), "|---|---|---|---|---|---|---|---|"]
    for r in pd.DataFrame(search_rows).itertuples():
        lines.append(f"| {r.model} | {r.map} | {r.avg_bits:.2f} | {r.layers} | {r.cut_by_inputs} | "
                     f"{r.latency_us:,.0f} | {r.ratio_to_per_layer:.2f}× | "
                     f"{r.rel_error_vs_float:.3f} |")
    pd.DataFrame(search_rows).to_csv(args.out / "slices_latency_searched.csv", index=False)
    (args.out / "slices_latency.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'slices_latency.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
