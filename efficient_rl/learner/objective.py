"""The training objective shared by every learner backend: model outputs -> scalar loss + stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import DIVERGENCES, map_row_chunks
from efficient_rl.algos.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, LossDenominators
from efficient_rl.modeling import output_head, response_hidden_states, scaled, scatter_selected


@dataclass(frozen=True)
class ObjectiveSettings:
    policy_loss: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_ratio_c: float | None = 10.0
    loss_agg: str = "token-mean"
    norm_length: int = 256  # constant of seq-mean-token-sum-norm
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    temperature: float = 1.0  # logits are divided by the rollout temperature, as in the engine
    tis_cap: float | None = None  # truncated importance sampling against the engine's log-probs
    # With a token selection (batch.loss_mask): "kept" averages the loss over the kept tokens,
    # "all" over every response token (unselected ones count as zero loss, as masking does).
    loss_denominator: str = "kept"
    # algorithm.objective: distillation (docs/algorithms.md#on-policy-distillation): per-token divergence from a teacher
    distillation: bool = False
    divergence: str = "reverse_kl"
    divergence_beta: float = 0.5
    chunk_rows: int = 512


def objective_settings(recipe) -> ObjectiveSettings:
    alg = recipe.algorithm
    return ObjectiveSettings(
        policy_loss=alg.policy_loss, eps_low=alg.clip_low, eps_high=alg.clip_high,
        clip_ratio_c=alg.clip_ratio_c, loss_agg=alg.loss_agg,
        norm_length=recipe.rollout.max_response_length, kl_coef=alg.kl_coef,
        kl_estimator=alg.kl_estimator, temperature=recipe.rollout.temperature,
        tis_cap=alg.tis_cap if alg.rollout_correction == "tis" else None,
        loss_denominator=alg.loss_denominator,
        distillation=alg.objective == "distillation", divergence=recipe.distill.divergence,
        divergence_beta=recipe.distill.beta, chunk_rows=recipe.distill.chunk_rows,
    )


def loss_masks(rows: RolloutBatch, settings: ObjectiveSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens that enter the loss, tokens the aggregation averages over)."""
    selected = rows.loss_mask if rows.loss_mask is not None else rows.response_mask
    return selected, selected if settings.loss_denominator == "kept" else rows.response_mask


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] log-softmax over the vocabulary for N hidden states, at the sampling temperature."""
    return torch.log_softmax(scaled(head(hidden).float(), temperature), -1)


def policy_objective(logprobs: torch.Tensor, rows: RolloutBatch, settings: ObjectiveSettings,
                     den: LossDenominators) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, already scaled so micro-batch losses sum to the mini-batch loss.

    Returns the loss and statistics summed over loss tokens (sums add up across micro-batches).
    """
    selected, mask = loss_masks(rows, settings)
    # One optimizer step per rollout batch: the rollout policy is the current one, so the old
    # log-probs are the current ones without gradient (ratio 1 with the right gradient).
    old = rows.old_logprobs if rows.old_logprobs is not None else logprobs.detach()
    token = POLICY_LOSSES.get(settings.policy_loss)(
        logprobs, old, rows.advantages,
        eps_low=settings.eps_low, eps_high=settings.eps_high, clip_ratio_c=settings.clip_ratio_c,
    )
    token_loss = token.loss * selected
    if settings.tis_cap is not None:
        # The engine sampled from its own numerics, not the learner's: reweight each token by the
        # (capped) learner / engine probability ratio, a constant in the gradient.
        token_loss = token_loss * (old - rows.rollout_logprobs).exp().clamp(max=settings.tis_cap).detach()
    aggregate = AGGREGATIONS.get(settings.loss_agg)
    loss = aggregate(token_loss, mask, den)
    stats = {
        "clip_ratio/low": (token.clipped_low * selected).sum(),
        "clip_ratio/high": (token.clipped_high * selected).sum(),
        "clip_ratio/dual": (token.dual_clipped * selected).sum(),
    }
    if settings.kl_coef > 0:
        kl = KL_ESTIMATORS.get(settings.kl_estimator)(logprobs, rows.ref_logprobs) * selected
        loss = loss + settings.kl_coef * aggregate(kl, mask, den)
        stats["kl"] = kl.detach().sum()
    return loss, stats


def distillation_objective(model, rows: RolloutBatch, settings: ObjectiveSettings, den: LossDenominators,
                           teacher) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On-policy distillation loss of one micro-batch: the per-token divergence between the
    student's and the teacher's distributions over the full vocabulary (reverse KL by default,
    OPD Eq. 1), aggregated like the policy loss. Only the selected positions reach either LM
    head, and they are processed `chunk_rows` at a time with recomputation in the backward, so
    the student's [K, V] log-probabilities never exist whole."""
    selected, averaged_over = loss_masks(rows, settings)
    kept = selected.bool()
    teacher_logprobs = teacher.logprobs(rows, kept).to(rows.response_mask.device)  # [K, V], no gradient
    head, divergence = output_head(model), DIVERGENCES.get(settings.divergence)

    def chunk_divergence(hidden: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
        return divergence(head_logprobs(head, hidden, settings.temperature), teacher_chunk, settings.divergence_beta)

    hidden = response_hidden_states(model, rows)[kept]
    token_divergence = scatter_selected(map_row_chunks(chunk_divergence, [hidden, teacher_logprobs],
                                                       settings.chunk_rows), kept)
    loss = AGGREGATIONS.get(settings.loss_agg)(token_divergence, averaged_over, den)
    return loss, {"distill/divergence": token_divergence.detach().sum()}
