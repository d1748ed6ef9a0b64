"""Prompts from Python's own documentation topics (`pydoc_data.topics`, shipped with CPython, so the
same offline on every machine). The benchmarks' chat task (speculant.bench.tasks), the
distillation's chat data (speculant.distill.data) and benchmarks/gpu_speed.py build their topic
prompts here, each with its own templates.

>>> topic_prompts(["Explain {topic}."], subjects=["the `with` statement", "lambdas"])
['Explain the `with` statement.', 'Explain lambdas.']
>>> topic_prompts(["A {topic}", "B {topic}"], count=3, subjects=["x", "y"], seed=0)
['B x', 'A x', 'A y']
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def doc_topics() -> dict[str, str]:
    """{topic key: documentation text}; ImportError on a Python built without pydoc_data."""
    from pydoc_data.topics import topics

    return topics


def topic_keys() -> list[str]:
    """The topic keys, sorted: 'assert', 'assignment', ..., 'with'."""
    return sorted(doc_topics())


def topic_titles() -> list[str]:
    """The distinct titles (each text's first line) in key order: 'The "assert" statement', ..."""
    topics = doc_topics()
    titles = []
    for key in sorted(topics):
        title = topics[key].strip().split("\n", 1)[0].strip()
        if title and title not in titles:
            titles.append(title)
    return titles


def title_phrase(title: str) -> str:
    """'The "with" statement' -> 'the `with` statement'; 'Lambdas' -> 'lambdas'."""
    parts = title.split('"')
    text = "".join(f"`{p}`" if i % 2 else p for i, p in enumerate(parts))
    words = text.split(" ", 1)
    if words[0] and not words[0].isupper() and not words[0].startswith("`"):
        words[0] = words[0].lower()
    return " ".join(words)


def spread(items: Sequence, count: int) -> list:
    """`count` items spread evenly over a list (deterministic, covers the whole range)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def topic_prompts(templates: Sequence[str], count: int | None = None, *, subjects: Sequence[str] | None = None,
                  seed: int | None = None) -> list[str]:
    """Prompts from `templates` (each with one `{topic}` field) over `subjects` (default: the topic
    titles, phrased for a sentence).

    seed None: subject i with template i % len(templates), in order (then `count` of them spread
    evenly). seed given: every (template, subject) pair, shuffled with `seed`, repeated up to `count`.
    """
    subjects = [title_phrase(t) for t in topic_titles()] if subjects is None else list(subjects)
    if seed is None:
        prompts = [templates[i % len(templates)].format(topic=s) for i, s in enumerate(subjects)]
        return prompts if count is None else spread(prompts, count)
    pairs = [(template, subject) for template in templates for subject in subjects]
    random.Random(seed).shuffle(pairs)
    count = len(pairs) if count is None else count
    return [pairs[i % len(pairs)][0].format(topic=pairs[i % len(pairs)][1]) for i in range(count)]
