"""Timing: interleaved repeated calls, medians and spread, cache flushing, device fingerprint."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: CPU flags that decide which low-bit kernels are fast
KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx512_fp16")
CACHE_MODES = ("warm", "cold")
#: least warm-up time per kernel (s); whole models take :data:`WARMUP_E2E_S`
WARMUP_S = 0.1
WARMUP_E2E_S = 1.0


def stats_us(samples_us: np.ndarray) -> dict[str, float]:
    """Median, 10th, 25th and 90th percentiles (µs) and the sample count."""
    s = np.asarray(samples_us, dtype=float)
    return {"median_us": float(np.median(s)), "p10_us": float(np.percentile(s, 10)),
            "p25_us": float(np.percentile(s, 25)), "p90_us": float(np.percentile(s, 90)),
            "n": int(s.size)}


def central(stats: Mapping[str, Any]) -> float:
    """The latency a profile predicts with and a deployment is judged by: the lower quartile.

    Other work on a shared machine only ever adds time, in bursts that can hold a whole
    round; the lower quartile of the interleaved samples follows the uncontended latency
    where the median moves with the bursts (measured here: an INT8 CNN whose median
    moved by 30 % between two runs a minute apart kept its lower quartile within 5 %).
    Profiles saved before it was recorded fall back to the median.
    """
    return float(stats.get("p25_us", stats["median_us"]))


def l3_bytes() -> int:
    """Size of the largest CPU cache level in bytes (32 MiB when unknown)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


class CacheFlusher:
    """Evicts the CPU caches by writing a buffer twice the size of the last-level cache."""

    def __init__(self, size_bytes: int | None = None) -> None:
        self.size_bytes = size_bytes or 2 * l3_bytes()
        self._buf = np.zeros(self.size_bytes // 8, dtype=np.float64)

    def __call__(self) -> None:
        self._buf += 1.0


def time_interleaved(runs: Mapping[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 3,
                     round_s: float = 0.02, max_calls: int = 50, cold: bool = False,
                     seed: int = 0, tick: Callable[[], None] | None = None,
                     warmup_s: float = WARMUP_S) -> dict[str, np.ndarray]:
    """Per-call times (µs) of several callables, interleaved round by round.

    Each callable is warmed up (``warmup`` calls and at least ``warmup_s`` seconds: a
    fresh ONNX Runtime session of integer kernels runs ~1.6× slower for its first few
    hundred milliseconds, measured here), then called ``rounds`` times in blocks of ``n``
    calls, with ``n`` sized from the warm-up to take about ``round_s`` (1 to
    ``max_calls``); the order of the callables is shuffled every round (seeded), so drifting
    machine load spreads evenly. With ``cold`` the caches are flushed before every timed
    call (the flush is not timed).
    """
    rng = np.random.default_rng(seed)
    flush = CacheFlusher() if cold else None
    names = list(runs)
    calls: dict[str, int] = {}
    for name in names:
        t0 = time.perf_counter()
        n_warm = 0
        while n_warm < warmup or time.perf_counter() - t0 < warmup_s:
            runs[name]()
            n_warm += 1
        per = (time.perf_counter() - t0) / max(n_warm, 1)
        calls[name] = int(np.clip(round_s / max(per, 1e-7), 1, max_calls if not cold else 5))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for idx in rng.permutation(len(names)):
            name = names[int(idx)]
            fn = runs[name]
            for _ in range(calls[name]):
                if flush is not None:
                    flush()
                t0 = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - t0) / 1e3)
            if tick is not None:
                tick()
    return {n: np.asarray(v) for n, v in samples.items()}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_fingerprint() -> dict[str, Any]:
    """CPU model, kernel-relevant flags, cores and last-level cache size."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"kind": "cpu", "name": model, "machine": platform.machine(),
            "flags": sorted(f for f in KERNEL_FLAGS if f in flags),
            "logical_cores": os.cpu_count() or 1, "cache_bytes": l3_bytes()}


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose kernels a profile measured."""
    return {p: _version(p) for p in ("torch", "onnxruntime", "onnx", "numpy", "mpsearch",
                                     "torchao")}


def now_iso() -> str:
    """UTC time, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
