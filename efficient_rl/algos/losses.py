"""Policy losses, loss aggregations, KL estimators and rollout corrections: pure tensor functions.

A policy loss reads one `LossInputs` (a micro-batch's log-probs, advantages, masks and the
mini-batch's denominators) and returns a `TokenLoss`: the per-token loss and per-token
indicators (which tokens were clipped), logged as shares of the loss tokens. An aggregation
turns the per-token loss into the micro-batch's scalar, scaled so that micro-batch losses add up
to the mini-batch loss. Rules, defaults and sources: docs/algorithms.md ("Policy losses",
"Loss aggregation", "KL to the reference").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from efficient_rl.registry import Registry

# name -> fn(inputs: LossInputs, **params) -> TokenLoss
POLICY_LOSSES: Registry = Registry("policy loss")
# name -> fn(token_values [B, R], mask [B, R] (the tokens averaged over), den, advantages [B, R]) -> scalar
AGGREGATIONS: Registry = Registry("loss aggregation")
# name -> fn(logprobs [B, R], ref_logprobs [B, R]) -> [B, R]
KL_ESTIMATORS: Registry = Registry("KL estimator")
# name -> fn(inputs: LossInputs, **params) -> [B, R] constant weights of the per-token loss
ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction")

LOG_RATIO_BOUND = 20.0  # per-token log-ratios are clamped here before exp (verl's bound)


@dataclass(frozen=True)
class LossDenominators:
    """Totals over the whole mini-batch (across processes), so micro-batch losses add up.

    Counted over the tokens the aggregation averages over: tokens, sequences with at least one of
    them, and for the balanced aggregation the same split by the sign of the token's advantage;
    norm_length is the constant of seq-mean-token-sum-norm (the recipe's maximum response length).
    """

    tokens: float
    sequences: float
    norm_length: float
    positive_tokens: float = 1.0
    negative_tokens: float = 1.0
    positive_sequences: float = 0.0
    negative_sequences: float = 0.0

    @staticmethod
    def of(mask: torch.Tensor, norm_length: int, advantages: torch.Tensor | None = None) -> "LossDenominators":
        def count_tokens(where: torch.Tensor) -> float:
            return float(where.sum().clamp(min=1))

        def count_sequences(where: torch.Tensor) -> float:
            return float((where.sum(-1) > 0).sum())

        signs = {}
        if advantages is not None:
            positive, negative = mask * (advantages > 0), mask * (advantages < 0)
            signs = dict(
                positive_tokens=count_tokens(positive),
                negative_tokens=count_tokens(negative),
                positive_sequences=count_sequences(positive),
                negative_sequences=count_sequences(negative),
            )
        return LossDenominators(
            tokens=count_tokens(mask),
            sequences=max(count_sequences(mask), 1.0),
            norm_length=float(norm_length),
            **signs,
        )


@dataclass
class LossInputs:
    """One micro-batch as a policy loss and an aggregation see it: [B, R] tensors, rows are
    sequences (rollouts), response positions right-padded."""

    logprobs: torch.Tensor  # log pi_theta of each sampled token, with gradient
    old_logprobs: torch.Tensor  # log pi_old, the policy of the importance ratio (no gradient)
    advantages: torch.Tensor
    mask: torch.Tensor  # 1 on the tokens that enter the loss (a token selection's kept tokens)
    averaged_over: torch.Tensor  # 1 on the tokens the aggregation divides by: `mask`, or every response token
    den: LossDenominators
    rollout_logprobs: torch.Tensor | None = None  # log-probs the engine sampled with (rollout corrections)

    def log_ratio(self) -> torch.Tensor:
        """log pi_theta - log pi_old per token, clamped, 0 off the mask."""
        return (self.logprobs - self.old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND) * self.mask

    def sequence_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[B] mean of `values` over each sequence's loss tokens (0 for a sequence without any)."""
        return (values * self.mask).sum(-1) / self.mask.sum(-1).clamp(min=1)


@dataclass
class TokenLoss:
    """Per-token loss plus per-token indicators, each logged as clip_ratio/<name>: the share of
    loss tokens where it holds."""

    loss: torch.Tensor  # [B, R]
    indicators: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, R] bool


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: torch.Tensor | float,
    high: torch.Tensor | float,
    dual_bound: torch.Tensor | float | None,
) -> TokenLoss:
    """-min(ratio * A, clip(ratio, low, high) * A), and for A < 0 at most -A * dual_bound.

    The PPO-clip surrogate with the ratio's bounds given directly (1 - eps, 1 + eps for PPO-clip,
    exp(-c t^p), exp(c t^p) for CTPO). The dual clip bounds the loss of negative-advantage tokens
    whose ratio exploded; None turns it off.
    """
    low, high = (torch.as_tensor(bound, dtype=ratio.dtype, device=ratio.device) for bound in (low, high))
    loss = torch.maximum(-advantages * ratio, -advantages * torch.minimum(torch.maximum(ratio, low), high))
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_bound is not None:
        capped = -advantages * dual_bound
        dual = (advantages < 0) & (loss > capped)
        loss = torch.where(advantages < 0, torch.minimum(loss, capped), loss)
    return TokenLoss(
        loss, {"low": (ratio < low) & (advantages < 0), "high": (ratio > high) & (advantages > 0), "dual": dual}
    )


# ---------------------------------------------------------------- policy losses


@POLICY_LOSSES.register(
    "ppo_clip",
    ranges={"clip_low": "[0, 1]", "clip_high": "[0, inf)", "clip_ratio_c": "(1, inf)"},
    source="PPO-clip (Schulman et al. 2017); clip-higher from DAPO (arXiv 2503.14476); dual clip (Ye et al. 2020)",
)
def ppo_clip_loss(
    inputs: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float | None = None
) -> TokenLoss:
    """Token ratio rho = pi / pi_old, clipped to [1 - clip_low, 1 + clip_high].

    clip_high > clip_low is DAPO's clip-higher (0.28). clip_ratio_c > 1 is the dual clip (DLER's
    code: 10.0).
    """
    ratio = torch.exp(inputs.log_ratio())
    return clipped_surrogate(ratio, inputs.advantages, 1.0 - clip_low, 1.0 + clip_high, clip_ratio_c)


@POLICY_LOSSES.register(
    "gspo",
    ranges={"clip_low": "[0, 1]", "clip_high": "[0, inf)"},
    source="GSPO (arXiv 2507.18071); eps 3e-4 / 4e-4 per TRL's docs, citing its v2 §5.1",
)
def gspo_loss(inputs: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> TokenLoss:
    """Sequence-level ratio s_i = exp(mean_t log rho_{i,t}), the geometric mean of the token
    ratios, clipped per sequence; A_i is the sequence's mean token advantage. Each loss token of
    sequence i carries the sequence's loss, so `seq-mean-token-mean` gives GSPO's 1/G sum.
    """
    log_s = inputs.sequence_mean(inputs.log_ratio())
    s = torch.exp(log_s)[:, None].expand_as(inputs.logprobs)
    adv = inputs.sequence_mean(inputs.advantages)[:, None].expand_as(inputs.logprobs)
    return clipped_surrogate(s, adv, 1.0 - clip_low, 1.0 + clip_high, None)


@POLICY_LOSSES.register(
    "gspo_token",
    ranges={"clip_low": "[0, 1]", "clip_high": "[0, inf)"},
    source="GSPO-token (arXiv 2507.18071), as verl-dler's compute_policy_loss_gspo",
)
def gspo_token_loss(inputs: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> TokenLoss:
    """s_{i,t} = sg[s_i] * pi(o_t) / sg[pi(o_t)]: the value of GSPO's sequence ratio with the
    gradient of the token's own log-prob, so token advantages A_{i,t} may differ along a
    sequence. With A_{i,t} = A_i and `seq-mean-token-mean` it equals `gspo` in value and gradient.
    log s_{i,t} is clamped at 10 (verl).
    """
    log_s = inputs.sequence_mean(inputs.log_ratio()).detach()[:, None]
    log_s_token = (log_s + inputs.logprobs - inputs.logprobs.detach()).clamp(max=10.0)
    return clipped_surrogate(torch.exp(log_s_token), inputs.advantages, 1.0 - clip_low, 1.0 + clip_high, None)


@POLICY_LOSSES.register(
    "cispo",
    ranges={"clip_low": "[0, 1]", "clip_high": "[0, inf)"},
    source="CISPO, MiniMax-M1 (arXiv 2506.13585) Eq. 4-5",
)
def cispo_loss(inputs: LossInputs, *, clip_low: float = 1.0, clip_high: float = 0.28) -> TokenLoss:
    """-sg[clip(rho, 1 - clip_low, 1 + clip_high)] * A * log pi: the clipped importance weight
    is a constant, so every token keeps its gradient (PPO-clip drops the clipped ones).
    clip_low 1.0 sets no lower bound, as MiniMax-M1 did (it tuned only the upper one).
    """
    ratio = torch.exp(inputs.log_ratio())
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    return TokenLoss(
        -weight * inputs.advantages * inputs.logprobs, {"low": ratio < 1.0 - clip_low, "high": ratio > 1.0 + clip_high}
    )


@POLICY_LOSSES.register(
    "ctpo",
    ranges={"c_low": "[0, inf)", "c_high": "[0, inf)", "power": "(-inf, inf)", "c_dual": "[0, inf)"},
    source="CTPO-LA (arXiv 2605.07331) and its code core_algos.py _compute_policy_loss_cum_token_la_impl",
)
def ctpo_loss(
    inputs: LossInputs, *, c_low: float = 0.025, c_high: float = 0.05, power: float = 0.5, c_dual: float | None = 0.05
) -> TokenLoss:
    """Cumulative token ratio R_{i,t} = prod_{k<=t} rho_{i,k} (the prefix's importance weight),
    with the gradient of the token's own log-prob: log r_t = sg[log R_t] + log pi_t - sg[log pi_t],
    clamped at 10. Clipped in log space to [-c_low t^p, c_high t^p] at 1-indexed response
    position t (the spread of log R_t grows like t); for A < 0 the dual clip caps the ratio at
    exp(c_dual t^p). Positions outside the loss mask add nothing to the cumulative sum.
    """
    cumulative = inputs.log_ratio().cumsum(-1).detach()
    log_r = (cumulative + inputs.logprobs - inputs.logprobs.detach()).clamp(max=10.0)
    position = torch.arange(1, log_r.shape[-1] + 1, dtype=log_r.dtype, device=log_r.device).pow(power)
    dual = None if c_dual is None else torch.exp(c_dual * position)
    return clipped_surrogate(
        torch.exp(log_r), inputs.advantages, torch.exp(-c_low * position), torch.exp(c_high * position), dual
    )


@POLICY_LOSSES.register(
    "gmpo", ranges={"clip": "(0, inf)"}, source="GMPO (arXiv 2507.20673), clip range (e^-0.4, e^0.4)"
)
def gmpo_loss(inputs: LossInputs, *, clip: float = 0.4) -> TokenLoss:
    """Geometric-mean policy optimisation: the sequence objective A_i * prod_t clipped(rho_t)^(1/|o_i|),
    each token's log-ratio clipped in log space to [-clip, clip] on the side the advantage's sign
    makes pessimistic (sgn(A) * min(sgn(A) log rho, sgn(A) clip(log rho))). Each loss token
    carries its sequence's loss, as in `gspo`.
    """
    adv = inputs.sequence_mean(inputs.advantages)[:, None]
    sign = torch.sign(adv)
    log_ratio = inputs.log_ratio()
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-clip, clip))
    sequence = torch.exp(inputs.sequence_mean(pessimistic))[:, None]
    loss = (-adv * sequence).expand_as(inputs.logprobs)
    return TokenLoss(loss, {"low": (log_ratio < -clip) & (adv < 0), "high": (log_ratio > clip) & (adv > 0)})


# ---------------------------------------------------------------- rollout corrections


@ROLLOUT_CORRECTIONS.register("none")
def no_correction(inputs: LossInputs) -> torch.Tensor:
    return torch.ones_like(inputs.old_logprobs)


@ROLLOUT_CORRECTIONS.register(
    "tis",
    ranges={"cap": "(0, inf)"},
    source="truncated importance sampling (Yao et al. 2025, 'Your efficient RL framework "
    "secretly brings you off-policy RL training')",
)
def truncated_importance_sampling(inputs: LossInputs, *, cap: float = 2.0) -> torch.Tensor:
    """min(pi_learner / pi_engine, cap) per token, a constant: the engine sampled with its own
    numerics, not the learner's."""
    return (inputs.old_logprobs - inputs.rollout_logprobs).exp().clamp(max=cap).detach()


# ---------------------------------------------------------------- KL estimators


@KL_ESTIMATORS.register("k1", source="Schulman, 'Approximating KL divergence' (2020)")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref: unbiased, high variance."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("low_var_kl", source="Schulman's k3, as verl's low_var_kl")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3, r - log r - 1 with r = pi_ref / pi; clamped to [-10, 10] as in verl."""
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("mse", source="Schulman's k2; DLER (arXiv 2510.15110) Table 4")
def kl_mse(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2, 0.5 * (log pi - log pi_ref)^2 (DLER's Table 4 setting)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


# ---------------------------------------------------------------- aggregations


@AGGREGATIONS.register("token-mean", source="DAPO (arXiv 2503.14476) token-level loss")
def token_mean(values: torch.Tensor, mask: torch.Tensor, den: LossDenominators, advantages=None) -> torch.Tensor:
    """Every token weighs the same (DAPO): sum of token losses / number of tokens."""
    return (values * mask).sum() / den.tokens


@AGGREGATIONS.register("seq-mean-token-mean", source="GRPO (DeepSeekMath, arXiv 2402.03300)")
def seq_mean_token_mean(
    values: torch.Tensor, mask: torch.Tensor, den: LossDenominators, advantages=None
) -> torch.Tensor:
    """Every sequence weighs the same (original GRPO): mean over sequences of the token mean."""
    per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / den.sequences


@AGGREGATIONS.register("seq-mean-token-sum-norm", source="Dr. GRPO (arXiv 2503.20783)")
def seq_mean_token_sum_norm(
    values: torch.Tensor, mask: torch.Tensor, den: LossDenominators, advantages=None
) -> torch.Tensor:
    """Dr. GRPO: token sums divided by a constant length, averaged over sequences.

    verl omits the mean over sequences (it divides a micro-batch's sum by the length only); that
    is the same direction scaled by the micro-batch size, which the learning rate absorbs.
    """
    return (values * mask).sum() / (den.sequences * den.norm_length)


@AGGREGATIONS.register("balanced", source="Balanced Aggregation; see docs/algorithms.md#balanced-aggregation")
def balanced(values: torch.Tensor, mask: torch.Tensor, den: LossDenominators, advantages: torch.Tensor) -> torch.Tensor:
    """A token mean over the positive-advantage tokens and one over the negative-advantage
    tokens, weighted by the share of sequences on each side: w+ mean+ + w- mean-, with
    w+ = S+ / (S+ + S-) for S+ sequences holding a positive-advantage token (S- likewise).
    Neither side's many or long sequences drown the other. Zero-advantage tokens weigh nothing.
    """
    sides = den.positive_sequences + den.negative_sequences
    if sides == 0:
        return (values * 0.0).sum()  # no token with an advantage: nothing to learn, a zero with a graph
    positive = (values * mask * (advantages > 0)).sum() / den.positive_tokens
    negative = (values * mask * (advantages < 0)).sum() / den.negative_tokens
    return (den.positive_sequences * positive + den.negative_sequences * negative) / sides
