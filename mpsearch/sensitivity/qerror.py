"""Quantization-error probes: the measured loss increase of each layer quantized alone.

For every layer and bit-width, the layer's weight is fake-quantized (the same quantizer
:func:`mpsearch.quantize` applies), the calibration loss is measured with only that change,
and Ω[l, b] is the increase over the float model's loss. This is the ground truth the
other estimators are judged by.

It costs L × B passes over the calibration data, so two things keep it fast:

- **prefix replay** (:class:`~mpsearch._replay.PrefixReplay`): what the model
  computes before layer l is the float model's, recorded once and replayed, so a probe runs
  only the part of the network from layer l on;
- **micro-batches**: large image batches are cut into pieces of ``micro_batch`` samples,
  which run faster on a CPU (activations stay in cache; MobileNetV2 at 224×224: batches of
  8 took 0.7 s per 32 images against 2.1 s as one batch of 32).

The standard error is that of the mean increase, from each calibration sample's paired
increase (so a single calibration batch has error bars too); from the per-batch increases
where the loss does not split by sample (a custom ``loss_fn``, a Hugging Face model's own
loss, a model with sequence-first (``batch_first=False``) recurrent or attention modules).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch._replay import PrefixReplay
from mpsearch._report import some
from mpsearch.batches import batch_rows, rechunk, split_batch
from mpsearch.layers import layer_weight
from mpsearch.losses import Objective, mean_and_stderr
from mpsearch.sensitivity.base import SensitivityTable

if TYPE_CHECKING:
    from mpsearch.layers import LayerInfo
    from mpsearch.quant import QuantConfig

log = logging.getLogger(__name__)

#: Inputs with more elements per sample than this (a 3×64×64 image) are cut into
#: micro-batches by default.
_LARGE_SAMPLE = 3 * 64 * 64


def _sample_elements(objective: Objective) -> int:
    split = split_batch(objective.batches[0])
    rows = max(split.batch_size, 1)
    values = [*split.args, *split.kwargs.values()]
    return max((v.numel() // rows for v in values if isinstance(v, torch.Tensor)), default=0)


def micro_batched(objective: Objective, model: nn.Module, device: torch.device,
                  rows: int | None) -> Objective:
    """The objective over micro-batches of at most ``rows`` samples (``None``: automatic)."""
    if rows is None:
        rows = 8 if _sample_elements(objective) > _LARGE_SAMPLE else 0
    if not rows or all(batch_rows(b) <= rows for b in objective.batches):
        return objective
    out = Objective(rechunk(objective.batches, rows), objective.loss_fn)
    out.prepare(model, device)
    return out


@dataclass(frozen=True, kw_only=True)
class QError:
    """Measured single-layer loss increase (the ground-truth estimator).

    Attributes:
        micro_batch: samples per forward pass; ``None`` cuts large inputs (images bigger
            than 64×64) into pieces of 8 and leaves others as given; 0 never cuts.
        replay: replay the float prefix of the network instead of recomputing it (exact;
            off only to compare).
    """

    name: str = field(default="qerror", init=False)
    micro_batch: int | None = None
    replay: bool = True

    def __post_init__(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 or None, got {self.micro_batch}")

    def estimate(self, model: nn.Module, modules: Mapping[str, nn.Module],
                 layers: Sequence[LayerInfo], objective: Objective, bits: Sequence[int],
                 qconfig: QuantConfig, *, device: torch.device, seed: int = 0,
                 progress: bool = False) -> SensitivityTable:
        """Quantize each layer alone at each bit-width and measure the loss increase."""
        from mpsearch.quant.apply import quantize_weight

        del seed  # deterministic
        start = time.perf_counter()
        model.eval()
        objective = micro_batched(objective, model, device, self.micro_batch)
        names = [info.name for info in layers]
        omega = np.zeros((len(layers), len(bits)))
        omega_se = np.zeros_like(omega)
        probes = [(i, j) for i in range(len(layers)) for j, b in enumerate(bits) if b < 32]
        replay = PrefixReplay(model, objective, device, names)
        replay.per_sample = True
        with replay:
            base = replay.record()
            base_samples = replay.sample_losses()
            bar = tqdm(probes, desc="qerror probes", unit="probe", disable=not progress,
                       leave=False)
            for i, j in bar:
                info = layers[i]
                w = layer_weight(modules[info.name]).detach()
                q = quantize_weight(w, info.kind, bits[j], qconfig, modules[info.name]).to(w.dtype)
                delta = replay.losses({info.name: q}, replay=self.replay) - base
                omega[i, j] = float(delta.mean())
                samples = replay.sample_losses()
                if samples is not None and base_samples is not None:
                    omega_se[i, j] = mean_and_stderr(samples[0] - base_samples[0],
                                                     samples[1])[1]
                else:
                    n = len(delta)
                    omega_se[i, j] = float(delta.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
            bar.close()
        idle = [names[i] for i in range(len(names)) if not omega[i].any()]
        if idle:
            log.warning("quantizing %d layer(s) alone does not change the loss at any width "
                        "(e.g. a layer that feeds only outputs the loss does not compare; the "
                        "solver will give them the fewest bits): %s", len(idle), some(idle))
        return SensitivityTable(
            tuple(names), tuple(bits), omega, omega_se,
            columns={"skipped_fraction": np.array([replay.skipped_fraction(n)
                                                   for n in names])} if self.replay else {},
            estimator=self.name,
            settings={k: v for k, v in asdict(self).items() if k != "name"},
            diagnostics={"probes": len(probes), "batches": len(objective.batches),
                         "mean_skipped_fraction": float(np.mean(
                             [replay.skipped_fraction(n) for n in names])) if self.replay else 0.0,
                         "loss": objective.kind, "time_s": time.perf_counter() - start},
        )
