"""``validate``: the float model against its quantized copy, predicted against measured."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mpsearch._state import outside_inference_mode, preserved
from mpsearch.batches import (
    Batch,
    call,
    first_output,
    ignored_outputs,
    materialize,
    model_device,
    split_batch,
    to_device,
)
from mpsearch.bitmap import BitMap, require_bitmap
from mpsearch.costs import sliced_weight_bytes
from mpsearch.layers import discover, layer_weight, quantizable_modules, require_values
from mpsearch.losses import (
    LossSpec,
    Objective,
    divergence_kind,
    is_distribution,
    kl_divergence,
    log_probabilities,
    mse_divergence,
)
from mpsearch.quant.apply import quantize
from mpsearch.slices import for_deployment, needs_slicing, slice_model

if TYPE_CHECKING:
    from mpsearch.hw.profile_data import HardwareProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationReport:
    """Float against quantized on evaluation data.

    Attributes:
        loss_kind: what the loss is (``cross_entropy``, ``hf_loss``, ``kl``, ``mse``, ``custom``).
        loss_float: mean loss of the float model (0 for divergence losses).
        loss_quantized: mean loss of the quantized model.
        loss_increase: measured ``loss_quantized − loss_float``.
        loss_increase_predicted: the bit map's predicted increase (Σ Ω), where it has one.
        divergence_kind: ``kl`` (logits) or ``mse`` (hidden states).
        output_divergence: mean divergence of the quantized output from the float output.
            It and the losses are means over the batches, as the search's loss is (so that
            a prediction on the calibration data compares with them): batches of equal
            size give the mean per sample. Accuracy and agreement count samples.
        outputs_not_compared: the model's other outputs, where it returns several tensors
            and the divergence compares one (``"[1] (8, 1)"``); empty otherwise.
        accuracy_float: top-1 accuracy of the float model, where targets are class labels
            (None, with a warning, where a label lies outside the model's classes).
        accuracy_quantized: the same for the quantized model.
        agreement: fraction of positions where both models predict the same class (logits).
        avg_bits: average weight bits of the bit map (:meth:`BitMap.avg_bits`: float
            layers count 32).
        size_bytes_float: bytes of the quantizable layers' weights in fp32 (layers that stay
            float by kind, such as embeddings, are not counted).
        size_bytes_quantized: the same quantized, scales included.
        n_batches: evaluation batches.
        n_samples: evaluation samples.
        predicted: every figure the bit map predicted (costs included).
        latency_us_predicted: end-to-end latency predicted from ``profile`` (µs).
        latency_us_measured: end-to-end latency (lower quartile of interleaved calls, see
            :func:`~mpsearch.hw.timing.central`) of the deployed mixed-precision model —
            ONNX Runtime, or PyTorch kernels for a ``torch`` profile — on the first
            evaluation batch, or, with a ``profile`` measured at other input shapes, at
            the profile's shapes (its rows taken from the evaluation data), so that
            prediction and measurement time the same work (µs).
        latency_input_shape: the input shape(s) the latency was measured at.
        latency_us_measured_p10: its 10th percentile; ``..._p90`` its 90th.
        latency_error: ``predicted / measured − 1``.
        deployed_batches: the evaluation batches the deployed model ran (those of the
            first batch's input shape: its exported graph has fixed shapes).
        deployed_rel_error: ‖y_ort − y_float‖ / ‖y_float‖ over those batches (real tokens
            only where the batches carry an ``attention_mask``).
        deployed_vs_simulated_rel_error: ‖y_ort − y_quantized‖ / ‖y_quantized‖: how far the
            real kernels are from the simulated (fake-quantized) model.
    """

    loss_kind: str
    loss_float: float
    loss_quantized: float
    loss_increase: float
    loss_increase_predicted: float | None
    divergence_kind: str
    output_divergence: float
    accuracy_float: float | None
    accuracy_quantized: float | None
    agreement: float | None
    avg_bits: float
    size_bytes_float: float
    size_bytes_quantized: float
    n_batches: int
    n_samples: int
    predicted: dict[str, Any] = field(default_factory=dict)
    latency_us_predicted: float | None = None
    latency_us_measured: float | None = None
    latency_us_measured_p10: float | None = None
    latency_us_measured_p90: float | None = None
    latency_error: float | None = None
    latency_input_shape: list[list[int]] | None = None
    deployed_batches: int | None = None
    deployed_rel_error: float | None = None
    deployed_vs_simulated_rel_error: float | None = None
    outputs_not_compared: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("loss", f"{self.loss_float:.6g} → {self.loss_quantized:.6g} ({self.loss_kind})"),
            ("loss increase", f"{self.loss_increase:.6g} measured"
             + (f", {self.loss_increase_predicted:.6g} predicted"
                if self.loss_increase_predicted is not None else "")),
            (f"output {self.divergence_kind}", f"{self.output_divergence:.6g}" + (
                f" (one output of several; not compared: "
                f"{', '.join(self.outputs_not_compared)})" if self.outputs_not_compared
                else "")),
        ]
        if self.accuracy_float is not None and self.accuracy_quantized is not None:
            rows.append(("accuracy", f"{self.accuracy_float:.4f} → {self.accuracy_quantized:.4f}"))
        if self.agreement is not None:
            rows.append(("top-1 agreement", f"{self.agreement:.4f}"))
        rows.append(("avg bits", f"{self.avg_bits:.3f}"))
        ratio = self.size_bytes_float / max(self.size_bytes_quantized, 1)
        sizes = (f"{self.size_bytes_float / 1e6:.3f} MB → "
                 f"{self.size_bytes_quantized / 1e6:.3f} MB ({ratio:.2f}×)")
        rows.append(("quantizable weights", sizes))  # embeddings etc. not counted
        if self.latency_us_measured is not None:
            pred = (f", {self.latency_us_predicted:.0f} µs predicted ({self.latency_error:+.1%})"
                    if self.latency_us_predicted is not None and self.latency_error is not None
                    else "")
            shape = ("" if not self.latency_input_shape else " (input " + ", ".join(
                "×".join(map(str, s)) for s in self.latency_input_shape) + ")")
            rows.append(("latency", f"{self.latency_us_measured:.0f} µs measured{pred}{shape}"))
        if self.deployed_rel_error is not None:
            errors = (f"{self.deployed_rel_error:.4g} vs float, "
                      f"{self.deployed_vs_simulated_rel_error:.4g} vs simulated"
                      + (f" ({self.deployed_batches} of {self.n_batches} batches: one input "
                         "shape)" if self.deployed_batches is not None
                         and self.deployed_batches < self.n_batches else ""))
            rows.append(("deployed output error", errors))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _shifts_labels(model: nn.Module, batch: object) -> bool:
    """Whether ``model`` is a Hugging Face causal LM given ``labels`` in a dict batch: it
    shifts them itself (token t + 1 is scored against the logits at t)."""
    name = type(model).__name__
    return (isinstance(batch, Mapping) and "labels" in batch
            and name.endswith(("ForCausalLM", "LMHeadModel"))
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@outside_inference_mode
def validate(model: nn.Module, bitmap: BitMap, *, data: Iterable[Batch],
             loss_fn: LossSpec = None, progress: bool = True,
             profile: HardwareProfile | None = None,
             measure_latency: bool = False) -> ValidationReport:
    """Quantize a copy of ``model`` as ``bitmap`` says and compare it with the float model.

    Args:
        model: the float model (left untouched).
        bitmap: the bit map to apply.
        data: re-iterable evaluation batches (same forms as for :func:`search`).
        loss_fn: as for :func:`search`.
        progress: show a progress bar.
        profile: a :class:`~mpsearch.HardwareProfile`: predicts the end-to-end latency.
        measure_latency: build the mixed-precision model with the real kernel of each
            layer's format — exported to ONNX and run in ONNX Runtime, or with PyTorch
            kernels on the profile's device when ``profile.backend == "torch"`` — run it
            on every batch (output error against the float and the simulated model) and
            time it on the first batch (the faster of two fresh deployments,
            :func:`~mpsearch.hw.runtime.deployed_latency`).

    Raises:
        BitMapError: the bit map does not fit the model.
        ValueError: empty data.
    """
    from mpsearch.hw.profile_data import require_profile

    require_values(model)
    bitmap = require_bitmap(bitmap)
    require_profile(profile)
    batches = materialize(data, "data")
    original = model
    if needs_slicing(model, bitmap):  # the float model the bit map's slices belong to
        model = slice_model(model, bitmap)
    qmodel = quantize(model, bitmap)
    device = model_device(model)
    objective = Objective(batches, loss_fn)
    sums = {"lf": 0.0, "lq": 0.0, "div": 0.0, "acc_f": 0.0, "acc_q": 0.0, "agree": 0.0}
    n_acc = n_agree = n_samples = 0
    unread: str | None = None  # class labels outside the model's classes
    div_kind: str = "kl"
    probabilities = False
    with preserved(model), torch.no_grad():
        model.eval()
        qmodel.eval()
        objective.prepare(model, device)
        for i, batch in enumerate(tqdm(batches, desc="validate", unit="batch",
                                       disable=not progress, leave=False)):
            split = to_device(split_batch(batch), device)
            out_f, out_q = call(model, split), call(qmodel, split)
            n_samples += split.batch_size
            sums["lf"] += float(objective.loss_of_output(out_f, i, batch, split.targets,
                                                         split.attention_mask))
            sums["lq"] += float(objective.loss_of_output(out_q, i, batch, split.targets,
                                                         split.attention_mask))
            yf, yq = first_output(out_f), first_output(out_q)
            if i == 0:  # decided on the first batch, as the objective's loss is
                others = ignored_outputs(out_f)
                div_kind, probabilities = divergence_kind(out_f, split.targets)
            if probabilities:
                yf, yq = log_probabilities(yf), log_probabilities(yq)
            div = kl_divergence if div_kind == "kl" else mse_divergence
            # KL >= 0; float32 rounding leaves about -1e-8 where the outputs barely differ
            sums["div"] += max(0.0, float(div(yq, yf, split.attention_mask)))
            if div_kind == "kl" and yf.dim() >= 1:
                pf, pq = yf.argmax(-1), yq.argmax(-1)
                sums["agree"] += float((pf == pq).sum())
                n_agree += pf.numel()
                t = split.targets
                if t is not None and _shifts_labels(model, batch) and t.dim() >= 2:
                    # a Hugging Face causal LM predicts labels[:, 1:] from logits[:, :-1]
                    pf, pq, t = pf[:, :-1], pq[:, :-1], t[:, 1:]
                if t is not None and is_distribution(t, int(yf.shape[-1])):
                    t = t.argmax(-1)  # one-hot or smoothed labels: their class
                if t is not None and t.shape == pf.shape and not t.is_floating_point():
                    valid = t != -100
                    outside = t[valid & ((t < 0) | (t >= yf.shape[-1]))]
                    if outside.numel() and unread is None:
                        unread = (f"batch {i} has labels {sorted(set(outside.tolist()))[:5]} "
                                  f"outside the model's {yf.shape[-1]} classes "
                                  f"(0–{yf.shape[-1] - 1}, or -100 to ignore)")
                    # counted by sample (position), not averaged by batch: a last batch
                    # of 41 beside batches of 100 weighed 2.4x per sample
                    sums["acc_f"] += float(((pf == t) & valid).sum())
                    sums["acc_q"] += float(((pq == t) & valid).sum())
                    n_acc += int(valid.sum())
    n = len(batches)
    infos = discover(model)
    size_f = sum(info.params * 4.0 for info in infos)
    modules = quantizable_modules(model)
    # from the model's shapes: the map fits it (quantize checked), and a map imported
    # without model= has none of its own
    numel = {n: layer_weight(modules[n]).numel() for n in bitmap}
    avg_bits = sum(numel[n] * bitmap[n].w_bits for n in bitmap) / max(sum(numel.values()), 1)
    size_q = sliced_weight_bytes(infos, modules,
                                 {i.name: bitmap[i.name].w_bits for i in infos},
                                 {i.name: bitmap[i.name].qconfig for i in infos})
    if unread is not None:
        log.warning("validate: no accuracy: %s; the divergences do not read labels", unread)
        n_acc = 0
    predicted = bitmap.predicted.get("loss_increase")
    searched = bitmap.provenance.get("loss")
    if predicted is not None and isinstance(searched, str) and searched != objective.kind:
        log.warning("the bit map predicts the increase of its search's loss (%s); this "
                    "validation measures %s, so there is no prediction to compare with "
                    "(validate with the same loss_fn= as the search for one)",
                    searched, objective.kind)
        predicted = None
    # a sliced map deploys with its slices of equal width merged, as export_onnx does
    deployed = (_deployed(*for_deployment(original, bitmap), batches, qmodel, profile)
                if measure_latency else {})
    if profile is not None and "latency_us_predicted" not in deployed:
        # of what deploys: a sliced map with its slices of equal width merged
        deployed["latency_us_predicted"] = _predicted(
            profile, *for_deployment(original, bitmap), batches)
    return ValidationReport(
        loss_kind=objective.kind, loss_float=sums["lf"] / n, loss_quantized=sums["lq"] / n,
        loss_increase=(sums["lq"] - sums["lf"]) / n,
        loss_increase_predicted=float(predicted) if predicted is not None else None,
        divergence_kind=div_kind, output_divergence=sums["div"] / n,
        accuracy_float=sums["acc_f"] / n_acc if n_acc else None,
        accuracy_quantized=sums["acc_q"] / n_acc if n_acc else None,
        agreement=sums["agree"] / n_agree if n_agree else None,
        avg_bits=avg_bits, size_bytes_float=size_f, size_bytes_quantized=size_q,
        n_batches=n, n_samples=n_samples, predicted=dict(bitmap.predicted),
        outputs_not_compared=others, **deployed,
    )


def _timing_batch(model: nn.Module, batches: list[Batch],
                  profile: HardwareProfile | None) -> Batch:
    """The batch to time: the first one, or one of the input shapes ``profile`` measured
    this model at (its latency predictions are for those), made of the data's rows where
    the inputs are one tensor that differs in batch size only."""
    from mpsearch.hw.specs import batch_from_spec, input_spec
    from mpsearch.layers import fingerprint, model_shapes

    rec = None if profile is None else profile.model_record(fingerprint(model_shapes(model)))
    first = batches[0]
    if rec is None or rec.get("inputs") == input_spec(first):
        return first
    want = rec["inputs"]
    shape = tuple(want[0]["shape"]) if len(want) == 1 else None
    if (shape is not None and isinstance(first, Tensor | tuple | list)
            and (first if isinstance(first, Tensor) else first[0]).shape[1:] == shape[1:]):
        rows = torch.cat([b if isinstance(b, Tensor) else b[0] for b in batches])
        timed: Batch = rows.repeat_interleave(-(-shape[0] // len(rows)), 0)[:shape[0]]
    else:
        timed = batch_from_spec(want)
    log.info("latency measured at the profile's input shape %s, not the first batch's %s: "
             "the profile predicts that shape's latency",
             [w["shape"] for w in want], [s["shape"] for s in input_spec(first)])
    return timed


def _deployed(model: nn.Module, bitmap: BitMap, batches: list[Batch], qmodel: nn.Module,
              profile: HardwareProfile | None) -> dict[str, Any]:
    """Run the deployed model: output errors, measured (and predicted) latency.

    ONNX Runtime by default; PyTorch kernels on the profile's device when ``profile`` was
    measured with ``backend="torch"``.
    """
    from mpsearch.hw.specs import input_spec

    threads = profile.threads if profile is not None else 1
    from mpsearch.hw.runtime import deploy, deployed_latency
    from mpsearch.hw.timing import central

    device = str(profile.device.get("kind", "cpu")) if profile is not None else "cpu"
    backend = profile.backend if profile is not None else "onnxruntime"
    deployed = deploy(model, bitmap, batches[0], device, backend, threads)
    num = {"f": 0.0, "q": 0.0}
    den = {"f": 0.0, "q": 0.0}
    ran = 0
    with torch.no_grad():
        for batch in batches:
            split = split_batch(batch)
            try:
                y = torch.as_tensor(deployed.run(batch))
            except ValueError:
                continue  # another input shape than the exported graph's
            ran += 1
            # real tokens only, as the output divergence counts them (padding is noise)
            mask = split.attention_mask
            keep = (mask.to(y.dtype).reshape(*mask.shape, *([1] * (y.dim() - mask.dim())))
                    if mask is not None and tuple(y.shape[:mask.dim()]) == tuple(mask.shape)
                    else None)
            for key, ref_model in (("f", model), ("q", qmodel)):
                ref = first_output(call(ref_model, split)).float()
                err, size = (y - ref).pow(2), ref.pow(2)
                if keep is not None:
                    err, size = err * keep, size * keep
                num[key] += float(err.sum())
                den[key] += float(size.sum())
    if ran < len(batches):
        log.info("deployed output error over %d of %d evaluation batches: the exported graph "
                 "takes the first batch's input shape only", ran, len(batches))
    timed = _timing_batch(model, batches, profile)
    timing = deployed_latency(model, bitmap, timed, device, backend, threads,
                              first=deployed if timed is batches[0] else None)
    out: dict[str, Any] = {
        "latency_us_measured": central(timing), "latency_us_measured_p10": timing["p10_us"],
        "latency_us_measured_p90": timing["p90_us"],
        "latency_input_shape": [spec["shape"] for spec in input_spec(timed)],
        "deployed_batches": ran,
        "deployed_rel_error": (num["f"] / den["f"]) ** 0.5 if den["f"] else None,
        "deployed_vs_simulated_rel_error": (num["q"] / den["q"]) ** 0.5 if den["q"] else None}
    if profile is not None:
        out["latency_us_predicted"] = _predicted(profile, model, bitmap, batches)
        out["latency_error"] = out["latency_us_predicted"] / central(timing) - 1.0
    return out


def _predicted(profile: HardwareProfile, model: nn.Module, bitmap: BitMap,
               batches: list[Batch]) -> float:
    """The profile's predicted latency of ``model`` under ``bitmap`` (µs)."""
    from mpsearch.hw.cost import predict_latency

    try:
        return float(predict_latency(profile, model, bitmap,
                                     layers=discover(model, batches[0]))["latency_us"])
    except ValueError as exc:
        if bitmap.slices is None:
            raise
        # its slices (of equal width merged) are layers of shapes the original had not
        what = str(exc).split("; measure it with")[0]
        raise ValueError(f"{what}: a sliced map deploys its slices (those of one width "
                         "merged) as layers of their own, which a profile of the model does "
                         "not hold; profile the deployed model, mpsearch.profile(mpsearch."
                         "slice_model(model, mpsearch.coalesce(bitmap, model)), batch, "
                         "reuse=profile), and validate with the profile it returns") from None
