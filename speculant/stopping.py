"""Stop strings over a token stream: which text is safe to show now, and where the output ends.

A speculative step fixes several tokens at once, so a stop string can start in one step's tokens
and end in the next step's, or lie inside one step's accepted tokens with more tokens after it.
`StopStringDecoder` turns the tokens each step fixed into the text that may be shown now:

    decoder = StopStringDecoder(tokenizer, stop=["\\n\\n", "END"])
    for update in steps:                      # each update: the token ids one step fixed
        print(decoder.add(update.tokens), end="")
        if decoder.stopped:                   # a stop string ended the output: stop generating
            break
    print(decoder.finish(), end="")           # at the end of generation (length, eos, stop)
    decoder.text                              # everything shown, the stop string excluded
    decoder.kept_ids                          # the ids the output consists of (see below)

The contract, for any tokenizer whose decode of a prefix is a prefix of the decode (byte-level
BPE, SentencePiece with byte fallback):

- the pieces returned by `add` and `finish` concatenate to `decode(all ids)` cut before the
  earliest occurrence (by start position; the shortest stop where several start at the same
  place: it completes first) of any stop string, or to all of it when none occurs (`reference_cut` is this
  rule in one line, the oracle of the tests);
- `add` holds back a tail that could still be the start of a stop string, and an incomplete
  UTF-8 character (a trailing U+FFFD, through `StreamDecoder`); held text comes out as soon as
  the next tokens rule the stop out, or at `finish`;
- once `stopped` is set the output is over: `add` ignores further ids and returns "";
  `kept_ids` are the ids up to and including the one that completed the stop string (the tokens
  after it are dropped, as vLLM and the OpenAI API count them), all ids otherwise.

Stop strings match the decoded text (special tokens skipped unless `skip_special_tokens=False`);
stop TOKENS (eos) are the engine's job. OpenAI's semantics: the stop string itself is not in the
output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from speculant.tokenizer import Tokenizer


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest (position, stop string) in text[start:], or None; the shortest wins a tie.

    >>> find_stop("a, b. c", [".", ", b"])
    (1, ', b')
    >>> find_stop("abcd", ["abcd", "ab"])
    (0, 'ab')
    >>> find_stop("abc", ["x"]) is None
    True
    """
    best: tuple[int, str] | None = None
    for s in stop:
        at = text.find(s, start)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) < len(best[1]))):
            best = (at, s)
    return best


def partial_stop_start(text: str, stop: Sequence[str]) -> int:
    """Where the longest tail of `text` that is a proper prefix of a stop string begins (len(text) if none).

    >>> partial_stop_start("hello wor", ["world"])
    6
    >>> partial_stop_start("hello", ["world"])
    5
    """
    earliest = len(text)
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), 0, -1):  # longest first: it starts earliest
            if text.endswith(s[:length]):
                earliest = min(earliest, len(text) - length)
                break
    return earliest


def reference_cut(text: str, stop: Sequence[str]) -> str:
    """The whole output's text: `text` cut before the earliest stop string (the tests' oracle)."""
    found = find_stop(text, stop)
    return text if found is None else text[: found[0]]


class StopStringDecoder:
    """Incremental detokenisation with stop strings (see the module docstring for the contract)."""

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        if any(not s for s in self.stop):
            raise ValueError("a stop string must not be empty")
        self.skip_special_tokens = skip_special_tokens
        self._stream = tokenizer.stream_decoder(skip_special_tokens)
        self.ids: list[int] = []  # every id fed in before the output stopped
        self.text = ""  # the text returned so far
        self.stopped: str | None = None  # the stop string that ended the output
        self.kept_ids: list[int] = []  # valid once finished or stopped

    def add(self, ids: Iterable[int]) -> str:
        """Take the ids one step fixed; return the text that is safe to show now (possibly "")."""
        if self.stopped is not None:
            return ""
        ids = [int(i) for i in ids]
        self.ids.extend(ids)
        self._stream.add(ids)
        return self._advance(self._stream.emitted, final=False)

    def finish(self) -> str:
        """The output is over (length, eos, cancel, or a stop): return what was still held back."""
        if self.stopped is not None:
            return ""
        self._stream.flush()
        piece = self._advance(self._stream.emitted, final=True)
        if self.stopped is None:
            self.kept_ids = list(self.ids)
        return piece

    def _advance(self, stable: str, final: bool) -> str:
        # `stable`: the decoded text without a trailing incomplete character; self.text: its shown prefix.
        # Shown text never holds the start of a stop string that could still complete, so every match
        # starts at or after len(self.text); one that starts at or before `hold` cannot be preceded by
        # a later-completing match (a stop starting before `hold` would be a partial match there).
        found = find_stop(stable, self.stop, len(self.text)) if self.stop else None
        hold = len(stable) if final or not self.stop else partial_stop_start(stable, self.stop)
        if found is not None and found[0] <= hold:
            # No stop string can still start before this one: the output ends here.
            at, s = found
            self.stopped = s
            self.kept_ids = self.ids[: self._tokens_to_complete(stable[: at + len(s)])]
            return self._show(stable[:at])
        end = hold if found is None else min(hold, found[0])
        return self._show(stable[:end])

    def _show(self, upto: str) -> str:
        piece = upto[len(self.text):]
        self.text = upto
        return piece

    def _tokens_to_complete(self, text: str) -> int:
        """The fewest leading ids whose decode starts with `text` (binary search: decode is prefix-stable)."""
        low, high = 0, len(self.ids)  # decode(ids[:high]) starts with text; decode(ids[:low]) may not
        while low < high:
            mid = (low + high) // 2
            if self.tokenizer.decode(self.ids[:mid], self.skip_special_tokens).startswith(text):
                high = mid
            else:
                low = mid + 1
        return high
