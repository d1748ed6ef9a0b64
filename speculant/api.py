"""The Python API, mirroring the CLI.

>>> import speculant                                                      # doctest: +SKIP
>>> spec = speculant.load(target="smollm2-135m", draft="ngram", gamma=4)  # doctest: +SKIP
>>> out = spec.generate("def fibonacci(n):", max_new_tokens=32, temperature=0)  # doctest: +SKIP
>>> out.text, out.token_ids, out.stats["alpha"], out.stats["tau"]         # doctest: +SKIP
>>> for piece in spec.stream("Hello", max_new_tokens=16): print(piece, end="")  # doctest: +SKIP

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
from typing import Iterator, Sequence

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
from speculant.models.base import CausalLM
from speculant.models.loading import LoadedModel, check_pairing, load_model
from speculant.models.transformer import LeanModel, int8_weights
from speculant.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NoDrafter:
    """`none`: propose nothing, so every step is a plain decoding step."""

    def reset(self) -> None:
        pass

    def propose(self, context, gamma, params, generator):
        raise AssertionError("the engine asks a drafter only for gamma >= 1")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: dict


EMBEDDED_DRAFTS = Path(__file__).parent / "embedded"


def default_draft(target_name: str) -> str:
    """The embedded distilled draft for a target if one ships with speculant, else `ngram`."""
    folder = EMBEDDED_DRAFTS / f"{target_name}-draft"
    return str(folder) if (folder / "config.json").exists() else "ngram"


class Speculant:
    """A target, a chain of drafters and a γ policy, ready to generate."""

    def __init__(self, target: LoadedModel, drafts: Sequence[str], gamma: int | str = 4,
                 inner_gamma: int = 4, fused: bool | None = None, candidates: int = 1, lookup: int = 0) -> None:
        self.target = target
        self.tokenizer = target.tokenizer
        self.draft_specs = list(drafts)
        self.drafter, self.levels = _build_chain(target, self.draft_specs, inner_gamma, candidates, lookup)
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
    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def steps(self, prompt: str | Sequence[int], *, chat: bool = False, max_new_tokens: int = 128,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
              seed: int | None = 0, stop_ids: Sequence[int] | None = None, plain: bool = False):
        """The engine's steps for one request (the building block of generate / stream)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        ids = self.encode(prompt, chat)
        device = self.target.model.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        stops = self.tokenizer.eos_ids if stop_ids is None else stop_ids
        drafter = NoDrafter() if plain else self.drafter
        gamma = 0 if plain else self.gamma
        stepper = self.plain_stepper if plain else self.stepper
        return ids, generate(self.target.model, drafter, ids, gamma=gamma, params=params,
                             max_new_tokens=max_new_tokens, stop_ids=stops, generator=generator, stepper=stepper)

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[str]:
        """Yield text pieces as tokens are fixed."""
        _, steps = self.steps(prompt, **options)
        decoder = self.tokenizer.stream_decoder()
        for step in steps:
            piece = decoder.add(step.tokens)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def generate(self, prompt: str | Sequence[int], **options) -> Generation:
        _, steps = self.steps(prompt, **options)
        token_ids: list[int] = []
        stats = None
        for step in steps:
            token_ids.extend(step.tokens)
            stats = step.stats
        if stats is None:  # max_new_tokens == 0
            stats = GenerationStats(gamma=0)
        return Generation(self.tokenizer.decode(token_ids), token_ids, self.stats_dict(stats))

    def stats_dict(self, stats: GenerationStats) -> dict:
        out = stats.to_dict()
        out["levels"] = [
            {"draft": spec, **_level_stats(drafter)} for spec, drafter in self.levels
            if isinstance(drafter, SpeculativeDrafter)
        ]
        return out


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
            spec = default_draft(target.name)
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

    if is_draft_folder(spec):
        return load_draft(spec, target)
    dtype = target.weights.embed_tokens.weight.dtype if target.weights is not None else torch.float32
    draft = load_model(spec, device=target.model.device, dtype=dtype, max_seq_len=target.model.max_seq_len)
    check_pairing(target, draft)
    return draft


def load(target: str = "smollm2-135m", draft: str | Sequence[str] = "default", *, gamma: int | str = 4,
         device: str = "cpu", dtype: str = "float32", max_seq_len: int | None = 2048,
         inner_gamma: int = 4, fused: bool | None = None, candidates: int = 1, lookup: int = 0) -> Speculant:
    """Load a target and its drafter chain. See the module docstring for draft specs."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here")
    loaded = load_model(target, device=device, dtype=DTYPES[dtype], max_seq_len=max_seq_len)
    drafts = [draft] if isinstance(draft, str) else list(draft)
    return Speculant(loaded, drafts, gamma=gamma, inner_gamma=inner_gamma, fused=fused, candidates=candidates,
                     lookup=lookup)
