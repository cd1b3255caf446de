"""What every length penalty promises, checked on random rounds (docs/algorithms.md#what-a-length-penalty-promises).

Every LENGTH_SHAPERS entry is taken from the registry, so a new one is covered without a line here.
On seeded random groups whose scores are the ones the entry declares it keeps its promises for
(`promises`: any, non-negative with partial credit, or binary):
(a) a longer correct rollout never earns more than a shorter correct one of the same score in its
    group (L1-Exact: one farther from the group's target never earns more);
(b) a correct rollout never earns less than a wrong one of the same length in its group whose score
    is no higher.
A declaration is never idle: the bare rule breaks (a) or (b) on scores outside it. A recipe whose
rewards can leave it is refused at load, in one line naming the field, and a round's scores that
leave it stop the run. Parameters that cannot work together (a buffer as long as the cap...) are
refused too. Hand-computed values of each rule are in test_length_rewards.py.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import efficient_rl.algos  # noqa: F401  (registers every length penalty)
from conftest import RECIPES, ROOT
from efficient_rl.algos.length_rewards import arora_zanette, l1_max, thinkprune
from efficient_rl.algos.shaping import (
    LENGTH_SHAPERS,
    SCORE_NEEDS,
    GatedPenalty,
    LengthGate,
    ScoresOutsidePromise,
    ShapingInputs,
    apply_gate,
    gated_score_need,
    least_correct_score,
    promise_of,
    truncation_penalty,
)
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.scoring.scale import SCORE_PROBLEMS

LIMIT = 5000  # the generation limit: every default parameter (caps of 4000, targets of 4096) binds below it
CAPS_IN_FORCE = (5000, 4500)  # a cap per group, as DA-DLER's tiers give
LENGTH_STEP = 250  # lengths on a grid, so that rollouts of one length meet in a group
# Scores each declaration allows, from a small set so that equal scores meet in a group too.
SCORE_VALUES = {"any": (-1.0, -0.5, 0.0, 0.3, 1.0, 1.5), "non_negative": (0.0, 0.25, 0.5, 1.0, 1.5)}
BINARY_VALUES = (0.5, 1.0, 2.0)  # what a correct rollout scores under binary scores, one value a round
# A need's scores, then the wider scores that lie outside it (where the bare rule must break).
WIDER = {"non_negative": "any", "binary": "non_negative"}
ROUNDS = 60
TOLERANCE = 1e-5


def random_lengths(generator: torch.Generator, groups: int, size: int) -> torch.Tensor:
    """[groups * size] lengths on the grid: half the groups spread evenly over it, half clustered
    within a step of a centre with a few at the limit, the outliers a robust z-score flags."""
    steps = LIMIT // LENGTH_STEP
    spread = torch.randint(1, steps + 1, (groups, size), generator=generator)
    centre = torch.randint(4, 11, (groups, 1), generator=generator)
    near = centre + torch.randint(-1, 2, (groups, size), generator=generator)
    clustered = torch.where(torch.rand(groups, size, generator=generator) < 0.2, steps, near)
    pick = torch.rand(groups, 1, generator=generator) < 0.5
    return torch.where(pick, clustered, spread).flatten() * LENGTH_STEP


def random_round(
    generator: torch.Generator, scores_kind: str, groups: int = 6, size: int = 8, least_correct: float = 0.0
) -> ShapingInputs:
    """One round of `groups` prompts with `size` rollouts each; a rollout at the limit was cut.
    Binary scores pay a correct rollout one value of at least `least_correct`."""
    rows = groups * size
    group_ids = torch.arange(groups).repeat_interleave(size)
    lengths = random_lengths(generator, groups, size)
    correct = (torch.rand(rows, generator=generator) < 0.5).float()
    if scores_kind == "binary":
        values = [value for value in BINARY_VALUES if value >= least_correct]
        value = values[int(torch.randint(len(values), (1,), generator=generator))]
        scores = correct * value
    else:
        values = torch.tensor(SCORE_VALUES[scores_kind])
        scores = values[torch.randint(len(values), (rows,), generator=generator)]
    caps = torch.tensor(CAPS_IN_FORCE)[torch.randint(len(CAPS_IN_FORCE), (groups,), generator=generator)]
    targets = torch.randint(1, LIMIT // LENGTH_STEP + 1, (groups,), generator=generator) * LENGTH_STEP
    progress = float(torch.rand(1, generator=generator))
    # Drawn after the rest, so that the draws above stay what they were: prompts every rollout
    # solves (DOT shapes only those), a reference profile per prompt, and a carried multiplier.
    solved = (torch.rand(groups, generator=generator) < 0.3).repeat_interleave(size)
    correct = torch.where(solved, torch.ones_like(correct), correct)
    if scores_kind == "binary":
        scores = correct * value
    profiles = reference_profiles(generator, groups)
    state = {  # Leash's multiplier, Short-RL's best accuracy
        "lambda": 2.0 * float(torch.rand(1, generator=generator)),
        "best_accuracy": float(torch.rand(1, generator=generator)),
    }
    return ShapingInputs(
        scores=scores.float(),
        lengths=lengths,
        truncated=lengths >= LIMIT,
        length_cap=caps.repeat_interleave(size),
        correct=correct,
        group_ids=group_ids,
        samples=[{"target_length": int(targets[group]), **profiles[group]} for group in group_ids.tolist()],
        progress=progress,
        state=state,
    )


def reference_profiles(generator: torch.Generator, groups: int) -> list[dict]:
    """Per prompt: how often a reference passed, and the mean and std of its passing lengths."""
    passing = torch.randint(0, 5, (groups,), generator=generator)
    mean = torch.randint(1, LIMIT // LENGTH_STEP + 1, (groups,), generator=generator) * LENGTH_STEP
    std = torch.rand(groups, generator=generator) * 1000
    return [
        {"reference_passing": int(p), "reference_mean": float(m), "reference_std": float(s)}
        for p, m, s in zip(passing, mean, std)
    ]


def broken_promises(inputs: ShapingInputs, rewards: torch.Tensor, length: str) -> list[str]:
    """Every pair of one group that breaks (a) or (b), described."""
    broken = []
    scores, lengths, correct = inputs.scores.tolist(), inputs.lengths.tolist(), inputs.correct.tolist()
    targets = [sample["target_length"] for sample in inputs.samples]
    paid = rewards.tolist()
    for i, j in itertools.permutations(range(len(paid)), 2):
        if inputs.group_ids[i] != inputs.group_ids[j]:
            continue
        # (a) i is the longer (or farther from the target) of two correct rollouts of one score.
        if length == "target":
            farther = abs(lengths[i] - targets[i]) > abs(lengths[j] - targets[j])
        else:
            farther = lengths[i] > lengths[j]
        if correct[i] and correct[j] and scores[i] == scores[j] and farther and paid[i] > paid[j] + TOLERANCE:
            broken.append(f"(a) length {lengths[i]} earns {paid[i]:.4f} > {paid[j]:.4f} at length {lengths[j]}")
        # (b) i correct, j wrong, one length, i's score no lower.
        if correct[i] and not correct[j] and lengths[i] == lengths[j] and scores[i] >= scores[j]:
            if paid[i] < paid[j] - TOLERANCE:
                broken.append(f"(b) correct {scores[i]} earns {paid[i]:.4f} < wrong {scores[j]} earns {paid[j]:.4f}")
    return broken


def bare_rule(entry):
    """The entry's rule without its run-time score check (to show what the declaration prevents)."""
    return getattr(entry.function, "__wrapped__", entry.function)


@pytest.mark.parametrize("name", LENGTH_SHAPERS.names())
def test_every_penalty_keeps_its_promises_for_the_scores_it_declares(name):
    entry = LENGTH_SHAPERS.get(name)
    promise = promise_of(entry)
    generator = torch.Generator().manual_seed(1000 + LENGTH_SHAPERS.names().index(name))
    for _ in range(ROUNDS):
        inputs = random_round(generator, promise.scores)
        broken = broken_promises(inputs, entry.bind()(inputs), promise.length)
        assert not broken, f"{name} on {promise.scores} scores: {broken[:3]}"


# Gates (algorithm.length_gate) over every penalty: each stage alone and all at once.
GATES = {
    "scaled by pass rate": LengthGate(False, "pass_rate", "pass_rate", 0.0, 1.0),
    "hard groups only": LengthGate(False, "none", "fail_rate", 0.5, 1.0),
    "correct only": LengthGate(True, "none", "pass_rate", 0.0, 1.0),
    "all at once": LengthGate(True, "fail_rate", "pass_rate", 0.25, 0.75),
}


def gate_of(name: str, gate: LengthGate) -> tuple[GatedPenalty | None, float]:
    """The gated penalty as the recipe check builds it (None where it is refused), and the least
    score a correct rollout needs under it."""
    entry = LENGTH_SHAPERS.get(name)
    promise, bound = promise_of(entry), entry.bind()
    need = gated_score_need(promise, gate)
    least = least_correct_score(promise, bound.params, gate)
    return (GatedPenalty(bound, gate, need, least) if need else None), least


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("name", LENGTH_SHAPERS.names())
def test_every_gated_penalty_keeps_its_promises_where_the_gate_is_accepted(name, gate):
    """Band and scale multiply a group's deltas by one factor in [0, 1], which keeps (a) and (b);
    correct_only keeps them for the scores gated_score_need names, or the recipe is refused."""
    gated, least = gate_of(name, GATES[gate])
    if gated is None:  # refused at load: the next test shows the refusal is needed
        assert GATES[gate].correct_only and promise_of(LENGTH_SHAPERS.get(name)).correct_floor == "none"
        return
    length = promise_of(LENGTH_SHAPERS.get(name)).length
    generator = torch.Generator().manual_seed(2000 + LENGTH_SHAPERS.names().index(name))
    for _ in range(ROUNDS):
        inputs = random_round(generator, gated.score_need, least_correct=least or 0.0)
        broken = broken_promises(inputs, gated(inputs), length)
        assert not broken, f"{name} gated {gate} on {gated.score_need} scores: {broken[:3]}"


def correct_only_breaks(name: str, scores: str, least_correct: float = 0.0, **params) -> bool:
    """Whether `name` gated to correct rollouts, without the gate's score check, breaks (a) or (b)
    on some random round of `scores`."""
    entry = LENGTH_SHAPERS.get(name)
    bound = entry.bind(entry.params(**params))
    generator = torch.Generator().manual_seed(11)
    for _ in range(ROUNDS):
        inputs = random_round(generator, scores, least_correct=least_correct)
        shaped = bare_rule(entry)(inputs, **bound.keywords())
        if broken_promises(inputs, apply_gate(inputs, shaped, GATES["correct only"]), promise_of(entry).length):
            return True
    return False


@pytest.mark.parametrize("name", LENGTH_SHAPERS.names())
def test_what_correct_only_refuses_or_narrows_breaks_a_promise_without(name):
    """Where correct_only is refused, or narrows the scores to binary ones, the gated rule does
    break (a) or (b) on the scores it would otherwise see: neither rule is idle."""
    promise = promise_of(LENGTH_SHAPERS.get(name))
    need = gated_score_need(promise, GATES["correct only"])
    if need == promise.scores:  # a bonus only, or scores binary already: nothing narrowed, nothing breaks
        assert not correct_only_breaks(name, need)
    else:
        assert correct_only_breaks(name, promise.scores), f"{name}: correct_only refuses or narrows for nothing"


def test_a_cut_larger_than_a_correct_score_breaks_b_under_correct_only():
    """Kimi takes up to weight / 2 from a correct rollout: 1.5 at weight 3, more than the 0.5 or 1.0
    a correct rollout may score, which the recipe check refuses; at weight 0.4 (0.2) it holds."""
    assert correct_only_breaks("kimi", "binary", weight=3.0)
    assert not correct_only_breaks("kimi", "binary", weight=0.4)
    assert correct_only_breaks("overlong", "binary", factor=4.0)
    assert not correct_only_breaks("overlong", "binary", least_correct=1.0, factor=1.0)


@pytest.mark.parametrize("name", [e.name for e in LENGTH_SHAPERS.entries() if promise_of(e).scores != "any"])
def test_a_declared_score_need_is_one_the_bare_rule_breaks_without(name):
    entry = LENGTH_SHAPERS.get(name)
    promise = promise_of(entry)
    generator = torch.Generator().manual_seed(7)
    rounds = (random_round(generator, WIDER[promise.scores]) for _ in range(ROUNDS))
    assert any(
        broken_promises(inputs, bare_rule(entry)(inputs, **entry.bind().keywords()), promise.length)
        for inputs in rounds
    ), f"{name} declares {promise.scores} scores but keeps its promises on wider ones: the declaration is idle"


def hand_round(scores, correct, lengths, truncated, cap=48, targets=None):
    rows = len(scores)
    return ShapingInputs(
        scores=torch.tensor(scores),
        lengths=torch.tensor(lengths),
        truncated=torch.tensor(truncated),
        length_cap=torch.full((rows,), cap),
        correct=torch.tensor(correct),
        group_ids=torch.zeros(rows, dtype=torch.long),
        samples=[{"target_length": t} for t in (targets or [cap] * rows)],
    )


def test_the_issues_cases_break_the_bare_rules_and_are_stopped_at_run_time():
    """The failures the declarations exist for, by hand: a correct rollout scored -0.5 (a negative
    reward weight) earns -0.5 when it stops and 0 when truncated; Arora & Zanette with the code
    reward's partial credit ranks a long correct answer (0.927) below a wrong one scoring 0.95."""
    negative = hand_round([-0.5, -0.5], [1.0, 1.0], [20, 48], [False, True])
    assert truncation_penalty.__wrapped__(negative).tolist() == [-0.5, 0.0]
    assert thinkprune.__wrapped__(negative, caps=[48]).tolist() == [-0.5, 0.0]
    budget = hand_round([-0.5, -0.5], [1.0, 1.0], [20, 40], [False, False], targets=[20, 20])
    assert l1_max.__wrapped__(budget, alpha=0.05, delta=0.5).tolist() == pytest.approx([-0.25, 0.0])
    partial = hand_round([1.0, 1.0, 0.95], [1.0, 1.0, 0.0], [10, 30, 30], [False, False, False])
    paid = arora_zanette.__wrapped__(partial, alpha=0.1).tolist()
    assert paid == pytest.approx([0.973, 0.927, 0.95], abs=1e-3) and paid[1] < paid[2]
    for penalty, inputs in ((truncation_penalty, negative), (l1_max, budget), (arora_zanette, partial)):
        with pytest.raises(ScoresOutsidePromise, match="needs"):
            penalty(inputs)


def test_the_run_time_check_passes_rounds_within_the_need_even_without_a_correct_rollout():
    all_wrong = hand_round([0.0, 0.0], [0.0, 0.0], [10, 30], [False, False])
    assert arora_zanette(all_wrong).tolist() == [0.0, 0.0]
    all_correct = hand_round([2.0, 2.0], [1.0, 1.0], [10, 30], [False, True])
    assert truncation_penalty(all_correct).tolist() == [2.0, 0.0]
    uneven = hand_round([1.0, 2.0], [1.0, 1.0], [10, 30], [False, False])  # two values for correct answers
    with pytest.raises(ScoresOutsidePromise, match="needs binary scores"):
        arora_zanette(uneven)


# The rows of the table in docs/algorithms.md#what-a-length-penalty-promises, by the need they state.
DOCUMENTED_NEEDS = {"any": "| any |", "non_negative": "| at least 0 |", "binary": "| binary:"}


def test_the_documented_table_of_score_needs_is_the_code_s():
    page = (ROOT / "docs" / "algorithms.md").read_text()
    for need, row_start in DOCUMENTED_NEEDS.items():
        (row,) = [line for line in page.splitlines() if line.startswith(row_start)]
        documented = set(re.findall(r"`(\w+)`", row.rsplit("|", 2)[1]))
        declared = {entry.name for entry in LENGTH_SHAPERS.entries() if promise_of(entry).scores == need}
        assert documented == declared, f"docs/algorithms.md's row for {need} scores"


def test_each_score_need_has_a_load_time_test():
    assert set(SCORE_PROBLEMS) == set(SCORE_NEEDS)


# --- at load -------------------------------------------------------------------------------------


# Penalties no shipped recipe picks yet, with the keys that pick them on the quickstart recipe.
PICKED_BY_KEYS = {
    "dot": ["rollout.group_size=16", "algorithm.length_penalty={name: dot}", "algorithm.sampling.metric=reward"],
    "leash": ["algorithm.length_penalty={name: leash, target: 32}"],
    "profiled_threshold": ["algorithm.length_penalty={name: profiled_threshold, stats: stats.jsonl}"],
}


def recipe_picking(name: str, overrides: list[str]):
    """A shipped recipe whose length penalty is `name`, with `overrides` (one picking it by keys if none does)."""
    if name in PICKED_BY_KEYS:
        return load_recipe(RECIPES / "quickstart.yaml", [*PICKED_BY_KEYS[name], *overrides])
    for path in sorted(RECIPES.rglob("*.yaml")):
        if "studies" in path.parts:
            continue
        recipe = load_recipe(path, [])
        if recipe.algorithm.length_penalty.name == name:
            return load_recipe(path, overrides)
    raise AssertionError(f"no shipped recipe picks the length penalty {name!r}")


# Reward lists by the scores they can add up to, and the needs that admit them.
REWARD_LISTS = {
    "binary": ("reward=[{name: math}, {name: length_metric, weight: 0}]", {"any", "non_negative", "binary"}),
    "binary code": ("reward=[{name: code, params: {all_or_nothing: true}}]", {"any", "non_negative", "binary"}),
    "partial credit": ("reward=[{name: code}]", {"any", "non_negative"}),
    "two rewards": ("reward=[{name: math}, {name: format, weight: 0.2}]", {"any", "non_negative"}),
    "a negative weight": ("reward=[{name: math}, {name: length, weight: -0.1}]", {"any"}),
}


@pytest.mark.parametrize("scores", REWARD_LISTS)
@pytest.mark.parametrize("name", LENGTH_SHAPERS.names())
def test_a_recipe_whose_rewards_leave_the_penalty_s_scores_is_refused_at_load(name, scores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stats.jsonl").touch()  # profiled_threshold's profile (PICKED_BY_KEYS), which validation asks for
    override, admitted = REWARD_LISTS[scores]
    need = promise_of(LENGTH_SHAPERS.get(name)).scores
    recipe = recipe_picking(name, [override])
    if need in admitted:
        validate(recipe)
        return
    with pytest.raises(ConfigError) as err:
        validate(recipe)
    message = str(err.value)
    assert message.startswith(f"algorithm.length_penalty: {name} needs ") and "reward[" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (  # the issue's case: every response of a 48-token cap would start 4048 tokens into the ramp
            ["algorithm.length_penalty={name: overlong, buffer: 4096}"],
            "algorithm.length_penalty.buffer: expected below the tightest length cap in force (48), got 4096",
        ),
        (
            ["algorithm.length_penalty={name: overlong, buffer: 48}"],
            "algorithm.length_penalty.buffer: expected below the tightest length cap in force (48), got 48",
        ),
        (  # under DA-DLER the easy tier's cap is the tightest
            [
                "algorithm.length_penalty={name: overlong, buffer: 30}",
                "algorithm.length_cap={name: difficulty_aware, truncation_lengths: [48, 24]}",
            ],
            "algorithm.length_penalty.buffer: expected below the tightest length cap in force (24), got 30",
        ),
        (
            ["algorithm.length_penalty={name: overlong, buffer: 20}", "algorithm.length_cap.length=16"],
            "algorithm.length_penalty.buffer: expected below the tightest length cap in force (16), got 20",
        ),
        (
            ["algorithm.length_penalty={name: laser, target: 64}"],
            "algorithm.length_penalty.target: expected 1..rollout.max_response_length (48), got 64",
        ),
        (
            ["algorithm.length_penalty={name: laser_d, min_target: 4096}"],
            "algorithm.length_penalty.min_target: expected 1..rollout.max_response_length (48), got 4096",
        ),
        (
            ["algorithm.length_penalty={name: cosine, correct_short: 1.0, correct_long: 2.0}"],
            "algorithm.length_penalty.correct_long: expected at most correct_short (1.0), got 2.0",
        ),
        (
            ["algorithm.length_penalty={name: cosine, exceed: 1.5}"],
            "algorithm.length_penalty.exceed: expected at most correct_long (1.0), got 1.5",
        ),
        (
            ["algorithm.length_penalty={name: cosine, wrong_long: 3.0}"],
            "algorithm.length_penalty.wrong_long: expected at most correct_long (1.0), got 3.0",
        ),
    ],
)
def test_parameters_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "dler.yaml", overrides))
    assert message in str(err.value)


def test_a_buffer_under_the_cap_is_accepted():
    validate(load_recipe(RECIPES / "dler.yaml", ["algorithm.length_penalty={name: overlong, buffer: 47}"]))


def test_a_reward_that_breaks_the_penalty_mid_run_ends_it_in_one_line(tmp_path, tiny_overrides):
    """A reward that declares no score range loads under truncation, and its first round of
    negative scores ends the run with one line naming the penalty (exit 2), not a traceback."""
    import subprocess
    import sys

    (tmp_path / "negative.py").write_text("def score(completion, sample):\n    return {'score': -0.5}\n")
    overrides = tiny_overrides + [
        "steps=1",
        "eval.before_training=false",
        "logging.trackers=[]",
        f"logging.output_dir={tmp_path / 'runs'}",
        "algorithm.length_penalty=truncation",
        "reward=[{name: negative.py:score}]",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "efficient_rl.cli", "train", str(RECIPES / "quickstart.yaml"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines[-1].startswith("efficient-rl: error: algorithm.length_penalty (truncation") and "-0.5" in lines[-1]
