"""What a training step learns from: sample selection, then token selection.

Runs after the advantages and before the update. The sample selector (algorithm.sample_selection)
drops rollouts (D3S keeps the subset with maximal advantage variance, advantages not
re-normalised: docs/algorithms.md#d3s); the token selector (algorithm.token_selection) sets
`batch.loss_mask`, and the learner then runs its LM head and loss on the kept tokens only. Each
is a registry entry with an identity default (every rollout, every token). The learner computes
the per-token statistics the token selector's entry needs, by name, in one call. Random selectors
draw from a generator seeded by (seed, step), so a resumed run selects exactly what the
uninterrupted one did.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import TOKEN_STATISTICS
from efficient_rl.algos.token_selection import TokenStats
from efficient_rl.config.plan import Plan


class Selection:
    def __init__(self, plan: Plan, vocab_size: int):
        self.seed, self.steps, self.vocab_size = plan.recipe.seed, plan.recipe.steps, vocab_size
        self.samples = plan["algorithm.sample_selection"]
        self.tokens = plan["algorithm.token_selection"]
        self.statistics = tuple(name for name in self.tokens.needs if name in TOKEN_STATISTICS)

    def __call__(self, batch: RolloutBatch, learner, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        progress = (step - 1) / max(self.steps - 1, 1)
        generated_tokens = float(batch.response_mask.sum())
        keep = self.samples(rollout_advantages(batch), batch.group_ids, progress=progress)
        metrics = {"selection/kept_rollouts": float(keep.sum())}
        if not keep.all():
            batch = batch.select(keep.nonzero()[:, 0])
        stats = TokenStats(
            mask=batch.sampled_mask, advantages=batch.advantages, vocab_size=self.vocab_size, progress=progress
        )
        if self.statistics:
            stats.statistics = learner.token_statistics(batch, self.statistics)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        kept = self.tokens(stats, generator=generator)
        # A selection that keeps every token is no selection: the learner takes its full path. Tokens
        # the engine wrote (budget forcing) are never sampled, so never kept.
        batch.loss_mask = None if bool((kept == (batch.response_mask > 0)).all()) else kept.float()
        metrics.update(self.tokens.metrics(stats))
        trained = batch.loss_mask if batch.loss_mask is not None else batch.response_mask
        metrics["tokens/kept_fraction"] = float(trained.sum()) / max(generated_tokens, 1.0)
        return batch, metrics


def rollout_advantages(batch: RolloutBatch) -> torch.Tensor:
    """[B] each rollout's mean token advantage (its outcome advantage for GRPO and DLER)."""
    return (batch.advantages * batch.response_mask).sum(-1) / batch.response_mask.sum(-1).clamp(min=1)
