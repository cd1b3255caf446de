"""Advantage estimators: (batch, hyperparameters) -> [B, R] per-token advantages.

Formulas and defaults: docs/algorithms.md#grpo, docs/algorithms.md#dr-grpo and
docs/algorithms.md#dler-advantage. TEMPO (docs/algorithms.md#tempo) is in tempo.py, registered when
the efficient_rl.algos package is imported.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.registry import Registry

# name -> fn(batch, **params) -> [B, R] per-token advantages. An entry's `metrics` (batch -> {name:
# value}) are its diagnostics, logged every step.
ADVANTAGES: Registry = Registry("advantage estimator")


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std and size of the row's group (std is 0 for a group of one)."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    groups = int(group_index.max()) + 1 if len(values) else 0
    values = values.double()
    size = torch.zeros(groups, dtype=torch.double).index_add_(0, group_index, torch.ones_like(values))
    total = torch.zeros(groups, dtype=torch.double).index_add_(0, group_index, values)
    mean = total / size
    squares = torch.zeros(groups, dtype=torch.double).index_add_(0, group_index, (values - mean[group_index]) ** 2)
    std = torch.where(size > 1, (squares / (size - 1).clamp(min=1)).sqrt(), torch.zeros_like(size))
    return mean[group_index].float(), std[group_index].float(), size[group_index].float()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased variance over the masked entries."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    var = (((values - mean) ** 2) * mask).sum() / count
    var = var * count / (count - 1).clamp(min=1)  # Bessel's correction, as verl's masked_whiten
    return (values - mean) * torch.rsqrt(var + eps)


@ADVANTAGES.register(
    "grpo",
    ranges={"eps": "(0, inf)"},
    source="GRPO (DeepSeekMath, arXiv 2402.03300); norm_by_std=false is Dr. GRPO (arXiv 2503.20783)",
)
def grpo_advantages(batch: RolloutBatch, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_group(r)) / (std_group(r) + eps), the same for every token of i.

    norm_by_std=False is Dr. GRPO's unnormalised form A_i = r_i - mean_group(r).
    """
    mean, std, _ = group_stats(batch.rewards, batch.group_ids)
    adv = batch.rewards - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv[:, None] * batch.response_mask


@ADVANTAGES.register(
    "dler", ranges={"eps": "(0, inf)"}, source="DLER (arXiv 2510.15110) Eq. 3; verl's reinforce_plus_plus_baseline"
)
def dler_advantages(batch: RolloutBatch, *, eps: float = 1e-8) -> torch.Tensor:
    """DLER batch-wise normalisation (paper Eq. 3; verl's reinforce_plus_plus_baseline).

    Subtract the group mean (a group of one keeps its reward), broadcast to the response tokens,
    then whiten over every valid response token of the whole batch, so long responses weigh more
    in the batch mean and variance.
    """
    mean, _, size = group_stats(batch.rewards, batch.group_ids)
    centred = batch.rewards - torch.where(size > 1, mean, torch.zeros_like(mean))
    token_adv = centred[:, None] * batch.response_mask
    return masked_whiten(token_adv, batch.response_mask, eps) * batch.response_mask
