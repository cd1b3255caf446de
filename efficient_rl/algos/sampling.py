"""Sample-level filters over groups of rollouts (DAPO / DLER dynamic sampling, docs/algorithms.md#dynamic-sampling)."""

from __future__ import annotations

import torch

from efficient_rl.algos.advantages import group_stats
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.registry import Registry

# algorithm.dynamic_sampling_metric: name -> fn(batch) -> [B], the value whose spread a group needs
FILTER_METRICS: Registry = Registry("dynamic sampling metric")


@FILTER_METRICS.register("score", source="DLER's official code: the verifier score before the length penalty")
def filter_on_score(batch: RolloutBatch) -> torch.Tensor:
    return batch.scores


@FILTER_METRICS.register("reward", source="the reward after length shaping")
def filter_on_reward(batch: RolloutBatch) -> torch.Tensor:
    return batch.rewards


@FILTER_METRICS.register("accuracy", source="DAPO (arXiv 2503.14476): filter_groups metric acc")
def filter_on_accuracy(batch: RolloutBatch) -> torch.Tensor:
    return batch.accuracy if batch.accuracy is not None else (batch.scores > 0).float()


def groups_with_spread(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row's group has non-zero spread in `values`, or is a group of one.

    Groups whose rollouts all scored the same carry no GRPO signal (their advantage is zero);
    dynamic sampling drops them and generates more prompts.
    """
    _, std, size = group_stats(values, group_ids)
    return (std > 0) | (size == 1)
