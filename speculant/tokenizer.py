"""Text <-> token ids, around a `tokenizers.Tokenizer` read from a model folder's tokenizer.json.

    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode("def fibonacci(n):")          # adds BOS where the model wants one
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(prompt, add_special_tokens=False)   # the template already wrote BOS
    stream = tokenizer.stream_decoder()
    for step in generate(...):
        print(stream.add(step.tokens), end="")
    print(stream.flush())

The chat template is rendered with jinja2 the way transformers renders it (a sandboxed
environment, trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that
keeps non-ASCII), without importing transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import tokenizers

# Tokens that end a turn or a document in common chat vocabularies; llama.cpp stops on the same.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<eos>", "</s>",
)


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_ids: Iterable[int] = (),
        bos_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend
        self.eos_ids: set[int] = {int(i) for i in eos_ids}
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... as strings, for templates
        self.name = name

    @classmethod
    def from_folder(cls, folder: str | Path, name: str = "") -> Tokenizer:
        """Read tokenizer.json, and tokenizer_config.json / chat_template.jinja / generation_config.json /
        config.json when present (for special tokens, the chat template and the stop ids)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(path))
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = tok_cfg.get(key)
            if isinstance(value, dict):  # an AddedToken written out in full
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value

        chat_template = tok_cfg.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template}
            chat_template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if chat_template is None and jinja_file.exists():
            chat_template = jinja_file.read_text(encoding="utf-8")

        def ids_of(value) -> list[int]:
            if value is None:
                return []
            return [int(v) for v in (value if isinstance(value, list) else [value])]

        model_cfg = _read_json(folder / "config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        eos_ids = set(ids_of(gen_cfg.get("eos_token_id"))) | set(ids_of(model_cfg.get("eos_token_id")))
        if "eos_token" in special and backend.token_to_id(special["eos_token"]) is not None:
            eos_ids.add(backend.token_to_id(special["eos_token"]))
        bos_id = None
        if "bos_token" in special:
            bos_id = backend.token_to_id(special["bos_token"])
        if bos_id is None:
            bos_ids = ids_of(gen_cfg.get("bos_token_id")) or ids_of(model_cfg.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None
        if bos_id is not None and "bos_token" not in special:
            special["bos_token"] = backend.id_to_token(bos_id) or ""
        if eos_ids and "eos_token" not in special:
            special["eos_token"] = backend.id_to_token(min(eos_ids)) or ""
        return cls(backend, eos_ids=eos_ids, bos_id=bos_id, chat_template=chat_template,
                   special_tokens=special, name=name or folder.name)

    # ---- the basics -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds what the tokenizer's post-processor adds (BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @cached_property
    def vocab_fingerprint(self) -> str:
        """sha256 of the token -> id map (added tokens included): equal iff the vocabularies are."""
        return vocab_fingerprint(self.backend)

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template.

        The text usually starts with the BOS token already: encode it with add_special_tokens=False
        (or use `encode_chat`)."""
        if not self.chat_template:
            raise ValueError(
                f"the tokenizer of {self.name or 'this model'} has no chat template (a base model?); "
                "pass the prompt as plain text instead"
            )
        template = _compile_template(self.chat_template)
        context = dict(self.special_tokens)
        context.update(kwargs)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat, as transformers' apply_chat_template(tokenize=True) gives them."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_ids={sorted(self.eos_ids)})"


def vocab_fingerprint(backend: tokenizers.Tokenizer) -> str:
    vocab = backend.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class StreamDecoder:
    """Incremental detokenisation: feed ids as they come, get the new text.

    The pieces concatenate to exactly `tokenizer.decode(all ids)`: each `add` decodes everything
    seen so far and returns what was added since, holding back a trailing U+FFFD (the first
    bytes of a character whose other bytes have not come yet) until the character completes or
    `flush` is called. Decoding the whole sequence again each time keeps SentencePiece spaces and
    byte fallback right, and costs microseconds per hundred tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""  # the text returned so far

    def add(self, ids: Iterable[int]) -> str:
        """Take the next token ids; return the text they complete (possibly "")."""
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        end = len(text)
        while end > len(self.emitted) and text[end - 1] == "\ufffd":
            end -= 1
        return self._emit(text[:end])

    def flush(self) -> str:
        """Everything not returned yet (an incomplete character comes out as U+FFFD)."""
        return self._emit(self.tokenizer.decode(self.ids, self.skip_special_tokens))

    def _emit(self, text: str) -> str:
        # A decoder that rewrote text it had already produced (not seen with byte-level BPE or
        # SentencePiece) cannot be undone on a terminal: emit only what lies past the old length.
        piece = text[len(self.emitted):]
        self.emitted += piece
        return piece


# ---- chat template rendering (as transformers does it) ----------------------------------------

_TEMPLATE_CACHE: dict[str, object] = {}


def _compile_template(source: str):
    if source in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[source]
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(source)
    _TEMPLATE_CACHE[source] = template
    return template


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_text(text, what: str) -> str:
    """Text must be a str of valid Unicode: an argument decoded with errors='surrogateescape' (a
    command line holding bytes that are not UTF-8) carries lone surrogates the tokenizer refuses.
    Returns `text`; raises TypeError or ValueError naming `what` and the offending bytes."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start:error.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8: byte(s) {bad.hex(' ')} at character {error.start}; "
                         "pass UTF-8 text") from None
    return text
