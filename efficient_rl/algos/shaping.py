"""Length shaping of sequence rewards: DLER truncation penalty and DAPO overlong shaping.

References: ALGORITHMS.md §1.1 (truncation; paper rule vs verl-dler's 0.1 multiplier) and §5.1
(DAPO overlong reward shaping).
"""

from __future__ import annotations

import torch

from efficient_rl.registry import Registry

LENGTH_SHAPERS: Registry = Registry("length penalty")


def over_cap(lengths: torch.Tensor, truncated: torch.Tensor, length_cap: torch.Tensor) -> torch.Tensor:
    """Rollouts that exceed the truncation length in force: cut by the engine, or longer than cap."""
    return truncated | (lengths > length_cap)


@LENGTH_SHAPERS.register("none")
def no_length_penalty(scores, lengths, truncated, length_cap) -> torch.Tensor:
    return scores.clone()


@LENGTH_SHAPERS.register("truncation")
def truncation_penalty(scores, lengths, truncated, length_cap, *, mode: str = "paper",
                       not_stopped_coef: float = 0.1) -> torch.Tensor:
    """DLER: a rollout over its truncation length gets reward 0 (mode="paper").

    mode="code" is the official verl-dler behaviour: the reward of any rollout that did not stop
    by itself (engine finish reason != stop) is multiplied by `not_stopped_coef` (0.1), so a
    truncated response that still holds a correct answer keeps 0.1 of its reward.
    """
    if mode == "paper":
        return torch.where(over_cap(lengths, truncated, length_cap), torch.zeros_like(scores), scores)
    if mode == "code":
        return torch.where(truncated, scores * not_stopped_coef, scores)
    raise ValueError(f"truncation mode: expected 'paper' or 'code', got {mode!r}")


@LENGTH_SHAPERS.register("overlong")
def overlong_shaping(scores, lengths, truncated, length_cap, *, buffer: int = 4096,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment with L_max = the cap in force and L_cache = `buffer`.

    0 up to L_max - L_cache, then a linear ramp down to -factor at L_max, and -factor beyond.
    """
    expected = length_cap - buffer
    penalty = -((lengths - expected).clamp(min=0).float() / buffer * factor).clamp(max=factor)
    return scores + penalty
