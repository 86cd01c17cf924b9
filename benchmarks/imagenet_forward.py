"""Time a naive float forward of the pretrained MobileNetV2 over the calibration crops.

The reference for the qerror speed target of issue #3 (a ~50-layer ImageNet CNN at
224×224, 32 calibration images): one float pass over the crops costs what each of the
L × B single-layer probes costs at least.

    python benchmarks/imagenet_forward.py            # writes results/imagenet_forward.md
    python benchmarks/imagenet_forward.py --quick    # one repeat, batch 8, 1 thread; prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from mpsearch._report import markdown_table
from mpsearch.zoo.imagenet import imagenet_batches, load_mobilenet_v2


def run(batch_sizes: list[int], threads: list[int], repeats: int, n_images: int) -> pd.DataFrame:
    model = load_mobilenet_v2()
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for batch_size in batch_sizes:
            batches = imagenet_batches("calib", batch_size=batch_size, n_crops=n_images)
            times_s = []
            with torch.inference_mode():
                model(batches[0])  # warm-up: allocator and oneDNN primitive caches
                for _ in range(repeats):
                    start = time.perf_counter()
                    for x in batches:
                        model(x)
                    times_s.append(time.perf_counter() - start)
            median_s = statistics.median(times_s)
            rows.append(
                {
                    "images": n_images,
                    "batch_size": batch_size,
                    "threads": n_threads,
                    "repeats": repeats,
                    "median_s": median_s,
                    "min_s": min(times_s),
                    "max_s": max(times_s),
                    "ms_per_image": 1e3 * median_s / n_images,
                }
            )
    return pd.DataFrame(rows)


def _write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1 repeat, batch 8, 1 thread")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.threads, args.repeats = [8], [1], 1
    frame = run(args.batch_sizes, args.threads, args.repeats, args.images)
    table = markdown_table(frame, floatfmt=".3g")
    print(table)
    if not args.quick:
        header = (
            "# MobileNetV2 float forward, 224×224 calibration crops\n\n"
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; `python benchmarks/imagenet_forward.py`\n\n"
        )
        _write(header + table + "\n", args.out / "imagenet_forward.md")


if __name__ == "__main__":
    main()
