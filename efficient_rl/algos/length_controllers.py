"""Length controllers of the 2026 wave, as LENGTH_SHAPERS entries.

  * DOT (#dot-dynamic-outlier-truncation): inside a group whose rollouts are all correct, a
    rollout far above the group's mean length (mean + k sample std, by a margin) is treated as
    truncated;
  * Leash (#leash): a one-sided penalty above a target length whose weight, a Lagrange
    multiplier, follows the batch's mean length by dual ascent: state carried across steps
    (algos/shaping.py `carries_state`);
  * the reference-profiled threshold (#reference-profiled-threshold): a penalty beyond mean + n
    std of a reference model's passing lengths for the prompt, joined on each sample at load.

Bare anchors above name headings of docs/algorithms.md, which holds the rules, defaults, sources
and the points where a choice had to be made.
"""

from __future__ import annotations

import math

import torch

from efficient_rl.algos.length_rewards import group_index, group_reduce
from efficient_rl.algos.sampling import GROUP_SAMPLERS
from efficient_rl.algos.shaping import LENGTH_SHAPERS, ShapingInputs, carries_state, promises, within_limit

# --- DOT: dynamic outlier truncation ---------------------------------------------------------------


def dot_outliers(inputs: ShapingInputs, k: float, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] rollouts treated as truncated, [B] rollouts in a group whose rollouts are all correct).

    The group's cutoff is floor(mean + k * std) of its lengths, std the sample standard deviation
    (n - 1; 0 for a group of one), computed afresh from every round's own rollouts; an outlier is
    at least `margin` tokens longer than the cutoff, as in the authors' code (U-rara/DOT)."""
    index, groups = group_index(inputs.group_ids)
    lengths = inputs.lengths.double()
    size = group_reduce(torch.ones_like(lengths), index, groups, "sum")
    hits = group_reduce((inputs.correct > 0).double(), index, groups, "sum")
    solved = (hits == size)[index]
    mean = group_reduce(lengths, index, groups, "sum") / size
    squares = group_reduce((lengths - mean[index]) ** 2, index, groups, "sum")
    spread = (squares / (size - 1).clamp(min=1)).sqrt()
    cutoff = torch.floor(mean + k * spread)[index]
    return solved & (lengths - cutoff >= margin), solved


def dot_check(params, recipe) -> str | None:
    """Within a group of G, no length is more than (G - 1) / sqrt(G) sample standard deviations
    above the group's mean: a k at or beyond that would never truncate anything; nor would a
    margin longer than the generation limit. And DOT acts only in all-correct groups, which dynamic
    sampling on the score or the accuracy drops (they have no spread there): it would train on
    none of DOT's truncations."""
    sampling = recipe.algorithm.sampling
    if sampling.name == "dynamic":
        metric = GROUP_SAMPLERS.get("dynamic").params(**sampling.params).metric
        if metric != "reward":
            return (
                f"name: dot shapes only all-correct groups, which dynamic sampling on the {metric} drops (no "
                f"spread there), so none of its truncations would be trained on; set algorithm.sampling.metric: "
                f"reward (the shaped reward, which DOT gives spread)"
            )
    size = recipe.rollout.group_size
    bound = (size - 1) / math.sqrt(size) if size > 0 else 0.0
    if params.k >= bound:
        return (
            f"k: expected below (rollout.group_size - 1) / sqrt(rollout.group_size) = {bound:.4g}, got {params.k}: "
            f"in a group of {size} no length lies further above the mean, so nothing would ever be truncated"
        )
    return within_limit("margin", params.margin, recipe.rollout.max_response_length)


def dot_metrics(inputs: ShapingInputs, *, k: float, margin: int) -> dict[str, float]:
    outliers, solved = dot_outliers(inputs, k, margin)
    return {"dot/truncated": float(outliers.double().mean()), "dot/solved_share": float(solved.double().mean())}


@LENGTH_SHAPERS.register(
    "dot",
    ranges={"k": "[0, inf)", "margin": "[1, inf)"},
    check=dot_check,
    metrics=dot_metrics,
    source="DOT (arXiv 2601.03969; code U-rara/DOT): truncation of the length tail of all-correct groups",
)
# An outlier earns min(score, 0): a positive score cut to 0, no lower; only all-correct groups
# are shaped, so every wrong rollout keeps its score.
@promises(correct_floor="zero", wrong_kept=True)
def dynamic_outlier_truncation(inputs: ShapingInputs, *, k: float = 3.0, margin: int = 32) -> torch.Tensor:
    """A rollout of a group whose rollouts are all correct, at least `margin` tokens longer than
    the group's cutoff floor(mean + k std), is treated as truncated: it earns min(score, 0), what
    the verifier gives an answer cut before its final line (0) on binary scores, and never more
    than its score. Every other rollout keeps its score."""
    outliers, _ = dot_outliers(inputs, k, margin)
    return torch.where(outliers, inputs.scores.clamp(max=0.0), inputs.scores)


# --- Leash: a target length held by a Lagrange multiplier ------------------------------------------

LEASH_LAMBDA = "lambda"  # the state's one entry


def leash_lambda(inputs: ShapingInputs, initial_lambda: float) -> float:
    """The multiplier in force: the carried one, or the initial one before any step advanced it."""
    return float(inputs.state.get(LEASH_LAMBDA, initial_lambda))


def leash_initial(*, target: int, step_size: float, initial_lambda: float) -> dict:
    return {LEASH_LAMBDA: float(initial_lambda)}


def leash_advance(state: dict, inputs: ShapingInputs, *, target: int, step_size: float, initial_lambda: float) -> dict:
    """Projected dual ascent on the constraint mean length / target - 1 <= 0: lambda grows while
    the step's rollouts are longer than the target on average and shrinks, never below 0, while
    they are shorter. The constraint is relative to the target, so step_size does not depend on
    the scale of lengths."""
    violation = float(inputs.lengths.double().mean()) / target - 1.0
    return {LEASH_LAMBDA: max(0.0, leash_lambda(inputs, initial_lambda) + step_size * violation)}


def leash_check(params, recipe) -> str | None:
    return within_limit("target", params.target, recipe.rollout.max_response_length)  # beyond it, never binds


def leash_metrics(inputs: ShapingInputs, *, target: int, step_size: float, initial_lambda: float) -> dict[str, float]:
    over = inputs.lengths.double() > target
    return {
        "length/leash_lambda": leash_lambda(inputs, initial_lambda),
        "length/leash_over_target": float(over.double().mean()),
    }


@LENGTH_SHAPERS.register(
    "leash",
    ranges={"target": "[1, inf)", "step_size": "[0, inf)", "initial_lambda": "[0, inf)"},
    check=leash_check,
    metrics=leash_metrics,
    source="Leash (arXiv 2512.21540): one-sided length penalty weighted by a dual-ascent multiplier",
)
@carries_state(initial=leash_initial, advance=leash_advance)
def leash(
    inputs: ShapingInputs, *, target: int = 4096, step_size: float = 0.05, initial_lambda: float = 0.0
) -> torch.Tensor:
    """r = score - lambda * max(0, length / target - 1), lambda the multiplier of the step
    (leash_advance); a rollout at or under the target keeps its score."""
    excess = (inputs.lengths.double() / target - 1.0).clamp(min=0.0)
    return (inputs.scores.double() - leash_lambda(inputs, initial_lambda) * excess).float()


# --- the reference-profiled threshold --------------------------------------------------------------

# The fields the load-time join (data/profiles.py) puts on every training sample.
PROFILE_PASSING, PROFILE_MEAN, PROFILE_STD = "reference_passing", "reference_mean", "reference_std"


def profiled_thresholds(inputs: ShapingInputs, n_std: float, min_passing: int) -> torch.Tensor:
    """[B] mean + n_std * std of the reference's passing lengths for each rollout's prompt; inf
    (no threshold) where the reference passed fewer than min_passing times."""
    passing = inputs.sample_values(PROFILE_PASSING, "profiled_threshold")
    mean = inputs.sample_values(PROFILE_MEAN, "profiled_threshold")
    std = inputs.sample_values(PROFILE_STD, "profiled_threshold")
    profiled = passing >= min_passing
    return torch.where(profiled, mean + n_std * std, torch.full_like(mean, math.inf))


def profiled_check(params, recipe) -> str | None:
    if params.stats:
        return None
    return "stats: expected the path of a length profile of the training prompts (efficient-rl profile-lengths)"


def profiled_metrics(inputs: ShapingInputs, *, stats: str, n_std: float, min_passing: int, penalty: float):
    thresholds = profiled_thresholds(inputs, n_std, min_passing)
    return {
        "profiled/over_threshold": float((inputs.lengths.double() >= thresholds).double().mean()),
        "profiled/profiled_share": float(thresholds.isfinite().double().mean()),
    }


@LENGTH_SHAPERS.register(
    "profiled_threshold",
    needs=("length_profile",),
    ranges={"n_std": "[0, inf)", "min_passing": "[1, inf)", "penalty": "[0, inf)"},
    check=profiled_check,
    metrics=profiled_metrics,
    source="NeMo-RL length adjustments (nemo_rl/utils/length_penalty.py): the reference-profiled threshold",
)
@promises(correct_floor="cut", correct_cut=lambda params: params.penalty)  # a flat penalty
def profiled_threshold(
    inputs: ShapingInputs, *, stats: str = "", n_std: float = 1.0, min_passing: int = 2, penalty: float = 0.5
) -> torch.Tensor:
    """r = score - penalty for a rollout at least mean + n_std * std tokens long, mean and std
    those of the reference model's passing lengths on the rollout's prompt (from `stats`, joined
    at load); no penalty on a prompt the reference passed fewer than min_passing times. Right and
    wrong answers alike: a long wrong answer never out-earns a long right one."""
    over = inputs.lengths.double() >= profiled_thresholds(inputs, n_std, min_passing)
    return inputs.scores - penalty * over.float()
