"""The drafter chain behind a list of draft specs (the grammar is in speculant.api's docstring):
specs[0] drafts for the target, specs[i] for specs[i-1]. Each spec is resolved to its model top-down
(`layers:N` and `int8` need the level above), then the drafters are built bottom-up, each level
above the last a SpeculativeDrafter over the one below. Also where the embedded drafts live and
which of them is a target's default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from speculant.drafters.base import Drafter, NoDrafter
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.hierarchical import SpeculativeDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.fused import GraphedModel, GraphedTail
from speculant.models.base import CausalLM
from speculant.models.cache import ModelLoadError
from speculant.models.feature_draft import FeatureDraft
from speculant.models.registry import EMBEDDED, LoadedModel, check_pairing, load_model
from speculant.models.transformer import LeanModel, int8_weights
from speculant.plan import DraftPlan
from speculant.step import GenericStepper

EMBEDDED_DRAFTS = Path(__file__).parent / "embedded"
INT8_SUFFIX = ":int8"  # NAME:int8, a draft model whose matrices are served as int8
# SPEC:vocab=N, a draft model that scores only the N most frequent tokens (models.frequent_tokens)
VOCAB_SUFFIX = re.compile(r":vocab=(\d+)$")


def embedded_draft_folder(spec: str) -> Path | None:
    """The folder of an embedded distilled draft named `spec` (e.g. `smollm2-135m-draft`), else None."""
    folder = EMBEDDED_DRAFTS / spec
    return folder if "/" not in spec and (folder / "config.json").is_file() else None


def default_draft(target: LoadedModel | str) -> str:
    """The folder of the embedded distilled draft made for the target's model, else `ngram`.

    A LoadedModel is matched by its weights (distilled_for): any copy or format of SmolLM2-135M gets
    the shipped draft. A bare name is matched by name (`smollm2-135m` -> `smollm2-135m-draft`)."""
    if isinstance(target, LoadedModel) and target.weights is None:
        return "ngram"  # a distilled draft reads a lean torch target's hidden states
    for config_path in sorted(EMBEDDED_DRAFTS.glob("*/config.json")):
        folder = config_path.parent
        if (folder.name == f"{target}-draft" if isinstance(target, str)
                else _distilled_for(folder, target) is not None):
            return str(folder)
    return "ngram"


def _distilled_for(folder: Path, target: LoadedModel) -> str | None:
    """The source hash to hand load_draft if the draft in `folder` was distilled from this target's
    model (the same file, or any copy or format of the same weights); None if from another model."""
    from speculant.models.feature_draft import read_draft_config

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



def build_chain(target: LoadedModel, plan: DraftPlan, inner_gamma: int) -> tuple[Drafter, list]:
    """Turn a plan's draft specs into one drafter. specs[0] drafts for the target, specs[i] for specs[i-1].
    `candidates` k > 1: the drafter proposes k candidates per position (one draft model only).
    `lookup` G > 0: a prompt-lookup branch of up to G tokens beside it (drafters.lookup)."""
    specs, candidates, lookup = list(plan.drafts), plan.candidates, plan.lookup
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
    if lookup and (len(models) > 1 or models[0][1] is None or not isinstance(target.model, LeanModel)):
        raise ValueError("a lookup branch goes beside one draft model as the only --draft (a distilled draft, a "
                         "model or layers:N) and a lean target; for prompt lookup alone use --draft ngram")
    if candidates > target.model.vocab_size:
        raise ValueError(f"candidates must be at most the vocabulary size ({target.model.vocab_size}), got {candidates}")
    spec, model = models[-1]
    above = _causal_lm(models[-2][1]) if len(models) > 1 else target.model
    drafter = _leaf_drafter(spec, model, above, candidates)
    if len(models) > 1 and isinstance(drafter, ModelDrafter):  # a hierarchy's last level runs eagerly too
        drafter = ModelDrafter(_graphed_on_cuda(drafter.model), drafter.candidates)
    if lookup:
        drafter = LookupDrafter(drafter, NgramDrafter(), lookup)
    levels = [(spec, drafter)]
    for spec, model in reversed(models[:-1]):
        level = _graphed_on_cuda(_causal_lm(model))
        tail = GraphedTail() if isinstance(level, GraphedModel) else None  # its steps' tails from graphs too
        drafter = SpeculativeDrafter(GenericStepper(level, drafter, tail), inner_gamma)
        levels.insert(0, (spec, drafter))
    return drafter, levels


def feature_draft_may_follow(specs_above: Sequence[str]) -> bool:
    """May a feature draft be the last level under these draft specs? It reads the hidden states of
    the model it drafts for: the target's, or those of the target's int8 copy, which are the
    target's up to rounding."""
    return list(specs_above) in ([], ["int8"])


def _causal_lm(model) -> CausalLM:
    return model.model if isinstance(model, LoadedModel) else model


def _graphed_on_cuda(model: CausalLM) -> CausalLM:
    """A hierarchy's model as its levels run it (the generic step, eagerly): a lean model on CUDA
    replays its short forwards (a middle level's verifications, a last level's one-token drafts) as
    CUDA graphs (fused.GraphedModel); any other model as it is."""
    if isinstance(model, LeanModel) and not isinstance(model, FeatureDraft) and model.device.type == "cuda":
        return GraphedModel(model)
    return model


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
    kept = VOCAB_SUFFIX.search(spec)
    if kept:  # the most frequent tokens only: NAME:vocab=N, NAME:int8:vocab=N, layers:N:vocab=N
        model = _level_model(spec[:kept.start()], above, target)  # a model of this level's own
        lean = _causal_lm(model)
        if not isinstance(lean, LeanModel) or isinstance(lean, FeatureDraft):
            raise ValueError(f"bad spec {spec!r}: ':vocab=N' follows a draft model that runs on the lean torch "
                             "model (a distilled draft keeps its own vocabulary), e.g. "
                             "qwen2.5-coder-0.5b:int8:vocab=32768")
        from speculant.models.frequent_tokens import frequent_tokens

        lean.keep_vocab(frequent_tokens(target.tokenizer, int(kept.group(1)), target.folder))
        return model
    if spec.startswith("layers:"):
        try:
            num_layers = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad spec {spec!r}: use layers:N with N an integer") from None
        if above.weights is None:
            raise ValueError(f"layers:N needs a lean model to draft for; {above.name} runs on {_runtime(above)}")
        total = above.weights.cfg.num_layers
        if not 1 <= num_layers < total:
            raise ValueError(f"layers:{num_layers} must be between 1 and {total - 1} for {above.name} ({total} layers)")
        return LeanModel(above.weights, max_seq_len=above.model.max_seq_len, num_layers=num_layers)
    if spec == "int8":
        if above.weights is None:
            raise ValueError(f"int8 needs a lean model to draft for; {above.name} runs on {_runtime(above)}")
        return LeanModel(int8_weights(above.weights), max_seq_len=above.model.max_seq_len)
    if spec.endswith(INT8_SUFFIX):  # a draft model served with int8 matrices: NAME:int8
        model = _level_model(spec[:-len(INT8_SUFFIX)], above, target)
        if not isinstance(model, LoadedModel) or model.weights is None:
            raise ValueError(f"bad spec {spec!r}: ':int8' follows a draft model that runs on the lean torch model "
                             "(an embedded name, a GGUF file or an HF folder), e.g. qwen2.5-coder-0.5b:int8")
        weights = int8_weights(model.weights)
        # still NAME's level (its tokenizer, its name): a layers:N below takes N of these layers
        return replace(model, model=LeanModel(weights, max_seq_len=model.model.max_seq_len), weights=weights)
    from speculant.models.feature_draft import is_draft_folder, load_draft

    folder = embedded_draft_folder(spec) or spec
    if is_draft_folder(folder):
        if backend_of(target) == "llama.cpp":
            raise ValueError(f"draft {spec!r} is a distilled feature draft: it reads the target's hidden states, which "
                             "the llama.cpp backend does not give; use --backend torch, or --draft ngram or a model")
        from safetensors import SafetensorError

        try:
            source_hash = _distilled_for(Path(folder), target) if target.weights is not None else None
            if source_hash is not None and source_hash != target.source_hash:  # the same model, another file
                return load_draft(folder, (target.weights, source_hash), max_seq_len=target.model.max_seq_len)
            return load_draft(folder, target)
        except (SafetensorError, KeyError, TypeError) as error:  # weights cut short, config fields missing
            raise ModelLoadError(f"{folder}: corrupt draft folder ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else 'incomplete'})") from None
    if spec not in EMBEDDED and not Path(spec).expanduser().exists():
        drafts = ", ".join(sorted(path.parent.name for path in EMBEDDED_DRAFTS.glob("*/config.json")))
        raise ModelLoadError(f"unknown draft {spec!r}: not a draft spec (none, ngram, layers:N, int8, default), an "
                             f"embedded draft ({drafts}) or model ({', '.join(EMBEDDED)}), nor a file or folder")
    config_path = Path(folder) / "config.json"
    if config_path.is_file() and not _json_readable(config_path):
        raise ModelLoadError(f"{config_path}: corrupt (not readable JSON); a draft or model folder needs it whole")
    if backend_of(target) == "llama.cpp":  # a model draft runs on its target's backend
        from speculant.models.llamacpp import load_llamacpp

        draft = load_llamacpp(spec, max_seq_len=target.model.max_seq_len, threads=target.model.threads)
    else:
        dtype = target.weights.embed_tokens.weight.dtype if target.weights is not None else torch.float32
        draft = load_model(spec, device=target.model.device, dtype=dtype, max_seq_len=target.model.max_seq_len)
    check_pairing(target, draft)
    return draft


def backend_of(loaded: LoadedModel) -> str:
    """Where a loaded model's forward passes run: torch (the lean model or transformers) or llama.cpp."""
    return getattr(loaded.model, "backend", "torch")


def _runtime(loaded: LoadedModel) -> str:
    return "llama.cpp" if backend_of(loaded) == "llama.cpp" else "transformers"



def _json_readable(path: Path) -> bool:
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def chain_rows(drafter: Drafter):
    """The row factory of the chain under a drafter of several candidates and/or a lookup branch (a
    draft model or a feature draft): speculant.batching drafts one chain per row. None for others."""
    inner = drafter.inner if isinstance(drafter, LookupDrafter) else drafter
    if isinstance(inner, (FeatureDrafter, ModelDrafter)) and isinstance(inner.model, LeanModel):
        return lambda max_rows, target_cache: inner.rows(max_rows, target_cache, chain=True)
    return None
