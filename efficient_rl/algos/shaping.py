"""Length shaping of sequence rewards: the length penalty interface, DLER's truncation penalty,
DAPO overlong shaping, and the truncation length in force (a fixed one, or DA-DLER's per prompt).

A length penalty (LENGTH_SHAPERS entry) reads one `ShapingInputs` (the round's rollouts: scores,
lengths, truncation, the cap in force, correctness, groups, samples and the training progress)
and returns the [B] rewards. The cap in force is a LENGTH_CAPS entry's. The efficient-reasoning
penalties (L1, ThinkPrune, Kimi, Arora & Zanette, LASER, cosine) are in length_rewards.py,
registered when efficient_rl.algos is imported.

What a penalty promises, and for which scores (docs/algorithms.md#what-a-length-penalty-promises):
(a) a longer correct rollout never earns more than a shorter correct one of the same score in its
group (L1-Exact: one farther from its target); (b) a correct rollout never earns less than a wrong
one of the same length and no higher score. An entry whose rule keeps them only for some scores
(a cut to 0 or a factor in [0, 1] rewards a negative score) says which with `promises`: the
recipe's rewards are checked against it at load (scoring/scale.py) and the scores of every round
at run time.

The length gate (algorithm.length_gate: LengthGate, GatedPenalty, GROUP_STATISTICS) narrows any
penalty in one place, keeping a share of each rollout's delta (reward - score); what a penalty can
cut from a correct rollout (`correct_floor`) says which gates keep its promises
(docs/algorithms.md#length-gate).

References: docs/algorithms.md#length-penalty-interface, docs/algorithms.md#dler-truncation (the
paper's rule vs verl-dler's 0.1 multiplier), docs/algorithms.md#difficulty-aware-dler and
docs/algorithms.md#dapo-overlong-shaping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

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
    # What a penalty carries from step to step (Leash's multiplier, Short-RL's best accuracy),
    # read-only while it shapes: the loop advances it once a step and checkpoints it (`carries_state`).
    state: dict = field(default_factory=dict)

    def over_cap(self) -> torch.Tensor:
        return over_cap(self.lengths, self.truncated, self.length_cap)

    def sample_values(self, name: str, entry: str) -> torch.Tensor:
        """[B] float: each rollout's sample field `name` (a per-sample target length, ...)."""
        try:
            return torch.tensor([float(sample[name]) for sample in self.samples], dtype=torch.float64)
        except KeyError:
            raise ValueError(
                f"length penalty {entry!r} reads the sample field {name!r}, which a sample lacks"
            ) from None


# A penalty that carries state across steps (Leash's multiplier, Short-RL's best accuracy)
# declares it with `carries_state(initial=..., advance=...)`: the driver starts from
# `initial(**params)`, hands the state to every call in `ShapingInputs.state` (read-only there: a
# step may shape several rounds, all with the state of the step), advances it once a step with
# `advance(state, inputs, **params)` over all the step's rollouts, and saves it in every
# checkpoint, so a resumed run goes on from exactly the state it stopped with.
@dataclass(frozen=True)
class CarriedState:
    initial: Callable  # fn(**params) -> dict: the state before the first step
    advance: Callable  # fn(state, inputs, **params) -> dict: the state after a step's rollouts


def carries_state(*, initial: Callable, advance: Callable) -> Callable:
    """Declare that a LENGTH_SHAPERS entry carries state across steps (put it under register)."""

    def declare(function: Callable) -> Callable:
        function.carried = CarriedState(initial, advance)
        return function

    return declare


def initial_state(penalty) -> dict:
    """A bound penalty's state before the first step ({} for a penalty without state)."""
    carried = getattr(penalty.entry.function, "carried", None)
    return carried.initial(**penalty.keywords()) if carried else {}


def advance_state(penalty, state: dict, inputs: ShapingInputs) -> dict:
    """The state after a step whose rollouts are `inputs` (the same {} without state)."""
    carried = getattr(penalty.entry.function, "carried", None)
    return carried.advance(state, inputs, **penalty.keywords()) if carried else state


class ScoresOutsidePromise(ValueError):
    """A round's scores are not what the length penalty needs: the rewards broke what the recipe
    said of them (the driver ends the run with this one line)."""


# The scores a penalty may need, by name: what each means, and its test on one round's scores
# and correctness. scoring/scale.py holds the same names' test on a recipe's reward list.
SCORE_NEEDS: dict[str, tuple[str, Callable]] = {
    "any": ("any scores", lambda scores, correct: True),
    "non_negative": ("scores >= 0", lambda scores, correct: bool((scores >= 0).all())),
    "binary": (
        "binary scores (0 for a wrong answer, one positive value for every correct one)",
        lambda scores, correct: bool(
            (scores[correct <= 0] == 0).all()
            and (scores[correct > 0] > 0).all()
            and scores[correct > 0].unique().numel() <= 1  # a round may have no correct rollout
        ),
    ),
}


@dataclass(frozen=True)
class Promise:
    """What a length penalty keeps: for which scores, and which length it pays for."""

    scores: str = "any"  # a SCORE_NEEDS name
    length: Literal["shorter", "target"] = "shorter"  # "target": closer to the sample's target earns more
    # What a correct rollout earns at the least, for the scores above: "score" (the rule only adds
    # to a correct rollout), "zero" (it may cut one, never below 0), "cut" (it subtracts at most
    # correct_cut(params) from the score), "none" (no bound). Gating the penalty to correct
    # rollouts leaves wrong ones their scores, so (b) then rests on this bound
    # (docs/algorithms.md#length-gate).
    correct_floor: Literal["score", "zero", "cut", "none"] = "none"
    correct_cut: Callable | None = None  # fn(params) -> the most taken from a correct rollout's score
    # True when the rule itself leaves every wrong rollout its score (it gates by correctness
    # already), so a "cut" bounds (b) even without correct_only.
    wrong_kept: bool = False


def promises(**fields) -> Callable:
    """Declare a penalty's Promise; its scores are then checked every round before it runs, so a
    reward that breaks them (an undeclared plugin's negative score) stops the run, never bends it."""
    promise = Promise(**fields)
    if promise.scores not in SCORE_NEEDS:
        raise ValueError(f"promises: unknown scores {promise.scores!r}; expected one of {sorted(SCORE_NEEDS)}")
    if (promise.correct_floor == "cut") != (promise.correct_cut is not None):
        raise ValueError("promises: correct_floor='cut' comes with correct_cut, and only it")

    def declare(function: Callable) -> Callable:
        @functools.wraps(function)
        def checked(inputs: ShapingInputs, **params) -> torch.Tensor:
            meaning, holds = SCORE_NEEDS[promise.scores]
            if not holds(inputs.scores, inputs.correct):
                seen = sorted(set(inputs.scores.tolist()))[:6]
                raise ScoresOutsidePromise(
                    f"algorithm.length_penalty ({function.__name__}) needs {meaning}; this round's rewards "
                    f"scored {seen}: declare score_range on the reward (docs/rewards.md) or change the penalty"
                )
            return function(inputs, **params)

        checked.promise = promise
        return checked

    return declare


def promise_of(entry) -> Promise:
    """A LENGTH_SHAPERS entry's Promise (the default, any scores and shorter wins, if undeclared)."""
    return getattr(entry.function, "promise", Promise())


def tightest_cap(recipe) -> int:
    """The shortest truncation length the recipe's length cap can put in force: its entry asked
    for the caps of groups of every accuracy from 0 to 1 (the generation limit if it cannot say)."""
    limit = recipe.rollout.max_response_length
    picked = recipe.algorithm.length_cap
    try:
        entry = LENGTH_CAPS.get(picked.name)
        hits = torch.arange(101).repeat_interleave(100)  # group g: g correct rollouts of 100
        correct = (torch.arange(100).repeat(101) < hits).float()
        caps = entry.bind(entry.params(**picked.params))(correct, hits, max_response_length=limit)
    except (KeyError, TypeError, ValueError, IndexError):  # a bad cap: its own check names it
        return limit
    return min(int(caps.min()), limit)


def shorter_than_cap(name: str, value: int, recipe) -> str | None:
    """A length the penalty measures against the cap must leave room under the tightest one."""
    cap = tightest_cap(recipe)
    if value < cap:
        return None
    return f"{name}: expected below the tightest length cap in force ({cap}), got {value}"


def over_cap(lengths: torch.Tensor, truncated: torch.Tensor, length_cap: torch.Tensor) -> torch.Tensor:
    """Rollouts that exceed the truncation length in force: cut by the engine, or longer than cap."""
    return truncated | (lengths > length_cap)


@LENGTH_SHAPERS.register("none", source="no length shaping: the reward is the score")
@promises(correct_floor="score")
def no_length_penalty(inputs: ShapingInputs) -> torch.Tensor:
    return inputs.scores.clone()


@LENGTH_SHAPERS.register(
    "truncation",
    needs=("length_cap",),
    ranges={"not_stopped_coef": "[0, 1]"},
    source="DLER (arXiv 2510.15110) §3.4; mode=code is verl-dler's reward manager",
)
@promises(scores="non_negative", correct_floor="zero")  # 0 over the cap would pay a negative score for running long
def truncation_penalty(
    inputs: ShapingInputs, *, mode: Literal["paper", "code"] = "paper", not_stopped_coef: float = 0.1
) -> torch.Tensor:
    """DLER: a rollout over its truncation length gets reward 0 (mode="paper").

    mode="code" is the official verl-dler behaviour: the reward of any rollout that did not stop
    by itself (engine finish reason != stop) is multiplied by `not_stopped_coef` (0.1), so a
    truncated response that still holds a correct answer keeps 0.1 of its reward. With a cap
    below the generation limit (DA-DLER tiers) "did not stop by itself" means "not within the cap".
    """
    scores = inputs.scores
    return torch.where(inputs.over_cap(), scores * (not_stopped_coef if mode == "code" else 0.0), scores)


def overlong_check(params, recipe) -> str | None:
    return shorter_than_cap("buffer", params.buffer, recipe)  # else every response starts penalised


@LENGTH_SHAPERS.register(
    "overlong",
    needs=("length_cap",),
    ranges={"buffer": "[1, inf)", "factor": "[0, inf)"},
    check=overlong_check,
    source="DAPO (arXiv 2503.14476) soft overlong punishment",
)
@promises(correct_floor="cut", correct_cut=lambda params: params.factor)  # the ramp ends at -factor
def overlong_shaping(inputs: ShapingInputs, *, buffer: int = 4096, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment with L_max = the cap in force and L_cache = `buffer`.

    0 up to L_max - L_cache, then a linear ramp down to -factor at L_max, and -factor beyond.
    """
    expected = inputs.length_cap - buffer
    penalty = -((inputs.lengths - expected).clamp(min=0).float() / buffer * factor).clamp(max=factor)
    return inputs.scores + penalty


# ---------------------------------------------------------------- length caps
# algorithm.length_cap: name -> fn(correct, group_ids, *, max_response_length, **params) -> [B] long,
# the truncation length in force for each rollout (what a length penalty that needs "length_cap"
# reads), given the rollouts' correctness and groups; the caller passes the generation limit. Its
# `metrics`, fn(correct, group_ids, lengths, over_cap, **params) -> {name: value}, are logged every step.
LENGTH_CAPS: Registry = Registry("length cap", provided=("max_response_length",))


def within_limit(name: str, value: int, limit: int) -> str | None:
    """A cap longer than the generation limit would never bind: the engine stops first."""
    return None if 1 <= value <= limit else f"{name}: expected 1..rollout.max_response_length ({limit}), got {value}"


def fixed_cap_check(params, recipe) -> str | None:
    return None if params.length is None else within_limit("length", params.length, recipe.rollout.max_response_length)


@LENGTH_CAPS.register(
    "fixed",
    ranges={"length": "[1, inf)"},
    check=fixed_cap_check,
    source="DLER (arXiv 2510.15110) §3.4: one truncation length for every rollout",
)
def fixed_caps(
    correct: torch.Tensor, group_ids: torch.Tensor, *, max_response_length: int, length: int | None = None
) -> torch.Tensor:
    """[B] the one truncation length of plain DLER for every rollout (null: the generation limit)."""
    return torch.full((len(correct),), length or max_response_length, dtype=torch.long)


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


def difficulty_check(params, recipe) -> str | None:
    bounds, lengths, limit = params.min_correct, params.truncation_lengths, recipe.rollout.max_response_length
    if not bounds or bounds[0] != 0.0 or any(later <= earlier for earlier, later in zip(bounds, bounds[1:])):
        return f"min_correct: must start at 0.0 and increase up to at most 1.0, got {bounds}"
    if len(lengths) != len(bounds):
        return f"truncation_lengths: expected one per min_correct tier ({len(bounds)}), got {lengths}"
    problems = (within_limit(f"truncation_lengths[{index}]", length, limit) for index, length in enumerate(lengths))
    return next((problem for problem in problems if problem), None)


def tier_metrics(
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    lengths: torch.Tensor,
    over: torch.Tensor,
    *,
    min_correct: list[float],
    **_,
) -> dict[str, float]:
    """Per DA-DLER tier: its share of the prompts, and its rollouts' mean length, accuracy and
    share over the tier's cap (NaN for a tier without prompts this step)."""
    tiers = difficulty_tiers(correct, group_ids, min_correct[1:])
    metrics = {}
    for tier in range(len(min_correct)):
        rows = tiers == tier
        metrics.update(
            {
                f"difficulty/tier{tier}/prompt_share": float(rows.float().mean()),
                f"difficulty/tier{tier}/response_length": mean_over(lengths, rows),
                f"difficulty/tier{tier}/accuracy": mean_over(correct, rows),
                f"difficulty/tier{tier}/over_cap": mean_over(over, rows),
            }
        )
    return metrics


@LENGTH_CAPS.register(
    "difficulty_aware",
    ranges={"min_correct": "[0, 1]", "truncation_lengths": "[1, inf)"},
    check=difficulty_check,
    metrics=tier_metrics,
    source="DA-DLER (arXiv 2510.15110) §3.5: a truncation length per prompt by its group's accuracy",
)
def difficulty_caps(
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    max_response_length: int,
    min_correct: list[float] = [0.0, 0.5],  # noqa: B006
    truncation_lengths: list[int] = [4000, 2000],
) -> torch.Tensor:  # noqa: B006
    """[B] truncation_lengths[tier] per rollout, the tier of its prompt the last whose min_correct
    its group's correctness ratio reaches (paper: 4000 below a ratio of 0.5, 2000 from it). The
    generation limit is not read: the check keeps every length within it."""
    return torch.tensor(truncation_lengths, dtype=torch.long)[difficulty_tiers(correct, group_ids, min_correct[1:])]


def mean_over(values: torch.Tensor, rows: torch.Tensor) -> float:
    return float(values[rows].float().mean()) if rows.any() else math.nan


# ---------------------------------------------------------------- the length gate
# algorithm.length_gate restricts whichever penalty is picked, in one place: the penalty runs on
# the whole round (its group statistics see every rollout), then its delta, reward - score, is
# multiplied per rollout by the gate's factor: 1 inside the difficulty band, else 0; times 1 for a
# correct rollout, else 0 under correct_only; times the group statistic `scale` names. The factors
# multiply, so their order changes nothing; the reward is score + factor * delta.


def group_share(flags: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] float64: the share of each rollout's group whose `flags` are set."""
    _, index = torch.unique(group_ids, return_inverse=True)
    groups = int(index.max()) + 1 if len(group_ids) else 0
    size = torch.zeros(groups, dtype=torch.float64).index_add_(0, index, torch.ones(len(flags), dtype=torch.float64))
    hits = torch.zeros(groups, dtype=torch.float64).index_add_(0, index, flags.double())
    return (hits / size)[index]


# The statistics of a group a gate reads, by name: what each is, and its [B] value (every rollout
# gets its group's). Each lies in [0, 1], so scaling by one never flips the delta's sign.
GROUP_STATISTICS: dict[str, tuple[str, Callable[[ShapingInputs], torch.Tensor]]] = {
    "pass_rate": (
        "the share of the group's rollouts that are correct",
        lambda inputs: group_share(inputs.correct > 0, inputs.group_ids),
    ),
    "fail_rate": (
        "the share of the group's rollouts that are wrong",
        lambda inputs: group_share(inputs.correct <= 0, inputs.group_ids),
    ),
}
NO_SCALE = "none"  # a gate's scale that leaves the delta whole


@dataclass(frozen=True)
class LengthGate:
    """Where a length penalty's delta applies; the recipe's algorithm.length_gate, checked. No
    defaults here: the recipe's are in config/schema.py."""

    correct_only: bool  # the delta on correct rollouts only; wrong ones keep their scores
    scale: str  # NO_SCALE or a GROUP_STATISTICS name: the delta times the group's value
    statistic: str  # the GROUP_STATISTICS name the difficulty band reads
    lower: float  # the band, both ends included: a group outside it keeps its scores
    upper: float

    def is_open(self) -> bool:
        """True when the gate passes every delta whole, whatever the round."""
        return not self.correct_only and self.scale == NO_SCALE and self.lower <= 0.0 and self.upper >= 1.0

    def factor(self, inputs: ShapingInputs) -> torch.Tensor:
        """[B] float64 in [0, 1]: how much of each rollout's delta the gate keeps."""
        band = GROUP_STATISTICS[self.statistic][1](inputs)
        factor = ((band >= self.lower) & (band <= self.upper)).double()
        if self.correct_only:
            factor = factor * (inputs.correct > 0).double()
        if self.scale != NO_SCALE:
            factor = factor * GROUP_STATISTICS[self.scale][1](inputs)
        return factor


def gated_score_need(promise: Promise, gate: LengthGate) -> str | None:
    """The scores a gated penalty keeps (a) and (b) for: the penalty's own; or, when correct_only
    leaves wrong rollouts their scores and the penalty may cut a correct one, binary ones (a wrong
    answer's 0 then stays below a correct one's reward if the cut stops at 0, or at most a correct
    score's worth: least_correct_score); None when no scores can do. A rule that leaves wrong
    rollouts their scores itself (wrong_kept) is not changed by correct_only."""
    if not gate.correct_only or promise.correct_floor == "score" or promise.wrong_kept:
        return promise.scores
    return "binary" if promise.correct_floor in ("zero", "cut") else None


def least_correct_score(promise: Promise, params, gate: LengthGate) -> float | None:
    """The score a correct rollout needs, at least, for the gated penalty to keep its reward >= 0:
    what the penalty can subtract, when wrong rollouts keep their scores (correct_only, or the
    rule's own) and it cuts correct ones by an amount (None: no such bound)."""
    wrong_kept = gate.correct_only or promise.wrong_kept
    return promise.correct_cut(params) if wrong_kept and promise.correct_floor == "cut" else None


def apply_gate(inputs: ShapingInputs, shaped: torch.Tensor, gate: LengthGate) -> torch.Tensor:
    """score + factor * (shaped - score); where the factor is 1 the shaped reward itself, bit for bit."""
    factor = gate.factor(inputs)
    scores = inputs.scores.double()
    gated = scores + factor * (shaped.double() - scores)
    return torch.where(factor == 1.0, shaped, gated.to(shaped.dtype))


@dataclass(frozen=True)
class GatedPenalty:
    """The recipe's length penalty behind its gate: what the driver calls every round."""

    penalty: Callable  # the LENGTH_SHAPERS entry, bound (its `metrics` too)
    gate: LengthGate
    score_need: str  # gated_score_need's answer, checked on every round's scores
    least_correct_score: float | None = None  # likewise least_correct_score's: what a correct rollout must score

    def __call__(self, inputs: ShapingInputs) -> torch.Tensor:
        shaped = self.penalty(inputs)
        if self.gate.is_open() and self.least_correct_score is None:
            return shaped
        self.check_scores(inputs)
        return shaped if self.gate.is_open() else apply_gate(inputs, shaped, self.gate)

    def initial_state(self) -> dict:
        return initial_state(self.penalty)

    def advance_state(self, state: dict, inputs: ShapingInputs) -> dict:
        return advance_state(self.penalty, state, inputs)

    def check_scores(self, inputs: ShapingInputs) -> None:
        """The round's scores are within what the gate needs (the penalty checked its own already)."""
        meaning, holds = SCORE_NEEDS[self.score_need]
        least = self.least_correct_score
        if least is not None:
            meaning = f"{meaning}, a correct one at least {least:g}"
        correct_scores = inputs.scores[inputs.correct > 0]
        if holds(inputs.scores, inputs.correct) and (least is None or bool((correct_scores >= least).all())):
            return
        seen = sorted(set(inputs.scores.tolist()))[:6]
        where = "algorithm.length_gate.correct_only" if self.gate.correct_only else "algorithm.length_penalty"
        raise ScoresOutsidePromise(
            f"{where}: {self.penalty.name} on correct rollouts only needs {meaning}; this round's rewards scored {seen}"
        )

    def metrics(self, inputs: ShapingInputs) -> dict[str, float]:
        """The penalty's own metrics; with a gate that can close, the mean delta before and after it
        and the share of rollouts it passes at all."""
        metrics = self.penalty.metrics(inputs)
        if self.gate.is_open():
            return metrics
        shaped = self.penalty(inputs).double()
        factor = self.gate.factor(inputs)
        delta = shaped - inputs.scores.double()
        return {
            **metrics,
            "length_gate/delta_before": float(delta.mean()),
            "length_gate/delta_after": float((factor * delta).mean()),
            "length_gate/open_share": float((factor > 0).double().mean()),
        }
