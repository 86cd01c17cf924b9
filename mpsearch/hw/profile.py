"""``profile``: measure the real kernels of a model's layer shapes on this device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch._state import preserved
from mpsearch.batches import Batch
from mpsearch.bitmap import BitMap
from mpsearch.hw import kernels_ort as ko
from mpsearch.hw.formats import BACKENDS, format_for
from mpsearch.hw.onnx_export import build_onnx, graph_layers
from mpsearch.hw.profile_data import HardwareProfile
from mpsearch.hw.specs import input_spec, model_inputs, model_specs
from mpsearch.hw.timing import (
    CACHE_MODES,
    cpu_fingerprint,
    library_versions,
    now_iso,
    stats_us,
    time_interleaved,
)
from mpsearch.layers import fingerprint, model_shapes
from mpsearch.quant import QuantConfig

log = logging.getLogger(__name__)


def _check(device: str, backend: str, threads: int, cache: Sequence[str], rounds: int) -> None:
    if device not in BACKENDS:
        raise ValueError(f"device must be one of {tuple(BACKENDS)}, got {device!r}")
    if backend not in BACKENDS[device]:
        raise ValueError(f"backend {backend!r} is not available for device {device!r}; "
                         f"use one of {BACKENDS[device]}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    bad = [c for c in cache if c not in CACHE_MODES]
    if bad or not cache:
        raise ValueError(f"cache must be a non-empty subset of {CACHE_MODES}, got {tuple(cache)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if device == "cuda":  # formats.py knows the CUDA formats; their timing is not written yet
        raise NotImplementedError("profile(device='cuda') is not implemented yet; "
                                  "use device='cpu' (onnxruntime)")


def _new_profile(device: str, backend: str, threads: int, settings: dict[str, Any]) -> HardwareProfile:
    if device == "cuda":
        from mpsearch.hw.kernels_cuda import gpu_fingerprint

        dev = gpu_fingerprint()
    else:
        dev = cpu_fingerprint()
    return HardwareProfile(device=dev, backend=backend, threads=threads,
                           versions=library_versions(), created=now_iso(), settings=settings)


def profile(model: nn.Module, sample_batch: Batch, device: str = "cpu",
            backend: str = "onnxruntime", *, bits: Sequence[int] = (2, 4, 8, 32),
            qconfig: QuantConfig | None = None, threads: int = 1,
            cache: Sequence[str] = ("warm",), rounds: int = 5, warmup: int = 3,
            round_s: float = 0.02, reuse: HardwareProfile | None = None,
            end_to_end: bool = True, seed: int = 0, progress: bool = True) -> HardwareProfile:
    """Measure, for each distinct layer shape and format with a real kernel, its latency.

    Each distinct layer shape (kind, weight, deployed input shape, convolution attributes)
    is measured once, whatever the number of layers or models sharing it; the single-layer
    graphs of all its formats run interleaved (shuffled each round), after a warm-up, and
    the median, p10 and p90 per call are kept, minus the median of an ``Identity`` graph on
    the same input (the fixed cost of ``session.run``). Each kernel takes float input and
    gives float output, so the cost of changing precision at its edges is included; the
    cost of one activation quantize + dequantize alone is recorded as ``qdq_us``.

    With ``end_to_end`` the float model is exported to ONNX and timed as a whole; the
    excess over its summed float layers is recorded as the model's ``rest_us``.

    Args:
        model: the float model (left as it was found).
        sample_batch: one batch with the deployed input shape (e.g. batch 1 × 128 tokens).
        device: ``"cpu"`` (ONNX Runtime kernels) or ``"cuda"`` (PyTorch kernels).
        backend: ``"onnxruntime"`` on CPU, ``"torch"`` on CUDA.
        bits: bit-widths to measure; those without a kernel for a layer kind are recorded
            as not offered, with the reason.
        qconfig: weight quantizer scheme (decides block sizes; default ``QuantConfig()``).
        threads: intra-op threads (1 gives the steadiest numbers on a shared machine).
        cache: ``("warm",)``, ``("cold",)`` or both: cold flushes the caches before each call.
        rounds: interleaved rounds per kernel.
        warmup: untimed calls per kernel first.
        round_s: target seconds per kernel per round (sets calls per round, 1–50).
        reuse: a profile to extend; shapes it already holds are not measured again.
        end_to_end: also time the whole float model (needed for ``rest_us``).
        seed: seeds the weights and the interleaving order.
        progress: show a progress bar.

    Returns:
        The profile (``reuse`` itself, extended, when given).

    Raises:
        ValueError: bad arguments, or ``reuse`` from another backend or thread count.
    """
    _check(device, backend, threads, cache, rounds)
    cfg = qconfig or QuantConfig()
    settings = {"rounds": rounds, "warmup": warmup, "round_s": round_s, "seed": seed,
                "allow_spinning": 0, "overhead": "Identity-graph median subtracted",
                "timer": "time.perf_counter_ns per call", "graph_optimization": "all"}
    prof = reuse if reuse is not None else _new_profile(device, backend, threads, settings)
    if prof.backend != backend or prof.threads != threads:
        raise ValueError(f"reuse= was measured with backend={prof.backend!r}, threads="
                         f"{prof.threads}; this call asks {backend!r}, threads={threads}")
    torch_threads = torch.get_num_threads()
    with preserved(model), torch.no_grad():
        model.eval()
        specs = model_specs(model, sample_batch)
        fp32_proto = build_onnx(model, BitMap.uniform(model, 32), sample_batch)
        in_graph = set(graph_layers(fp32_proto))
        specs = {n: sc for n, sc in specs.items() if n in in_graph}
        todo: dict[str, Any] = {}
        for spec, _ in specs.values():
            todo.setdefault(spec.key(), spec)
        bar = tqdm(total=len(todo), desc=f"profile {device}", unit="shape", disable=not progress)
        try:
            for key, spec in todo.items():
                _measure_shape(prof, key, spec, bits, cfg, device, threads, cache, rounds,
                               warmup, round_s, seed)
                bar.update()
        finally:
            bar.close()
        fp = fingerprint(model_shapes(model))
        record: dict[str, Any] = {
            "class": type(model).__name__, "inputs": input_spec(sample_batch),
            "layers": {n: {"key": s.key(), "calls": c} for n, (s, c) in sorted(specs.items())}}
        if end_to_end and device == "cpu":
            record.update(_end_to_end(prof, fp32_proto, sample_batch, specs, threads, cache,
                                      rounds, warmup, seed))
        prof.models[fp] = record
    torch.set_num_threads(torch_threads)
    log.info("profile: %s", prof)
    return prof


def _measure_shape(prof: HardwareProfile, key: str, spec: ko.LayerSpec, bits: Sequence[int],
                   cfg: QuantConfig, device: str, threads: int, cache: Sequence[str],
                   rounds: int, warmup: int, round_s: float, seed: int) -> None:
    backend = "torch" if device == "cuda" else "onnxruntime"
    rec = prof.shapes.setdefault(key, {"spec": spec.to_dict(), "macs": spec.macs,
                                       "formats": {}, "unsupported": {}})
    formats: list[str] = []
    for b in sorted(set(bits), reverse=True):
        choice = format_for(spec.kind, spec.reduction, b, cfg, device=device, backend=backend)
        if choice.name is None:
            rec["unsupported"][f"{b}bit"] = choice.reason
        elif choice.name not in formats:
            formats.append(choice.name)
    for mode in cache:
        need = [f for f in formats if mode not in rec["formats"].get(f, {})]
        if not need:
            continue
        if device == "cuda":
            from mpsearch.hw.kernels_cuda import time_formats

            results = time_formats(spec, need, cfg, rounds=rounds, warmup=warmup, seed=seed)
        else:
            results = _time_ort(rec, spec, need, cfg, threads, mode, rounds, warmup, round_s,
                                seed)
        for f, st in results.items():
            rec["formats"].setdefault(f, {})[mode] = st


def _time_ort(rec: dict[str, Any], spec: ko.LayerSpec, formats: Sequence[str], cfg: QuantConfig,
              threads: int, mode: str, rounds: int, warmup: int, round_s: float,
              seed: int) -> dict[str, dict[str, float]]:
    gen = np.random.default_rng(seed)
    x = {"x": gen.standard_normal(spec.input_shape).astype(np.float32)}
    sessions = {f: ko.session(ko.layer_model(spec, f, cfg, seed), threads) for f in formats}
    sessions["_identity"] = ko.session(ko.identity_model(spec.input_shape), threads)
    sessions["_qdq"] = ko.session(ko.qdq_model(spec.input_shape), threads)
    runs = {f: (lambda s=s: s.run(None, x)) for f, s in sessions.items()}
    samples = time_interleaved(runs, rounds=rounds, warmup=warmup, round_s=round_s,
                               cold=mode == "cold", seed=seed)
    overhead = float(np.median(samples["_identity"]))
    rec.setdefault("overhead_us", {})[mode] = overhead
    rec.setdefault("qdq_us", {})[mode] = stats_us(np.maximum(samples["_qdq"] - overhead, 0.0))
    return {f: stats_us(np.maximum(samples[f] - overhead, 0.0)) for f in formats}


def _end_to_end(prof: HardwareProfile, proto: Any, batch: Batch,
                specs: dict[str, tuple[ko.LayerSpec, int]], threads: int, cache: Sequence[str],
                rounds: int, warmup: int, seed: int) -> dict[str, Any]:
    names, tensors, _ = model_inputs(batch)
    feed = {n: t.numpy() for n, t in zip(names, tensors)}
    sess = ko.session(proto, threads)
    e2e, rest = {}, {}
    for mode in cache:
        samples = time_interleaved({"e2e": lambda: sess.run(None, feed)}, rounds=rounds,
                                   warmup=warmup, round_s=0.1, cold=mode == "cold", seed=seed)
        e2e[mode] = stats_us(samples["e2e"])
        layers = sum(prof.shapes[s.key()]["formats"]["fp32"][mode]["median_us"] * c
                     for s, c in specs.values())
        rest[mode] = e2e[mode]["median_us"] - layers
    return {"e2e_fp32_us": e2e, "rest_us": rest}
