"""The training objective shared by every learner backend: model outputs -> scalar loss + stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, LossDenominators


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


def objective_settings(recipe) -> ObjectiveSettings:
    alg = recipe.algorithm
    return ObjectiveSettings(
        policy_loss=alg.policy_loss, eps_low=alg.clip_low, eps_high=alg.clip_high,
        clip_ratio_c=alg.clip_ratio_c, loss_agg=alg.loss_agg,
        norm_length=recipe.rollout.max_response_length, kl_coef=alg.kl_coef,
        kl_estimator=alg.kl_estimator, temperature=recipe.rollout.temperature,
        tis_cap=alg.tis_cap if alg.rollout_correction == "tis" else None,
    )


def sequence_inputs(rows: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input ids, attention mask and position ids for prompt + response."""
    input_ids = torch.cat([rows.prompt_ids, rows.response_ids], 1)
    attention_mask = torch.cat([rows.prompt_mask, rows.response_mask.long()], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logprobs(model, rows: RolloutBatch, temperature: float, with_entropy: bool = True):
    """Log-probs of the response tokens (and per-token entropy) under `model`, both [B, R]."""
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    # Logits at position p predict token p + 1: keep the last R + 1 positions, drop the final one.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=width + 1).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, rows.response_ids[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logprobs, entropy


def policy_objective(logprobs: torch.Tensor, rows: RolloutBatch, settings: ObjectiveSettings,
                     den: LossDenominators) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, already scaled so micro-batch losses sum to the mini-batch loss.

    Returns the loss and statistics summed over loss tokens (sums add up across micro-batches).
    """
    mask = rows.loss_mask if rows.loss_mask is not None else rows.response_mask
    # One optimizer step per rollout batch: the rollout policy is the current one, so the old
    # log-probs are the current ones without gradient (ratio 1 with the right gradient).
    old = rows.old_logprobs if rows.old_logprobs is not None else logprobs.detach()
    token = POLICY_LOSSES.get(settings.policy_loss)(
        logprobs, old, rows.advantages,
        eps_low=settings.eps_low, eps_high=settings.eps_high, clip_ratio_c=settings.clip_ratio_c,
    )
    token_loss = token.loss
    if settings.tis_cap is not None:
        # The engine sampled from its own numerics, not the learner's: reweight each token by the
        # (capped) learner / engine probability ratio, a constant in the gradient.
        token_loss = token_loss * (old - rows.rollout_logprobs).exp().clamp(max=settings.tis_cap).detach()
    aggregate = AGGREGATIONS.get(settings.loss_agg)
    loss = aggregate(token_loss, mask, den)
    stats = {
        "clip_ratio/low": (token.clipped_low * mask).sum(),
        "clip_ratio/high": (token.clipped_high * mask).sum(),
        "clip_ratio/dual": (token.dual_clipped * mask).sum(),
    }
    if settings.kl_coef > 0:
        kl = KL_ESTIMATORS.get(settings.kl_estimator)(logprobs, rows.ref_logprobs)
        loss = loss + settings.kl_coef * aggregate(kl, mask, den)
        stats["kl"] = (kl.detach() * mask).sum()
    return loss, stats
