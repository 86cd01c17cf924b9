"""PyTorch kernels (CUDA, and CPU as a second backend): one layer in one format, float in/out.

The ``torch`` backend runs each quantizable layer as a :class:`TorchKernel`, a module that
takes the float activation and returns the float output, so the cost of every precision
change at its edges is inside its latency — the same contract as the ONNX Runtime kernels.
The single-layer kernels that :func:`mpsearch.profile` times are the modules that
:class:`TorchModel` deploys, so the profiled kernel is the deployed kernel.

- ``fp32``: ``F.linear`` / ``F.conv*d`` in float32.
- ``fp16``: the weight stored in float16; the activation cast to float16 and the output
  back to float32 (16-bit weights in the bit map: our quantizer's float16 round trip).
- ``w8a8``: the activation quantized dynamically per tensor to 8 bits (asymmetric min-max,
  as :func:`~mpsearch.quant.fake_quantize_activation`), an int8 × int8 → int32 GEMM
  (``torch._int_mm``) with our int8 weights, zero points folded in exactly, and the
  per-channel scales applied in float. CUDA needs more than 16 rows and K, N multiples of
  8: rows (and on every device N, K) are zero-padded, the padding part of the measured cost.
- ``w4b{block}``: weight-only int4 with groups of ``block`` along K, bfloat16
  activations: ``aten._weight_int4pack_mm`` (tensor-core "tinygemm" on CUDA,
  ``_weight_int4pack_mm_for_cpu`` on CPU). Our per-channel or per-group scales and integer
  zero points map exactly onto its ``(q − 8) · scale + zero`` form.

A kernel whose output disagrees with the dequantized float reference is not timed:
:func:`time_formats` reports it as unsupported with the error it measured, so a kernel
layout that changed between PyTorch versions cannot yield a latency for a wrong result.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpsearch._state import unfused_attention
from mpsearch.hw.formats import MATMUL_KINDS, parse_weight_only
from mpsearch.hw.kernels_ort import LayerSpec
from mpsearch.hw.timing import WARMUP_E2E_S, WARMUP_S, stats_us, time_interleaved
from mpsearch.quant import QuantConfig, quantize_tensor

#: relative output error (vs the dequantized float reference) above which a kernel is refused
CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "w8a8": 5e-2}
INT4_TOLERANCE = 3e-2  # bfloat16 activations and accumulation


def _matrix(weight: Tensor, kind: str) -> Tensor:
    """The (out, K) weight matrix of a matrix-multiply layer (``Conv1D`` is stored (in, out))."""
    w = weight.detach()
    return (w.t() if kind == "Conv1D" else w).contiguous()


def _per_row(t: Tensor, rows: int) -> Tensor:
    """A per-tensor or per-channel parameter as one value per row."""
    return t.reshape(-1).expand(rows) if t.numel() == 1 else t.reshape(rows)


def _int4_layout(k: int, device: torch.device) -> tuple[int, str]:
    """inner K tiles of the int4 pack for this K, or (0, why not)."""
    if device.type == "cpu":
        return (1, "") if k % 2 == 0 else (0, f"int4 pack needs an even K, got {k}")
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles, ""
    return 0, f"int4 tensor-core pack needs K divisible by 32, got {k}"


class TorchKernel(nn.Module):
    """One quantizable layer in one format, float input → float output (see module docs).

    Build with :meth:`from_weight`; the module holds only what its kernel reads.
    """

    weight: Tensor
    bias: Tensor | None
    bias_c: Tensor | None
    w_nk: Tensor
    w_scale: Tensor
    w_zero: Tensor
    w_colsum: Tensor
    packed: Tensor
    scales_zeros: Tensor
    compute_dtype: torch.dtype
    k: int
    k_pad: int
    n_out: int
    block: int

    def __init__(self, spec: LayerSpec, fmt: str, device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.fmt = fmt
        self.device_type = device.type
        #: rows the int8 GEMM needs at least (torch._int_mm on CUDA: > 16); 0 on CPU
        self.min_rows = 17 if device.type == "cuda" else 0
        self._fwd: Callable[[Tensor], Tensor] = self._fp

    def extra_repr(self) -> str:
        return f"{self.spec.kind} {tuple(self.spec.weight_shape)} {self.fmt} on {self.device_type}"

    @classmethod
    def from_weight(cls, spec: LayerSpec, fmt: str, weight: Tensor, bias: Tensor | None,
                    cfg: QuantConfig, device: str | torch.device) -> TorchKernel:
        """The kernel of a layer with this float ``weight`` (as the module stores it).

        Raises:
            ValueError: no kernel for this format, layer kind or shape on this device.
        """
        dev = torch.device(device)
        self = cls(spec, fmt, dev)
        b = None if bias is None else bias.detach().float().to(dev)
        self.register_buffer("bias", b)
        if fmt in ("fp32", "fp16"):
            dtype = torch.float32 if fmt == "fp32" else torch.float16
            self.register_buffer("weight", weight.detach().to(dev, dtype))
            self.register_buffer("bias_c", None if b is None else b.to(dtype))
            self.compute_dtype = dtype
            self._fwd = self._fp
            return self
        if spec.kind not in MATMUL_KINDS:
            raise ValueError(f"no {fmt} {spec.kind} kernel in PyTorch; only fp32/fp16")
        w = _matrix(weight, spec.kind).float().cpu()
        self.n_out = n = w.shape[0]
        wo = parse_weight_only(fmt)
        if fmt != "w8a8" and (wo is None or wo[0] != 4):
            raise ValueError(f"unknown format {fmt!r} for the torch backend "
                             "(fp32, fp16, w8a8, w4b<block>)")
        # The int4 pack (and _int_mm on CUDA) needs N (and K) divisible by 8: zero rows /
        # columns are added. Zero is exact on every grid and leaves min-max and MSE ranges
        # of the real rows unchanged, so the real outputs are those of the unpadded weight.
        w = F.pad(w, (0, 0, 0, (-n) % 8))
        if fmt == "w8a8":
            self.k_pad = (-w.shape[1]) % 8
            if cfg.granularity == "group":
                raise ValueError("w8a8 takes per-channel or per-tensor weight scales, not groups")
            self._build_w8a8(F.pad(w, (0, self.k_pad)), cfg, dev)
            return self
        assert wo is not None
        self._build_int4(w, wo[1], cfg, dev, *w.shape)
        return self

    # -- builders -------------------------------------------------------------------------

    def _build_w8a8(self, w: Tensor, cfg: QuantConfig, dev: torch.device) -> None:
        n, k = w.shape
        qt = quantize_tensor(w, 8, cfg)
        q = qt.int_values.to(torch.int16)
        zp = _per_row(qt.zero_point, n).to(torch.int16)
        if not cfg.symmetric:  # uint8 grid → int8 by an exact shift of −128
            q, zp = q - 128, zp - 128
        # (N, K) row-major, passed transposed: the column-major B that cuBLASLt's int8
        # GEMM takes (torchao calls _int_mm the same way)
        self.register_buffer("w_nk", q.to(torch.int8).contiguous().to(dev))
        self.register_buffer("w_scale", _per_row(qt.scale.float(), n).contiguous().to(dev))
        self.register_buffer("w_zero", zp.float().to(dev))
        self.register_buffer("w_colsum", q.sum(1).float().to(dev))  # Σ_k q[n, k]
        self.k = k
        self._fwd = self._w8a8

    def _build_int4(self, w: Tensor, block: int, cfg: QuantConfig, dev: torch.device,
                    n: int, k: int) -> None:
        if block not in (32, 64, 128, 256):
            raise ValueError(f"_weight_int4pack_mm takes groups of 32, 64, 128 or 256, got {block}")
        if k % block:
            raise ValueError(f"int4 groups of {block} need K divisible by {block}, got K={k}")
        tiles, why = _int4_layout(k, dev)
        if not tiles:
            raise ValueError(why)
        qt = quantize_tensor(w, 4, cfg)
        q = qt.int_values.to(torch.int32).reshape(n, k)
        if cfg.symmetric:  # [−8, 7] → [0, 15]: (q + 8) − 8 = q, zero = 0
            q = q + 8
            zero_int = torch.full((n, 1), 8, dtype=torch.int32)
        else:
            zero_int = qt.zero_point.to(torch.int32)
        scale, zero_int = self._groups(qt.scale.float(), zero_int, n, k, block, cfg)
        # w = s · (q − z) = (q − 8) · s + s · (8 − z)
        zero_f = scale * (8 - zero_int).float()
        sz = torch.stack([scale, zero_f], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        if dev.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)
        else:
            u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev)
            packed = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), tiles)
        self.register_buffer("packed", packed.to(dev))
        self.register_buffer("scales_zeros", sz.to(dev, torch.bfloat16))
        self.block = block
        self._fwd = self._int4

    @staticmethod
    def _groups(scale: Tensor, zero: Tensor, n: int, k: int, block: int,
                cfg: QuantConfig) -> tuple[Tensor, Tensor]:
        """(N, K / block) scales and integer zero points, repeating coarser ones per group."""
        groups = k // block
        if cfg.granularity == "group":
            if cfg.group_size != block:
                raise ValueError(f"weights quantized in groups of {cfg.group_size} cannot run "
                                 f"in int4 groups of {block}")
            return scale.reshape(n, groups), zero.reshape(n, groups)
        s = scale.reshape(-1, 1).expand(n, groups) if scale.numel() == 1 else \
            scale.reshape(n, 1).expand(n, groups)
        z = zero.reshape(-1, 1).expand(n, groups) if zero.numel() == 1 else \
            zero.reshape(n, 1).expand(n, groups)
        return s.contiguous(), z.contiguous()

    # -- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return self._fwd(x)

    def _fp(self, x: Tensor) -> Tensor:
        xc = x.to(self.compute_dtype)
        kind = self.spec.kind
        if kind in MATMUL_KINDS:
            y = F.linear(xc, self.weight.t() if kind == "Conv1D" else self.weight, self.bias_c)
        else:
            conv = F.conv1d if kind == "Conv1d" else F.conv2d
            s = self.spec
            nd = len(s.weight_shape) - 2
            if s.pads[:nd] != s.pads[nd:]:
                xc = F.pad(xc, [p for i in reversed(range(nd)) for p in (s.pads[i], s.pads[nd + i])])
                pad: Any = 0
            else:
                pad = s.pads[:nd]
            y = conv(xc, self.weight, self.bias_c, s.strides, pad, s.dilations, s.group)
        return y.float()

    def _w8a8(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        lo = torch.clamp(x2.min(), max=0.0)
        hi = torch.clamp(x2.max(), min=0.0)
        sx = torch.clamp((hi - lo) / 255.0, min=1e-12)
        zx = torch.clamp(torch.round(-lo / sx), 0, 255)
        xq = torch.clamp(torch.round(x2 / sx) + zx, 0, 255) - 128  # int8 grid, zero zx − 128
        zx8 = zx - 128
        m = xq.shape[0]
        pad = 0
        if self.min_rows:  # CUDA _int_mm: more than 16 rows, a multiple of 8
            pad = max(self.min_rows - m, 0)
            pad += (-(m + pad)) % 8
        xi = xq.to(torch.int8)
        if pad or self.k_pad:  # padded K columns add k_pad·zx·zw to two terms below, which cancel
            xi = F.pad(xi, (0, self.k_pad, 0, pad), value=0)
        acc = torch._int_mm(xi, self.w_nk.t())[:m].float()
        # Σ_k (xq − zx)(wq − zw) = xq·wq − zw Σ xq − zx Σ wq + K zx zw
        rows = xq.sum(1, keepdim=True)
        acc = acc - rows * self.w_zero - zx8 * self.w_colsum + self.k * zx8 * self.w_zero
        y = (acc * (sx * self.w_scale))[:, : self.n_out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)

    def _int4(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.device_type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.block,
                                                            self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.block, self.scales_zeros)
        y = y[:, : self.n_out].float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def reference_check(kernel: TorchKernel, weight: Tensor, bias: Tensor | None, bits: int,
                    cfg: QuantConfig, x: Tensor) -> float:
    """Relative output error of ``kernel`` against the layer run in float on its quantized weight.

    The reference uses our quantizer's dequantized weight (float16 round trip for
    ``fp16``, the float weight for ``fp32``) and, for ``w8a8``, the 8-bit fake-quantized
    activation, so a correct kernel differs only by its arithmetic.
    """
    from mpsearch.quant import fake_quantize_activation
    from mpsearch.quant.apply import quantize_weight

    spec = kernel.spec
    wq = weight.detach().float().cpu()
    if bits < 32:
        wq = quantize_weight(wq, spec.kind, bits, cfg)
    xr = x.detach().float().cpu()
    if kernel.fmt == "w8a8":
        xr = fake_quantize_activation(xr, 8)
    ref_kernel = TorchKernel.from_weight(spec, "fp32", wq, bias, cfg, "cpu")
    ref = ref_kernel(xr)
    with torch.no_grad():
        got = kernel(x).float().cpu()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-12))


def tolerance(fmt: str) -> float:
    """The :func:`reference_check` error above which a format's kernel is refused."""
    return CHECK_TOLERANCE.get(fmt, INT4_TOLERANCE)


def fmt_bits(fmt: str) -> int:
    """Weight bits of a torch-backend format."""
    wo = parse_weight_only(fmt)
    return {"fp32": 32, "fp16": 16, "w8a8": 8}.get(fmt, wo[0] if wo else 0)


# -- timing ---------------------------------------------------------------------------------

def _cuda_flusher(device: torch.device) -> Callable[[], None]:
    size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 64 << 20
    buf = torch.empty(2 * size // 4, dtype=torch.float32, device=device)

    def flush() -> None:
        buf.add_(1.0)

    return flush


def time_on(runs: Mapping[str, Callable[[], Any]], device: torch.device, *, rounds: int = 5,
            warmup: int = 3, round_s: float = 0.02, cold: bool = False,
            seed: int = 0, warmup_s: float = WARMUP_S) -> dict[str, np.ndarray]:
    """Per-call times (µs) of callables on ``device``, interleaved round by round.

    On CPU this is :func:`~mpsearch.hw.timing.time_interleaved`. On CUDA each block of
    calls is bracketed by CUDA events and synchronised once, so a sample is the GPU time of
    one call averaged over its block (launch gaps included, host sync excluded); cold
    cache flushes the L2 (twice its size written) before each single call.
    """
    if device.type != "cuda":
        return time_interleaved(runs, rounds=rounds, warmup=warmup, round_s=round_s,
                                cold=cold, seed=seed, warmup_s=warmup_s)
    rng = np.random.default_rng(seed)
    flush = _cuda_flusher(device) if cold else None
    names = list(runs)
    calls: dict[str, int] = {}
    for name in names:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        n_warm = 0
        while n_warm < max(warmup, 1) or time.perf_counter() - t0 < warmup_s:
            runs[name]()
            n_warm += 1
            if n_warm % 8 == 0:
                torch.cuda.synchronize(device)
        torch.cuda.synchronize(device)
        per = (time.perf_counter() - t0) / n_warm
        calls[name] = int(np.clip(round_s / max(per, 1e-7), 1, 5 if cold else 200))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for idx in rng.permutation(len(names)):
            name = names[int(idx)]
            fn = runs[name]
            if flush is None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls[name]):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e3 / calls[name])
                continue
            for _ in range(calls[name]):
                flush()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e3)
    return {n: np.asarray(v) for n, v in samples.items()}


def time_formats(spec: LayerSpec, formats: Sequence[str], cfg: QuantConfig, *,
                 device: str | torch.device = "cuda", threads: int = 1, cache: str = "warm",
                 rounds: int = 5, warmup: int = 3, round_s: float = 0.02,
                 seed: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Latency of one layer shape in each format on ``device`` (random weights, seeded).

    Every kernel is first checked against the float reference (:func:`reference_check`);
    a format whose kernel cannot be built for this shape, or disagrees, is returned in the
    second dict with the reason instead of being timed.

    Returns:
        ``({fmt: stats}, {fmt: reason})``; stats as :func:`~mpsearch.hw.timing.stats_us`.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(spec.weight_shape, generator=gen) / max(spec.reduction, 1) ** 0.5
    bias = torch.randn(spec.out_features, generator=gen) * 0.1 if spec.bias else None
    x = torch.randn(spec.input_shape, generator=gen)
    xd = x.to(dev)
    runs: dict[str, Callable[[], Any]] = {}
    refused: dict[str, str] = {}
    torch_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for fmt in formats:
                try:
                    kern = TorchKernel.from_weight(spec, fmt, weight, bias, cfg, dev)
                except (ValueError, RuntimeError) as err:
                    refused[fmt] = str(err).splitlines()[0]
                    continue
                err_rel = reference_check(kern, weight, bias, fmt_bits(fmt), cfg, xd)
                if not err_rel <= tolerance(fmt):
                    refused[fmt] = (f"kernel output differs from the float reference by "
                                    f"{err_rel:.3g} (relative; limit {tolerance(fmt):g})")
                    continue
                runs[fmt] = partial(kern, xd)
            samples = time_on(runs, dev, rounds=rounds, warmup=warmup, round_s=round_s,
                              cold=cache == "cold", seed=seed) if runs else {}
    finally:
        torch.set_num_threads(torch_threads)
    return {f: stats_us(s) for f, s in samples.items()}, refused


def gpu_fingerprint(device: str | torch.device = "cuda") -> dict[str, Any]:
    """GPU name, compute capability, memory, L2 size, driver and CUDA versions."""
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__})")
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    return {"kind": "cuda", "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
            "cache_bytes": int(getattr(props, "L2_cache_size", 0)),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


# -- deployment -----------------------------------------------------------------------------

class TorchModel:
    """A copy of a float model with each quantizable layer replaced by its :class:`TorchKernel`.

    Layers the bit map keeps at 32 bits run ``fp32``; the rest of the model runs as it is
    (float32) on ``device``.

    Args:
        model: the float model (not modified).
        bitmap: bits per layer (checked against the model).
        device: ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads on CPU.

    Raises:
        BitMapError: the bit map does not fit the model.
        ValueError: a layer's bits have no kernel in PyTorch on ``device``.
    """

    def __init__(self, model: nn.Module, bitmap: Any, device: str | torch.device = "cuda",
                 threads: int = 1) -> None:
        from mpsearch.hw.formats import format_for
        from mpsearch.hw.specs import fused_stay_float
        from mpsearch.layers import layer_weight, quantizable_modules, replace_module

        self.device = torch.device(device)
        self.threads = threads
        bitmap.check_model(model, as_is=True)
        fused = fused_stay_float(model, bitmap)  # left to PyTorch's fused operators
        self.model = copy.deepcopy(model).eval()
        modules = quantizable_modules(self.model)
        self.formats: dict[str, str] = {}
        for name, module in modules.items():
            if name in fused:
                self.formats[name] = "fp32"
                continue
            entry = bitmap[name]
            spec = _module_spec(module)
            choice = format_for(spec.kind, spec.reduction, entry.w_bits, entry.qconfig,
                                device=self.device.type, backend="torch")
            if choice.name is None:
                raise ValueError(f"layer {name!r} at {entry.w_bits} bits: {choice.reason}")
            bias = getattr(module, "bias", None)
            kern = TorchKernel.from_weight(spec, choice.name, layer_weight(module),
                                           bias if isinstance(bias, Tensor) else None,
                                           entry.qconfig, self.device)
            if module is self.model:  # the model is one bare layer
                self.model = kern
            else:
                replace_module(self.model, module, kern)
            self.formats[name] = choice.name
        self.model.to(self.device)

    def run(self, batch: Any) -> Tensor:
        """The first output of the deployed model on ``batch``, on the CPU."""
        from mpsearch.batches import call, first_output, split_batch, to_device

        # the fused transformer fast path would read the swapped layers' weights
        with torch.no_grad(), _threads(self.device, self.threads), unfused_attention():
            out = call(self.model, to_device(split_batch(batch), self.device))
        return first_output(out).float().cpu()

    def latency_us(self, batch: Any, *, rounds: int = 5, warmup: int = 3, cold: bool = False,
                   seed: int = 0) -> dict[str, Any]:
        """Measured end-to-end latency on ``batch``: median, p10, p90 (µs) and count."""
        with unfused_attention():
            return time_model(self.model, batch, self.device, threads=self.threads,
                              rounds=rounds, warmup=warmup, cold=cold, seed=seed)


def time_model(model: nn.Module, batch: Any, device: torch.device, *, threads: int = 1,
               rounds: int = 5, warmup: int = 3, cold: bool = False,
               seed: int = 0) -> dict[str, Any]:
    """End-to-end latency of ``model`` (already on ``device``) on one batch."""
    from mpsearch.batches import call, split_batch, to_device

    split = to_device(split_batch(batch), device)
    with torch.no_grad(), _threads(device, threads):
        samples = time_on({"e2e": lambda: call(model, split)}, device, rounds=rounds,
                          warmup=warmup, round_s=0.1, cold=cold, seed=seed,
                          warmup_s=WARMUP_E2E_S)
    return stats_us(samples["e2e"])


class _threads:
    """Context: torch intra-op threads set to ``n`` on CPU, restored after."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.device, self.n, self.old = device, n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def _module_spec(module: nn.Module) -> LayerSpec:
    """A spec from the module alone (a kernel does not depend on the input shape)."""
    from mpsearch.hw.specs import layer_spec
    from mpsearch.layers import layer_weight

    w = layer_weight(module)
    if w.dim() == 2:
        k = int(w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1])
        return layer_spec(module, (1, k))
    groups = int(getattr(module, "groups", 1))
    return layer_spec(module, (1, int(w.shape[1]) * groups, *([8] * (w.dim() - 2))))


__all__ = ["TorchKernel", "TorchModel", "gpu_fingerprint", "time_formats",
           "time_model", "time_on"]
