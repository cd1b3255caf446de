"""Which generated groups a step trains on (GRPO: all of them; DAPO / DLER dynamic sampling,
docs/algorithms.md#dynamic-sampling).

A group sampler (GROUP_SAMPLERS entry) is a small class whose fields are its parameters: the bound
entry, called, constructs it. The driver generates rounds of prompts, keeps the rows `keep(batch)`
marks, and stops once it holds enough groups or after `max_rounds` rounds (0 = no limit);
`metrics(rounds, kept, generated)` is logged every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from efficient_rl.algos.advantages import group_stats
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.registry import Registry, did_you_mean

# algorithm.sampling: name -> a class with keep(batch) -> [B] bool, max_rounds and metrics(rounds,
# kept, generated) -> {name: value}
GROUP_SAMPLERS: Registry = Registry("group sampler")

# The `metric` of dynamic sampling: name -> fn(batch) -> [B], the value whose spread a group needs
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


def group_count(batch: RolloutBatch) -> float:
    return float(batch.group_ids.unique().numel())


@GROUP_SAMPLERS.register("all", source="every generated group, one generation round per step (GRPO)")
@dataclass(frozen=True, kw_only=True)
class AllGroups:
    max_rounds: ClassVar[int] = 1  # one round holds the step's prompts

    def keep(self, batch: RolloutBatch) -> torch.Tensor:
        return torch.ones(len(batch), dtype=torch.bool)

    def metrics(self, rounds: int, kept: RolloutBatch, generated: RolloutBatch) -> dict[str, float]:
        return {}


def known_filter_metric(params, recipe) -> str | None:
    if params.metric not in FILTER_METRICS:
        return (
            f"metric: unknown {FILTER_METRICS.kind} {params.metric!r}"
            f"{did_you_mean(params.metric, FILTER_METRICS.names())}"
        )
    return None


@GROUP_SAMPLERS.register(
    "dynamic",
    ranges={"max_rounds": "[0, inf)"},
    check=known_filter_metric,
    source="DAPO (arXiv 2503.14476) dynamic sampling; DLER's code filters on the score",
)
@dataclass(frozen=True, kw_only=True)
class DynamicSampling:
    """Drop the groups whose `metric` (a FILTER_METRICS name: score | reward | accuracy) has zero
    spread and generate further rounds, until enough groups are kept or `max_rounds` rounds ran
    (0 = no limit)."""

    metric: str = "score"  # a str, not a Literal: a plugin may register more FILTER_METRICS
    max_rounds: int = 4

    def keep(self, batch: RolloutBatch) -> torch.Tensor:
        return groups_with_spread(FILTER_METRICS.get(self.metric)(batch), batch.group_ids)

    def metrics(self, rounds: int, kept: RolloutBatch, generated: RolloutBatch) -> dict[str, float]:
        return {
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/kept_groups": group_count(kept),
            "dynamic_sampling/generated_groups": group_count(generated),
        }
