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
show (in float32; in bfloat16 on a GPU near-ties may round differently between the two unless
`bit_exact=True`, which makes every position's logits a function of its context only: see
speculant.models.exact_attention). Pass `temperature=1` (and top_k / top_p / min_p) to sample; the output's law is then exactly
the target's.

Draft specs (`draft=` takes one spec or a list; each further drafter drafts for the one before):
    none          plain decoding
    ngram         prompt lookup (`ngram:MAX` or `ngram:MAX:MIN` to set the n-gram sizes); last level only
    layers:N      the first N layers of the model it drafts for (lean models), sharing its weights
    int8          the model it drafts for with int8 matrices (lean models): on a CPU about half its
                  time per token, close to its law; drafted in turn by a further --draft
    NAME|PATH     a model (embedded name, HF folder, GGUF file) or a distilled draft folder
    NAME:int8     that model with int8 matrices (lean models): on a CPU about half its time per token
    SPEC:vocab=N  a model draft that scores only the N most frequent tokens (models.frequent_tokens)
    default       the embedded distilled draft of the target if there is one, else ngram

Long because the one public entry point (load, Speculant: generate, stream, generate_many, the
batch engine, the γ policies' step costs) checks every option once for the CLI, the server and Python.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from speculant.adaptive import (
    BATCH_MAX_GAMMA,
    MAX_GAMMA,
    AdaptiveGamma,
    BatchStepCosts,
    StepCosts,
    nominal_batch_costs,
    nominal_costs,
)
from speculant.analysis import GenerationStats
from speculant.calibrate import (
    batch_step_costs,
    measure_batch_costs,
    measure_costs,
    setup_key,
    step_costs,
    timing_prompt,
)
from speculant.chain import backend_of, build_chain, chain_rows, embedded_draft_folder
from speculant.drafters.base import NoDrafter
from speculant.drafters.hierarchical import SpeculativeDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.exact_target import ExactTarget
from speculant.fused import FusedStepper, GraphedModel, GraphedTail, check_compile, fused_stepper
from speculant.models.base import DTYPES, ContextOverflowError
from speculant.models.cache import ModelLoadError
from speculant.models.exact_attention import check_exact_width
from speculant.models.registry import LoadedModel, load_model
from speculant.models.transformer import LeanModel
from speculant.plan import DraftPlan
from speculant.request_checks import chat_messages, check_counts, stop_strings, token_id
from speculant.sampling import SamplingParams
from speculant.step import GenericStepper, Stepper
from speculant.stopping import StopStringDecoder
from speculant.tokenizer import check_text

# The KV cache when load() is not given max_seq_len: room for long chats, while a CUDA-graph step,
# which attends over the whole cache, stays fast.
DEFAULT_MAX_SEQ_LEN = 2048


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


class Speculant:
    """A target, a chain of drafters and a γ policy, ready to generate."""

    def __init__(self, target: LoadedModel, drafts: Sequence[str], gamma: int | str = 4,
                 inner_gamma: int = 4, fused: bool | None = None, candidates: int = 1, lookup: int = 0,
                 bit_exact: bool | None = None, kernels: str = "torch", compile: bool | str | None = None) -> None:
        """`compile`: how the fused step's forwards compile (speculant.fused.check_compile: False, True
        or "layers"); None: the fused step's default (whole forwards). `bit_exact` None: on where it
        costs little, i.e. on the Triton kernels where the step's tree fits (default_bit_exact)."""
        self.target = target
        self.tokenizer = target.tokenizer
        self.plan = DraftPlan(tuple(drafts), gamma, candidates, lookup)  # checks the options
        self.drafter, self.levels = build_chain(target, self.plan, inner_gamma)
        self.draft_specs = [spec for spec, _ in self.levels]  # as resolved: `default` says which draft ran
        self.inner_gamma = inner_gamma
        self.gamma: int | str = 0 if isinstance(self.drafter, NoDrafter) else gamma
        # --gamma auto: greedy (False) or sampled (True) -> this machine's step costs (gamma_policy), and
        # AdaptiveGamma's own settings for experiments (benchmarks/gpu_speed.py: half_life, max_gamma)
        self.step_costs: dict[bool, StepCosts] = {}
        self.auto_options: dict = {}
        # batched --gamma auto: (max_batch, graphs) -> this machine's batched step costs (batch_step_costs)
        self.batch_costs: dict[tuple[int, bool, bool], BatchStepCosts] = {}
        # On CUDA, whole steps run as captured graphs when the pair allows it (speculant.fused).
        if fused is None:
            fused = target.model.device.type == "cuda" or bool(bit_exact) or kernels == "triton"
        if bit_exact is None:
            bit_exact = default_bit_exact(fused, kernels, MAX_GAMMA if self.gamma == "auto" else self.gamma,
                                          candidates, lookup)
        self.bit_exact, self.kernels = bit_exact, kernels
        if bit_exact:
            _check_bit_exact(fused, MAX_GAMMA if self.gamma == "auto" else self.gamma, candidates, lookup)
        if kernels not in ("torch", "triton") or (kernels == "triton" and not fused):
            raise ValueError(f"kernels is 'torch' or 'triton' (the fused step's: not with fused=False), "
                             f"got {kernels!r}")
        # bit-exact plain and speculative decoding share the fused step's fixed-width forwards, and the triton
        # kernels run in the fused step: both compiled on CUDA only
        special = bit_exact or kernels == "triton"
        options = {"bit_exact": bit_exact, "kernels": kernels, "compile": target.model.device.type == "cuda"} \
            if special else {}
        if compile is not None:
            options["compile"] = check_compile(compile)
        self.stepper: Stepper | None = fused_stepper(target.model, self.drafter, **options) if fused else None
        self.plain_stepper = fused_stepper(target.model, NoDrafter(), **options) if fused else None
        # bit-exact mode's target for the generic step (a hierarchy, a draft through transformers, logprobs):
        # the plain stepper's own prefill and exact forward, so its logits are plain decoding's bits
        self.exact_target = None
        if bit_exact:
            if self.plain_stepper is None:
                raise ValueError("bit-exact decoding needs a lean (torch) target; a target through transformers or "
                                 "llama.cpp cannot run it")
            self.exact_target = ExactTarget(self.plain_stepper)
            if self.stepper is None:  # the generic step (a hierarchy): each verification and its tail graphs on CUDA
                self.stepper = GenericStepper(ExactTarget(self.plain_stepper, graphs=True), self.drafter, GraphedTail())
        elif self.stepper is None and fused and kernels == "torch" and isinstance(target.model, LeanModel) \
                and target.model.device.type == "cuda":
            # a hierarchy: the generic step, its target's chain verifications and their tails replayed as CUDA graphs
            self.stepper = GenericStepper(GraphedModel(target.model), self.drafter, GraphedTail())
        if kernels == "triton" and self.stepper is None:
            raise ValueError("kernels=triton needs a lean (torch) target and one drafter level (none, ngram, a model, "
                             "layers:N or a distilled draft); a hierarchy or a target through transformers or "
                             "llama.cpp cannot run it")

    # ---- requests ----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | None = None, chat: bool = False, *,
               messages: Sequence[dict] | None = None, system: str | None = None) -> list[int]:
        """The token ids of a request: `prompt` as text (through the chat template when `chat` or
        `system` is given) or as token ids, or `messages` ([{"role", "content"}], roles system, user,
        assistant) through the chat template, with `system` put first."""
        if system is not None:
            check_text(system, "system")
        if messages is not None:
            if prompt is not None:
                raise ValueError("give either a prompt or messages, not both")
            return self.tokenizer.encode_chat(chat_messages(messages, system))
        if prompt is None:
            raise ValueError("give a prompt (text or token ids) or messages")
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if chat or system is not None:
                return self.tokenizer.encode_chat(chat_messages([{"role": "user", "content": prompt}], system))
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("the prompt is bytes: pass text as str (bytes.decode('utf-8')) or a list of token ids")
        if system is not None or chat:
            raise ValueError("chat / system apply to a text prompt or to messages, not to token ids")
        try:
            ids = [token_id(t) for t in prompt]
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
        check_counts(max_new_tokens, seed, None)
        ids = self.encode(prompt, chat, messages=messages, system=system)
        self._check_fits(ids)
        device = self.target.model.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        stops = self.tokenizer.eos_ids if stop_ids is None else [token_id(t) for t in stop_ids]
        drafter = NoDrafter() if plain else self.drafter
        gamma = 0 if plain else self.gamma_policy(params) if self.gamma == "auto" else self.gamma
        stepper = self.plain_stepper if plain else self.stepper
        if keep_logits:  # the generic step (its Steps carry the logits); in bit-exact mode over the exact target
            stepper = GenericStepper(self.exact_target, drafter) if self.bit_exact else None
        return ids, generate(self.target.model, drafter, ids, gamma=gamma, params=params,
                             max_new_tokens=max_new_tokens, stop_ids=stops, generator=generator, stepper=stepper)

    def gamma_policy(self, params: SamplingParams) -> AdaptiveGamma:
        """A fresh `--gamma auto` policy for one request: the same prior for every request and this
        machine's step costs for the pair, measured through the request's stepper on first use and
        then read from the cache (speculant.calibrate), so that a seeded request gives the same tokens
        every time, on this object or on a fresh load in another process."""
        if isinstance(self.stepper, FusedStepper):
            self.stepper.reserve(MAX_GAMMA)  # the feature window no longer depends on the γs taken so far
        sampled = not params.greedy
        if sampled not in self.step_costs:
            stepper = self.stepper or GenericStepper(self.target.model, self.drafter)
            plan, model = self.plan, self.target.model
            calibration = SamplingParams() if sampled else SamplingParams(temperature=0.0)
            key = {**setup_key(model, self.target.source_hash, self.draft_specs), "backend": backend_of(self.target),
                   "candidates": plan.candidates, "lookup": plan.lookup, "inner_gamma": self.inner_gamma,
                   "stepper": type(stepper).__name__, "runs_ahead": bool(stepper.runs_ahead),
                   **({"target": type(stepper.target).__name__} if isinstance(stepper, GenericStepper) else {}),
                   "bit_exact": self.bit_exact, "max_gamma": MAX_GAMMA, "sampled": sampled,
                   **({"kernels": self.kernels} if self.kernels != "torch" else {}),
                   **({"compile": stepper.compile} if getattr(stepper, "compile", True) is not True else {})}
            fallback = nominal_costs(MAX_GAMMA, model.device.type, 0.0 if isinstance(self.drafter, NgramDrafter) else 0.1,
                                     plan.candidates, plan.lookup)
            self.step_costs[sampled] = step_costs(
                key, lambda: measure_costs(stepper, MAX_GAMMA, calibration, plan.candidates, plan.lookup), fallback)
        return AdaptiveGamma(self.step_costs[sampled], lookup=self.plan.lookup, **self.auto_options)

    def warm_up(self, params: Sequence[SamplingParams] = (SamplingParams(),), max_prompt: int | None = None) -> float:
        """Make ahead what requests with these sampling params meet in the single-request engine, so
        that none waits on a measurement, a capture or a compile: `auto`'s step costs (gamma_policy),
        and on the fused step the graphs (with the compiles inside them) of a step of every γ the
        policy may take (0..MAX_GAMMA; a fixed γ: 0..γ, as a request's end takes), each launched
        ahead where the stepper runs ahead, and of the prefills of every length bucket for prompts of
        up to `max_prompt` tokens (default: the cache). Returns the seconds it took. The tokens of a
        seeded request are the same with or without it."""
        start = time.perf_counter()
        for p in params:
            if self.gamma == "auto":
                self.gamma_policy(p)
            if isinstance(self.stepper, FusedStepper):
                self.stepper.warm_up_prefills(p, max_prompt)
                top = MAX_GAMMA if self.gamma == "auto" else self.gamma
                measure_costs(self.stepper, top, p, self.plan.candidates, self.plan.lookup, budget=0.0)
                # and the one-token plain step of a request's last tokens (the sweep's plain steps decode chunks)
                prompt = timing_prompt(self.target.model)
                self.stepper.begin(prompt, p)
                self.stepper.step(prompt, 0, torch.Generator(device=self.target.model.device), room=0)
        return time.perf_counter() - start

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
        stops = stop_strings(stop)
        check_counts(max_new_tokens, seed, logprobs)
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
        stops = stop_strings(stop)
        check_counts(0, None, logprobs)
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
        out["backend"] = backend_of(self.target)
        out["levels"] = [
            {"draft": spec, **_level_stats(drafter)} for spec, drafter in self.levels
            if isinstance(drafter, SpeculativeDrafter)
        ]
        return out

    def batch_engine(self, max_batch: int = 64, graphs: bool = False, compile: bool = False, solo: bool = False):
        """A speculant.batching.BatchEngine over this target, draft and γ, for up to `max_batch` requests
        at once; `graphs`: each step as one CUDA graph per (batch bucket, Γ, sampling params), prefills
        per size (speculant.row_step); `compile`: the row forwards in them through torch.compile (off
        by default; `speculant serve` turns it on where its steps are CUDA graphs). `auto`: a fresh
        LoadGamma over this machine's batched step costs (batch_step_costs), so that the same requests
        give the same tokens on every engine. In bit-exact mode each row runs its own exact forwards
        (one per row per step: speculant.batching), without graphs. `solo` (under `auto`, not bit-exact):
        while a request runs alone it runs this object's single-request engine (solo_steps: its
        stepper, fused on CUDA, and its γ policy) instead of a batch of one row."""
        from speculant.batching import BatchEngine, LoadGamma, check_max_batch

        if self.bit_exact and graphs:
            raise ValueError("bit-exact batching runs each row's exact forward on its own cache, eagerly: no graphs")
        if self.kernels != "torch":
            raise ValueError("batched decoding runs torch's kernels, not kernels='triton': run requests one by one")
        solo = solo and self.gamma == "auto" and not self.bit_exact
        rows = self._row_factory(chain=solo)
        if rows is None and not isinstance(self.drafter, NoDrafter):
            raise ValueError("batched decoding drafts with none, ngram, a model, layers:N or a distilled draft "
                             "(one level, one candidate, no lookup branch; with gamma auto, a lone request "
                             "runs solo with candidates and a lookup branch, the batch their chain)")
        check_max_batch(max_batch)
        policy = LoadGamma(self.batch_step_costs(max_batch, graphs, compile)) if self.gamma == "auto" else None
        return BatchEngine(self.target.model, rows, gamma=self.gamma, max_batch=max_batch, policy=policy, graphs=graphs,
                           exact=self.exact_target, compile=compile, solo=self.solo_steps if solo else None)

    def _row_factory(self, chain: bool):
        """What a batch drafts with: the drafter's own rows, or with `chain` (a lone request runs solo
        with the candidates and the lookup branch) the chain under them (chain.chain_rows); None if
        neither exists."""
        rows = getattr(self.drafter, "rows", None)
        return chain_rows(self.drafter) if rows is None and chain else rows

    def solo_steps(self, context: list[int], request, seed: int, max_new_tokens: int):
        """The single-request engine's steps for a batched engine's lone request (a
        speculant.batching.BatchRequest with `context` so far and `max_new_tokens` left): this
        object's stepper and a fresh `auto` policy, draws from a generator of `seed` on the device."""
        generator = torch.Generator(device=self.target.model.device)
        generator.manual_seed(seed)
        return generate(self.target.model, self.drafter, context, gamma=self.gamma_policy(request.params),
                        params=request.params, max_new_tokens=max_new_tokens, stop_ids=request.stop_ids,
                        generator=generator, stepper=self.stepper)

    def batch_step_costs(self, max_batch: int, graphs: bool, compile: bool = False) -> BatchStepCosts:
        """This machine's batched step costs for the pair at `max_batch` rows: timed once through an
        engine of the same settings (speculant.calibrate), then read from the cache."""
        from speculant.batching import BatchEngine

        if (max_batch, graphs, compile) not in self.batch_costs:
            model = self.target.model
            key = {**setup_key(model, self.target.source_hash, self.draft_specs), "max_batch": max_batch,
                   "graphs": graphs, "max_gamma": BATCH_MAX_GAMMA, **({"bit_exact": True} if self.bit_exact else {}),
                   **({"compiled": True} if compile else {})}
            fallback = nominal_batch_costs(max_batch, BATCH_MAX_GAMMA, model.device.type,
                                           0.0 if isinstance(self.drafter, NgramDrafter) else 0.1)

            def measure() -> dict[int, tuple[float, ...]]:
                engine = BatchEngine(model, self._row_factory(chain=True), gamma=BATCH_MAX_GAMMA, max_batch=max_batch,
                                     graphs=graphs, exact=self.exact_target, compile=compile)
                return measure_batch_costs(engine, BATCH_MAX_GAMMA)

            self.batch_costs[(max_batch, graphs, compile)] = batch_step_costs(key, measure, fallback)
        return self.batch_costs[(max_batch, graphs, compile)]


class BadRequest(ValueError):
    """One of generate_many's requests cannot run; `index` says which."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"request {index}: {error}")
        self.index = index
        self.reason = str(error)


def default_bit_exact(fused: bool, kernels: str, longest: int, candidates: int, lookup: int) -> bool:
    """bit_exact=None's choice: on for the fused step on the Triton kernels, where the mode cost at most
    4 % (an H100, SmolLM2-135M, BENCHMARKS.md 2026-12-06 fifth session), when its trees (up to the
    longest γ) fit a bit-exact forward; off on torch's kernels, where it costs up to 18 % on plain
    decoding (the padding to a fixed width), and for batched requests (a forward per row)."""
    if not fused or kernels != "triton":
        return False
    try:
        check_exact_width(longest, candidates, lookup)
    except ValueError:
        return False
    return True


def _check_bit_exact(fused: bool, longest: int, candidates: int, lookup: int) -> None:
    """A bit-exact request's target forwards are the fused step's calls of EXACT_WIDTH rows (the
    generic step's too, through ExactTarget): its trees (up to the longest γ) must fit."""
    if not fused:
        raise ValueError("bit-exact decoding runs the fused step: fused=False cannot be bit-exact")
    check_exact_width(longest, candidates, lookup)


def _level_stats(drafter: SpeculativeDrafter) -> dict:
    s = drafter.stats
    # cost_ratio: c of the level below, its draft time per token ÷ this level's model's time per call
    return {"alpha": s.alpha, "tau": s.tau, "target_calls": s.target_calls, "drafted": s.drafted,
            "accepted": s.accepted, "cost_ratio": s.cost_ratio}


BACKENDS = ("torch", "llama.cpp", "auto")


def choose_backend(backend: str, *, target: str, drafts: Sequence[str], device: str = "cpu", dtype: str = "float32",
                   candidates: int = 1, lookup: int = 0) -> str:
    """torch or llama.cpp for a request. `llama.cpp` says in one line what it cannot run; `auto` takes
    llama.cpp where it can run the request (a CPU, llama-cpp-python installed, an embedded name or a
    .gguf target, drafts it runs: ngram, none, default, models) and torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    from speculant.models.feature_draft import is_draft_folder
    from speculant.models.llamacpp import llama_cpp_available
    from speculant.models.registry import EMBEDDED

    problems = []
    if device != "cpu":
        problems.append(f"it runs on the CPU, not {device}")
    if dtype != "float32":
        problems.append("it computes in the GGUF's own types (--dtype is for --backend torch)")
    for d in drafts:
        if is_draft_folder(embedded_draft_folder(d) or d):
            problems.append(f"--draft {d} is a distilled feature draft: it reads the target's hidden states, which "
                            "llama.cpp does not give (use ngram, none, default or a model)")
        elif d.startswith("layers:") or d == "int8" or d.endswith(":int8"):
            problems.append(f"--draft {d} needs the lean torch model (the llama.cpp backend runs whole GGUF models: "
                            "ngram, none, default or a model)")
    if candidates > 1 or lookup:
        problems.append("--candidates and --lookup need the lean torch target")
    if backend == "auto":
        runs = target in EMBEDDED or str(target).lower().endswith(".gguf")
        return "llama.cpp" if runs and not problems and llama_cpp_available() else "torch"
    if problems:
        raise ValueError(f"--backend llama.cpp: {problems[0]}")
    return "llama.cpp"


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


def load(target: str = "smollm2-135m", draft: str | Sequence[str] = "default", *, gamma: int | str = 4,
         device: str = "cpu", dtype: str = "float32", max_seq_len: int | None = None,
         inner_gamma: int = 4, fused: bool | None = None, candidates: int = 1, lookup: int = 0,
         backend: str = "torch", bit_exact: bool | None = None, kernels: str = "torch",
         compile: bool | str | None = None) -> Speculant:
    """Load a target and its drafter chain. See the module docstring for draft specs.

    backend: torch (default), llama.cpp (the target and model drafts run in llama.cpp on the GGUF
    file: `bash scripts/setup.sh --llama-cpp`), or auto (llama.cpp where it can run this, else
    torch); stats["backend"] says which ran.

    device: cpu, cuda or cuda:N. max_seq_len: the KV cache's capacity in tokens (prompt + output),
    at most the target's context; None: 2048, or the target's context where that is shorter.

    bit_exact: None (default): on with kernels="triton" wherever the step's trees fit (below), off on
    torch's kernels (default_bit_exact says why). True: every target forward of decoding (plain or
    speculative) computes a fixed number of
    rows with position-ordered attention (speculant.models.exact_attention), so greedy speculative
    output equals plain greedy output token for token in bfloat16 on a GPU too; costs speed (with
    kernels="triton": the call's own rows on row-invariant kernels, no fixed width; see below). Needs
    the torch backend, a lean target and 1 + gamma·candidates + lookup <= EXACT_WIDTH (32; gamma
    auto: up to 12); runs the fused step (also on the CPU, uncompiled), and where that cannot run the
    drafter (a hierarchy, a draft through transformers) or logprobs are asked for, the generic step
    over the same exact forward (speculant.exact_target); batched requests (generate_many, the server)
    run each row's exact forwards on its own cache, one row at a time (a step costs a forward per row).

    kernels: torch (default) or triton: the fused step's target forwards (and a token draft model's
    where it can) on speculant.models.triton_layers' kernels; a lean Llama or Qwen2 target, one
    drafter level, CUDA (the CPU only under TRITON_INTERPRET=1) (speculant.fused). With bit_exact, every
    target forward (the prefill too) runs TritonForward.forward_exact: each row walks its own keys in
    position order on kernels whose row bits do not depend on the call's rows, unpadded; a hierarchy,
    a draft through transformers and logprobs run the generic step over the same forward, batched
    requests one at a time. There bit-exact mode is the default (bit_exact=False turns it off).

    compile: how the fused step's forwards compile (speculant.fused.check_compile): None, its default
    (each whole forward: one compile per new shape, minutes for a tree with a lookup branch under
    gamma auto on a GPU), "layers" (one compiled decoder layer for every layer and shape: seconds),
    or False."""
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
    torch_only = bit_exact or kernels == "triton"
    if torch_only and backend == "llama.cpp":
        raise ValueError(f"{'bit-exact decoding' if bit_exact else 'kernels=triton'} runs on the torch backend, not "
                         "llama.cpp")
    if not torch_only and choose_backend(backend, target=str(target), drafts=drafts, device=device, dtype=dtype,
                                         candidates=candidates, lookup=lookup) == "llama.cpp":
        from speculant.models.llamacpp import load_llamacpp

        loaded = load_llamacpp(str(target), max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN)
        return Speculant(loaded, drafts, gamma=gamma, inner_gamma=inner_gamma, fused=False)
    try:
        loaded = load_model(str(target), device=device, dtype=DTYPES[dtype],
                            max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN)
    except ModelLoadError:
        if max_seq_len is not None:
            raise
        # a target whose context is shorter than the default takes all of it (any other error recurs)
        loaded = load_model(str(target), device=device, dtype=DTYPES[dtype], max_seq_len=None)
    return Speculant(loaded, drafts, gamma=gamma, inner_gamma=inner_gamma, fused=fused, candidates=candidates,
                     lookup=lookup, bit_exact=bit_exact, kernels=kernels, compile=compile)
