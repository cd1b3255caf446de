"""Length rewards of the efficient-reasoning papers, as LENGTH_SHAPERS entries.

Each reads one `ShapingInputs` and returns the [B] rewards; any optimiser recipe can use any of
them (`algorithm.length_penalty: {name: kimi, weight: 0.4}`). Rules, defaults, sources and the
points where a choice had to be made are in docs/algorithms.md:
  * L1 / LCPO, exact and max (#l1-lcpo): a per-sample target length read from the sample,
    which prompt.variables draws and the user template shows the model;
  * ThinkPrune (#thinkprune): truncation at caps that tighten over training;
  * Kimi k1.5's length reward (#kimi-length-reward): the group's min/max-length interpolation;
  * Arora & Zanette (#arora-and-zanette): a sigmoid of the z-scored length among the correct;
  * LASER and LASER-D (#laser): a step bonus under a target length, LASER-D's targets adaptive
    per difficulty band;
  * the cosine length-scaled reward (#cosine-length-reward).
Bare anchors above name headings of docs/algorithms.md.
"""

from __future__ import annotations

import math

import torch

from efficient_rl.algos.shaping import LENGTH_SHAPERS, ShapingInputs, promises, within_limit

ANY = "(-inf, inf)"


# --- shared pieces -----------------------------------------------------------------------------


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each row's group as 0..n-1, and n."""
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max()) + 1 if len(group_ids) else 0


def group_reduce(values: torch.Tensor, index: torch.Tensor, groups: int, reduce: str) -> torch.Tensor:
    """[groups] sum / amin / amax of `values` over each group's rows."""
    empty = torch.zeros(groups, dtype=values.dtype)
    return empty.scatter_reduce(0, index, values, reduce=reduce, include_self=False)


def sample_field_needs(params) -> tuple[str, ...]:
    return (f"sample.{params.target_field}",)


# --- L1 / LCPO -----------------------------------------------------------------------------------


def l1_metrics(inputs: ShapingInputs, *, target_field: str, **_) -> dict[str, float]:
    """How far responses land from their sample's target: mean |n_gold - n_y|, share above it."""
    gap = inputs.lengths.double() - inputs.sample_values(target_field, "l1")
    return {"l1/target_deviation": float(gap.abs().mean()), "l1/over_target": float((gap > 0).double().mean())}


@LENGTH_SHAPERS.register(
    "l1_exact",
    needs=sample_field_needs,
    ranges={"alpha": "[0, inf)"},
    metrics=l1_metrics,
    source="L1 / LCPO (arXiv 2503.04697) Eq. 1, L1-Exact; docs/algorithms.md#l1-lcpo",
)
@promises(length="target")  # pays for hitting the sample's target, so a too-short answer earns less
def l1_exact(inputs: ShapingInputs, *, alpha: float = 0.0003, target_field: str = "target_length") -> torch.Tensor:
    """r = score - alpha * |n_gold - n_y|, n_gold the sample's `target_field` (the score stands
    for the paper's correctness indicator)."""
    target = inputs.sample_values(target_field, "l1_exact")
    return (inputs.scores.double() - alpha * (target - inputs.lengths.double()).abs()).float()


@LENGTH_SHAPERS.register(
    "l1_max",
    needs=sample_field_needs,
    ranges={"alpha": "[0, inf)", "delta": "[0, 1]"},
    metrics=l1_metrics,
    source="L1 / LCPO (arXiv 2503.04697) Eq. 2, L1-Max; alpha from the official reward code",
)
@promises(
    scores="non_negative", correct_floor="zero"
)  # a factor in [0, 1] would lift a negative score of a long answer
def l1_max(
    inputs: ShapingInputs, *, alpha: float = 0.001, delta: float = 0.5, target_field: str = "target_length"
) -> torch.Tensor:
    """r = score * clip(alpha * (n_gold - n_y) + delta, 0, 1): a soft budget, n_gold the sample's
    `target_field`; a wrong answer (score 0) gets 0 whatever its length."""
    target = inputs.sample_values(target_field, "l1_max")
    factor = (alpha * (target - inputs.lengths.double()) + delta).clamp(0.0, 1.0)
    return (inputs.scores.double() * factor).float()


# --- ThinkPrune ----------------------------------------------------------------------------------


def thinkprune_cap(progress: float, caps: list[int]) -> int:
    """The cap of the round training is in: len(caps) equal rounds of the run, in order."""
    p = min(max(float(progress), 0.0), 1.0)
    return caps[min(math.floor(p * len(caps) + 1e-9), len(caps) - 1)]


def thinkprune_check(params, recipe) -> str | None:
    caps, limit = params.caps, recipe.rollout.max_response_length
    if not caps:
        return "caps: expected at least one cap"
    if any(later > earlier for earlier, later in zip(caps, caps[1:])):
        return f"caps: expected caps that tighten (non-increasing), got {caps}"
    if caps[0] > limit:
        return f"caps: expected caps within rollout.max_response_length ({limit}), got {caps}"
    return None


def thinkprune_metrics(inputs: ShapingInputs, *, caps: list[int]) -> dict[str, float]:
    return {"thinkprune/cap": float(thinkprune_cap(inputs.progress, caps))}


@LENGTH_SHAPERS.register(
    "thinkprune",
    needs=("length_cap",),
    ranges={"caps": "[1, inf)"},
    check=thinkprune_check,
    metrics=thinkprune_metrics,
    source="ThinkPrune (arXiv 2504.01296): truncation at tightening limits; caps from its scripts",
)
@promises(scores="non_negative", correct_floor="zero")  # 0 over the cap would pay a negative score for running long
def thinkprune(inputs: ShapingInputs, *, caps: list[int] = [4000, 3000, 2000]) -> torch.Tensor:  # noqa: B006
    """Reward 0 over the cap of the current round (and over the cap in force, if tighter); the
    run is split into len(caps) equal rounds by training progress."""
    cap = inputs.length_cap.clamp(max=thinkprune_cap(inputs.progress, caps))
    over = inputs.truncated | (inputs.lengths > cap)
    return torch.where(over, torch.zeros_like(inputs.scores), inputs.scores)


# --- Kimi k1.5 -----------------------------------------------------------------------------------


@LENGTH_SHAPERS.register(
    "kimi",
    ranges={"weight": "[0, inf)", "warmup": "[0, 1]"},
    source="Kimi k1.5 (arXiv 2501.12599) §2.3.3; weight 0.4 from LASER's re-implementation",
)
@promises(correct_floor="cut", correct_cut=lambda params: params.weight * 0.5)  # lambda >= -0.5
def kimi_length_reward(inputs: ShapingInputs, *, weight: float = 0.4, warmup: float = 0.0) -> torch.Tensor:
    """r = score + weight * len_reward, with lambda = 0.5 - (len - min_len) / (max_len - min_len)
    over the group's rollouts (0 for all when max_len = min_len): lambda for a correct answer,
    min(0, lambda) for a wrong one. Off while training progress < `warmup`."""
    if inputs.progress < warmup:
        return inputs.scores.clone()
    lengths = inputs.lengths.double()
    index, groups = group_index(inputs.group_ids)
    shortest = group_reduce(lengths, index, groups, "amin")[index]
    longest = group_reduce(lengths, index, groups, "amax")[index]
    spread = longest - shortest
    lam = torch.where(spread > 0, 0.5 - (lengths - shortest) / spread.clamp(min=1), torch.zeros_like(lengths))
    length_reward = torch.where(inputs.correct > 0, lam, lam.clamp(max=0.0))
    return (inputs.scores.double() + weight * length_reward).float()


# --- Arora & Zanette -----------------------------------------------------------------------------


@LENGTH_SHAPERS.register(
    "arora_zanette",
    ranges={"alpha": "[0, 1)"},
    source="Arora & Zanette, Training language models to reason efficiently (arXiv 2502.04463)",
)
@promises(
    scores="binary", correct_floor="zero"
)  # a wrong answer's partial credit may exceed a long correct one's score * (1 - alpha)
def arora_zanette(inputs: ShapingInputs, *, alpha: float = 0.1) -> torch.Tensor:
    """A correct answer gets score * (1 - alpha * sigmoid((len - mean) / std)), mean and
    (population) std over the lengths of the group's correct answers; z = 0 when they all have
    one length (or there is one), so 1 - alpha / 2. A wrong answer keeps its score."""
    correct = inputs.correct > 0
    lengths, weight = inputs.lengths.double(), correct.double()
    index, groups = group_index(inputs.group_ids)
    count = group_reduce(weight, index, groups, "sum").clamp(min=1)
    mean = group_reduce(lengths * weight, index, groups, "sum") / count
    variance = group_reduce(weight * (lengths - mean[index]) ** 2, index, groups, "sum") / count
    std = variance.sqrt()[index]
    z = torch.where(std > 0, (lengths - mean[index]) / std.clamp(min=1e-12), torch.zeros_like(lengths))
    factor = 1.0 - alpha * torch.sigmoid(z)
    return torch.where(correct, inputs.scores.double() * factor, inputs.scores.double()).float()


# --- LASER and LASER-D ---------------------------------------------------------------------------


def laser_check(params, recipe) -> str | None:
    return within_limit("target", params.target, recipe.rollout.max_response_length)  # beyond it, never binds


@LENGTH_SHAPERS.register(
    "laser",
    ranges={"target": "[1, inf)", "alpha": "[0, inf)"},
    check=laser_check,
    source="LASER (arXiv 2505.15612): step reward under a target; hkust-nlp/Laser defaults",
)
@promises(correct_floor="score")  # a bonus only: correct rollouts earn at least their scores
def laser(inputs: ShapingInputs, *, target: int = 4096, alpha: float = 0.5) -> torch.Tensor:
    """r = score + alpha for a correct answer of at most `target` tokens, else the score."""
    bonus = (inputs.correct > 0) & (inputs.lengths <= target)
    return inputs.scores + alpha * bonus.float()


BANDS = ("low", "medium", "high")


def difficulty_bands(inputs: ShapingInputs) -> tuple[torch.Tensor, int]:
    """[B] band of each rollout's prompt by its group's accuracy a: 0 low (a < 1/3), 1 medium
    (1/3 <= a < 2/3), 2 high (a >= 2/3); and G, the rollouts per prompt (the largest group)."""
    index, groups = group_index(inputs.group_ids)
    size = group_reduce(torch.ones_like(inputs.correct, dtype=torch.float64), index, groups, "sum")
    hits = group_reduce((inputs.correct > 0).double(), index, groups, "sum")
    band = (3 * hits >= size).long() + (3 * hits >= 2 * size).long()  # exact: no 1/3 in floating point
    return band[index], int(size.max()) if groups else 0


def laser_d_targets(inputs: ShapingInputs, min_target: int, step: int, expected_correct: int) -> torch.Tensor:
    """[3] target length per band: the shortest L of min_target, min_target + step, ... (up to
    the largest cap in force) with floor(coverage(L) * n_band) >= expected_correct, where
    coverage(L) is the share of the band's rollouts of at most L tokens and n_band is 1, floor(G/3)
    and floor(2G/3) for low, medium and high; the cap when none qualifies."""
    band, size = difficulty_bands(inputs)
    upper = int(inputs.length_cap.max())
    grid = list(range(min_target, upper + 1, step))
    needed = (1, size // 3, 2 * size // 3)
    targets = []
    for level in range(len(BANDS)):
        lengths = inputs.lengths[band == level]
        target = upper
        for length in grid:
            covered = int((lengths <= length).sum())
            if len(lengths) and covered * needed[level] // len(lengths) >= expected_correct:
                target = length
                break
        targets.append(target)
    return torch.tensor(targets, dtype=torch.long)


def laser_d_metrics(
    inputs: ShapingInputs, *, alpha: float, min_target: int, step: int, expected_correct: int
) -> dict[str, float]:
    targets = laser_d_targets(inputs, min_target, step, expected_correct)
    return {f"laser_d/target_{name}": float(value) for name, value in zip(BANDS, targets.tolist())}


def laser_d_check(params, recipe) -> str | None:
    return within_limit("min_target", params.min_target, recipe.rollout.max_response_length)


@LENGTH_SHAPERS.register(
    "laser_d",
    needs=("length_cap",),
    ranges={"alpha": "[0, inf)", "min_target": "[1, inf)", "step": "[1, inf)", "expected_correct": "[1, inf)"},
    metrics=laser_d_metrics,
    check=laser_d_check,
    source="LASER-D (arXiv 2505.15612): targets per difficulty band; hkust-nlp/Laser's rule",
)
@promises(correct_floor="score")  # a bonus only: correct rollouts earn at least their scores
def laser_d(
    inputs: ShapingInputs, *, alpha: float = 0.5, min_target: int = 4096, step: int = 1024, expected_correct: int = 1
) -> torch.Tensor:
    """LASER's step bonus with the target of the prompt's difficulty band (laser_d_targets),
    recomputed every round from the round's own rollouts."""
    band, _ = difficulty_bands(inputs)
    target = laser_d_targets(inputs, min_target, step, expected_correct)[band]
    bonus = (inputs.correct > 0) & (inputs.lengths <= target)
    return inputs.scores + alpha * bonus.float()


# --- cosine length-scaled reward -----------------------------------------------------------------


# The cosine reward's values that must not be out of order, each pair (higher, lower) with why.
COSINE_ORDER = (
    ("correct_short", "correct_long", "a longer correct answer would earn more"),
    ("correct_long", "exceed", "running over the cap would pay a correct answer more"),
    ("correct_short", "wrong_short", "a short wrong answer would beat a short correct one"),
    ("correct_long", "wrong_long", "a long wrong answer would beat a long correct one"),
)


def cosine_check(params, recipe) -> str | None:
    for higher, lower, why in COSINE_ORDER:
        top, value = getattr(params, higher), getattr(params, lower)
        if top < value:
            return f"{lower}: expected at most {higher} ({top}), got {value}: {why}"
    return None


@LENGTH_SHAPERS.register(
    "cosine",
    needs=("length_cap",),
    ranges={"correct_short": ANY, "correct_long": ANY, "wrong_short": ANY, "wrong_long": ANY, "exceed": ANY},
    check=cosine_check,
    source="Yeo et al., Demystifying long CoT (arXiv 2502.03373); values from its run scripts",
)
def cosine_length_reward(
    inputs: ShapingInputs,
    *,
    correct_short: float = 2.0,
    correct_long: float = 1.0,
    wrong_short: float = -10.0,
    wrong_long: float = 0.0,
    exceed: float = -10.0,
) -> torch.Tensor:
    """The reward moves along half a cosine from its value at length 0 (`*_short`) to its value
    at the cap in force (`*_long`), by correctness; `exceed` over the cap. It replaces the score."""
    fraction = (inputs.lengths.double() / inputs.length_cap.double()).clamp(max=1.0)
    near_start = 0.5 * (1.0 + torch.cos(math.pi * fraction))  # 1 at length 0, 0 at the cap
    if_correct = correct_long + (correct_short - correct_long) * near_start
    if_wrong = wrong_long + (wrong_short - wrong_long) * near_start
    reward = torch.where(inputs.correct > 0, if_correct, if_wrong)
    return torch.where(inputs.over_cap(), torch.full_like(reward, exceed), reward).float()
