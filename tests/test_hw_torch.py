"""The PyTorch kernel backend: the CUDA code path, run on PyTorch's CPU kernels in CI.

``torch._int_mm`` and ``_weight_int4pack_mm_for_cpu`` are real CPU kernels, so every
builder, the reference check, the timing loop, ``TorchModel`` and ``profile(...,
backend="torch")`` run here; only the CUDA op names, CUDA events and row padding are left
to the ``gpu``-marked tests (skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch import BitMap, Budget, HardwareProfile
from mpsearch.hw.cost import predict_latency
from mpsearch.hw.formats import format_for
from mpsearch.hw.kernels_ort import LayerSpec
from mpsearch.hw.kernels_torch import (
    TorchKernel,
    TorchModel,
    fmt_bits,
    reference_check,
    time_formats,
)
from mpsearch.quant import QuantConfig

FAST = {"rounds": 1, "warmup": 1, "round_s": 0.002, "progress": False}
CONFIGS = [QuantConfig(), QuantConfig(symmetric=True),
           QuantConfig(granularity="group", group_size=64)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g) * 0.1,
            torch.randn(5, k, generator=g))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["asym", "sym", "group64"])
@pytest.mark.parametrize("n,k", [(96, 256), (10, 128)])  # 10 outputs: padded to 16
def test_kernels_match_the_quantized_reference(cfg: QuantConfig, n: int, k: int) -> None:
    w, b, x = _layer(n, k)
    spec = LayerSpec("Linear", (n, k), (5, k))
    for bits in (32, 16, 8, 4):
        choice = format_for("Linear", k, bits, cfg, device="cpu", backend="torch")
        if choice.name is None:
            assert bits == 8 and cfg.granularity == "group"
            continue
        kern = TorchKernel.from_weight(spec, choice.name, w, b, cfg, "cpu")
        err = reference_check(kern, w, b, fmt_bits(choice.name), cfg, x)
        # W8A8 is exact integer arithmetic; int4 runs bfloat16 activations
        limit = {32: 1e-6, 16: 1e-3, 8: 1e-5, 4: 1e-2}[bits]
        assert err < limit, (bits, err)
        assert kern(x).shape == (5, n)


def test_w8a8_cuda_row_and_k_padding_is_exact() -> None:
    # the CUDA-only row padding (more than 16 rows) run on the CPU kernel
    w, b, x = _layer(24, 100)  # K = 100: padded to 104
    kern = TorchKernel.from_weight(LayerSpec("Linear", (24, 100), (5, 100)), "w8a8", w, b,
                                   QuantConfig(), "cpu")
    kern.min_rows = 17
    assert kern.k_pad == 4
    assert reference_check(kern, w, b, 8, QuantConfig(), x) < 1e-5


def test_a_kernel_that_disagrees_is_refused_not_timed() -> None:
    spec = LayerSpec("Linear", (64, 128), (4, 128))
    cfg = QuantConfig()
    stats, refused = time_formats(spec, ["fp32", "w4b128", "w4b48", "w3b128"], cfg,
                                  device="cpu", rounds=1, warmup=1, round_s=0.001)
    assert set(stats) == {"fp32", "w4b128"}
    assert "groups of 32, 64, 128 or 256" in refused["w4b48"]
    assert "unknown format" in refused["w3b128"]
    # a wrong kernel: the scales of a different weight
    w, b, x = _layer(64, 128)
    kern = TorchKernel.from_weight(spec, "w4b128", w * 3, b, cfg, "cpu")
    assert reference_check(kern, w, b, 4, cfg, x) > 0.5


def test_torch_formats() -> None:
    cfg = QuantConfig()
    fmt = lambda kind, k, bits: format_for(kind, k, bits, cfg, device="cpu", backend="torch")
    assert fmt("Linear", 768, 4).name == "w4b128"
    assert fmt("Linear", 96, 4).name == "w4b32"
    assert fmt("Linear", 100, 4).name is None and "divisible by 32" in fmt("Linear", 100, 4).reason
    assert fmt("Linear", 768, 8).name == "w8a8"
    assert fmt("Linear", 768, 16).name == "fp16"
    assert fmt("Linear", 768, 2).name is None
    assert fmt("Conv2d", 9, 8).name is None and "convolution" in fmt("Conv2d", 9, 8).reason
    assert fmt("Conv2d", 9, 16).name == "fp16"


@pytest.fixture(scope="module")
def torch_profile(mnist_cnn: nn.Module,
                  mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]) -> HardwareProfile:
    return mpsearch.profile(mnist_cnn, mnist_eval[0][0][:8], backend="torch",
                            bits=(4, 8, 16, 32), **FAST)


def test_profile_search_validate_on_torch_backend(
        torch_profile: HardwareProfile, mnist_cnn: nn.Module,
        mnist_calib: list[tuple[torch.Tensor, torch.Tensor]],
        mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    prof = torch_profile
    assert prof.backend == "torch" and prof.device["kind"] == "cpu"
    conv = next(r for k, r in prof.shapes.items() if k.startswith("Conv2d"))
    assert set(conv["formats"]) == {"fp32", "fp16"}
    lin = next(r for k, r in prof.shapes.items() if k.startswith("Linear|in=8x1568"))
    assert set(lin["formats"]) == {"fp32", "fp16", "w8a8", "w4b32"}
    rec = next(iter(prof.models.values()))
    assert set(rec["graph_factor"]) == {"4", "8", "16"}
    for by_cache in rec["graph_factor"].values():
        assert 0.25 <= by_cache["warm"] <= 4.0
    # JSON round trip keeps the backend; reuse= from another backend is refused
    back = HardwareProfile.from_dict(prof.to_dict())
    assert back.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        mpsearch.profile(mnist_cnn, mnist_eval[0][0][:8], reuse=prof, **FAST)

    fp32 = predict_latency(prof, mnist_cnn, BitMap.uniform(mnist_cnn, 32))["latency_us"]
    res = mpsearch.search(mnist_cnn, Budget(latency_us=fp32 * 10, avg_bits=8.0),
                          data=mnist_calib[:1], profile=prof, progress=False, refine=False,
                          bits=(4, 8, 16, 32), slices=None)
    for conv_name in ("features.0", "features.3"):  # no integer convolution in PyTorch
        assert res.bitmap[conv_name].w_bits in (16, 32)
    data = [(x[:8], y[:8]) for x, y in mnist_eval[:2]]
    rep = mpsearch.validate(mnist_cnn, res.bitmap, data=data, profile=prof,
                            measure_latency=True, progress=False)
    assert rep.latency_us_measured is not None and rep.latency_us_measured > 0
    assert rep.latency_us_predicted is not None and rep.latency_us_predicted > 0
    assert rep.deployed_vs_simulated_rel_error is not None
    assert rep.deployed_vs_simulated_rel_error < 0.05


def test_torch_model_runs_the_deployed_formats(mnist_cnn: nn.Module,
                                               mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]
                                               ) -> None:
    x = mnist_eval[0][0][:8]
    before = {k: v.clone() for k, v in mnist_cnn.state_dict().items()}
    bm = BitMap.from_bits(mnist_cnn, {"classifier.0": 4, "classifier.2": 8}, default=32)
    dep = TorchModel(mnist_cnn, bm, "cpu")
    assert dep.formats == {"features.0": "fp32", "features.3": "fp32",
                           "classifier.0": "w4b32", "classifier.2": "w8a8"}
    y = dep.run(x)
    ref = mpsearch.quantize(mnist_cnn, bm)(x).detach()
    assert float((y - ref).norm() / ref.norm()) < 0.02
    assert all(torch.equal(v, mnist_cnn.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="convolution"):
        TorchModel(mnist_cnn, BitMap.uniform(mnist_cnn, 8), "cpu")


def test_torch_model_replaces_a_layer_under_each_of_its_names() -> None:
    """``self.alias = self.fc``, called as ``alias``: the kernel replaced ``fc`` only and
    the deployment ran the float layer."""

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(64, 32), nn.Linear(32, 6)
            self.alias = self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.alias(x)))

    torch.manual_seed(0)
    model = Aliased().eval()
    bm = BitMap.from_bits(model, {"fc": 4}, default=32)
    dep = TorchModel(model, bm, "cpu")
    assert dep.model.alias is dep.model.fc and dep.formats["fc"].startswith("w4")
    x = torch.randn(8, 64)
    ref = mpsearch.quantize(model, bm)(x).detach()
    assert float((dep.run(x) - ref).norm() / ref.norm()) < 0.01
    assert float((model(x) - ref).norm() / ref.norm()) > 0.01  # 4 bits differ from float


def test_cuda_needs_a_gpu(mnist_cnn: nn.Module) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        mpsearch.profile(mnist_cnn, torch.zeros(1, 1, 28, 28), device="cuda", **FAST)


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernels_profile_and_deploy(mnist_cnn: nn.Module,
                                         mnist_eval: list[tuple[torch.Tensor, torch.Tensor]]
                                         ) -> None:
    for cfg in CONFIGS:
        spec = LayerSpec("Linear", (256, 512), (5, 512))
        stats, refused = time_formats(spec, ["fp32", "fp16", "w8a8", "w4b128", "w4b64"], cfg,
                                      device="cuda", rounds=2, warmup=2)
        expect = {"fp32", "fp16", "w4b64" if cfg.granularity == "group" else "w4b128"}
        if cfg.granularity != "group":
            expect.add("w8a8")
        assert expect <= set(stats), refused
    prof = mpsearch.profile(mnist_cnn, mnist_eval[0][0][:32], device="cuda", **FAST)
    assert prof.device["kind"] == "cuda" and prof.backend == "torch"
    bm = BitMap.from_bits(mnist_cnn, {"classifier.0": 4, "classifier.2": 8}, default=16)
    # the float model stays on the CPU; the deployment runs on the profile's GPU
    rep = mpsearch.validate(mnist_cnn, bm, data=[mnist_eval[0]], profile=prof,
                            measure_latency=True, progress=False)
    assert rep.latency_us_measured and rep.deployed_vs_simulated_rel_error < 0.05
