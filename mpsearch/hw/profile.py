"""``profile``: measure the real kernels of a model's layer shapes on this device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch._state import outside_inference_mode, preserved
from mpsearch.batches import Batch
from mpsearch.bitmap import BitMap
from mpsearch.hw import kernels_ort as ko
from mpsearch.hw.formats import BACKENDS, format_for
from mpsearch.hw.onnx_export import build_onnx, graph_layers
from mpsearch.hw.profile_data import HardwareProfile
from mpsearch.hw.runtime import deployed_latency
from mpsearch.hw.specs import input_spec, model_inputs, model_specs
from mpsearch.hw.timing import (
    CACHE_MODES,
    WARMUP_E2E_S,
    central,
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
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile(device='cuda') needs a CUDA GPU, but torch.cuda.is_available()"
                           f" is False (torch {torch.__version__}); use device='cpu'")


def _new_profile(device: str, backend: str, threads: int, settings: dict[str, Any]) -> HardwareProfile:
    if device == "cuda":
        from mpsearch.hw.kernels_torch import gpu_fingerprint

        dev = gpu_fingerprint()
    else:
        dev = cpu_fingerprint()
    return HardwareProfile(device=dev, backend=backend, threads=threads,
                           versions=library_versions(), created=now_iso(), settings=settings)


@outside_inference_mode
def profile(model: nn.Module, sample_batch: Batch, device: str = "cpu",
            backend: str | None = None, *, bits: Sequence[int] = (2, 4, 8, 32),
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
        device: ``"cpu"`` or ``"cuda"``.
        backend: ``"onnxruntime"`` (CPU only) or ``"torch"`` (CUDA; also CPU). ``None``:
            the device's default (ONNX Runtime on CPU, PyTorch on CUDA).
        bits: bit-widths to measure; those without a kernel for a layer kind are recorded
            as not offered, with the reason. Float (32) is always measured: a map's float
            layers, the model's ``rest_us`` and the graph factors are priced from it.
        qconfig: weight quantizer scheme (decides block sizes; default ``QuantConfig()``).
        threads: CPU intra-op threads (1 gives the steadiest numbers on a shared machine).
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
        RuntimeError: ``device="cuda"`` without a CUDA GPU.
    """
    if backend is None:
        backend = BACKENDS.get(device, ("onnxruntime",))[0]
    _check(device, backend, threads, cache, rounds)
    bits = tuple(dict.fromkeys([*bits, 32]))
    cfg = qconfig or QuantConfig()
    settings: dict[str, Any] = {"rounds": rounds, "warmup": warmup, "round_s": round_s,
                                "seed": seed}
    if backend == "onnxruntime":
        settings.update({"allow_spinning": 0, "overhead": "Identity-graph median subtracted",
                         "timer": "time.perf_counter_ns per call", "graph_optimization": "all"})
    else:
        settings.update({"overhead": "none subtracted (module call)",
                         "timer": ("CUDA events per block of calls" if device == "cuda"
                                   else "time.perf_counter_ns per call"),
                         "check": "each kernel checked against the float reference"})
    prof = reuse if reuse is not None else _new_profile(device, backend, threads, settings)
    prof_device = prof.device.get("kind", "cpu")
    if prof.backend != backend or prof.threads != threads or prof_device != device:
        raise ValueError(f"reuse= was measured on {prof_device} with backend={prof.backend!r}, "
                         f"threads={prof.threads}; this call asks {device}, {backend!r}, "
                         f"threads={threads}")
    torch_threads = torch.get_num_threads()
    with preserved(model), torch.no_grad():
        model.eval()
        specs = model_specs(model, sample_batch)
        fp32_proto = None
        if backend == "onnxruntime":  # layers the exported graph runs (constant folding)
            fp32_proto = build_onnx(model, BitMap.uniform(model, 32), sample_batch)
            in_graph = set(graph_layers(fp32_proto))
            specs = {n: sc for n, sc in specs.items() if n in in_graph}
        todo: dict[str, Any] = {}
        for spec, _ in specs.values():
            todo.setdefault(spec.key(), spec)
        bar = tqdm(total=len(todo), desc=f"profile {device}", unit="shape", disable=not progress)
        try:
            for key, spec in todo.items():
                _measure_shape(prof, key, spec, bits, cfg, device, backend, threads, cache,
                               rounds, warmup, round_s, seed)
                bar.update()
        finally:
            bar.close()
        fp = fingerprint(model_shapes(model))
        record: dict[str, Any] = {
            "class": type(model).__name__, "inputs": input_spec(sample_batch),
            "layers": {n: {"key": s.key(), "calls": c} for n, (s, c) in sorted(specs.items())}}
        if end_to_end and fp32_proto is not None:
            record.update(_end_to_end(prof, fp32_proto, sample_batch, specs, threads, cache,
                                      rounds, warmup, seed))
        elif end_to_end:
            record.update(_end_to_end_torch(prof, model, sample_batch, specs, device, threads,
                                            cache, rounds, warmup, seed))
        if end_to_end:
            record.update(_graph_factors(prof, record, model, sample_batch, specs, bits, cfg,
                                         device, backend, threads, cache, rounds, warmup, seed))
        old = prof.models.get(fp, {})
        if old.get("inputs") == record["inputs"]:  # keep end-to-end figures not re-measured
            record = {**old, **record}
        prof.models[fp] = record
    torch.set_num_threads(torch_threads)
    log.info("profile: %s", prof)
    return prof


def _measure_shape(prof: HardwareProfile, key: str, spec: ko.LayerSpec, bits: Sequence[int],
                   cfg: QuantConfig, device: str, backend: str, threads: int,
                   cache: Sequence[str], rounds: int, warmup: int, round_s: float,
                   seed: int) -> None:
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
        need = [f for f in formats if mode not in rec["formats"].get(f, {})
                and f not in rec["unsupported"]]
        if not need:
            continue
        if backend == "torch":
            from mpsearch.hw.kernels_torch import time_formats

            results, refused = time_formats(spec, need, cfg, device=device, threads=threads,
                                            cache=mode, rounds=rounds, warmup=warmup,
                                            round_s=round_s, seed=seed)
            for f, why in refused.items():
                log.warning("profile: %s %s not offered: %s", key, f, why)
                rec["unsupported"][f] = why
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
    e2e = {}
    for mode in cache:
        samples = time_interleaved({"e2e": lambda: sess.run(None, feed)}, rounds=rounds,
                                   warmup=warmup, round_s=0.1, cold=mode == "cold", seed=seed,
                                   warmup_s=WARMUP_E2E_S)
        e2e[mode] = stats_us(samples["e2e"])
    return {"e2e_fp32_us": e2e, "rest_us": _rest(prof, specs, e2e)}


#: in-graph factors outside this range are clipped (and logged): a kernel that runs 4×
#: slower or faster in the whole graph than alone means the single-layer timing is broken
GRAPH_FACTOR_RANGE = (0.25, 4.0)
#: below this share of the end-to-end time the factor is not resolved from timing noise: 1.0
GRAPH_FACTOR_MIN_SHARE = 0.1


def _graph_factors(prof: HardwareProfile, record: dict[str, Any], model: nn.Module,
                   batch: Batch, specs: dict[str, tuple[ko.LayerSpec, int]],
                   bits: Sequence[int], cfg: QuantConfig, device: str, backend: str,
                   threads: int, cache: Sequence[str], rounds: int, warmup: int,
                   seed: int) -> dict[str, Any]:
    """Per bit-width: how much slower its kernels run inside the whole graph than alone.

    For each bit-width ``b`` the model is deployed with every layer that has a ``b``-bit
    kernel at ``b`` (the rest in float) and timed end to end; the factor is (measured −
    ``rest_us`` − the float layers) / the summed single-layer latencies of the ``b``-bit
    layers. It captures what single-layer graphs cannot see — layout changes between
    consecutive integer kernels, fusions that only float graphs get, a session's memory
    traffic — and scales those layers' latencies in every later prediction for this model.
    Where the ``b``-bit layers take under 10 % of the end-to-end time the factor is 1.
    """
    factors: dict[str, dict[str, float]] = {}
    e2e_at: dict[str, dict[str, Any]] = {}
    for b in sorted({int(b) for b in bits} - {32}):
        chosen: dict[str, str] = {}
        for name, (spec, _) in specs.items():
            choice = format_for(spec.kind, spec.reduction, b, cfg, device=device, backend=backend)
            rec = prof.shapes[spec.key()]
            if choice.name is not None and choice.name not in rec["unsupported"]:
                chosen[name] = choice.name
        if not chosen:
            continue
        bitmap = BitMap.from_bits(model, dict.fromkeys(chosen, b), default=32, qconfig=cfg)
        for mode in cache:
            st = deployed_latency(model, bitmap, batch, device, backend, threads, rounds=rounds,
                                  warmup=warmup, cold=mode == "cold", seed=seed)
            e2e_at.setdefault(str(b), {})[mode] = st
            alone = quant = 0.0
            for name, (spec, calls) in specs.items():
                fmts = prof.shapes[spec.key()]["formats"]
                if name in chosen:
                    quant += central(fmts[chosen[name]][mode]) * calls
                else:
                    alone += central(fmts["fp32"][mode]) * calls
            raw = (central(st) - record["rest_us"][mode] - alone) / max(quant, 1e-9)
            factor = float(np.clip(raw, *GRAPH_FACTOR_RANGE))
            if quant < GRAPH_FACTOR_MIN_SHARE * central(st):
                factor = 1.0  # those layers are too small a part of the model to resolve
            elif factor != raw:
                log.warning("profile: %d-bit kernels run %.2f× their single-layer latency in "
                            "the whole graph; clipped to %.2f", b, raw, factor)
            factors.setdefault(str(b), {})[mode] = factor
    return {"graph_factor": factors, "e2e_bits_us": e2e_at}


def _rest(prof: HardwareProfile, specs: dict[str, tuple[ko.LayerSpec, int]], e2e: dict[str, Any],
          ) -> dict[str, float]:
    """Per cache mode: end-to-end float latency minus the summed float layers."""
    rest = {}
    for mode, st in e2e.items():
        layers = sum(central(prof.shapes[s.key()]["formats"]["fp32"][mode]) * c
                     for s, c in specs.values())
        rest[mode] = central(st) - layers
    return rest


def _end_to_end_torch(prof: HardwareProfile, model: nn.Module, batch: Batch,
                      specs: dict[str, tuple[ko.LayerSpec, int]], device: str, threads: int,
                      cache: Sequence[str], rounds: int, warmup: int,
                      seed: int) -> dict[str, Any]:
    from mpsearch.hw.kernels_torch import TorchModel

    deployed = TorchModel(model, BitMap.uniform(model, 32), device, threads)
    e2e = {mode: deployed.latency_us(batch, rounds=rounds, warmup=warmup, cold=mode == "cold",
                                     seed=seed) for mode in cache}
    return {"e2e_fp32_us": e2e, "rest_us": _rest(prof, specs, e2e)}
