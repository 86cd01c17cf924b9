"""Time each stage of ``search`` (discover, sensitivity, solve, quantize, validate).

Models: the MNIST CNN, the MobileNet-style depthwise-separable MNIST CNN, and
all-MiniLM-L6-v2 on real English sentences. Also measures the quality of the searched
map against the uniform map at the same average bits.

    python benchmarks/stages.py            # writes results/stages.{csv,md}
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

import mpsearch
from mpsearch._report import markdown_table


def _models(which: list[str]) -> dict[str, tuple[torch.nn.Module, list, list]]:
    out = {}
    if "cnn" in which or "dwsep" in which:
        from mpsearch.zoo.mnist import mnist_batches, pretrained_mnist

        calib = mnist_batches("calib", batch_size=100)
        evals = mnist_batches("eval", batch_size=250)
        for arch in ("cnn", "dwsep"):
            if arch in which:
                out[f"mnist-{arch}"] = (pretrained_mnist(arch), calib, evals)  # type: ignore[arg-type]
    if "minilm" in which:
        from mpsearch.zoo.minilm import load_minilm, text_batches

        model, tok = load_minilm()
        out["minilm"] = (model, text_batches(tok, "calib", n_batches=4, batch_size=8),
                         text_batches(tok, "eval", n_batches=4, batch_size=16))
    return out


def run(which: list[str], budget: float, out_dir: Path) -> pd.DataFrame:
    rows = []
    for name, (model, calib, evals) in _models(which).items():
        t0 = time.perf_counter()
        res = mpsearch.search(model, budget, data=calib, slices=None, progress=False)
        t_search = time.perf_counter() - t0
        t = time.perf_counter()
        mpsearch.quantize(model, res.bitmap)
        t_quant = time.perf_counter() - t
        t = time.perf_counter()
        searched = mpsearch.validate(model, res.bitmap, data=evals, progress=False)
        t_val = time.perf_counter() - t
        uniform = mpsearch.validate(model, mpsearch.BitMap.uniform(model, int(budget)),
                                    data=evals, progress=False)
        diag = res.sensitivity.diagnostics
        rows.append({
            "model": name, "layers": len(res.layers), "calib_batches": len(calib),
            "discover_s": res.timings_s["discover"], "sensitivity_s": res.timings_s["sensitivity"],
            "estimator": res.sensitivity.estimator, "probes": diag.get("probes"),
            "solve_s": res.timings_s["solve"], "refine_s": res.timings_s.get("refine", 0.0),
            "quantize_s": t_quant, "validate_s": t_val,
            "search_total_s": t_search, "avg_bits": res.bitmap.avg_bits(),
            "divergence_searched": searched.output_divergence,
            f"divergence_uniform{int(budget)}": uniform.output_divergence,
            "divergence_ratio": uniform.output_divergence / max(searched.output_divergence, 1e-30),
            "accuracy_searched": searched.accuracy_quantized,
            f"accuracy_uniform{int(budget)}": uniform.accuracy_quantized,
        })
        print(f"{name}: {rows[-1]}", flush=True)
    frame = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "stages.csv", index=False)
    header = (f"# Stage timings (budget {budget} avg bits, per layer, every other default: "
              "qerror + ILP + measured refinement)\n\n"
              f"Machine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. "
              "Divergence: KL of logits (MNIST) or MSE of hidden states (MiniLM) of the "
              "quantized model from the float model on held-out data; ratio = uniform / searched "
              "at the same average bits, measured in one run.\n\n")
    (out_dir / "stages.md").write_text(header + markdown_table(frame) + "\n", encoding="utf-8")
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["cnn", "dwsep", "minilm"])
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    run(args.models, args.budget, args.out)


if __name__ == "__main__":
    main()
