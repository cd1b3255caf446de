"""Policy losses, KL estimators and loss aggregation: pure tensor functions.

References: docs/algorithms.md#policy-losses (PPO-clip, DAPO's clip-higher, the dual clip),
docs/algorithms.md#loss-aggregation and docs/algorithms.md#kl-to-a-reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficient_rl.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
KL_ESTIMATORS: Registry = Registry("KL estimator")
AGGREGATIONS: Registry = Registry("loss aggregation")


@dataclass
class TokenLoss:
    """Per-token loss plus the per-token indicators the step reports."""

    loss: torch.Tensor  # [B, R]
    clipped_low: torch.Tensor  # [B, R] bool: ratio below 1 - eps_low with A < 0 (gradient cut)
    clipped_high: torch.Tensor  # [B, R] bool: ratio above 1 + eps_high with A > 0 (gradient cut)
    dual_clipped: torch.Tensor  # [B, R] bool: A < 0 and the loss capped at -A * clip_ratio_c


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
) -> TokenLoss:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), with the dual clip for A < 0.

    eps_high > eps_low is DAPO's clip-higher. The dual clip (clip_ratio_c > 1) bounds the loss of
    negative-advantage tokens whose ratio exploded; None disables it.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(loss, dtype=torch.bool)
    if clip_ratio_c is not None:
        dual_bound = -advantages * clip_ratio_c
        dual_clipped = (advantages < 0) & (loss > dual_bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, dual_bound), loss)
    return TokenLoss(
        loss=loss,
        clipped_low=(ratio < 1.0 - eps_low) & (advantages < 0),
        clipped_high=(ratio > 1.0 + eps_high) & (advantages > 0),
        dual_clipped=dual_clipped,
    )


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref: unbiased, high variance."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("low_var_kl")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3, r - log r - 1 with r = pi_ref / pi; clamped to [-10, 10] as in verl."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("mse")
def kl_mse(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2, 0.5 * (log pi - log pi_ref)^2 (DLER's Table 4 setting)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@dataclass(frozen=True)
class LossDenominators:
    """Totals over the whole mini-batch, so micro-batch losses add up to the mini-batch loss.

    tokens: number of loss tokens; sequences: number of sequences with at least one loss token;
    norm_length: the constant of seq-mean-token-sum-norm (the recipe's maximum response length).
    """

    tokens: float
    sequences: float
    norm_length: float

    @staticmethod
    def of(mask: torch.Tensor, norm_length: int) -> "LossDenominators":
        return LossDenominators(
            tokens=float(mask.sum().clamp(min=1)),
            sequences=float((mask.sum(-1) > 0).sum().clamp(min=1)),
            norm_length=float(norm_length),
        )


@AGGREGATIONS.register("token-mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, den: LossDenominators) -> torch.Tensor:
    """Every token weighs the same (DAPO): sum of token losses / number of tokens."""
    return (loss * mask).sum() / den.tokens


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, den: LossDenominators) -> torch.Tensor:
    """Every sequence weighs the same (original GRPO): mean over sequences of the token mean."""
    per_sequence = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / den.sequences


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, den: LossDenominators) -> torch.Tensor:
    """Dr. GRPO: token sums divided by a constant length, averaged over sequences.

    verl omits the mean over sequences (it divides a micro-batch's sum by the length only); that
    is the same direction scaled by the micro-batch size, which the learning rate absorbs.
    """
    return (loss * mask).sum() / (den.sequences * den.norm_length)
