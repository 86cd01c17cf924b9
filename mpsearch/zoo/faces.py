"""MTCNN's pretrained output network (ONet) as a face / non-face classifier, on real faces.

The weights (``onet.pt``, 0.39 M parameters) are those the ``facenet-pytorch`` package
ships (MTCNN's third stage, converted from the original Caffe model). The network is
defined here with that package's parameter names, so the checkpoint loads unchanged; only
its face head is built (``dense6_1``: face / not a face), not its box and landmark heads,
so the model's one output is the classifier's logits and the default divergence is the KL
to the float model's prediction. Four 3×3/2×2 convolutions with PReLU and max pooling,
then one 1152 → 256 linear layer that holds three quarters of the weights.

The data are scikit-image's ``lfw_subset``: 100 faces from Labeled Faces in the Wild and
100 patches of other images, 25×25 grey. They are resized to ONet's 48×48 input, grey
copied to the three channels, and shuffled once (seeded), then split: the calibration
and evaluation images are disjoint. Nothing is downloaded. ``facenet-pytorch`` pins
torchvision in its metadata, so install it with ``pip install --no-deps facenet-pytorch``
(only its weight files are read, the package is never imported).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ONET_SIZE", "ONetFace", "face_batches", "faces", "load_onet", "mtcnn_state"]

#: Side of ONet's square input, in pixels.
ONET_SIZE = 48
_HINT = ("install it with `pip install --no-deps facenet-pytorch` "
         "(its metadata pins torchvision, which is not needed)")
#: Images per split of the 200 in ``lfw_subset``, after one seeded shuffle.
_SPLITS = {"calib": (0, 64), "eval": (64, 200)}


class ONetFace(nn.Module):
    """MTCNN's ONet trunk and face head: ``(N, 3, 48, 48)`` → face logits ``(N, 2)``.

    Inputs are RGB scaled as MTCNN does, ``(pixel − 127.5) / 128``; class 1 is "face".
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        # the Caffe model flattens (width, height, channel): the dense layer expects it
        x = x.permute(0, 3, 2, 1).flatten(1)
        return self.dense6_1(self.prelu5(self.dense5(x)))


def _weights_dir() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")  # never imported: it needs torchvision
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"ONet's weights come with facenet-pytorch; {_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def mtcnn_state(stage: str) -> dict[str, Tensor]:
    """The pretrained weights facenet-pytorch ships for one MTCNN stage, on the CPU.

    Args:
        stage: ``"pnet"``, ``"rnet"`` or ``"onet"``. Parameter names are facenet-pytorch's
            (``conv1.weight``, ``prelu1.weight``, ..., every head included).

    Raises:
        ValueError: unknown stage.
        ImportError: facenet-pytorch is not installed.
    """
    if stage not in ("pnet", "rnet", "onet"):
        raise ValueError(f"stage must be 'pnet', 'rnet' or 'onet', got {stage!r}")
    state: dict[str, Tensor] = torch.load(_weights_dir() / f"{stage}.pt", map_location="cpu",
                                          weights_only=True)
    return state


def load_onet() -> ONetFace:
    """MTCNN's pretrained ONet face classifier, in eval mode, on the CPU.

    Raises:
        ImportError: facenet-pytorch is not installed.
    """
    state = mtcnn_state("onet")
    model = ONetFace()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    return model.eval()


@functools.cache
def _all_faces() -> tuple[Tensor, Tensor]:
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(f"the faces ship with scikit-image ({exc}); install it with "
                          "`pip install mpsearch[imagenet]`") from None
    grey = torch.tensor(data.lfw_subset(), dtype=torch.float32)  # (200, 25, 25) in [0, 1]
    images = F.interpolate(grey[:, None], size=ONET_SIZE, mode="bilinear",
                           align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    images = (images * 255 - 127.5) / 128
    labels = (torch.arange(len(grey)) < 100).long()  # the first 100 are the faces
    order = torch.randperm(len(grey), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def faces(split: str) -> tuple[Tensor, Tensor]:
    """The images ``(N, 3, 48, 48)`` of a split and their labels (1 = face).

    ``"calib"``: 64 images, ``"eval"``: the other 136; about half of each are faces.

    Raises:
        ValueError: unknown split.
        ImportError: scikit-image is missing.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    images, labels = _all_faces()
    start, stop = _SPLITS[split]
    return images[start:stop].clone(), labels[start:stop].clone()


def face_batches(split: str, batch_size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """A split as ``(images, labels)`` batches (the labels are for accuracy only)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, labels = faces(split)
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))
