"""Length shaping of sequence rewards: the length penalty interface, DLER's truncation penalty,
difficulty-aware truncation lengths (DA-DLER) and DAPO overlong shaping.

A length penalty (LENGTH_SHAPERS entry) reads one `ShapingInputs` (the round's rollouts: scores,
lengths, truncation, the cap in force, correctness, groups, samples and the training progress)
and returns the [B] rewards. The efficient-reasoning penalties (L1, ThinkPrune, Kimi, Arora &
Zanette, LASER, cosine) are in length_rewards.py, registered when efficient_rl.algos is imported.

References: docs/algorithms.md#length-penalty-interface, docs/algorithms.md#dler-truncation (the
paper's rule vs verl-dler's 0.1 multiplier), docs/algorithms.md#difficulty-aware-dler and
docs/algorithms.md#dapo-overlong-shaping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from efficient_rl.registry import Registry

# name -> fn(inputs: ShapingInputs, **params) -> [B] rewards; its `metrics`, fn(inputs, **params)
# -> {name: value}, are logged every step. An entry that reads inputs.length_cap needs
# "length_cap" (DA-DLER's per-prompt caps apply to it); one that reads a sample field needs
# "sample.<field>" (checked on every training sample at load).
LENGTH_SHAPERS: Registry = Registry("length penalty")


@dataclass
class ShapingInputs:
    """What a length penalty reads: [B] tensors over the rollouts of one generation round."""

    scores: torch.Tensor  # float, the verifier's score before shaping
    lengths: torch.Tensor  # long, response tokens (EOS included)
    truncated: torch.Tensor  # bool, cut by the engine's generation limit
    length_cap: torch.Tensor  # long, the truncation length in force (per prompt under DA-DLER)
    correct: torch.Tensor  # float, 1.0 where the verifier accepted the answer
    group_ids: torch.Tensor  # long, rollouts of one prompt share an id
    samples: list[dict] = field(default_factory=list)  # the data sample each rollout answers
    progress: float = 0.0  # training progress p in [0, 1]: (step - 1) / (steps - 1)

    def over_cap(self) -> torch.Tensor:
        return over_cap(self.lengths, self.truncated, self.length_cap)

    def sample_values(self, name: str, entry: str) -> torch.Tensor:
        """[B] float: each rollout's sample field `name` (a per-sample target length, ...)."""
        try:
            return torch.tensor([float(sample[name]) for sample in self.samples], dtype=torch.float64)
        except KeyError:
            raise ValueError(f"length penalty {entry!r} reads the sample field {name!r}, which a sample lacks") from None


def over_cap(lengths: torch.Tensor, truncated: torch.Tensor, length_cap: torch.Tensor) -> torch.Tensor:
    """Rollouts that exceed the truncation length in force: cut by the engine, or longer than cap."""
    return truncated | (lengths > length_cap)


@LENGTH_SHAPERS.register("none", source="no length shaping: the reward is the score")
def no_length_penalty(inputs: ShapingInputs) -> torch.Tensor:
    return inputs.scores.clone()


@LENGTH_SHAPERS.register("truncation", needs=("length_cap",), ranges={"not_stopped_coef": "[0, 1]"},
                         source="DLER (arXiv 2510.15110) §3.4; mode=code is verl-dler's reward manager")
def truncation_penalty(inputs: ShapingInputs, *, mode: Literal["paper", "code"] = "paper",
                       not_stopped_coef: float = 0.1) -> torch.Tensor:
    """DLER: a rollout over its truncation length gets reward 0 (mode="paper").

    mode="code" is the official verl-dler behaviour: the reward of any rollout that did not stop
    by itself (engine finish reason != stop) is multiplied by `not_stopped_coef` (0.1), so a
    truncated response that still holds a correct answer keeps 0.1 of its reward. With a cap
    below the generation limit (DA-DLER tiers) "did not stop by itself" means "not within the cap".
    """
    scores = inputs.scores
    return torch.where(inputs.over_cap(), scores * (not_stopped_coef if mode == "code" else 0.0), scores)


@LENGTH_SHAPERS.register("overlong", needs=("length_cap",), ranges={"buffer": "[1, inf)", "factor": "[0, inf)"},
                         source="DAPO (arXiv 2503.14476) soft overlong punishment")
def overlong_shaping(inputs: ShapingInputs, *, buffer: int = 4096, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment with L_max = the cap in force and L_cache = `buffer`.

    0 up to L_max - L_cache, then a linear ramp down to -factor at L_max, and -factor beyond.
    """
    expected = inputs.length_cap - buffer
    penalty = -((inputs.lengths - expected).clamp(min=0).float() / buffer * factor).clamp(max=factor)
    return inputs.scores + penalty


# ---------------------------------------------------------------- DA-DLER
def difficulty_tiers(correct: torch.Tensor, group_ids: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """[B] tier of each rollout's prompt: how many thresholds its group's correctness ratio
    reaches (ratio >= threshold), so with the paper's one threshold at 0.5 a prompt with half its
    rollouts correct is tier 1, "easy". The ratio comes from the same rollouts being shaped."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    groups = int(group_index.max()) + 1
    size = torch.zeros(groups).index_add_(0, group_index, torch.ones(len(correct)))
    hits = torch.zeros(groups).index_add_(0, group_index, correct.float())
    ratio = (hits / size)[group_index]
    return torch.bucketize(ratio, torch.tensor(thresholds, dtype=ratio.dtype), right=True)


def difficulty_caps(correct: torch.Tensor, group_ids: torch.Tensor, thresholds: list[float],
                    lengths: list[int]) -> torch.Tensor:
    """[B] truncation length per rollout: lengths[tier] (paper: 4000 below ratio 0.5, 2000 above)."""
    return torch.tensor(lengths, dtype=torch.long)[difficulty_tiers(correct, group_ids, thresholds)]


def fixed_caps(correct: torch.Tensor, group_ids: torch.Tensor, length: int) -> torch.Tensor:
    """[B] the one truncation length of plain DLER for every rollout."""
    return torch.full((len(correct),), length, dtype=torch.long)


def tier_metrics(correct: torch.Tensor, group_ids: torch.Tensor, lengths: torch.Tensor, over: torch.Tensor,
                 thresholds: list[float]) -> dict[str, float]:
    """Per DA-DLER tier: its share of the prompts, and its rollouts' mean length, accuracy and
    share over the tier's cap (NaN for a tier without prompts this step)."""
    tiers = difficulty_tiers(correct, group_ids, thresholds)
    metrics = {}
    for tier in range(len(thresholds) + 1):
        rows = tiers == tier
        metrics.update({f"difficulty/tier{tier}/prompt_share": float(rows.float().mean()),
                        f"difficulty/tier{tier}/response_length": mean_over(lengths, rows),
                        f"difficulty/tier{tier}/accuracy": mean_over(correct, rows),
                        f"difficulty/tier{tier}/over_cap": mean_over(over, rows)})
    return metrics


def mean_over(values: torch.Tensor, rows: torch.Tensor) -> float:
    return float(values[rows].float().mean()) if rows.any() else math.nan
