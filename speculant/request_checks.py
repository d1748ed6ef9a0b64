"""Checks of a request's arguments for speculant.api: counts, token ids, chat messages and stop
strings, each raising a one-line ValueError or TypeError that names the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from speculant.tokenizer import check_text


def check_counts(max_new_tokens, seed, logprobs) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= 20):
        raise ValueError(f"logprobs must be an integer in [0, 20] (alternatives per token), got {logprobs!r}")


def token_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()):
        raise TypeError(f"token ids must be integers, got {value!r}")
    return int(value)


def chat_messages(messages: Sequence[dict], system: str | None) -> list[dict]:
    """Checked copies of chat messages, `system` put first."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError('messages must be a list of {"role": ..., "content": ...} dicts')
    out = [] if system is None else [{"role": "system", "content": system}]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or "content" not in message:
            raise ValueError(f'messages[{i}] must be a dict with "role" and "content", got {message!r:.80}')
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f'messages[{i}]["role"] must be "system", "user" or "assistant", got {role!r:.40}')
        check_text(message["content"], f'messages[{i}]["content"]')
        out.append({"role": role, "content": message["content"]})
    if not any(m["role"] != "system" for m in out):
        raise ValueError("messages hold no user or assistant message")
    return out


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, (bytes, bytearray)) or not isinstance(stops, Sequence):
        raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stops:
        check_text(s, "a stop string")
        if not s:
            raise ValueError("a stop string must not be empty")
    return list(stops)
