"""The length gate and the group-length entries, against values computed by hand
(docs/algorithms.md#length-gate, #brevity-bonus, #mad-outlier-penalty, #short-rl-lazy-length-penalty).

The gate multiplies a penalty's delta (reward - score) by: 1 inside the difficulty band else 0,
times 1 for a correct rollout under correct_only (0 for a wrong one), times the group statistic
`scale` names. What each gated penalty keeps of (a) and (b) is checked on random rounds in
test_shaping_properties.py; here the arithmetic, the refusals at load and one training run.
"""

from __future__ import annotations

import json

import pytest
import torch

import efficient_rl.algos  # noqa: F401  (registers every length penalty)
from conftest import RECIPES, run_cli
from efficient_rl.algos.group_length import brevity_bonus, mad_outlier, median, short_rl
from efficient_rl.algos.shaping import LENGTH_SHAPERS, GatedPenalty, LengthGate, ScoresOutsidePromise, ShapingInputs
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.loop import run_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError


def round_of(
    groups: list[tuple[list[int], list[float], list[float]]], cap: int = 48, best_accuracy: float = 0.0
) -> ShapingInputs:
    """Rollouts grouped as given: each group (lengths, correctness, scores)."""
    lengths, correct, scores, ids = [], [], [], []
    for group, (group_lengths, group_correct, group_scores) in enumerate(groups):
        lengths += group_lengths
        correct += group_correct
        scores += group_scores
        ids += [group] * len(group_lengths)
    rows = len(lengths)
    return ShapingInputs(
        scores=torch.tensor(scores),
        lengths=torch.tensor(lengths),
        truncated=torch.tensor(lengths) >= cap,
        length_cap=torch.full((rows,), cap),
        correct=torch.tensor(correct),
        group_ids=torch.tensor(ids),
        state={"best_accuracy": best_accuracy},
    )


# --- brevity bonus -------------------------------------------------------------------------------


def test_brevity_bonus_by_hand():
    inputs = round_of(
        [
            # mean correct length (10 + 20 + 30) / 3 = 20: bonuses 1 - 10/20 = 0.5, 0, 0 (1 - 30/20 < 0
            # clamps to 0); the wrong 40 keeps its 0.
            ([10, 20, 30, 40], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]),
            # a score of 2: mean (6 + 18) / 2 = 12, bonuses 0.5 and 0: 2 * 1.5 = 3 and 2.
            ([6, 18], [1.0, 1.0], [2.0, 2.0]),
            # no correct rollout: nothing changes.
            ([5, 15], [0.0, 0.0], [0.0, 0.0]),
            # partial credit for the wrong one (0.5) is kept; the lone correct one sits at its mean.
            ([8, 4], [1.0, 0.0], [1.0, 0.5]),
        ]
    )
    assert brevity_bonus(inputs).tolist() == pytest.approx([1.5, 1.0, 1.0, 0.0, 3.0, 2.0, 0.0, 0.0, 1.0, 0.5])
    assert LENGTH_SHAPERS.get("brevity_bonus").bind().metrics(inputs) == {
        "brevity_bonus/mean_bonus": pytest.approx((0.5 + 0.5) / 6)
    }


def test_brevity_bonus_refuses_a_negative_score():
    with pytest.raises(ScoresOutsidePromise, match="brevity_bonus"):
        brevity_bonus(round_of([([10, 20], [1.0, 1.0], [-1.0, -1.0])]))


# --- robust length outlier -------------------------------------------------------------------------


def test_the_median_of_an_even_count_is_the_middle_pair_s_mean():
    assert float(median(torch.tensor([40.0, 10.0, 30.0, 20.0]))) == 25.0
    assert float(median(torch.tensor([3.0, 1.0, 2.0]))) == 2.0


def test_mad_outlier_by_hand():
    # Correct lengths 10 11 12 12 13 14 15 60: median (12 + 13) / 2 = 12.5; deviations 2.5 1.5 0.5 0.5
    # 0.5 1.5 2.5 47.5, their median (1.5 + 1.5) / 2 = 1.5. z(60) = 0.6745 * 47.5 / 1.5 = 21.4 > 3.5;
    # z(15) = 0.6745 * 2.5 / 1.5 = 1.12. The wrong 100 is neither counted nor touched.
    inputs = round_of([([10, 11, 12, 12, 13, 14, 15, 60, 100], [1.0] * 8 + [0.0], [1.0] * 8 + [0.0])])
    assert mad_outlier(inputs).tolist() == pytest.approx([1.0] * 7 + [0.5, 0.0])
    assert mad_outlier(inputs, penalty=0.2).tolist() == pytest.approx([1.0] * 7 + [0.8, 0.0])
    assert LENGTH_SHAPERS.get("mad_outlier").bind().metrics(inputs) == {"mad_outlier/flagged_share": 1 / 8}


def test_mad_outlier_uses_the_true_median_and_flags_the_long_side_only():
    # 10 20 30 40: median 25, deviations 15 5 5 15, MAD 10: z(40) = 0.6745 * 15 / 10 = 1.012, z(10) = -1.012.
    # (The lower median, 20, would give MAD 10 and z(40) = 0.6745 * 20 / 10 = 1.349, above 1.2.)
    inputs = round_of([([10, 20, 30, 40], [1.0] * 4, [1.0] * 4)])
    assert mad_outlier(inputs, threshold=1.2).tolist() == [1.0] * 4
    assert mad_outlier(inputs, threshold=1.0).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5])


def test_mad_outlier_leaves_lengths_that_nearly_agree():
    # 1000 1001 1002 1003 5000: median 1002, deviations 2 1 0 1 3998, MAD 1: 1 / 1002 is below the
    # 0.015 floor, so nothing is an outlier; without the floor z(5000) = 0.6745 * 3998 = 2697.
    inputs = round_of([([1000, 1001, 1002, 1003, 5000], [1.0] * 5, [1.0] * 5)])
    assert mad_outlier(inputs).tolist() == [1.0] * 5
    assert mad_outlier(inputs, min_relative_mad=0.0).tolist() == pytest.approx([1.0] * 4 + [0.5])
    # one correct rollout, or most lengths equal (MAD 0, as NeMo-RL): no outlier either
    assert mad_outlier(round_of([([10, 90], [1.0, 0.0], [1.0, 0.0])])).tolist() == [1.0, 0.0]
    assert mad_outlier(round_of([([10, 10, 10, 90], [1.0] * 4, [1.0] * 4)])).tolist() == [1.0] * 4  # MAD 0


# --- Short-RL's lazy length penalty ----------------------------------------------------------------

# Group A: correct lengths 10 12 20 30 (shortest 10, longest 30), a wrong 40; group B: two wrong.
# With length_tolerance 5, 10 and 12 are within 10 + 5: +0.5; 20 gets 0.5 - 10 / (20 + 1e-5) = 2.5e-7;
# 30 gets 0.5 - 20 / (20 + 1e-5) = -0.4999995; the wrong ones 0. Round accuracy 4 / 7 = 0.571.
LAZY_ROUND = [([10, 12, 20, 30, 40], [1.0] * 4 + [0.0], [1.0] * 4 + [0.0]), ([8, 9], [0.0, 0.0], [0.0, 0.0])]
LAZY_REWARDS = [1.5, 1.5, 1.0000002, 0.5000005, 0.0, 0.0, 0.0]


def test_short_rl_by_hand_while_accuracy_holds():
    # best earlier round 0.6: 0.571 >= 0.6 - 0.05, so the penalty is on
    inputs = round_of(LAZY_ROUND, best_accuracy=0.6)
    assert short_rl(inputs, length_tolerance=5).tolist() == pytest.approx(LAZY_REWARDS, abs=1e-6)
    halved = [score + 0.5 * (reward - score) for score, reward in zip([1.0] * 4 + [0.0] * 3, LAZY_REWARDS)]
    assert short_rl(inputs, length_tolerance=5, weight=0.5).tolist() == pytest.approx(halved, abs=1e-6)
    metrics = LENGTH_SHAPERS.get("short_rl").bind().metrics(inputs)
    assert metrics == {"short_rl/active": 1.0, "short_rl/best_accuracy": 0.6}


def test_short_rl_waits_while_accuracy_is_below_its_best():
    # best earlier round 0.7: 0.571 < 0.7 - 0.05, so every rollout keeps its score
    inputs = round_of(LAZY_ROUND, best_accuracy=0.7)
    assert short_rl(inputs, length_tolerance=5).tolist() == [1.0] * 4 + [0.0] * 3
    assert short_rl(inputs, length_tolerance=5, accuracy_tolerance=0.2).tolist() == pytest.approx(
        LAZY_REWARDS, abs=1e-6
    )
    assert LENGTH_SHAPERS.get("short_rl").bind().metrics(inputs)["short_rl/active"] == 0.0
    # a round better than any before is its own best: on
    assert short_rl(round_of(LAZY_ROUND, best_accuracy=0.5), length_tolerance=5).tolist() == pytest.approx(
        LAZY_REWARDS, abs=1e-6
    )


# --- the gate --------------------------------------------------------------------------------------

# Kimi (weight 0.4) over two groups.
# Group A, lengths 10 20 30 40, correct 1 1 1 0, pass rate 0.75: lambda = 0.5 - (len - 10) / 30 =
# 0.5, 1/6, -1/6, -0.5; the wrong one gets min(0, -0.5). Deltas 0.4 * lambda: 0.2, 1/15, -1/15, -0.2.
# Group B, lengths 10 30, correct 0 1, pass rate 0.5: lambda 0.5 (wrong: min(0, 0.5) = 0), -0.5.
# Deltas 0, -0.2.
KIMI_ROUND = [([10, 20, 30, 40], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]), ([10, 30], [0.0, 1.0], [0.0, 1.0])]
KIMI_DELTAS = [0.2, 1 / 15, -1 / 15, -0.2, 0.0, -0.2]
KIMI_SCORES = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def gated(gate: LengthGate, name: str = "kimi", **params) -> GatedPenalty:
    entry = LENGTH_SHAPERS.get(name)
    return GatedPenalty(entry.bind(entry.params(**params)), gate, "any")


def open_gate(**changes) -> LengthGate:
    return LengthGate(
        **{"correct_only": False, "scale": "none", "statistic": "pass_rate", "lower": 0.0, "upper": 1.0, **changes}
    )


@pytest.mark.parametrize(
    "gate, factors",
    [
        (open_gate(), [1, 1, 1, 1, 1, 1]),
        (open_gate(scale="pass_rate"), [0.75] * 4 + [0.5] * 2),  # prime-rl: spare hard prompts
        (open_gate(scale="fail_rate"), [0.25] * 4 + [0.5] * 2),
        (open_gate(lower=0.6), [1] * 4 + [0] * 2),  # the easy group only
        (open_gate(statistic="fail_rate", lower=0.5), [0] * 4 + [1] * 2),  # the hard group only
        (open_gate(lower=0.5, upper=0.5), [0] * 4 + [1] * 2),  # both ends included
        (open_gate(correct_only=True), [1, 1, 1, 0, 0, 1]),
        # every stage at once: A is in the band [0.6, 1], times its fail rate 0.25, correct ones only
        (open_gate(correct_only=True, scale="fail_rate", lower=0.6), [0.25, 0.25, 0.25, 0, 0, 0]),
    ],
)
def test_the_gate_keeps_its_share_of_each_delta(gate, factors):
    expected = [score + factor * delta for score, factor, delta in zip(KIMI_SCORES, factors, KIMI_DELTAS)]
    assert gated(gate)(round_of(KIMI_ROUND)).tolist() == pytest.approx(expected, abs=1e-6)


def test_an_open_gate_returns_the_penalty_s_rewards_bit_for_bit():
    inputs = round_of(KIMI_ROUND)
    assert torch.equal(gated(open_gate())(inputs), LENGTH_SHAPERS.get("kimi").bind()(inputs))
    assert gated(open_gate()).metrics(inputs) == {}  # no gate metrics when it passes everything


def test_gate_metrics_report_the_delta_before_and_after():
    inputs = round_of(KIMI_ROUND)
    metrics = gated(open_gate(statistic="fail_rate", lower=0.5)).metrics(inputs)  # group B only
    assert metrics["length_gate/delta_before"] == pytest.approx(sum(KIMI_DELTAS) / 6, abs=1e-6)
    assert metrics["length_gate/delta_after"] == pytest.approx(-0.2 / 6, abs=1e-6)
    assert metrics["length_gate/open_share"] == pytest.approx(2 / 6)


def test_correct_only_checks_each_round_s_scores():
    """Gated to correct rollouts, kimi (weight 0.4) may take 0.2 from a correct one: scores must be
    binary and a correct one must score at least 0.2, else the round stops the run."""
    gate = GatedPenalty(LENGTH_SHAPERS.get("kimi").bind(), open_gate(correct_only=True), "binary", 0.2)
    gate(round_of(KIMI_ROUND))  # binary 0 / 1: fine
    with pytest.raises(ScoresOutsidePromise, match="at least 0.2"):
        gate(round_of([([10, 30], [1.0, 0.0], [0.1, 0.0])]))  # 0.1 - 0.2 < 0: below the wrong one
    with pytest.raises(ScoresOutsidePromise, match="binary"):
        gate(round_of([([10, 30], [1.0, 0.0], [1.0, 0.5])]))


# --- at load ---------------------------------------------------------------------------------------


def load(*overrides):
    return validate(load_recipe(RECIPES / "dler.yaml", list(overrides)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.length_gate.scale=accuracy"],
            "algorithm.length_gate.scale: unknown group statistic 'accuracy'; expected one of: none, pass_rate, "
            "fail_rate",
        ),
        (
            ["algorithm.length_gate.difficulty.statistic=difficulty"],
            "algorithm.length_gate.difficulty.statistic: unknown group statistic 'difficulty'; expected one of: "
            "pass_rate, fail_rate",
        ),
        (
            ["algorithm.length_gate.difficulty={lower: 0.8, upper: 0.2}"],
            "algorithm.length_gate.difficulty: expected lower <= upper, got lower 0.8 and upper 0.2",
        ),
        (  # cosine replaces the score: a long correct answer can earn exceed (-10), a wrong one keeps 0
            ["algorithm.length_penalty=cosine", "algorithm.length_gate.correct_only=true"],
            "algorithm.length_gate.correct_only: cosine may pay a correct rollout less than a wrong one",
        ),
        (  # truncation cuts a correct answer to 0: below a wrong one's partial credit
            ["algorithm.length_gate.correct_only=true", "reward=[{name: code}]"],
            "algorithm.length_gate.correct_only: truncation on correct rollouts only needs binary scores",
        ),
        (  # short_rl leaves wrong answers alone and takes up to weight / 2 = 1.5 from a correct one
            ["algorithm.length_penalty={name: short_rl, weight: 3.0}"],
            "algorithm.length_penalty: short_rl can take 1.5 from a correct rollout, more than the 1 "
            "reward[0] (math) pays one",
        ),
        (  # kimi takes up to weight / 2 = 1.5 from a correct answer the math reward pays 1
            ["algorithm.length_penalty={name: kimi, weight: 3.0}", "algorithm.length_gate.correct_only=true"],
            "algorithm.length_gate.correct_only: kimi can take 1.5 from a correct rollout, more than the 1 "
            "reward[0] (math) pays one",
        ),
    ],
)
def test_a_gate_that_cannot_work_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_gates_that_keep_the_promises_load():
    assert load().length_penalty.gate.is_open()
    plan = load("algorithm.length_penalty=kimi", "algorithm.length_gate.correct_only=true")
    assert (plan.length_penalty.score_need, plan.length_penalty.least_correct_score) == ("binary", 0.2)
    plan = load("algorithm.length_penalty=brevity_bonus", "algorithm.length_gate.correct_only=true")
    assert plan.length_penalty.score_need == "non_negative"  # a bonus only: wrong ones lose nothing by the gate
    plan = load("algorithm.length_gate={scale: pass_rate, difficulty: {statistic: fail_rate, lower: 0.5}}")
    assert plan.length_penalty.gate == LengthGate(False, "pass_rate", "fail_rate", 0.5, 1.0)


def test_a_bad_gate_on_the_command_line_exits_2_in_one_line_and_writes_nothing(tmp_path, tiny_overrides):
    done = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "algorithm.length_gate.difficulty={statistic: pass_rate, lower: 0.9, upper: 0.1}",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "efficient-rl: error: algorithm.length_gate.difficulty: expected lower <= upper, got lower 0.9 and upper 0.1"
    ]
    assert not (tmp_path / "runs").exists()


# --- in training -----------------------------------------------------------------------------------


def test_a_closed_band_leaves_the_scores_in_training(tmp_path, tiny_overrides):
    """Two lab steps with DAPO's overlong shaping from 4 tokens under the 24-token cap, gated to
    groups at least half right: the tiny model answers nothing right, so the penalty charges every
    round yet the band passes none of it, and the reward is the score."""
    overrides = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.every=0",
        "logging.trackers=[]",
        "algorithm.length_penalty={name: overlong, buffer: 20, factor: 1.0}",
        "algorithm.length_gate.difficulty.lower=0.5",
    ]
    run, _ = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["acc/mean"] == 0.0 and row["length_gate/open_share"] == 0.0
        assert row["length_gate/delta_before"] < 0.0 and row["length_gate/delta_after"] == 0.0
        assert row["reward/mean"] == row["score/mean"]


# A reward that accepts the first four training problems (data.shuffle false: step 1's prompts) and
# nothing else, declared binary as short_rl needs.
FIRST_FOUR = """
def score(completion, sample):
    return {"score": float(int(sample["id"].split("-")[1]) < 4)}


score.score_range = (0.0, 1.0)
score.binary_score = True
"""


def test_short_rl_s_best_accuracy_survives_a_resume(tmp_path, tiny_overrides):
    """Step 1 answers everything right (round accuracy 1), step 2 nothing: the penalty is on at
    step 1 and off at step 2 (0 < 1 - 0.05), only if the best accuracy of step 1 came back with the
    checkpoint the resumed run started from (a fresh one would compare 0 with 0 and switch on)."""
    (tmp_path / "first_four.py").write_text(FIRST_FOUR)
    overrides = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.every=0",
        "eval.after_training=false",
        "logging.trackers=[]",
        "data.shuffle=false",
        f"reward=[{{name: {tmp_path / 'first_four.py'}:score}}]",
        "algorithm.length_penalty={name: short_rl, length_tolerance: 2}",
    ]
    run, _ = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides), stop_after_step=1)
    saved = torch.load(run.path / "checkpoints" / "step-00000001" / "trainer_state.pt", weights_only=False)
    assert saved["state"]["length_penalty_state"] == {"best_accuracy": 1.0}
    run, _ = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides), resume=True)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["score/mean"] for row in rows] == [1.0, 0.0]  # the round accuracies: no accuracy field
    assert [row["short_rl/active"] for row in rows] == [1.0, 0.0]
    assert [row["short_rl/best_accuracy"] for row in rows] == [1.0, 1.0]
    assert rows[0]["reward/mean"] > rows[0]["score/mean"] == 1.0  # +0.5 within 2 tokens of the shortest
