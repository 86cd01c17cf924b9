"""ONNX Runtime (CPU) kernels: the ONNX nodes that run one layer in one format.

Every builder takes float input ``x`` and gives float output ``y``, so its measured latency
includes the precision changes at its edges (quantizing the input activation, scaling the
integer accumulator back to float). The same builders make the single-layer graphs that
:func:`mpsearch.profile` times and the layers of :func:`mpsearch.export_onnx`, so the
profiled kernel is the deployed kernel.

- ``fp32``: ``MatMul`` + ``Add`` (Linear), ``Conv``.
- ``w8a8``: ``DynamicQuantizeLinear`` (per-tensor asymmetric uint8, as
  :func:`~mpsearch.quant.fake_quantize_activation` with 8 bits), then ``MatMulInteger``
  with uint8 weights and the float scale (exact), or ``QLinearConv`` whose uint8 output
  takes a static scale from the output range seen on calibration data (static
  quantization: one more 8-bit rounding; ``ConvInteger`` would avoid it but ran 4× slower
  than ``QLinearConv`` here and takes no per-channel zero point). Weights are uint8
  (symmetric int8 grids shifted by +128, exact): ONNX Runtime's uint8 × int8 kernels
  saturate on x86 CPUs without VNNI (:func:`_uint8_weights`).
- ``w{b}b{block}``: ``com.microsoft.MatMulNBits`` (``bits`` 2, 4, 8; ``accuracy_level=4``),
  weight-only with float activations; per-channel scales are repeated in every block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpsearch.hw.formats import CONV_KINDS, MATMUL_KINDS, parse_weight_only
from mpsearch.quant import QuantConfig, QuantizedTensor, quantize_tensor

OPSET = 17
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LayerSpec:
    """What a layer kernel needs to know: shapes and convolution attributes.

    Attributes:
        kind: ``Linear``, ``Conv1D`` (weight stored ``(in, out)``), ``Conv1d``, ``Conv2d``.
        weight_shape: weight shape as stored.
        input_shape: input shape of the deployed call, batch dim included.
        bias: whether the layer adds a bias.
        strides, pads, dilations: convolution attributes (ONNX layout; pads begin then end).
        group: convolution groups.
    """

    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    bias: bool = True
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1

    @property
    def out_features(self) -> int:
        """Output features / channels."""
        return self.weight_shape[1] if self.kind == "Conv1D" else self.weight_shape[0]

    @property
    def reduction(self) -> int:
        """Reduction length K of one output value."""
        if self.kind == "Conv1D":
            return self.weight_shape[0]
        return int(math.prod(self.weight_shape[1:]))

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Output shape for :attr:`input_shape`."""
        if self.kind in MATMUL_KINDS:
            return (*self.input_shape[:-1], self.out_features)
        spatial = []
        nd = len(self.weight_shape) - 2
        for i in range(nd):
            size, k = self.input_shape[2 + i], self.weight_shape[2 + i]
            span = self.dilations[i] * (k - 1) + 1
            spatial.append((size + self.pads[i] + self.pads[nd + i] - span) // self.strides[i] + 1)
        return (self.input_shape[0], self.out_features, *spatial)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one call."""
        return int(math.prod(self.output_shape)) * self.reduction

    def key(self) -> str:
        """Stable text key: layers with equal keys have equal kernels and latency."""
        dims = lambda t: "x".join(map(str, t))
        parts = [self.kind, f"in={dims(self.input_shape)}", f"w={dims(self.weight_shape)}",
                 f"bias={int(self.bias)}"]
        if self.kind in CONV_KINDS:
            parts += [f"s={dims(self.strides)}", f"p={dims(self.pads)}",
                      f"d={dims(self.dilations)}", f"g={self.group}"]
        return "|".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"kind": self.kind, "weight_shape": list(self.weight_shape),
                "input_shape": list(self.input_shape), "bias": self.bias,
                "strides": list(self.strides), "pads": list(self.pads),
                "dilations": list(self.dilations), "group": self.group}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(kind=str(d["kind"]), weight_shape=tuple(d["weight_shape"]),
                   input_shape=tuple(d["input_shape"]), bias=bool(d["bias"]),
                   strides=tuple(d["strides"]), pads=tuple(d["pads"]),
                   dilations=tuple(d["dilations"]), group=int(d["group"]))


def _helpers() -> tuple[Any, Any, Any]:
    from onnx import TensorProto, helper, numpy_helper

    return helper, TensorProto, numpy_helper


class _Nodes:
    """Collects nodes and initializers under a unique name prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.replace("/", "_")
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def name(self, s: str) -> str:
        return f"{self.prefix}/{s}"

    def const(self, s: str, array: np.ndarray) -> str:
        _, _, nh = _helpers()
        name = self.name(s)
        self.inits.append(nh.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str],
             domain: str = "", **attrs: Any) -> None:
        helper, _, _ = _helpers()
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs),
                                           name=self.name(op + str(len(self.nodes))),
                                           domain=domain or None, **attrs))


def _matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """(out, K) view of a weight, K flattened for conv."""
    w = weight.detach().float()
    return (w.t() if kind == "Conv1D" else w).reshape(w.shape[1] if kind == "Conv1D"
                                                      else w.shape[0], -1).contiguous()


def _per_row(t: torch.Tensor, rows: int) -> np.ndarray:
    """A per-tensor or per-channel quantization parameter as one value per row."""
    return np.broadcast_to(t.reshape(-1).numpy() if t.numel() > 1 else t.reshape(1).numpy(),
                           (rows,)).copy()


def _uint8_weights(qt: QuantizedTensor, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 values (rows, K), uint8 zero point per row, float32 scale per row.

    Unsigned, not int8: ONNX Runtime's uint8 × int8 kernels on x86 CPUs without VNNI
    (AVX2's ``vpmaddubsw``) saturate pairs of products at int16, an output error of
    5–10 % on full-range weights (seen on an AVX2-only AMD EPYC); uint8 × uint8 is exact
    on every CPU. A symmetric int8 grid is shifted by +128 (zero point 128), exactly.
    """
    q = qt.int_values.reshape(rows, -1).to(torch.int16)
    zp = torch.as_tensor(_per_row(qt.zero_point, rows)).to(torch.int16)
    if qt.cfg.symmetric:  # int8 grid [-128, 127] → uint8 by an exact shift of +128
        q, zp = q + 128, zp + 128
    return (q.to(torch.uint8).numpy(), zp.to(torch.uint8).numpy(),
            _per_row(qt.scale.float(), rows).astype(np.float32))


def _add_bias(b: _Nodes, y0: str, y: str, bias: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if bias is None:
        b.node("Identity", [y0], [y])
    else:
        b.node("Add", [y0, b.const("bias", bias.astype(np.float32).reshape(shape))], [y])


def build_layer(spec: LayerSpec, fmt: str, x: str, y: str, weight: torch.Tensor,
                bias: torch.Tensor | None, cfg: QuantConfig, prefix: str,
                out_range: tuple[float, float] | None = None,
                quantized: Callable[[int], QuantizedTensor] | None = None,
                ) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers computing ``y = layer(x)`` in format ``fmt``.

    Args:
        spec: the layer's shapes and attributes.
        fmt: ``fp32``, ``w8a8`` or ``w{bits}b{block}`` (matrix-multiply layers only).
        x, y: names of the float input and output.
        weight: the float weight as stored in the module.
        bias: the float bias or None.
        cfg: weight quantizer scheme (our quantizer makes the integer weights).
        prefix: unique prefix of every new name (e.g. the layer FQN).
        out_range: (min, max) of the layer's pre-bias output on calibration data: the static
            uint8 output scale of ``w8a8`` convolutions (``QLinearConv``); None: ±4.
        quantized: bits → the integer weight to write, where it is not ``weight``
            quantized on its own (a slice by input features takes its rows' scales in the
            whole layer); None: ``quantize_tensor(weight, bits, cfg)``.

    Raises:
        ValueError: the format has no kernel for this layer kind.
    """
    b = _Nodes(prefix)
    bias_np = None if bias is None else bias.detach().float().numpy()
    conv = spec.kind in CONV_KINDS
    n_out = spec.out_features
    bshape = (1, n_out) + (1,) * (len(spec.weight_shape) - 2) if conv else (n_out,)
    if fmt == "fp32":
        if conv:
            w = b.const("weight", weight.detach().float().numpy())
            ins = [x, w] + ([b.const("bias", bias_np)] if bias_np is not None else [])
            b.node("Conv", ins, [y], strides=list(spec.strides), pads=list(spec.pads),
                   dilations=list(spec.dilations), group=spec.group)
        else:
            wt = _matrix(weight, spec.kind).t().contiguous().numpy()  # (K, N)
            b.node("MatMul", [x, b.const("weight_t", wt)], [b.name("mm")])
            _add_bias(b, b.name("mm"), y, bias_np, bshape)
        return b.nodes, b.inits
    if fmt == "w8a8":
        _w8a8(b, spec, x, y, weight, bias_np, cfg, bshape, out_range, quantized)
        return b.nodes, b.inits
    parsed = parse_weight_only(fmt)
    if parsed is None or conv:
        raise ValueError(f"format {fmt!r} has no onnxruntime kernel for a {spec.kind} layer; "
                         "known: fp32, w8a8 (all kinds), w{2,4,8}b{block} (Linear, Conv1D)")
    _nbits(b, spec, x, y, _matrix(weight, spec.kind), bias_np, cfg, *parsed, quantized)
    return b.nodes, b.inits


def _w8a8(b: _Nodes, spec: LayerSpec, x: str, y: str, weight: torch.Tensor,
          bias_np: np.ndarray | None, cfg: QuantConfig, bshape: tuple[int, ...],
          out_range: tuple[float, float] | None,
          quantized: Callable[[int], QuantizedTensor] | None = None) -> None:
    _, tp, _ = _helpers()
    n_out = spec.out_features
    conv = spec.kind in CONV_KINDS
    w = weight.detach().float()
    qt = (quantized(8) if quantized is not None else
          quantize_tensor(w.t().contiguous() if spec.kind == "Conv1D" else w, 8, cfg))
    q, zp, scale = _uint8_weights(qt, n_out)
    xq, xs, xz = b.name("xq"), b.name("xs"), b.name("xz")
    b.node("DynamicQuantizeLinear", [x], [xq, xs, xz])
    acc = b.name("acc")
    if not conv:
        b.node("MatMulInteger", [xq, b.const("weight_q", q.T.copy()), xz, b.const("weight_zp", zp)],
               [acc])
    else:
        # QLinearConv (MLAS) is several times faster here than ConvInteger, which also
        # takes no per-channel weight zero point; its uint8 output needs a static scale.
        lo, hi = out_range if out_range is not None else (-4.0, 4.0)
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        y_scale = (hi - lo) / 255 if hi > lo else 1.0
        y_zero = int(np.clip(np.round(-lo / y_scale), 0, 255))
        yq = b.name("yq")
        b.node("QLinearConv", [xq, xs, xz, b.const("weight_q", q.reshape(spec.weight_shape)),
                               b.const("weight_scale", scale), b.const("weight_zp", zp),
                               b.const("y_scale", np.array(y_scale, np.float32)),
                               b.const("y_zp", np.array(y_zero, np.uint8))], [yq], strides=list(spec.strides), pads=list(spec.pads),
               dilations=list(spec.dilations), group=spec.group)
        y0 = b.name("y0")
        b.node("DequantizeLinear", [yq, b.name("y_scale"), b.name("y_zp")], [y0])
        _add_bias(b, y0, y, bias_np, bshape)
        return
    accf, sc, y0 = b.name("accf"), b.name("scale"), b.name("y0")
    b.node("Cast", [acc], [accf], to=tp.FLOAT)
    b.node("Mul", [xs, b.const("weight_scale", scale.reshape(bshape))], [sc])
    b.node("Mul", [accf, sc], [y0])
    _add_bias(b, y0, y, bias_np, bshape)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis, low bits first, into uint8."""
    per = 8 // bits
    v = values.astype(np.uint8)
    pad = (-v.shape[-1]) % per
    if pad:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], pad), np.uint8)], axis=-1)
    v = v.reshape(*v.shape[:-1], -1, per)
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= (v[..., i] << (bits * i)).astype(np.uint8)
    return out


def nbits_weights(w: torch.Tensor, bits: int, block: int, cfg: QuantConfig,
                  quantized: Callable[[int], QuantizedTensor] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MatMulNBits`` inputs (B, scales, zero_points) for a float (N, K) weight.

    Values come from our quantizer; a symmetric grid is shifted to unsigned with zero point
    ``2^(bits−1)``; per-channel (or per-tensor) parameters are repeated in every block.
    """
    n, k = w.shape
    qt = quantized(bits) if quantized is not None else quantize_tensor(w, bits, cfg)
    n_blocks = -(-k // block)
    q = qt.int_values.to(torch.int16).numpy().reshape(n, k)
    if cfg.granularity == "group":
        scale = qt.scale.float().numpy().reshape(n, n_blocks)
        zp = qt.zero_point.numpy().reshape(n, n_blocks).astype(np.int16)
    else:
        scale = np.repeat(_per_row(qt.scale.float(), n)[:, None], n_blocks, axis=1)
        zp = np.repeat(_per_row(qt.zero_point, n).astype(np.int16)[:, None], n_blocks, axis=1)
    if cfg.symmetric:
        shift = 1 << (bits - 1)
        q, zp = q + shift, zp + shift
    pad = n_blocks * block - k
    if pad:  # padded values dequantize to 0: the block's zero point
        q = np.concatenate([q, np.repeat(zp[:, -1:], pad, axis=1)], axis=1)
    blob = _pack(q.reshape(n, n_blocks, block), bits)
    return blob, scale.astype(np.float32).reshape(-1), _pack(zp, bits).reshape(-1)


def _nbits(b: _Nodes, spec: LayerSpec, x: str, y: str, w: torch.Tensor, bias_np: np.ndarray | None,
           cfg: QuantConfig, bits: int, block: int,
           quantized: Callable[[int], QuantizedTensor] | None = None) -> None:
    n, k = w.shape
    blob, scales, zps = nbits_weights(w, bits, block, cfg, quantized)
    y0 = b.name("y0")
    b.node("MatMulNBits", [x, b.const("weight_q", blob), b.const("weight_scale", scales),
                           b.const("weight_zp", zps)], [y0], domain=MS_DOMAIN,
           K=k, N=n, bits=bits, block_size=block, accuracy_level=4)
    _add_bias(b, y0, y, bias_np, (n,))


def make_model(nodes: list[Any], inits: list[Any], inputs: list[tuple[str, tuple[int, ...]]],
               outputs: list[str], name: str = "mpsearch") -> Any:
    """A float-in, float-out ONNX model from nodes (opset 17 + com.microsoft)."""
    helper, tp, _ = _helpers()
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(n, tp.FLOAT, list(s)) for n, s in inputs],
        [helper.make_tensor_value_info(o, tp.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    return model


def layer_model(spec: LayerSpec, fmt: str, cfg: QuantConfig, seed: int = 0) -> Any:
    """A single-layer ONNX model in ``fmt`` with random weights (latency ignores values)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(spec.weight_shape, generator=gen) * 0.05
    bias = torch.randn(spec.out_features, generator=gen) * 0.05 if spec.bias else None
    nodes, inits = build_layer(spec, fmt, "x", "y", weight, bias, cfg, "layer")
    return make_model(nodes, inits, [("x", spec.input_shape)], ["y"])


def identity_model(shape: tuple[int, ...]) -> Any:
    """``y = x``: the fixed cost of one ``session.run``, subtracted from layer timings."""
    helper, _, _ = _helpers()
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [], [("x", shape)], ["y"])


def qdq_model(shape: tuple[int, ...]) -> Any:
    """Quantize an activation to uint8 and back: the price of one precision change."""
    helper, _, _ = _helpers()
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    return make_model(nodes, [], [("x", shape)], ["y"])


def session(model: Any, threads: int = 1) -> Any:
    """A CPU inference session: ``threads`` intra-op threads, no spinning, full optimization."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
