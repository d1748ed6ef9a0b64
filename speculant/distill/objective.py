"""The distillation objective m·KL(p̃ || q) (see speculant.distill.train) and the target's side of
it: its logits and features for a batch of training sequences, computed on the fly, no grad."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from speculant.models.feature_draft import FeatureDraft, batched_hidden_states
from speculant.models.transformer import LeanModel


def distill_loss(draft_kept_logits: torch.Tensor, target_logits: torch.Tensor, kept_ids: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m · KL(p̃ || q) averaged over positions (why this objective: speculant.distill.train).

    draft_kept_logits [N, K], target_logits [N, V], kept_ids [K]. Returns (loss, α estimate at this
    temperature Σ_K min(p, q), target mass m on the kept ids), the last two detached means.
    """
    scaled = target_logits.float() / temperature  # [N, V]
    log_p = scaled.index_select(-1, kept_ids) - torch.logsumexp(scaled, -1, keepdim=True)  # [N, K]
    p = log_p.exp()
    mass = p.sum(-1, keepdim=True)  # [N, 1]
    log_q = F.log_softmax(draft_kept_logits.float() / temperature, -1)  # [N, K]
    per_position = (p * (log_p - mass.clamp_min(1e-30).log() - log_q)).sum(-1)
    alpha = torch.minimum(p, log_q.detach().exp()).sum(-1).mean()
    return per_position.mean(), alpha, mass.mean()


def target_logits_batch(target: LeanModel, tokens: torch.Tensor) -> torch.Tensor:
    """The target's logits for tokens [B, T] from position 0: [B, T, V]."""
    return target_outputs_batch(target, tokens)[0]


def target_outputs_batch(target: LeanModel, tokens: torch.Tensor, tap_layers: Sequence[int] = (),
                         taps: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits [B, T, V] and features (final-normed hidden states) [B, T, E] for tokens
    [B, T] from position 0; `taps` (a list) gets the outputs [B, T, E] of the layers `tap_layers`.
    Batched for llama-family targets; one sequence at a time through the cached path otherwise
    (Gemma's sliding windows: no taps)."""
    w = target.weights
    with torch.no_grad():
        if w.cfg.arch == "llama" and not w.cfg.sliding_window:
            x = w.embed_tokens(tokens)
            hidden = batched_hidden_states(w.layers[: target.num_layers], w.norm, w.cfg, x, target.rope_global,
                                           tap_layers=tap_layers, taps=taps)
        elif tap_layers:
            raise ValueError("feature layers (--feature-layers) need a llama-family target without sliding windows")
        else:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            hidden = torch.stack([target.hidden_states(row, positions, kv_len=tokens.shape[1]) for row in tokens])
        return F.linear(hidden, w.head_weight()), hidden


def feature_draft_losses(trainer: FeatureDraft, tokens: torch.Tensor, target_logits: torch.Tensor,
                         target_features: torch.Tensor, kept_ids: torch.Tensor, temperature: float,
                         feature_weight: float, rollout_steps: int = 2,
                         rollout_weight_decay: float = 1.0,
                         read_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature draft's objective on tokens [B, T] with the target's logits [B, T, V] and features
    [B, T, E]. Draft position i reads (x_{i+1}, f_i) and is scored against the target at i+1.

    `rollout_steps` passes (EAGLE-3's training-time test): pass 1 reads the target's true features
    (the first draft token of a step); pass k > 1 reads the draft's own predictions from pass k-1,
    shifted by one position (f̂_i at position i; position 0 keeps the true f_0), as the k-th draft
    token of a step reads features predicted k-1 times in a row. Each pass adds the distillation loss
    and `feature_weight` x smooth-L1 between predicted and true features, pass k weighted
    `rollout_weight_decay`^(k-1). The default (2 passes, weight 1) is the shipped draft's objective.
    `read_features` [B, T, E]: what the draft reads where the target's features are known, if not
    target_features (a draft with feature layers: DraftWeights.combine_features, with grad); the
    predictions are still regressed on target_features. Returns (loss, α of each pass
    [rollout_steps], detached)."""
    inputs = tokens[:, 1:]
    true_next = target_features[:, 1:].float()
    scored = target_logits[:, 1:].flatten(0, 1)
    read = target_features if read_features is None else read_features
    features = read[:, :-1]  # what pass 1 reads: [B, T-1, E]
    distill = regression = 0.0
    alphas = []
    for k in range(rollout_steps):
        weight = rollout_weight_decay ** k  # 1.0 at k = 0; with decay 1 the sums are bit for bit the two-pass one
        logits, predicted = trainer.train_feature_outputs(inputs, features)  # [B, T-1, K], [B, T-1, E]
        loss, alpha, _ = distill_loss(logits.flatten(0, 1), scored, kept_ids, temperature)
        distill = distill + weight * loss
        regression = regression + weight * F.smooth_l1_loss(predicted.float(), true_next)
        alphas.append(alpha)
        if k + 1 < rollout_steps:  # the next pass reads these predictions, one position on, without grad
            features = torch.cat([read[:, :1].to(predicted.dtype), predicted[:, :-1].detach()], 1)
    return distill + feature_weight * regression, torch.stack(alphas)
