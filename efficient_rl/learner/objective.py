"""The training objective shared by every learner backend: model outputs -> scalar loss + stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import DIVERGENCES, map_row_chunks
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
    # With a token selection (batch.loss_mask): "kept" averages the loss over the kept tokens,
    # "all" over every response token (unselected ones count as zero loss, as masking does).
    loss_denominator: str = "kept"
    # algorithm.objective: distillation (ALGORITHMS.md §4): per-token divergence from a teacher
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


def sequence_inputs(rows: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input ids, attention mask and position ids for prompt + response."""
    input_ids = torch.cat([rows.prompt_ids, rows.response_ids], 1)
    attention_mask = torch.cat([rows.prompt_mask, rows.response_mask.long()], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logprobs(model, rows: RolloutBatch, temperature: float, with_entropy: bool = True,
                      selected: torch.Tensor | None = None):
    """Log-probs of the response tokens (and per-token entropy) under `model`, both [B, R].

    With `selected` ([B, R] bool), the transformer body still runs on the full sequences, but the
    LM head, log-softmax and entropy only on the selected positions: [B, R, V] logits never exist,
    which is where a large vocabulary's memory and time go. Other positions are 0 (and carry no
    gradient), exactly what full compute followed by masking would give the loss.
    """
    if selected is not None:
        return selected_logprobs(model, rows, temperature, with_entropy, selected.bool())
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    # Logits at position p predict token p + 1: keep the last R + 1 positions, drop the final one.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=width + 1).logits[:, :-1].float()
    return token_logprobs_and_entropy(scaled(logits, temperature), rows.response_ids, with_entropy)


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits over the sampling temperature, as the engine sampled (no [.., V] copy at 1.0)."""
    return logits if temperature == 1.0 else logits / temperature


def output_head(model) -> torch.nn.Module:
    """The LM head of a Hugging Face model, or of the one a DeepSpeed engine wraps."""
    return getattr(model, "module", model).get_output_embeddings()


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] log-softmax over the vocabulary for N hidden states, at the sampling temperature."""
    return torch.log_softmax(scaled(head(hidden).float(), temperature), -1)


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool):
    """log p(token) and the entropy of each row of `logits` ([..., V]; tokens [...])."""
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, tokens[..., None])[..., 0]
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a statistic, not a loss term: no [.., V] tensors kept for backward
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def response_hidden_states(model, rows: RolloutBatch) -> torch.Tensor:
    """[B, R, H] final hidden states at the positions that predict each response token."""
    network = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    hidden = network.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state
    return hidden[:, -(width + 1):-1]


def selected_logprobs(model, rows: RolloutBatch, temperature: float, with_entropy: bool, selected: torch.Tensor):
    head = output_head(model)
    hidden = response_hidden_states(model, rows)[selected]  # [K, H]: gathered before the head
    logits = scaled(head(hidden).float(), temperature)
    picked_logprobs, picked_entropy = token_logprobs_and_entropy(logits, rows.response_ids[selected], with_entropy)
    return scatter_selected(picked_logprobs, selected), (
        scatter_selected(picked_entropy, selected) if with_entropy else None)


def scatter_selected(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[K] values back into a [B, R] tensor of zeros at the selected positions (differentiable)."""
    return torch.zeros(selected.shape, dtype=values.dtype, device=values.device).masked_scatter(selected, values)


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
