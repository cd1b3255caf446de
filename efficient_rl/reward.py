"""Scoring rollouts with the recipe's weighted reward functions.

Resolution happens at recipe load, so a bad reward name fails before any work. A reward that
raises or returns a non-number gives that sample 0 *and* is counted in `reward/errors`, with the
first messages kept for the log: an error is never silently a zero.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch

from efficient_rl.config import ConfigError, RewardEntry

BUILTIN_REWARDS = {
    "math": "efficient_rl.rewards.math:math_reward",
}
MAX_KEPT_ERRORS = 5


def resolve_reward(name: str, where: str):
    reference = BUILTIN_REWARDS.get(name, name)
    if ":" not in reference:
        raise ConfigError(f"{where}: unknown reward {name!r}; built-in: {', '.join(sorted(BUILTIN_REWARDS))}, "
                          "or give module.path:function")
    module_name, function_name = reference.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{where}: cannot load reward {reference!r} ({err})") from None
    if not callable(function):
        raise ConfigError(f"{where}: {reference!r} is not a function")
    return function


@dataclass
class RewardResult:
    scores: torch.Tensor  # [B] weighted sum of the reward functions
    accuracy: torch.Tensor | None  # [B] from rewards that report "accuracy"
    extras: dict[str, list[float]] = field(default_factory=dict)  # other per-sample metrics
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


class RewardRunner:
    def __init__(self, entries: list[RewardEntry]):
        if not entries:
            raise ConfigError("reward: expected at least one reward entry")
        self.entries = entries
        self.functions = [resolve_reward(e.name, f"reward[{i}].name") for i, e in enumerate(entries)]

    def score(self, completions: list[str], samples: list[dict]) -> RewardResult:
        result = RewardResult(scores=torch.zeros(len(completions)), accuracy=None)
        for entry, function in zip(self.entries, self.functions):
            for row, (completion, sample) in enumerate(zip(completions, samples)):
                value = self._call(entry, function, completion, sample, result)
                result.scores[row] += entry.weight * value.pop("score", 0.0)
                if "accuracy" in value:  # a row is correct if a reward reporting accuracy says so
                    if result.accuracy is None:
                        result.accuracy = torch.zeros(len(completions))
                    result.accuracy[row] = max(float(result.accuracy[row]), value.pop("accuracy"))
                for key, metric in value.items():
                    result.extras.setdefault(f"{entry.name}/{key}", [0.0] * len(completions))[row] = metric
        return result

    @staticmethod
    def _call(entry: RewardEntry, function, completion: str, sample: dict, result: RewardResult) -> dict:
        try:
            value = function(completion, sample, **entry.params)
            value = value if isinstance(value, dict) else {"score": value}
            numbers = {k: float(v) for k, v in value.items()}
            if not all(math.isfinite(v) for v in numbers.values()):
                raise ValueError(f"returned a non-finite value {value}")
            return numbers
        except Exception as err:  # a reward bug must not kill training, and must not hide
            result.errors += 1
            if len(result.error_messages) < MAX_KEPT_ERRORS:
                result.error_messages.append(f"{entry.name}: {type(err).__name__}: {err}")
            return {"score": 0.0}
