"""What scores a recipe's weighted rewards can add up to, checked at load against what its length
penalty needs (docs/algorithms.md#what-a-length-penalty-promises).

A reward function says what it can score with two attributes: `score_range = (low, high)`, and
`binary_score`, True when it only ever returns `low` or `high` (or fn(params) -> bool, when a
parameter decides: the code reward's all_or_nothing). The built-in rewards declare both. An
undeclared reward is taken at its weight's sign: the check refuses what it can prove, and the
penalty checks each round's actual scores at run time (algos/shaping.py `promises`).
"""

from __future__ import annotations

from dataclasses import dataclass

from efficient_rl.algos.shaping import SCORE_NEEDS, promise_of
from efficient_rl.config.schema import RewardEntry
from efficient_rl.errors import ConfigError
from efficient_rl.registry import Bound
from efficient_rl.scoring.plugins import load_reward


@dataclass(frozen=True)
class WeightedReward:
    """One reward entry with a nonzero weight: where it is in the recipe and what it can score."""

    where: str  # "reward[1] (code)"
    weight: float
    score_range: tuple[float, float] | None  # None: the function does not say
    binary: bool

    def weighted_range(self) -> tuple[float, float] | None:
        if self.score_range is None:
            return None
        ends = [self.weight * end for end in self.score_range]
        return min(ends), max(ends)


def weighted_rewards(entries: list[RewardEntry]) -> list[WeightedReward]:
    """The entries that add to the score (weight 0 logs metrics only), with their declarations."""
    rewards = []
    for index, entry in enumerate(entries):
        if entry.weight == 0:
            continue
        function = load_reward(entry.name)
        declared = getattr(function, "score_range", None)
        binary = getattr(function, "binary_score", False)
        rewards.append(
            WeightedReward(
                where=f"reward[{index}] ({entry.name})",
                weight=entry.weight,
                score_range=tuple(float(end) for end in declared) if declared is not None else None,
                binary=bool(binary(entry.params) if callable(binary) else binary),
            )
        )
    return rewards


def negative_score(rewards: list[WeightedReward]) -> str | None:
    """Which reward can make a score negative: a declared range below 0 after its weight, or an
    undeclared reward under a negative weight."""
    for reward in rewards:
        weighted = reward.weighted_range()
        if weighted is None and reward.weight < 0:
            return f"{reward.where} has weight {reward.weight:g}"
        if weighted is not None and weighted[0] < 0:
            low, high = reward.score_range
            return f"{reward.where} can score {weighted[0]:g} (weight {reward.weight:g} times [{low:g}, {high:g}])"
    return None


def non_binary_score(rewards: list[WeightedReward]) -> str | None:
    """Why the scores are not 0 for a wrong answer and one positive value for a correct one."""
    if not rewards:
        return "every reward has weight 0"
    if len(rewards) > 1:
        return f"{' and '.join(reward.where for reward in rewards)} add up to more than two values"
    (reward,) = rewards
    weighted = reward.weighted_range()
    if weighted is None:
        return f"{reward.where} declares no score_range"
    if not reward.binary:
        return f"{reward.where} gives partial credit (scores in [{reward.score_range[0]:g}, {reward.score_range[1]:g}])"
    if weighted[0] != 0 or weighted[1] <= 0:
        return f"{reward.where} scores {weighted[0]:g} or {weighted[1]:g}, not 0 or a positive value"
    return None


# SCORE_NEEDS name -> fn(weighted rewards) -> what breaks the need, or None.
SCORE_PROBLEMS = {"any": lambda rewards: None, "non_negative": negative_score, "binary": non_binary_score}


def check_scores_fit_penalty(penalty: Bound, entries: list[RewardEntry]) -> None:
    """ConfigError, in one line naming both fields, when the recipe's rewards can produce scores
    its length penalty does not keep its promises for."""
    need = promise_of(penalty.entry).scores
    problem = SCORE_PROBLEMS[need](weighted_rewards(entries))
    if problem:
        raise ConfigError(
            f"algorithm.length_penalty: {penalty.name} needs {SCORE_NEEDS[need][0]}, but {problem}; "
            "change `reward` or pick another length penalty"
        )
