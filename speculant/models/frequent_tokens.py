"""The most frequent tokens of a vocabulary, for a draft model that scores only those
(`--draft NAME:vocab=N`, LeanModel.keep_vocab): "frequency-ranked" drafting (FR-Spec, Zhao et al.
2025). A large vocabulary makes the output head a large share of a small draft's work per token
(Qwen2.5-Coder-0.5B: 151,936 × 896 of its 494 M parameters, a quarter); scoring the N most frequent
tokens instead cuts that share by V ÷ N, and a token outside them is one the draft never proposes.
The rule stays exact: the draft's law is what it draws from, with probability 0 elsewhere.

Frequency is counted once per tokenizer on a corpus that ships with Python, so that nothing is
downloaded: the English of pydoc's topics (`pydoc_data.topics`) and the code of the standard
library's top-level modules. Neither is a benchmark's prompt set (HumanEval, the chat and held-out
prompts). Every special token (end of turn, chat markers) is always kept. The ranking is kept beside
the model's converted weights (`frequent_tokens.json`), computed again if that cannot be read.
"""

from __future__ import annotations

import json
import sysconfig
from collections import Counter
from pathlib import Path

import torch

from speculant.models.cache import write_json_atomic
from speculant.tokenizer import Tokenizer

CORPUS_VERSION = 1  # bump when the corpus or the counting changes: a kept ranking is then counted again
RANKING_FILE = "frequent_tokens.json"


def corpus_texts() -> list[str]:
    """pydoc's topics (English) and the standard library's top-level modules (code), in a fixed order."""
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py"))]
    return texts


def ranked_tokens(tokenizer: Tokenizer, folder: Path | None = None) -> list[int]:
    """Every token id, most frequent in the corpus first (ties and unseen ids by id). Read from
    `folder`/frequent_tokens.json when it was counted for this tokenizer, else counted and kept there."""
    path = Path(folder) / RANKING_FILE if folder is not None else None
    key = {"corpus": CORPUS_VERSION, "vocab": tokenizer.vocab_fingerprint}
    if path is not None and path.is_file():
        try:
            kept = json.loads(path.read_text())
            if kept.get("key") == key and len(kept["ranked"]) == tokenizer.vocab_size:
                return [int(i) for i in kept["ranked"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged: counted again below
    counts = Counter()
    for encoding in tokenizer.backend.encode_batch(corpus_texts(), add_special_tokens=False):
        counts.update(encoding.ids)
    ranked = sorted(range(tokenizer.vocab_size), key=lambda i: (-counts[i], i))
    if path is not None:
        try:
            write_json_atomic(path, {"key": key, "ranked": ranked})
        except OSError:
            pass  # a read-only folder: counted again next time
    return ranked


def frequent_tokens(tokenizer: Tokenizer, count: int, folder: Path | None = None) -> torch.Tensor:
    """The ids [M] (sorted) of the `count` most frequent tokens and every special token (M >= count)."""
    vocab = tokenizer.vocab_size
    if not 1 <= count < vocab:
        raise ValueError(f"vocab=N keeps 1 to {vocab - 1} of the vocabulary's {vocab} tokens, got {count}")
    special = set(tokenizer.backend.get_added_tokens_decoder()) | tokenizer.eos_ids
    if tokenizer.bos_id is not None:
        special.add(tokenizer.bos_id)
    return torch.tensor(sorted(set(ranked_tokens(tokenizer, folder)[:count]) | special), dtype=torch.int64)
