"""What a training step learns from: D3S sample selection and token selection.

Runs after the advantages and before the update. Sample selection drops rollouts (D3S keeps the
subset with maximal advantage variance, advantages not re-normalised, docs/algorithms.md#d3s-sample-level);
token selection sets `batch.loss_mask`, and the learner then runs its LM head and loss on the
kept tokens only. Random selectors draw from a generator seeded by (seed, step), so a resumed
run selects exactly what the uninterrupted one did.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.token_selection import (TOKEN_SELECTORS, TokenStats, d3s_sample_mask, d3s_schedule,
                                               quadrant_shares)
from efficient_rl.config import Recipe

STATISTIC_FREE = ("all", "random")  # selectors that need no entropy pass


class Selection:
    def __init__(self, recipe: Recipe, vocab_size: int):
        self.alg, self.seed, self.steps, self.vocab_size = recipe.algorithm, recipe.seed, recipe.steps, vocab_size
        self.distillation = recipe.algorithm.objective == "distillation"
        self.select_tokens = TOKEN_SELECTORS.get(self.alg.token_selection)

    @property
    def active(self) -> bool:
        return self.alg.sample_selection != "none" or self.alg.token_selection != "all"

    def __call__(self, batch: RolloutBatch, learner, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        generated_tokens = float(batch.response_mask.sum())
        rollouts, keep_fraction = d3s_schedule((step - 1) / max(self.steps - 1, 1), *self.alg.d3s_rollouts,
                                               *self.alg.d3s_token_fraction)
        metrics = {}
        if self.alg.sample_selection == "d3s":
            keep = d3s_sample_mask(rollout_advantages(batch), batch.group_ids, rollouts, self.alg.d3s_scope)
            metrics["d3s/kept_rollouts"] = float(keep.sum())
            batch = batch.select(keep.nonzero()[:, 0])
        params = dict(self.alg.token_selection_params)
        if self.alg.token_selection == "d3s_tokens":
            params["keep_fraction"] = keep_fraction
            metrics["d3s/token_fraction"] = keep_fraction
        if self.alg.token_selection != "all":
            stats, stat_metrics = self.token_statistics(batch, learner)
            metrics.update(stat_metrics)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            batch.loss_mask = self.select_tokens(stats, generator=generator, **params).float()
        trained = batch.loss_mask if batch.loss_mask is not None else batch.response_mask
        metrics["tokens/kept_fraction"] = float(trained.sum()) / max(generated_tokens, 1.0)
        return batch, metrics

    def token_statistics(self, batch: RolloutBatch, learner) -> tuple[TokenStats, dict[str, float]]:
        """What the selector ranks by: nothing, the policy's entropy, or with distillation TIP's
        axes (entropy and the divergence from the teacher), whose quadrant shares are logged."""
        stats = TokenStats(mask=batch.response_mask, advantages=batch.advantages, group_ids=batch.group_ids,
                           vocab_size=self.vocab_size)
        if self.alg.token_selection in STATISTIC_FREE:
            return stats, {}
        if not self.distillation:
            stats.entropy = learner.token_entropy(batch)
            return stats, {}
        axes = learner.distill_stats(batch)
        stats.entropy, stats.reverse_kl, stats.forward_kl = axes["entropy"], axes["reverse_kl"], axes["forward_kl"]
        return stats, quadrant_shares(axes["entropy"], axes["reverse_kl"], batch.response_mask)


def rollout_advantages(batch: RolloutBatch) -> torch.Tensor:
    """[B] each rollout's mean token advantage (its outcome advantage for GRPO and DLER)."""
    return (batch.advantages * batch.response_mask).sum(-1) / batch.response_mask.sum(-1).clamp(min=1)
