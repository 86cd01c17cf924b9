"""Run a deployed mixed-precision model: outputs and measured end-to-end latency.

:class:`OrtModel` (ONNX Runtime) here, :class:`~mpsearch.hw.kernels_torch.TorchModel`
(PyTorch kernels), and :func:`deploy` to pick one by backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from mpsearch.batches import Batch
from mpsearch.bitmap import BitMap
from mpsearch.hw import kernels_ort as ko
from mpsearch.hw.onnx_export import build_onnx
from mpsearch.hw.specs import model_inputs
from mpsearch.hw.timing import WARMUP_E2E_S, central, stats_us, time_interleaved


class OrtModel:
    """A mixed-precision model built by :func:`~mpsearch.hw.onnx_export.build_onnx`, loaded.

    Args:
        model: the float model.
        bitmap: bits per layer.
        sample_batch: input shapes of the graph (later batches must have the same shapes).
        threads: intra-op threads.
    """

    def __init__(self, model: nn.Module, bitmap: BitMap, sample_batch: Batch,
                 threads: int = 1) -> None:
        self.proto = build_onnx(model, bitmap, sample_batch)
        self.session = ko.session(self.proto, threads)
        self.threads = threads
        self._names = [i.name for i in self.session.get_inputs()]
        self._shapes = {n: tuple(t.shape) for n, t in zip(*model_inputs(sample_batch)[:2])}

    def feed(self, batch: Batch) -> dict[str, np.ndarray]:
        """The ONNX feed of a batch (its shapes must be those of the sample batch)."""
        names, tensors, _ = model_inputs(batch)
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors) if n in self._names}
        for n, a in feed.items():
            if a.shape != self._shapes[n]:
                raise ValueError(f"input {n!r} has shape {a.shape}; this graph was exported "
                                 f"for {self._shapes[n]}")
        return feed

    def run(self, batch: Batch) -> np.ndarray:
        """The graph's output on ``batch``."""
        out: np.ndarray = self.session.run(None, self.feed(batch))[0]
        return out

    def latency_us(self, batch: Batch, *, rounds: int = 5, warmup: int = 3,
                   cold: bool = False, seed: int = 0) -> dict[str, Any]:
        """Measured end-to-end latency on ``batch``: median, p10, p25, p90 (µs) and count."""
        feed = self.feed(batch)
        samples = time_interleaved({"e2e": lambda: self.session.run(None, feed)},
                                   rounds=rounds, warmup=warmup, round_s=0.1, cold=cold, seed=seed,
                                   warmup_s=WARMUP_E2E_S)
        return stats_us(samples["e2e"])


#: fresh deployments timed by :func:`deployed_latency` (the faster kept)
SESSIONS = 2


def deployed_latency(model: nn.Module, bitmap: BitMap, batch: Batch, device: str = "cpu",
                     backend: str = "onnxruntime", threads: int = 1, *,
                     sessions: int = SESSIONS, first: Any = None, **timing: Any) -> dict[str, Any]:
    """End-to-end latency of ``model`` deployed as ``bitmap``: the faster of fresh sessions.

    On this machine a new ONNX Runtime session of integer kernels now and then runs
    1.2–1.5× slower than the next one built from the same graph, for its whole life
    (measured: 3970 vs 2700–2950 µs for the MNIST CNN at INT8); timing ``sessions`` fresh
    deployments and keeping the faster (by :func:`~mpsearch.hw.timing.central`) measures
    the map rather than the session.

    Args:
        first: an already built deployment of this map, timed as the first session.
        timing: ``rounds``, ``warmup``, ``cold``, ``seed`` for ``latency_us``.
    """
    out: dict[str, Any] | None = None
    for i in range(max(sessions, 1)):
        dep = first if i == 0 and first is not None else deploy(model, bitmap, batch, device,
                                                                 backend, threads)
        st = dep.latency_us(batch, **timing)
        if out is None or central(st) < central(out):
            out = st
    assert out is not None
    return out


def deploy(model: nn.Module, bitmap: BitMap, sample_batch: Batch, device: str = "cpu",
           backend: str = "onnxruntime", threads: int = 1) -> Any:
    """The model deployed as ``bitmap`` with real kernels: an :class:`OrtModel` or a
    :class:`~mpsearch.hw.kernels_torch.TorchModel` (both have ``run`` and ``latency_us``)."""
    if backend == "torch":
        from mpsearch.hw.kernels_torch import TorchModel

        return TorchModel(model, bitmap, device, threads)
    if device != "cpu":
        raise ValueError(f"backend 'onnxruntime' runs on cpu here, got device={device!r}")
    return OrtModel(model, bitmap, sample_batch, threads=threads)
