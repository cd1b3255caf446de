"""The training objective shared by every learner backend: model outputs -> scalar loss + stats.

An objective is an entry of OBJECTIVES (algorithm.objective): `policy_gradient` (a policy loss
from algos/losses.py, aggregated, plus the KL term) or `distillation` (a per-token divergence from
a teacher). Each takes (model, micro-batch rows, settings, mini-batch denominators, teacher) and
returns the micro-batch's loss, scaled so micro-batch losses add up to the mini-batch loss, and
statistics summed over its loss tokens (sums add up across micro-batches and processes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import DIVERGENCES, map_row_chunks
from efficient_rl.algos.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    LossDenominators,
    LossInputs,
)
from efficient_rl.config.plan import Plan
from efficient_rl.config.schema import AlgorithmSection, DistillSection, LearnerSection, RolloutSection
from efficient_rl.models.fused_head import HeadTiles
from efficient_rl.models.modeling import (
    WHOLE_VOCABULARY,
    Support,
    output_head,
    response_hidden_states,
    response_logprobs,
    scaled,
    scatter_selected,
)
from efficient_rl.registry import Bound, Registry

# name -> fn(model, rows, settings, den, teacher, **params) -> (loss, {statistic: sum over loss tokens}).
# Needs: "old_logprobs" (the learner computes the pre-update log-probs when a batch takes several
# optimizer steps), "teacher" (a distillation teacher).
OBJECTIVES: Registry = Registry("objective")


def recipe_default(registry: Registry, name: str):
    """A default factory: the entry the recipe's AlgorithmSection.<name> picks by default, with the
    entry's own defaults (the schema names the entry, the signature holds its defaults)."""
    return lambda: registry.get(getattr(AlgorithmSection(), name).name).bind()


@dataclass(frozen=True)
class ObjectiveSettings:
    """The recipe's objective, its loss pieces bound once (entries with their parameters)."""

    # Each defaults to the recipe's default entry with that entry's defaults, as a recipe does.
    objective: Bound = field(default_factory=recipe_default(OBJECTIVES, "objective"))
    policy_loss: Bound = field(default_factory=recipe_default(POLICY_LOSSES, "policy_loss"))
    aggregation: Bound = field(default_factory=recipe_default(AGGREGATIONS, "loss_agg"))
    kl_estimator: Bound = field(default_factory=recipe_default(KL_ESTIMATORS, "kl_estimator"))
    rollout_correction: Bound = field(default_factory=recipe_default(ROLLOUT_CORRECTIONS, "rollout_correction"))
    # The rest default to the recipe's own defaults (config.py), where they are documented.
    kl_coef: float = AlgorithmSection.kl_coef
    norm_length: int = RolloutSection.max_response_length  # constant of seq-mean-token-sum-norm
    temperature: float = RolloutSection.temperature  # logits are divided by it, as in the engine
    loss_denominator: str = AlgorithmSection.loss_denominator
    chunk_rows: int = DistillSection.chunk_rows
    # The LM head runs on the loss tokens only, through the fused head. whole_model: the model is
    # called through its own forward, the head inside it (ZeRO-3's weight gathering needs it).
    whole_model: bool = False
    head_tiles: HeadTiles = HeadTiles()  # the fused head's tile sizes (learner.head_*_tile)
    packing: bool = LearnerSection.packing
    support: Support = WHOLE_VOCABULARY  # the tokens the engine sampled from (rollout.top_k, top_p)

    @property
    def needs(self) -> tuple[str, ...]:
        return self.objective.needs


def objective_settings(plan: Plan) -> ObjectiveSettings:
    recipe = plan.recipe
    alg = recipe.algorithm
    return ObjectiveSettings(
        objective=plan["algorithm.objective"],
        policy_loss=plan["algorithm.policy_loss"],
        aggregation=plan["algorithm.loss_agg"],
        kl_estimator=plan["algorithm.kl_estimator"],
        rollout_correction=plan["algorithm.rollout_correction"],
        kl_coef=alg.kl_coef,
        norm_length=recipe.rollout.max_response_length,
        temperature=recipe.rollout.temperature,
        loss_denominator=alg.loss_denominator,
        chunk_rows=recipe.distill.chunk_rows,
        packing=recipe.learner.packing,
        support=Support(recipe.rollout.top_k, recipe.rollout.top_p),
        head_tiles=HeadTiles(recipe.learner.head_token_tile, recipe.learner.head_vocab_tile),
    )


def called_whole(settings: ObjectiveSettings) -> ObjectiveSettings:
    return dataclasses.replace(settings, whole_model=True)


def policy_logprobs(model, rows: RolloutBatch, settings: ObjectiveSettings, with_entropy: bool = True):
    """The policy's log-probs (and entropies) of `rows`' response tokens, [B, R] each: the LM head
    runs on the loss tokens only (every response token when no token selection was made)."""
    return response_logprobs(
        model,
        rows,
        settings.temperature,
        with_entropy=with_entropy,
        selected=rows.loss_mask if rows.loss_mask is not None else rows.response_mask > 0,
        packed=settings.packing,
        support=settings.support,
        tiles=settings.head_tiles,
        whole_model=settings.whole_model,
    )


def loss_masks(rows: RolloutBatch, settings: ObjectiveSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens that enter the loss, tokens the aggregation averages over)."""
    selected = rows.loss_mask if rows.loss_mask is not None else rows.sampled_mask
    return selected, selected if settings.loss_denominator == "kept" else rows.sampled_mask


def denominators(mini: RolloutBatch, settings: ObjectiveSettings) -> LossDenominators:
    _, averaged_over = loss_masks(mini, settings)
    return LossDenominators.of(averaged_over, settings.norm_length, mini.advantages)


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] log-softmax over the vocabulary for N hidden states, at the sampling temperature."""
    return torch.log_softmax(scaled(head(hidden).float(), temperature), -1)


def loss_inputs(
    logprobs: torch.Tensor, rows: RolloutBatch, settings: ObjectiveSettings, den: LossDenominators
) -> LossInputs:
    selected, averaged_over = loss_masks(rows, settings)
    # One optimizer step per rollout batch: the rollout policy is the current one, so the old
    # log-probs are the current ones without gradient (ratio 1 with the right gradient).
    old = rows.old_logprobs if rows.old_logprobs is not None else logprobs.detach()
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=rows.advantages,
        mask=selected,
        averaged_over=averaged_over,
        den=den,
        rollout_logprobs=rows.rollout_logprobs,
    )


def policy_gradient_loss(
    logprobs: torch.Tensor, rows: RolloutBatch, settings: ObjectiveSettings, den: LossDenominators
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of one micro-batch from its log-probs: per token, times the rollout
    correction's weights, aggregated; plus kl_coef times the aggregated KL to the reference."""
    inputs = loss_inputs(logprobs, rows, settings, den)
    token = settings.policy_loss(inputs)
    token_loss = token.loss * inputs.mask * settings.rollout_correction(inputs)
    loss = aggregate(token_loss, inputs, settings)
    stats = {f"clip_ratio/{name}": (flags * inputs.mask).sum() for name, flags in token.indicators.items()}
    if settings.kl_coef > 0:
        kl = settings.kl_estimator(logprobs, rows.ref_logprobs) * inputs.mask
        loss = loss + settings.kl_coef * aggregate(kl, inputs, settings)
        stats["kl"] = kl.detach().sum()
    return loss, stats


def aggregate(values: torch.Tensor, inputs: LossInputs, settings: ObjectiveSettings) -> torch.Tensor:
    return settings.aggregation(values, inputs.averaged_over, inputs.den, inputs.advantages)


@OBJECTIVES.register("policy_gradient", needs=("old_logprobs",), source="docs/algorithms.md#policy-losses")
def policy_gradient(
    model, rows: RolloutBatch, settings: ObjectiveSettings, den: LossDenominators, teacher
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RL objective: with a token selection only the kept tokens reach the LM head."""
    logprobs, entropy = policy_logprobs(model, rows, settings)
    loss, stats = policy_gradient_loss(logprobs, rows, settings, den)
    tokens, _ = loss_masks(rows, settings)
    stats["entropy"] = (entropy.detach() * tokens).sum()
    engine_log_ratio = logprobs.detach() - rows.rollout_logprobs  # log pi_learner / pi_engine
    stats["rollout/logprob_diff"] = (engine_log_ratio.abs() * tokens).sum()
    stats.update(engine_ratio_statistics(engine_log_ratio, tokens, settings))
    return loss, stats


# The learner/engine ratio's spread, as counts in fixed bins of its log, so that it adds up over
# micro-batches and ranks like every other statistic: bins of 0.005 nats across [-0.5, 0.5] and one
# more on each side for the rest. ratio_quantiles reads them back as quantiles.
RATIO_BIN_NATS, RATIO_BINS, RATIO_BIN_PREFIX = 0.005, 200, "rollout/ratio_bin/"
RATIO_QUANTILES = {"rollout/ratio_p1": 0.01, "rollout/ratio_p50": 0.5, "rollout/ratio_p99": 0.99}


def engine_ratio_statistics(
    log_ratio: torch.Tensor, tokens: torch.Tensor, settings: ObjectiveSettings
) -> dict[str, torch.Tensor]:
    """Sums over the loss tokens: how many fall in each log-ratio bin, and how many lie outside the
    policy loss's clip band (0.2 either side where the loss has none)."""
    kept = (tokens > 0) & log_ratio.isfinite()  # a non-finite one is the skip logic's to report
    bins = (log_ratio[kept] / RATIO_BIN_NATS).floor().clamp(-RATIO_BINS // 2 - 1, RATIO_BINS // 2) + RATIO_BINS // 2 + 1
    counts = torch.bincount(bins.long(), minlength=RATIO_BINS + 2).to(log_ratio.dtype)
    low = getattr(settings.policy_loss.params, "clip_low", 0.2)
    high = getattr(settings.policy_loss.params, "clip_high", 0.2)
    ratio = log_ratio[kept].exp()
    return {
        **{f"{RATIO_BIN_PREFIX}{index}": count for index, count in enumerate(counts)},
        "rollout/ratio_outside_clip": ((ratio < 1.0 - low) | (ratio > 1.0 + high)).sum().to(log_ratio.dtype),
    }


def ratio_quantiles(means: dict[str, float]) -> dict[str, float]:
    """`means` with the bin shares replaced by the ratio's quantiles; none when nothing was counted."""
    shares = [means.pop(f"{RATIO_BIN_PREFIX}{index}", 0.0) for index in range(RATIO_BINS + 2)]
    total = sum(shares)
    if total <= 0:
        return means
    cumulative = [sum(shares[: index + 1]) / total for index in range(len(shares))]
    quantiles = {
        name: math.exp(bin_log_ratio(next(index for index, c in enumerate(cumulative) if c >= level - 1e-12)))
        for name, level in RATIO_QUANTILES.items()
    }
    return {**means, **quantiles}


def bin_log_ratio(index: int) -> float:
    """A bin's log-ratio: its middle, or for the two outer bins the edge of the binned range."""
    inner = min(max(index, 1), RATIO_BINS)
    middle = (inner - RATIO_BINS // 2 - 0.5) * RATIO_BIN_NATS
    return middle if index == inner else math.copysign(RATIO_BINS // 2 * RATIO_BIN_NATS, index - inner)


@OBJECTIVES.register(
    "distillation",
    needs=("teacher",),
    ranges={"beta": "(0, 1)"},
    source="on-policy distillation (Agarwal et al. 2024; Lu & Thinking Machines 2025), "
    "docs/algorithms.md#on-policy-distillation",
)
def distillation(
    model,
    rows: RolloutBatch,
    settings: ObjectiveSettings,
    den: LossDenominators,
    teacher,
    *,
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On-policy distillation loss of one micro-batch: the per-token divergence between the
    student's and the teacher's distributions over the full vocabulary (reverse KL by default,
    OPD Eq. 1; `beta` is the student's weight in jsd's mixture), aggregated like the policy loss.
    Only the selected positions reach either LM head, and they are processed `chunk_rows` at a
    time with recomputation in the backward, so the student's [K, V] log-probabilities never
    exist whole."""
    selected, averaged_over = loss_masks(rows, settings)
    kept = selected.bool()
    teacher_logprobs = teacher.logprobs(rows, kept).to(rows.response_mask.device)  # [K, V], no gradient
    head, token_divergence_of = output_head(model), DIVERGENCES.get(divergence)

    def chunk_divergence(hidden: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
        return token_divergence_of(head_logprobs(head, hidden, settings.temperature), teacher_chunk, beta)

    hidden = response_hidden_states(model, rows, settings.packing)[kept]
    token_divergence = scatter_selected(
        map_row_chunks(chunk_divergence, [hidden, teacher_logprobs], settings.chunk_rows), kept
    )
    loss = settings.aggregation(token_divergence, averaged_over, den, rows.advantages)
    return loss, {"distill/divergence": token_divergence.detach().sum()}
