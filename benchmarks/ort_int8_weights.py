"""ONNX Runtime's W8A8 ``MatMulInteger`` with uint8 against int8 weights, on this CPU.

``export_onnx`` and ``mpsearch.profile`` store 8-bit weights as uint8 (symmetric grids
shifted by +128). ONNX Runtime's uint8 × int8 kernels on x86 CPUs without VNNI multiply
with AVX2's ``vpmaddubsw``, which saturates each pair of products at int16: this
benchmark measures, per shape, both the output error of each variant against the exact
integer product and their latency (interleaved rounds, one thread, medians), so the
price of exactness is a ratio measured in one run.

    PYTHONPATH=. python benchmarks/ort_int8_weights.py        # ~1 min
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: (name, M rows of activations, K, N): MNIST CNN's first Linear at batch 64, MiniLM's
#: FFN up and down projections at 128 tokens, and a decode step (M = 1)
SHAPES = [("mnist_fc batch 64", 64, 3136, 128), ("minilm ffn_up 128 tok", 128, 384, 1536),
          ("minilm ffn_down 128 tok", 128, 1536, 384), ("decode 1 tok", 1, 1024, 1024)]


def _session(k: int, n: int, weights: np.ndarray, zero: np.ndarray) -> object:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    wtype = TensorProto.UINT8 if weights.dtype == np.uint8 else TensorProto.INT8
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
        [helper.make_tensor("w", wtype, [k, n], weights.tobytes(), raw=True),
         helper.make_tensor("xz", TensorProto.UINT8, [], [128]),
         helper.make_tensor("wz", wtype, [n], zero.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def measure(rounds: int, seed: int = 0) -> pd.DataFrame:
    """One row per shape and weight type: relative error and median latency."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, m, k, n in SHAPES:
        x = rng.integers(0, 256, (m, k), dtype=np.uint8)
        # a symmetric per-channel int8 grid as our quantizer makes it: full range per row
        q = np.clip(np.round(rng.standard_normal((k, n)) / 3.0 * 127), -127, 127).astype(np.int8)
        exact = (x.astype(np.int64) - 128) @ q.astype(np.int64)
        variants = {"int8": _session(k, n, q, np.zeros(n, np.int8)),
                    "uint8": _session(k, n, (q.astype(np.int16) + 128).astype(np.uint8),
                                      np.full(n, 128, np.uint8))}
        times: dict[str, list[float]] = {v: [] for v in variants}
        errors = {}
        for v, sess in variants.items():
            y = sess.run(None, {"x": x})[0]  # type: ignore[attr-defined]
            errors[v] = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
        reps = max(1, int(2e8 / (m * k * n)))
        for _ in range(rounds):
            for v in rng.permutation(list(variants)):
                t = time.perf_counter()
                for _ in range(reps):
                    variants[v].run(None, {"x": x})  # type: ignore[attr-defined]
                times[v].append((time.perf_counter() - t) / reps * 1e6)
        for v in variants:
            rows.append({"shape": name, "M": m, "K": k, "N": n, "weights": v,
                         "rel_error": errors[v], "median_us": float(np.median(times[v]))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    import onnxruntime as ort

    table = measure(args.rounds)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    table.to_csv(out / "ort_int8_weights.csv", index=False)
    wide = table.pivot(index="shape", columns="weights", values=["rel_error", "median_us"])
    ratio = (wide["median_us"]["uint8"] / wide["median_us"]["int8"]).rename("uint8_over_int8")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    lines = [
        "# ONNX Runtime W8A8 MatMulInteger: uint8 against int8 weights",
        "",
        (f"`python benchmarks/ort_int8_weights.py` — {time.strftime('%Y-%m-%d %H:%M')}, "
         f"onnxruntime {ort.__version__}, {platform.machine()}, "
         f"{'with' if vnni else 'without'} VNNI, 1 thread, {args.rounds} interleaved rounds "
         "(medians)."),
        "",
        ("| shape | rel. error int8 weights | rel. error uint8 weights | int8 µs | uint8 µs "
         "| uint8 / int8 time |"),
        "|---|---|---|---|---|---|",
    ]
    for shape in wide.index:
        lines.append(f"| {shape} | {wide['rel_error']['int8'][shape]:.2e} | "
                     f"{wide['rel_error']['uint8'][shape]:.2e} | "
                     f"{wide['median_us']['int8'][shape]:.0f} | "
                     f"{wide['median_us']['uint8'][shape]:.0f} | {ratio[shape]:.2f}× |")
    lines += ["", ("The error is against the exact integer product. mpsearch stores uint8 "
                   "weights: exact on every CPU, at the time ratio above where int8 would be "
                   "faster but wrong.")]
    (out / "ort_int8_weights.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
