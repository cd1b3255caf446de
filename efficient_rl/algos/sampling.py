"""Sample-level filters over groups of rollouts (DAPO / DLER dynamic sampling, docs/algorithms.md#dynamic-sampling)."""

from __future__ import annotations

import torch

from efficient_rl.algos.advantages import group_stats


def groups_with_spread(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row's group has non-zero spread in `values`, or is a group of one.

    Groups whose rollouts all scored the same carry no GRPO signal (their advantage is zero);
    dynamic sampling drops them and generates more prompts.
    """
    _, std, size = group_stats(values, group_ids)
    return (std > 0) | (size == 1)
