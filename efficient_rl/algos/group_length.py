"""Length shaping measured against the group's own correct answers, as LENGTH_SHAPERS entries.

Rules, defaults, sources and the points where a choice had to be made are in docs/algorithms.md:
  * the correctness-gated brevity bonus (#brevity-bonus): a correct answer shorter than the
    group's mean correct length earns up to twice its score;
  * the robust length outlier penalty (#mad-outlier-penalty): a correct answer whose length is
    an outlier among the group's correct lengths by the Iglewicz-Hoaglin modified z-score loses a
    share of its score.
Either can be narrowed to some groups or rollouts by algorithm.length_gate (shaping.py).
"""

from __future__ import annotations

import torch

from efficient_rl.algos.length_rewards import group_index, group_reduce
from efficient_rl.algos.shaping import LENGTH_SHAPERS, ShapingInputs, carries_state, promises

# Iglewicz and Hoaglin's constant: 0.6745 = the 0.75 quantile of the standard normal, so that the
# modified z-score of normal data matches its ordinary z-score.
MAD_TO_Z = 0.6745


# --- correctness-gated brevity bonus -------------------------------------------------------------


def brevity_bonuses(inputs: ShapingInputs) -> torch.Tensor:
    """[B] float64: clamp(1 - len / mean correct len of the group, 0, 1) for a correct rollout,
    0 for a wrong one (and for every rollout of a group without a correct one)."""
    correct = (inputs.correct > 0).double()
    lengths = inputs.lengths.double()
    index, groups = group_index(inputs.group_ids)
    count = group_reduce(correct, index, groups, "sum")
    mean_correct = group_reduce(lengths * correct, index, groups, "sum") / count.clamp(min=1)
    bonus = (1.0 - lengths / mean_correct[index].clamp(min=1)).clamp(0.0, 1.0)
    return bonus * correct


def brevity_metrics(inputs: ShapingInputs) -> dict[str, float]:
    """The mean bonus over the correct rollouts (NaN for a round without one)."""
    correct = inputs.correct > 0
    bonus = brevity_bonuses(inputs)
    return {"brevity_bonus/mean_bonus": float(bonus[correct].mean()) if correct.any() else float("nan")}


@LENGTH_SHAPERS.register(
    "brevity_bonus",
    metrics=brevity_metrics,
    source="prime-rl PR #2265: correctness-gated efficiency shaping, applied before the group baseline",
)
@promises(scores="non_negative", correct_floor="score")  # a factor 1 + bonus would sink a negative score further
def brevity_bonus(inputs: ShapingInputs) -> torch.Tensor:
    """r = score * (1 + bonus * correct), bonus = clamp(1 - len / mean correct len, 0, 1): no
    parameter. A correct answer at or over the group's mean correct length keeps its score; a
    wrong one always does."""
    return (inputs.scores.double() * (1.0 + brevity_bonuses(inputs))).float()


# --- robust length outlier penalty ---------------------------------------------------------------


def median(values: torch.Tensor) -> torch.Tensor:
    """The median, the mean of the two middle values for an even count (torch.median takes the lower)."""
    ordered = values.sort().values
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def modified_z(lengths: torch.Tensor, min_relative_mad: float) -> torch.Tensor:
    """0.6745 * (x - median) / MAD over `lengths` (MAD the median absolute deviation); all 0 when
    there are fewer than two, or the MAD is 0 or below min_relative_mad of the median (lengths
    that nearly agree have no outliers)."""
    if len(lengths) < 2:
        return torch.zeros_like(lengths)
    centre = median(lengths)
    mad = median((lengths - centre).abs())
    if mad <= 0 or mad < min_relative_mad * centre:
        return torch.zeros_like(lengths)
    return MAD_TO_Z * (lengths - centre) / mad


def outliers(inputs: ShapingInputs, threshold: float, min_relative_mad: float) -> torch.Tensor:
    """[B] bool: correct rollouts whose modified z-score among their group's correct lengths is
    above `threshold` (long ones only: a short correct answer is never an outlier to punish)."""
    correct = inputs.correct > 0
    lengths = inputs.lengths.double()
    flagged = torch.zeros(len(lengths), dtype=torch.bool)
    for group in inputs.group_ids.unique():
        rows = ((inputs.group_ids == group) & correct).nonzero()[:, 0]
        flagged[rows] = modified_z(lengths[rows], min_relative_mad) > threshold
    return flagged


def outlier_metrics(
    inputs: ShapingInputs, *, threshold: float, penalty: float, min_relative_mad: float
) -> dict[str, float]:
    """The share of correct rollouts flagged (NaN for a round without one)."""
    correct = inputs.correct > 0
    flagged = outliers(inputs, threshold, min_relative_mad)
    return {"mad_outlier/flagged_share": float(flagged[correct].double().mean()) if correct.any() else float("nan")}


@LENGTH_SHAPERS.register(
    "mad_outlier",
    ranges={"threshold": "[0, inf)", "penalty": "[0, 1]", "min_relative_mad": "[0, inf)"},
    metrics=outlier_metrics,
    source="NeMo-RL PR #3852 length adjustments: Iglewicz-Hoaglin modified z-score outliers among passing rollouts",
)
@promises(scores="binary", correct_floor="zero")  # a cut correct answer could fall below a wrong one's partial credit
def mad_outlier(
    inputs: ShapingInputs, *, threshold: float = 3.5, penalty: float = 0.5, min_relative_mad: float = 0.015
) -> torch.Tensor:
    """r = score * (1 - penalty) for a correct rollout whose length's modified z-score among its
    group's correct lengths exceeds `threshold` (Iglewicz and Hoaglin's 3.5); else the score."""
    flagged = outliers(inputs, threshold, min_relative_mad)
    return torch.where(flagged, inputs.scores * (1.0 - penalty), inputs.scores)


# --- Short-RL's lazy length penalty --------------------------------------------------------------


def round_accuracy(inputs: ShapingInputs) -> float:
    return float((inputs.correct > 0).double().mean()) if len(inputs.correct) else 0.0


BEST_ACCURACY = "best_accuracy"  # the state's one entry: the best step accuracy of the run so far


def best_accuracy(inputs: ShapingInputs) -> float:
    """The best accuracy of an earlier step (0 before the first), carried across steps."""
    return float(inputs.state.get(BEST_ACCURACY, 0.0))


def lazy_initial(**params) -> dict:
    return {BEST_ACCURACY: 0.0}


def lazy_advance(state: dict, inputs: ShapingInputs, **params) -> dict:
    """The best accuracy with the step's: every rollout the step generated, all its rounds."""
    return {BEST_ACCURACY: max(float(state.get(BEST_ACCURACY, 0.0)), round_accuracy(inputs))}


def lazy_penalty_active(inputs: ShapingInputs, accuracy_tolerance: float) -> bool:
    """Training accuracy is "stable": this round's accuracy is within accuracy_tolerance of the
    best accuracy of the run so far, this round's included."""
    accuracy = round_accuracy(inputs)
    return accuracy >= max(best_accuracy(inputs), accuracy) - accuracy_tolerance


def lazy_length_rewards(inputs: ShapingInputs, length_tolerance: int) -> torch.Tensor:
    """[B] float64: for a correct rollout within length_tolerance tokens of its group's shortest
    correct length, 0.5; beyond it, 0.5 - (len - min) / (max - min + 1e-5), min and max over the
    group's correct lengths (Kimi's interpolation); 0 for a wrong rollout."""
    correct = inputs.correct > 0
    lengths = inputs.lengths.double()
    index, groups = group_index(inputs.group_ids)
    among_correct = torch.where(correct, lengths, torch.full_like(lengths, float("inf")))
    shortest = group_reduce(among_correct, index, groups, "amin")[index]
    longest = group_reduce(torch.where(correct, lengths, torch.zeros_like(lengths)), index, groups, "amax")[index]
    beyond = 0.5 - (lengths - shortest) / (longest - shortest + 1e-5)
    reward = torch.where(lengths > shortest + length_tolerance, beyond, torch.full_like(lengths, 0.5))
    return torch.where(correct, reward, torch.zeros_like(lengths))


def lazy_metrics(
    inputs: ShapingInputs, *, weight: float, length_tolerance: int, accuracy_tolerance: float
) -> dict[str, float]:
    """Whether the penalty was on for the step's rollouts, and the best round accuracy it compared with."""
    return {
        "short_rl/active": float(lazy_penalty_active(inputs, accuracy_tolerance)),
        "short_rl/best_accuracy": max(best_accuracy(inputs), round_accuracy(inputs)),
    }


@LENGTH_SHAPERS.register(
    "short_rl",
    ranges={"weight": "[0, inf)", "length_tolerance": "[0, inf)", "accuracy_tolerance": "[0, 1]"},
    metrics=lazy_metrics,
    source="Short-RL (arXiv 2505.12284): lazy length penalty; tolerances from lblankl/Short-RL's scripts",
)
@promises(  # a wrong answer keeps its score, a long correct one loses up to weight / 2
    scores="binary", correct_floor="cut", correct_cut=lambda params: params.weight / 2, wrong_kept=True
)
@carries_state(initial=lazy_initial, advance=lazy_advance)
def short_rl(
    inputs: ShapingInputs, *, weight: float = 1.0, length_tolerance: int = 200, accuracy_tolerance: float = 0.05
) -> torch.Tensor:
    """r = score + weight * lazy_length_rewards while this round's accuracy is within
    accuracy_tolerance of the best accuracy of the run (this round's included); else the score,
    for every rollout of the round."""
    if not lazy_penalty_active(inputs, accuracy_tolerance):
        return inputs.scores.clone()
    return (inputs.scores.double() + weight * lazy_length_rewards(inputs, length_tolerance)).float()
