"""The Python API, mirroring the CLI.

>>> import speculant                                                      # doctest: +SKIP
>>> spec = speculant.load(target="smollm2-135m", draft="ngram", gamma=4)  # doctest: +SKIP
>>> out = spec.generate("def fibonacci(n):", max_new_tokens=32, temperature=0)  # doctest: +SKIP
>>> out.text, out.token_ids, out.stats["alpha"], out.stats["tau"]         # doctest: +SKIP
>>> for piece in spec.stream("Hello", max_new_tokens=16): print(piece, end="")  # doctest: +SKIP
>>> spec.generate(messages=[{"role": "user", "content": "Hi"}], system="Be brief.", stop=["\\n\\n"],
...               temperature=0.7, logprobs=3).logprobs[0]                   # doctest: +SKIP

Every request defaults to greedy decoding (temperature 0), as the CLI does: the output is then
reproducible and equal to plain greedy decoding token for token, which is what a first run should
show. Pass `temperature=1` (and top_k / top_p / min_p) to sample; the output's law is then exactly
the target's.

Draft specs (`draft=` takes one spec or a list; each further drafter drafts for the one before):
    none          plain decoding
    ngram         prompt lookup (`ngram:MAX` or `ngram:MAX:MIN` to set the n-gram sizes); last level only
    layers:N      the first N layers of the model it drafts for (lean models), sharing its weights
    int8          the model it drafts for with int8 matrices (lean models): on a CPU about half its
                  time per token, close to its law; drafted in turn by a further --draft
    NAME|PATH     a model (embedded name, HF folder, GGUF file) or a distilled draft folder
    default       the embedded distilled draft of the target if there is one, else ngram
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from speculant.adaptive import AdaptiveGamma
from speculant.distill.draft_model import FeatureDraft
from speculant.drafters.base import Drafter
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.hierarchical import SpeculativeDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import GenerationStats, generate
from speculant.models.base import DTYPES, CausalLM, ContextOverflowError
from speculant.models.loading import LoadedModel, ModelLoadError, check_pairing, load_model
from speculant.models.transformer import LeanModel, int8_weights
from speculant.sampling import SamplingParams
from speculant.stopping import StopStringDecoder

# The KV cache when load() is not given max_seq_len: room for long chats, while a CUDA-graph step,
# which attends over the whole cache, stays fast.
DEFAULT_MAX_SEQ_LEN = 2048


class NoDrafter:
    """`none`: propose nothing, so every step is a plain decoding step."""

    def reset(self) -> None:
        pass

    def propose(self, context, gamma, params, generator):
        raise AssertionError("the engine asks a drafter only for gamma >= 1")


class TokenLogprob(NamedTuple):
    """One emitted token with its log-probability under the target's own distribution (its raw
    logits: temperature 1, before top-k / top-p / min-p, as vLLM and the OpenAI API report them),
    and the `top` most likely tokens at that position as (token_id, token, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Generation:
    text: str  # the output text, cut before a stop string
    token_ids: list[int]  # the output's token ids (up to the one that completed a stop string)
    stats: dict  # GenerationStats.to_dict(); finish_reason "stop" (eos or stop string), "length" or "context"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for (logprobs=N)
    stop: str | None = None  # the stop string that ended the output, if one did


EMBEDDED_DRAFTS = Path(__file__).parent / "embedded"


def embedded_draft_folder(spec: str) -> Path | None:
    """The folder of an embedded distilled draft named `spec` (e.g. `smollm2-135m-draft`), else None."""
    folder = EMBEDDED_DRAFTS / spec
    return folder if "/" not in spec and (folder / "config.json").is_file() else None


def default_draft(target: LoadedModel | str) -> str:
    """The folder of the embedded distilled draft made for the target's model, else `ngram`.

    A LoadedModel is matched by its weights (distilled_for): any copy or format of SmolLM2-135M gets
    the shipped draft. A bare name is matched by name (`smollm2-135m` -> `smollm2-135m-draft`)."""
    for config_path in sorted(EMBEDDED_DRAFTS.glob("*/config.json")):
        folder = config_path.parent
        if (folder.name == f"{target}-draft" if isinstance(target, str)
                else _distilled_for(folder, target) is not None):
            return str(folder)
    return "ngram"


def _distilled_for(folder: Path, target: LoadedModel) -> str | None:
    """The source hash to hand load_draft if the draft in `folder` was distilled from this target's
    model (the same file, or any copy or format of the same weights); None if from another model."""
    from speculant.distill.draft_model import read_draft_config
    from speculant.models.loading import EMBEDDED

    config = read_draft_config(folder)
    if config["target_hash"] == target.source_hash:
        return target.source_hash
    if target.fingerprint is None:
        return None
    # the fingerprint of the model the draft was distilled from: recorded in the draft, or known for
    # an embedded model whose GGUF has that hash
    known = config.get("target_fingerprint") or next(
        (e.fingerprint for e in EMBEDDED.values() if e.sha256 == config["target_hash"]), None)
    return config["target_hash"] if known == target.fingerprint else None


def _resolved_name(spec: str) -> str:
    """How a level's spec is reported: an embedded draft by its name, not its folder."""
    folder = Path(spec)
    return folder.name if folder.parent == EMBEDDED_DRAFTS and embedded_draft_folder(folder.name) else spec


class Speculant:
    """A target, a chain of drafters and a γ policy, ready to generate."""

    def __init__(self, target: LoadedModel, drafts: Sequence[str], gamma: int | str = 4,
                 inner_gamma: int = 4, fused: bool | None = None, candidates: int = 1, lookup: int = 0) -> None:
        self.target = target
        self.tokenizer = target.tokenizer
        self.drafter, self.levels = _build_chain(target, list(drafts), inner_gamma, candidates, lookup)
        self.draft_specs = [spec for spec, _ in self.levels]  # as resolved: `default` says which draft ran
        if gamma == "auto":
            if lookup:
                raise ValueError("--gamma auto does not take --lookup: its model of a step has no lookup branch "
                                 "(use a fixed --gamma; 3 or 4 suit the embedded draft)")
            self.gamma: int | AdaptiveGamma = AdaptiveGamma()  # kept across requests: the pair's prior
        else:
            if not isinstance(gamma, int) or gamma < 1:
                raise ValueError(f"gamma must be an integer >= 1 or 'auto', got {gamma!r}")
            self.gamma = gamma
        if isinstance(self.drafter, NoDrafter):
            self.gamma = 0
        # On CUDA, whole steps run as captured graphs when the pair allows it (speculant.fused).
        if fused is None:
            fused = target.model.device.type == "cuda"
        self.stepper = _fused_stepper(target.model, self.drafter, candidates, lookup) if fused else None
        self.plain_stepper = _fused_stepper(target.model, NoDrafter()) if fused else None

    # ---- requests ----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | None = None, chat: bool = False, *,
               messages: Sequence[dict] | None = None, system: str | None = None) -> list[int]:
        """The token ids of a request: `prompt` as text (through the chat template when `chat` or
        `system` is given) or as token ids, or `messages` ([{"role", "content"}], roles system, user,
        assistant) through the chat template, with `system` put first."""
        if system is not None:
            _check_text(system, "system")
        if messages is not None:
            if prompt is not None:
                raise ValueError("give either a prompt or messages, not both")
            return self.tokenizer.encode_chat(_chat_messages(messages, system))
        if prompt is None:
            raise ValueError("give a prompt (text or token ids) or messages")
        if isinstance(prompt, str):
            _check_text(prompt, "prompt")
            if chat or system is not None:
                return self.tokenizer.encode_chat(_chat_messages([{"role": "user", "content": prompt}], system))
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("the prompt is bytes: pass text as str (bytes.decode('utf-8')) or a list of token ids")
        if system is not None or chat:
            raise ValueError("chat / system apply to a text prompt or to messages, not to token ids")
        try:
            ids = [_token_id(t) for t in prompt]
        except TypeError:
            raise TypeError(f"the prompt must be text (str), a list of token ids or None with messages; got "
                            f"{type(prompt).__name__}") from None
        return ids

    def steps(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
              system: str | None = None, chat: bool = False, max_new_tokens: int = 128, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = 0,
              stop_ids: Sequence[int] | None = None, plain: bool = False, keep_logits: bool = False):
        """The prompt's ids and the engine's steps for one request (the building block of generate /
        stream). `keep_logits`: run the generic (unfused) step, whose Steps carry the target's logits."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        _check_counts(max_new_tokens, seed, None)
        ids = self.encode(prompt, chat, messages=messages, system=system)
        self._check_fits(ids)
        device = self.target.model.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        stops = self.tokenizer.eos_ids if stop_ids is None else [_token_id(t) for t in stop_ids]
        drafter = NoDrafter() if plain else self.drafter
        gamma = 0 if plain else self.gamma
        stepper = None if keep_logits else self.plain_stepper if plain else self.stepper
        return ids, generate(self.target.model, drafter, ids, gamma=gamma, params=params,
                             max_new_tokens=max_new_tokens, stop_ids=stops, generator=generator, stepper=stepper)

    def stream(self, prompt: str | Sequence[int] | None = None, **options) -> Iterator[str]:
        """Yield text pieces as tokens are fixed (options as for `generate`). A piece that could be
        the start of a stop string is held back until the next tokens rule it out."""
        yield from self._pieces(prompt, **options)

    def generate(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
                 system: str | None = None, chat: bool = False, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = 0, stop: str | Sequence[str] | None = None,
                 stop_ids: Sequence[int] | None = None, logprobs: int | None = None, plain: bool = False,
                 on_text: Callable[[str], object] | None = None) -> Generation:
        """Generate a continuation of `prompt`, or the assistant's reply to `messages`.

        prompt          text, or a list of token ids (then no chat template is applied)
        messages        a conversation, [{"role": "system"|"user"|"assistant", "content": str}], rendered
                        with the target's chat template and a generation prompt
        system          a system message, put first (with a text prompt, implies the chat template)
        chat            apply the chat template to a text prompt (as a user message)
        max_new_tokens  at most this many new tokens (default 128); fewer when the KV cache is full
                        (stats["finish_reason"] "context": raise max_seq_len in `load`)
        temperature     0 (default) is greedy; top_k (0 off), top_p (1 off), min_p (0 off) as in
                        speculant.sampling. Sampled output follows the target's law exactly.
        seed            seeds the draws (default 0: reproducible); None for a fresh seed
        stop            stop strings: the output ends before the first one that appears (it is not
                        part of `text`), even inside a block of accepted draft tokens
        stop_ids        token ids that end the output (kept in it); default the tokenizer's eos ids
        logprobs        N >= 0: per emitted token, its log-probability under the target (raw logits)
                        and the N most likely tokens; runs the unfused step on a GPU
        plain           plain decoding of the target (no drafter), for comparison
        on_text         called with each piece of text as soon as it is fixed (for streaming)

        >>> out = spec.generate("def f(x):", max_new_tokens=16, stop=["\\n\\n"])  # doctest: +SKIP
        >>> out.text, out.token_ids, out.stats["tau"], out.stats["finish_reason"]  # doctest: +SKIP
        """
        pieces = self._pieces(prompt, messages=messages, system=system, chat=chat, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              stop=stop, stop_ids=stop_ids, logprobs=logprobs, plain=plain)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as done:
                return done.value
            if on_text is not None and piece:
                on_text(piece)

    def generate_many(self, requests: Sequence[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = 0,
                      stop: str | Sequence[str] | None = None, logprobs: int | None = None,
                      max_batch: int = 8) -> list[Generation]:
        """Many requests, each a dict of `encode`'s arguments ({"prompt": ...} or {"messages": [...]},
        optionally "system" and "chat"), with the same options as `generate`. Where the target is
        lean and the drafter one level (none, ngram, a model, layers:N, a distilled draft), they run
        together by continuous batching (speculant.batching; up to `max_batch` at once), else one after
        the other. Each request's output is what `generate` gives it (same seed, same law; equal
        tokens on the CPU). A bad request raises BadRequest (a ValueError) naming its index."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        stops = _stop_strings(stop)
        _check_counts(max_new_tokens, seed, logprobs)
        prompts = []
        for index, request in enumerate(requests):
            try:
                if not isinstance(request, dict):
                    raise TypeError(f"a request is a dict of encode's arguments, got {type(request).__name__}")
                prompts.append(self.encode(**request))
                self._check_fits(prompts[-1])
            except (ValueError, TypeError) as error:
                raise BadRequest(index, error) from None
        try:
            engine = self.batch_engine(max_batch=max(1, min(max_batch, len(prompts))))
        except ValueError:  # a target through transformers, a hierarchy, candidates or a lookup branch
            engine = None
        if engine is None:
            return [self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, min_p=min_p, seed=seed, stop=stops, logprobs=logprobs)
                    for ids in prompts]
        from speculant.batching import BatchRequest

        eos = tuple(sorted(self.tokenizer.eos_ids))
        index_of, decoders, token_logprobs = {}, {}, {}
        for index, ids in enumerate(prompts):
            request_id = engine.add(BatchRequest(ids, params, max_new_tokens, eos, seed=seed, logprobs=logprobs))
            index_of[request_id] = index
            decoders[request_id] = StopStringDecoder(self.tokenizer, stops)
            token_logprobs[request_id] = []
        results: list[Generation | None] = [None] * len(prompts)
        while engine.num_running:
            for update in engine.step():
                request_id = update.request_id
                decoder = decoders[request_id]
                if results[index_of[request_id]] is not None:  # the cancellation of a request a stop string ended
                    continue
                if update.logprobs is not None:
                    token_logprobs[request_id] += [
                        TokenLogprob(token, self._token_text(token), logprob,
                                     [(t, self._token_text(t), v) for t, v in top])
                        for token, (logprob, top) in zip(update.tokens, update.logprobs)]
                decoder.add(update.tokens)
                if decoder.stopped is not None and update.finished is None:
                    engine.cancel(request_id)
                if decoder.stopped is None and update.finished is None:
                    continue
                decoder.finish()
                stats = self.stats_dict(update.stats)
                if decoder.stopped is not None:
                    stats["finish_reason"], stats["new_tokens"] = "stop", len(decoder.kept_ids)
                kept = decoder.kept_ids
                results[index_of[request_id]] = Generation(
                    decoder.text, kept, stats,
                    token_logprobs[request_id][:len(kept)] if logprobs is not None else None, decoder.stopped)
        return results

    def _check_fits(self, ids: list[int]) -> None:
        capacity = self.target.model.max_seq_len
        if len(ids) >= capacity:
            raise ContextOverflowError(
                f"the prompt's {len(ids)} tokens do not fit the KV cache of {capacity} tokens (at least one "
                f"position must stay free): raise --max-seq-len (max_seq_len=) up to {self.target.name}'s context "
                f"of {self.target.context_length} tokens, or shorten the prompt")

    def _pieces(self, prompt=None, *, stop: str | Sequence[str] | None = None, logprobs: int | None = None,
                **options):
        """Yield text pieces; return the Generation."""
        stops = _stop_strings(stop)
        _check_counts(0, None, logprobs)
        _, steps = self.steps(prompt, keep_logits=logprobs is not None, **options)
        decoder = StopStringDecoder(self.tokenizer, stops)
        token_logprobs: list[TokenLogprob] = []
        stats = None
        for step in steps:
            stats = step.stats
            if logprobs is not None:
                token_logprobs += self._token_logprobs(step.tokens, step.target_logits, logprobs)
            piece = decoder.add(step.tokens)
            if piece:
                yield piece
            if decoder.stopped is not None:
                steps.close()
                break
        piece = decoder.finish()
        if piece:
            yield piece
        if stats is None:  # max_new_tokens == 0
            stats = GenerationStats(gamma=0)
        out = self.stats_dict(stats)
        token_ids = decoder.kept_ids
        if decoder.stopped is not None:
            out["finish_reason"] = "stop"
            out["new_tokens"] = len(token_ids)
        return Generation(decoder.text, token_ids, out,
                          token_logprobs[:len(token_ids)] if logprobs is not None else None, decoder.stopped)

    def _token_logprobs(self, tokens: list[int], logits: torch.Tensor | None, top: int) -> list[TokenLogprob]:
        if logits is None:
            raise AssertionError("logits asked for, but the step kept none")
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [len(tokens), vocab]
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
        best = logprobs.topk(top, dim=-1) if top else None
        out = []
        for i, token in enumerate(tokens):
            alternatives = [] if best is None else [
                (int(t), self._token_text(int(t)), float(v))
                for t, v in zip(best.indices[i].tolist(), best.values[i].tolist())]
            out.append(TokenLogprob(int(token), self._token_text(int(token)), float(chosen[i]), alternatives))
        return out

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def stats_dict(self, stats: GenerationStats) -> dict:
        out = stats.to_dict()
        out["levels"] = [
            {"draft": spec, **_level_stats(drafter)} for spec, drafter in self.levels
            if isinstance(drafter, SpeculativeDrafter)
        ]
        return out

    def batch_engine(self, max_batch: int = 64, graphs: bool = False):
        """A speculant.batching.BatchEngine over this target, draft and γ (`auto`: γ from measured
        step cost at each batch size), for up to `max_batch` requests at once; `graphs`: the target's
        forward as CUDA graphs per (batch bucket, T)."""
        from speculant.batching import BatchEngine, LoadGamma

        rows = getattr(self.drafter, "rows", None)
        if rows is None and not isinstance(self.drafter, NoDrafter):
            raise ValueError("batched decoding drafts with none, ngram, a model, layers:N or a distilled draft "
                             "(one level, one candidate, no lookup branch)")
        gamma, policy = self.gamma, None
        if isinstance(self.gamma, AdaptiveGamma):
            if getattr(self, "batch_policy", None) is None:
                self.batch_policy = LoadGamma()  # kept across engines: the step costs measured for this pair
            gamma, policy = "auto", self.batch_policy
        return BatchEngine(self.target.model, rows, gamma=gamma, max_batch=max_batch, policy=policy, graphs=graphs)


class BadRequest(ValueError):
    """One of generate_many's requests cannot run; `index` says which."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"request {index}: {error}")
        self.index = index
        self.reason = str(error)


def _check_counts(max_new_tokens, seed, logprobs) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= 20):
        raise ValueError(f"logprobs must be an integer in [0, 20] (alternatives per token), got {logprobs!r}")


def _check_text(text, what: str) -> None:
    """Text must be a str of valid Unicode: an argument decoded with errors='surrogateescape' (a
    command line holding bytes that are not UTF-8) carries lone surrogates the tokenizer cannot take."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start:error.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8: byte(s) {bad!r} at character {error.start}; "
                         "pass UTF-8 text") from None


def _token_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()):
        raise TypeError(f"token ids must be integers, got {value!r}")
    return int(value)


def _chat_messages(messages: Sequence[dict], system: str | None) -> list[dict]:
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
        _check_text(message["content"], f'messages[{i}]["content"]')
        out.append({"role": role, "content": message["content"]})
    if not any(m["role"] != "system" for m in out):
        raise ValueError("messages hold no user or assistant message")
    return out


def _stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, (bytes, bytearray)) or not isinstance(stops, Sequence):
        raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stops:
        _check_text(s, "a stop string")
        if not s:
            raise ValueError("a stop string must not be empty")
    return list(stops)


def _fused_stepper(target: CausalLM, drafter: Drafter, candidates: int = 1, lookup: int = 0):
    """A FusedStepper for a lean target and a one-level drafter it can fuse; else None."""
    from speculant.fused import FusedStepper

    if not isinstance(target, LeanModel):
        return None
    if isinstance(drafter, NoDrafter):
        return FusedStepper(target, None)
    if isinstance(drafter, NgramDrafter):
        return FusedStepper(target, None, ngram=drafter)
    if isinstance(drafter, LookupDrafter):
        ngram, drafter = drafter.ngram, drafter.inner
    else:
        ngram, lookup = None, 0
    if isinstance(drafter, (ModelDrafter, FeatureDrafter)) and isinstance(drafter.model, LeanModel):
        return FusedStepper(target, drafter.model, candidates=candidates, lookup=lookup, ngram=ngram)
    return None


def _level_stats(drafter: SpeculativeDrafter) -> dict:
    s = drafter.stats
    return {"alpha": s.alpha, "tau": s.tau, "target_calls": s.target_calls, "drafted": s.drafted,
            "accepted": s.accepted}


def _build_chain(target: LoadedModel, specs: Sequence[str], inner_gamma: int,
                 candidates: int = 1, lookup: int = 0) -> tuple[Drafter, list]:
    """Turn draft specs into one drafter. specs[0] drafts for the target, specs[i] for specs[i-1].
    `candidates` k > 1: the drafter proposes k candidates per position (one draft model only).
    `lookup` G > 0: a prompt-lookup branch of up to G tokens beside it (drafters.lookup)."""
    if not specs:
        specs = ["none"]
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    if len(specs) > 1 and any(s == "none" for s in specs):
        raise ValueError("'none' cannot be combined with other drafters")
    # Resolve each level's model (None for n-gram / none), top-down: layers:N needs the level above.
    above: LoadedModel = target
    models: list[tuple[str, CausalLM | None]] = []
    for depth, spec in enumerate(specs):
        if spec == "default":
            spec = _resolved_name(default_draft(target))
        model = _level_model(spec, above, target)
        if model is None and depth < len(specs) - 1:
            raise ValueError(f"draft '{spec}' has no model to be drafted for; it can only be the last --draft")
        models.append((spec, model))
        if model is not None and isinstance(model, LoadedModel):
            above = model
    # Build bottom-up: the last level is a plain drafter, each level above wraps the one below.
    for depth, (spec, model) in enumerate(models):
        if isinstance(model, FeatureDraft) and (depth < len(models) - 1
                                                or not feature_draft_may_follow([s for s, _ in models[:depth]])):
            raise ValueError(f"draft '{spec}' reads the target's features: it drafts for the target or for "
                             "--draft int8 directly, as the last --draft")
    if candidates > 1 and (len(models) > 1 or models[0][1] is None or not isinstance(target.model, LeanModel)):
        raise ValueError("several candidates per position need one draft model as the only --draft (a distilled "
                         "draft, a model or layers:N) and a lean target; n-gram, none and chains propose one")
    if not isinstance(lookup, int) or isinstance(lookup, bool) or lookup < 0:
        raise ValueError(f"lookup must be an integer >= 0, got {lookup!r}")
    if lookup and (len(models) > 1 or models[0][1] is None or not isinstance(target.model, LeanModel)):
        raise ValueError("a lookup branch goes beside one draft model as the only --draft (a distilled draft, a "
                         "model or layers:N) and a lean target; for prompt lookup alone use --draft ngram")
    if candidates > target.model.vocab_size:
        raise ValueError(f"candidates must be at most the vocabulary size ({target.model.vocab_size}), got {candidates}")
    spec, model = models[-1]
    above = _causal_lm(models[-2][1]) if len(models) > 1 else target.model
    drafter = _leaf_drafter(spec, model, above, candidates)
    if lookup:
        drafter = LookupDrafter(drafter, NgramDrafter(), lookup)
    levels = [(spec, drafter)]
    for spec, model in reversed(models[:-1]):
        drafter = SpeculativeDrafter(_causal_lm(model), drafter, inner_gamma)
        levels.insert(0, (spec, drafter))
    return drafter, levels


def feature_draft_may_follow(specs_above: Sequence[str]) -> bool:
    """May a feature draft be the last level under these draft specs? It reads the hidden states of
    the model it drafts for: the target's, or those of the target's int8 copy, which are the
    target's up to rounding."""
    return list(specs_above) in ([], ["int8"])


def _causal_lm(model) -> CausalLM:
    return model.model if isinstance(model, LoadedModel) else model


def _leaf_drafter(spec: str, model, above: CausalLM, candidates: int = 1) -> Drafter:
    """The last level's drafter; `above` is the model it drafts for."""
    if spec == "none":
        return NoDrafter()
    if model is None:
        return _ngram(spec)
    if isinstance(model, FeatureDraft):
        return FeatureDrafter(model, above, candidates)
    return ModelDrafter(_causal_lm(model), candidates)


def _ngram(spec: str) -> NgramDrafter:
    parts = spec.split(":")
    try:
        sizes = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"bad n-gram spec {spec!r}: use ngram, ngram:MAX or ngram:MAX:MIN") from None
    if len(sizes) > 2:
        raise ValueError(f"bad n-gram spec {spec!r}: use ngram, ngram:MAX or ngram:MAX:MIN")
    max_ngram = sizes[0] if sizes else 3
    return NgramDrafter(max_ngram=max_ngram, min_ngram=sizes[1] if len(sizes) > 1 else 1)


def _level_model(spec: str, above: LoadedModel, target: LoadedModel):
    """The model behind a draft spec: None for none/ngram, a CausalLM or LoadedModel otherwise."""
    if spec == "none" or spec == "ngram" or spec.startswith("ngram:"):
        return None
    if spec.startswith("layers:"):
        try:
            num_layers = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad spec {spec!r}: use layers:N with N an integer") from None
        if above.weights is None:
            raise ValueError(f"layers:N needs a lean model to draft for; {above.name} runs through transformers")
        total = above.weights.cfg.num_layers
        if not 1 <= num_layers < total:
            raise ValueError(f"layers:{num_layers} must be between 1 and {total - 1} for {above.name} ({total} layers)")
        return LeanModel(above.weights, max_seq_len=above.model.max_seq_len, num_layers=num_layers)
    if spec == "int8":
        if above.weights is None:
            raise ValueError(f"int8 needs a lean model to draft for; {above.name} runs through transformers")
        return LeanModel(int8_weights(above.weights), max_seq_len=above.model.max_seq_len)
    from speculant.distill.draft_model import is_draft_folder, load_draft

    folder = embedded_draft_folder(spec) or spec
    if is_draft_folder(folder):
        from safetensors import SafetensorError

        try:
            source_hash = _distilled_for(Path(folder), target) if target.weights is not None else None
            if source_hash is not None and source_hash != target.source_hash:  # the same model, another file
                return load_draft(folder, (target.weights, source_hash), max_seq_len=target.model.max_seq_len)
            return load_draft(folder, target)
        except (SafetensorError, KeyError, TypeError) as error:  # weights cut short, config fields missing
            raise ModelLoadError(f"{folder}: corrupt draft folder ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else 'incomplete'})") from None
    config_path = Path(folder) / "config.json"
    if config_path.is_file() and not _json_readable(config_path):
        raise ModelLoadError(f"{config_path}: corrupt (not readable JSON); a draft or model folder needs it whole")
    dtype = target.weights.embed_tokens.weight.dtype if target.weights is not None else torch.float32
    draft = load_model(spec, device=target.model.device, dtype=dtype, max_seq_len=target.model.max_seq_len)
    check_pairing(target, draft)
    return draft


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and a CUDA device only where torch sees one."""
    if not isinstance(device, str) or not (device in ("cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def _json_readable(path: Path) -> bool:
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def load(target: str = "smollm2-135m", draft: str | Sequence[str] = "default", *, gamma: int | str = 4,
         device: str = "cpu", dtype: str = "float32", max_seq_len: int | None = None,
         inner_gamma: int = 4, fused: bool | None = None, candidates: int = 1, lookup: int = 0) -> Speculant:
    """Load a target and its drafter chain. See the module docstring for draft specs.

    device: cpu, cuda or cuda:N. max_seq_len: the KV cache's capacity in tokens (prompt + output),
    at most the target's context; None: 2048, or the target's context where that is shorter."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_device(device)
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
                                    or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2 or None, got {max_seq_len!r}")
    if not isinstance(target, (str, Path)):
        raise TypeError(f"target must be a name or a path, got {type(target).__name__}")
    drafts = [draft] if isinstance(draft, (str, Path)) else draft
    if not isinstance(drafts, Sequence) or not all(isinstance(d, (str, Path)) for d in drafts):
        raise TypeError(f"draft must be a draft spec or a list of them (see speculant.api), got {draft!r:.80}")
    drafts = [str(d) for d in drafts]
    try:
        loaded = load_model(str(target), device=device, dtype=DTYPES[dtype],
                            max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN)
    except ModelLoadError:
        if max_seq_len is not None:
            raise
        # a target whose context is shorter than the default takes all of it (any other error recurs)
        loaded = load_model(str(target), device=device, dtype=DTYPES[dtype], max_seq_len=None)
    return Speculant(loaded, drafts, gamma=gamma, inner_gamma=inner_gamma, fused=fused, candidates=candidates,
                     lookup=lookup)
