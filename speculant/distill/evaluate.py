"""How good a draft is for its target: held-out α (Σ min(p, q) through the engine's own
`logits_to_probs`), α and the cost ratio c measured by running the engine, the cost of one forward;
and `serving_copy`, the draft as it will be served (cast to the target's dtype) for those measures."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch

from speculant.models.base import synchronize
from speculant.models.feature_draft import (
    DistilledDraft,
    DraftWeights,
    FeatureDraft,
    dequantized,
    draft_class,
    stored_tensors,
)
from speculant.sampling import SamplingParams, logits_to_probs


@torch.no_grad()
def heldout_alpha(target, draft, heldout: torch.Tensor, temperatures: Sequence[float] = (0.0, 1.0),
                  passes: int = 2) -> dict:
    """α = mean over held-out positions of Σ_x min(p(x), q(x)), p and q from the models' own
    cached forward (what serving runs) through `logits_to_probs`; plus the target's mass on the
    kept ids at temperature 1 (the ceiling of α at T=1 for any draft over those ids).

    A feature draft is measured in `passes` passes, as it is trained (objective.feature_draft_losses):
    pass 1 reads the target's features (keys alpha_t0, alpha_t1), pass k the draft's own predictions
    from pass k-1, one position on: α of the k-th draft token of a step (alpha2_t0, alpha3_t0, ...)."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    features = isinstance(draft, FeatureDraft)
    num_passes = passes if features else 1
    sums = [{t: 0.0 for t in temperatures} for _ in range(num_passes)]
    mass, count = 0.0, 0
    kept = draft.kept_ids
    if features:
        draft.read_from(target)
    for row in heldout:
        row = row.to(target.device)
        target.truncate(0)
        draft.truncate(0)
        p_logits = target.forward(row, 0)  # [L, V]
        if features:
            # draft position i reads (x_{i+1}, f_i) and predicts x_{i+2}: scored against the
            # target's law at i+1. Pass k > 1 reads the predicted features of pass k-1 instead.
            true = target.features[: row.shape[0] - 1]  # [L-1, E]
            read, q_by_pass = true, []
            for _ in range(num_passes):
                draft.truncate(0)
                q_logits, predicted = draft.forward_features(row[1:], read, 0)  # [L-1, V], [L-1, E]
                q_by_pass.append(q_logits)
                read = torch.cat([true[:1], predicted[:-1]])
            p_logits = p_logits[1:]
        else:
            q_by_pass = [draft.forward(row, 0)]
        for t in temperatures:
            params = SamplingParams(temperature=t)
            p = logits_to_probs(p_logits, params)
            for sums_k, q_logits in zip(sums, q_by_pass):
                sums_k[t] += float(torch.minimum(p, logits_to_probs(q_logits, params)).sum(-1).sum())
        mass += float(torch.softmax(p_logits.float(), -1)[:, kept].sum())
        count += p_logits.shape[0]
    target.truncate(0)
    draft.truncate(0)
    out = {}
    for k, sums_k in enumerate(sums):  # alpha_t*, then α of a draft token after k draft tokens (own features)
        out.update({f"alpha{k + 1 if k else ''}_t{t:g}": sums_k[t] / count for t in temperatures})
    out["kept_mass_t1"] = mass / count
    return out


def engine_alpha(target, draft, prompts: Sequence[Sequence[int]], *, gamma: int, max_new_tokens: int,
                 temperatures: Sequence[float] = (0.0, 1.0), seed: int = 0) -> dict:
    """Run the engine with the draft on `prompts`: measured α (accepted ÷ tested) and c per temperature."""
    from speculant.drafters.features import FeatureDrafter
    from speculant.drafters.model import ModelDrafter
    from speculant.engine import generate

    def drafter():
        return FeatureDrafter(draft, target) if isinstance(draft, FeatureDraft) else ModelDrafter(draft)

    out = {}
    for t in temperatures:
        accepted = tested = 0
        draft_time = target_time = 0.0
        drafted = calls = 0
        generator = torch.Generator(device=target.device).manual_seed(seed)
        for prompt in prompts:
            stats = None
            for step in generate(target, drafter(), list(prompt), gamma=gamma,
                                 params=SamplingParams(temperature=t), max_new_tokens=max_new_tokens,
                                 generator=generator):
                stats = step.stats
            if stats is None:
                continue
            accepted += stats.accepted
            tested += stats.accepted + stats.rejections
            draft_time, target_time = draft_time + stats.draft_time, target_time + stats.target_time
            drafted, calls = drafted + stats.drafted, calls + stats.target_calls
        out[f"engine_alpha_t{t:g}"] = accepted / tested if tested else 0.0
        if drafted and calls and target_time:
            out[f"engine_cost_ratio_t{t:g}"] = (draft_time / drafted) / (target_time / calls)
    return out


@torch.no_grad()
def measure_cost_ratio(target, draft, context: torch.Tensor, repeats: int = 20) -> dict:
    """c = time of one draft forward of one token ÷ one target forward of one token, after a
    prefill of `context` [P] (median of `repeats`)."""
    def one_token_time(model) -> float:
        if isinstance(model, FeatureDraft):  # the cost does not depend on the feature values
            zeros = torch.zeros(len(context), model.cfg.hidden_size, dtype=model.dtype, device=model.device)

            def forward(tokens, start):
                return model.forward_features(tokens, zeros[: len(tokens)], start)
        else:
            forward = model.forward
        model.truncate(0)
        forward(context.to(model.device), 0)
        times = []
        token = context[-1:].to(model.device)
        for _ in range(repeats + 3):
            model.truncate(len(context))
            synchronize(model.device)
            start = time.perf_counter()
            forward(token, len(context))
            synchronize(model.device)
            times.append(time.perf_counter() - start)
        model.truncate(0)
        return statistics.median(times[3:])

    target_s, draft_s = one_token_time(target), one_token_time(draft)
    return {"cost_ratio": draft_s / target_s, "target_forward_ms": 1e3 * target_s, "draft_forward_ms": 1e3 * draft_s}


def serving_copy(weights: DraftWeights, dtype: torch.dtype, max_seq_len: int | None = None) -> DistilledDraft:
    """A draft over a copy of `weights` cast to `dtype` (the target's), for evaluation while the
    trained weights stay in float32. The target's embedding stays shared. torch.int8: the weights a
    draft saved in int8 loads (its matrices quantized and back, the rest through bfloat16), in float32."""
    embedding = weights.embed_tokens
    copied = copy.deepcopy(weights, {id(embedding): embedding})
    if dtype is torch.int8:
        if any(layer.gate_up is not None for layer in weights.layers):  # a copy's fused matrices would go stale
            raise ValueError("serving_copy(..., torch.int8) takes training weights, not a loaded draft's (fused)")
        device = embedding.weight.device
        copied.load_state_dict({k: v.to(device) for k, v in dequantized(stored_tensors(copied, torch.int8)).items()})
        dtype = torch.float32
    return draft_class(weights.draft_cfg)(copied.to(dtype=dtype), max_seq_len=max_seq_len)
