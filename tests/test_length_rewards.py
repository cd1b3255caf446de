"""The efficient-reasoning length rewards (efficient_rl/algos/length_rewards.py) against values
computed by hand here: ties, all-wrong and all-correct groups, groups of one; and one short
training run with L1, whose target length is a prompt variable."""

import json
import math

import pytest
import torch

from conftest import RECIPES
from efficient_rl.algos.length_rewards import (
    arora_zanette,
    cosine_length_reward,
    difficulty_bands,
    kimi_length_reward,
    l1_exact,
    l1_max,
    laser,
    laser_d,
    laser_d_targets,
    thinkprune,
    thinkprune_cap,
)
from efficient_rl.algos.shaping import LENGTH_SHAPERS, ShapingInputs
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError


def inputs(lengths, correct, groups=None, scores=None, cap=48, truncated=None, targets=None, progress=0.0):
    """ShapingInputs by hand: scores default to the correctness, one group unless given."""
    rows = len(lengths)
    return ShapingInputs(
        scores=torch.tensor(scores if scores is not None else correct, dtype=torch.float),
        lengths=torch.tensor(lengths),
        correct=torch.tensor(correct, dtype=torch.float),
        truncated=torch.tensor(truncated) if truncated is not None else torch.zeros(rows, dtype=torch.bool),
        length_cap=torch.tensor(cap) if isinstance(cap, list) else torch.full((rows,), cap),
        group_ids=torch.tensor(groups if groups is not None else [0] * rows),
        samples=[{"target_length": t} for t in targets] if targets is not None else [{}] * rows,
        progress=progress,
    )


def close(tensor, expected):
    assert tensor.tolist() == pytest.approx(expected, abs=1e-6)


# --- L1 ------------------------------------------------------------------------------------------


def test_l1_exact_charges_the_distance_to_each_samples_target():
    batch = inputs([10, 20, 30], [1, 0, 1], targets=[15, 20, 10])
    close(l1_exact(batch, alpha=0.01), [1 - 0.01 * 5, 0.0, 1 - 0.01 * 20])


def test_l1_max_is_a_soft_budget_and_zero_for_wrong_answers():
    # clip(0.1 * (target - length) + 0.5, 0, 1) times the score
    batch = inputs([10, 20, 30, 12, 10], [1, 0, 1, 1, 1], targets=[15, 40, 10, 10, 12])
    close(l1_max(batch, alpha=0.1, delta=0.5), [1.0, 0.0, 0.0, 0.3, 0.7])


def test_l1_reads_the_named_field_and_names_a_missing_one():
    batch = inputs([10, 20], [1, 1])
    batch.samples = [{"budget": 10}, {"budget": 30}]
    close(l1_exact(batch, alpha=0.1, target_field="budget"), [1.0, 0.0])
    with pytest.raises(ValueError, match="'l1_exact' reads the sample field 'target_length'"):
        l1_exact(batch)
    metrics = LENGTH_SHAPERS.get("l1_exact").bind().metrics(inputs([10, 20], [1, 1], targets=[12, 14]))
    assert metrics == {"l1/target_deviation": pytest.approx(4.0), "l1/over_target": pytest.approx(0.5)}


# --- ThinkPrune ----------------------------------------------------------------------------------


def test_thinkprune_caps_tighten_in_equal_rounds():
    caps = [40, 30, 20]
    assert [thinkprune_cap(p, caps) for p in (0.0, 0.33, 0.34, 0.5, 2 / 3, 0.99, 1.0)] == [40, 40, 30, 30, 20, 20, 20]
    batch = inputs([15, 25, 35, 45], [1, 1, 1, 1], truncated=[False, False, False, True])
    for progress, expected in ((0.0, [1, 1, 1, 0]), (0.5, [1, 1, 0, 0]), (1.0, [1, 0, 0, 0])):
        batch.progress = progress
        close(thinkprune(batch, caps=caps), expected)
    batch.progress, batch.length_cap = 0.0, torch.tensor([10, 48, 48, 48])  # a tighter cap in force wins
    close(thinkprune(batch, caps=caps), [0, 1, 1, 0])
    assert LENGTH_SHAPERS.get("thinkprune").bind().metrics(batch) == {"thinkprune/cap": 4000.0}


@pytest.mark.parametrize(
    "caps, message",
    [
        ("[48, 52]", "algorithm.length_penalty.caps: expected caps that tighten (non-increasing), got [48, 52]"),
        ("[64, 32]", "algorithm.length_penalty.caps: expected caps within rollout.max_response_length (48)"),
        ("[]", "algorithm.length_penalty.caps: expected at least one cap"),
        ("[48, 0]", "algorithm.length_penalty.caps[1]: expected an integer >= 1, got 0"),
    ],
)
def test_thinkprune_caps_are_checked_at_load(caps, message):
    with pytest.raises(ConfigError) as err:
        validate(
            load_recipe(RECIPES / "length_penalties" / "thinkprune.yaml", [f"algorithm.length_penalty.caps={caps}"])
        )
    assert message in str(err.value)


# --- Kimi k1.5 -----------------------------------------------------------------------------------


def test_kimi_interpolates_between_the_groups_shortest_and_longest():
    batch = inputs(
        lengths=[10, 20, 30, 40, 5, 15, 7, 7, 7, 12, 10, 30, 10, 30],
        correct=[1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1],
        groups=[0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5],
    )
    expected = [
        1 + 0.5,
        1 + (0.5 - 10 / 30),
        0 + min(0, 0.5 - 20 / 30),
        0 - 0.5,  # lambda for correct, min(0, lambda) for wrong
        0 + 0.0,
        1 - 0.5,  # a short wrong answer gets no bonus
        1.0,
        0.0,
        1.0,  # a tie: max_len = min_len, no length reward
        1.0,  # a group of one
        0 + 0.0,
        0 - 0.5,  # all wrong
        1 + 0.5,
        1 - 0.5,  # all correct
    ]
    close(kimi_length_reward(batch, weight=1.0), expected)
    close(kimi_length_reward(batch, weight=0.4), [s + 0.4 * (e - s) for s, e in zip(batch.scores.tolist(), expected)])


def test_kimi_warmup_leaves_the_score_until_it_ends():
    batch = inputs([10, 30], [1, 1], progress=0.2)
    close(kimi_length_reward(batch, weight=1.0, warmup=0.5), [1.0, 1.0])
    batch.progress = 0.5
    close(kimi_length_reward(batch, weight=1.0, warmup=0.5), [1.5, 0.5])


# --- Arora & Zanette -----------------------------------------------------------------------------


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_arora_zanette_sigmoid_of_the_z_scored_length_among_the_correct():
    batch = inputs(
        lengths=[10, 20, 30, 40, 15, 15, 25, 10, 30, 12, 50],
        correct=[1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0],
        groups=[0, 0, 0, 0, 1, 1, 2, 3, 3, 4, 4],
    )
    std = math.sqrt(((10 - 20) ** 2 + 0 + (30 - 20) ** 2) / 3)  # population std of 10, 20, 30 (the wrong 40 is out)
    expected = [
        1 - 0.2 * sigmoid(-10 / std),
        1 - 0.2 * 0.5,
        1 - 0.2 * sigmoid(10 / std),
        0.0,
        0.9,
        0.9,  # a tie among the correct: z = 0
        0.9,  # a group of one
        0.0,
        0.0,  # all wrong: the scores
        0.9,
        0.0,
    ]  # one correct answer among wrong ones
    close(arora_zanette(batch, alpha=0.2), expected)
    all_correct = inputs([10, 30], [1, 1])
    close(arora_zanette(all_correct, alpha=0.2), [1 - 0.2 * sigmoid(-1.0), 1 - 0.2 * sigmoid(1.0)])


# --- LASER and LASER-D ---------------------------------------------------------------------------


def test_laser_adds_a_step_bonus_to_correct_answers_within_the_target():
    close(laser(inputs([10, 20, 21, 5], [1, 1, 1, 0]), target=20, alpha=0.5), [1.5, 1.5, 1.0, 0.0])


def test_difficulty_bands_by_group_accuracy_exactly_at_the_thirds():
    correct = [1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    groups = [0] * 3 + [1] * 3 + [2] * 3 + [3] * 6 + [4] * 6 + [5] * 6
    band, size = difficulty_bands(inputs([1] * len(correct), correct, groups=groups))
    # 1/3 medium, 2/3 high, 0 low; 2/6 medium, 4/6 high, 1/6 low
    assert band.tolist() == [1] * 3 + [2] * 3 + [0] * 3 + [1] * 6 + [2] * 6 + [0] * 6 and size == 6


def test_laser_d_targets_per_band_from_the_rounds_own_rollouts():
    # G = 6: a band needs floor(coverage * n) >= 1 with n = 1 (low), 2 (medium), 4 (high).
    batch = inputs(
        lengths=[18, 20, 26, 30, 40, 44, 10, 30, 34, 36, 38, 46, 20, 47, 47, 47, 47, 47],
        correct=[1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        groups=[0] * 6 + [1] * 6 + [2] * 6,
    )
    # grid 16, 24, ..., 48: high covers 2 of 6 at 24 (floor(8 / 6) = 1); medium 5 of 6 at 40
    # (floor(10 / 6) = 1, 2 of 6 at 32 is not enough); low needs every rollout, so 48.
    assert laser_d_targets(batch, min_target=16, step=8, expected_correct=1).tolist() == [48, 40, 24]
    close(
        laser_d(batch, alpha=0.5, min_target=16, step=8),
        [1.5, 1.5, 1, 1, 1, 0, 1.5, 1.5, 1.5, 0, 0, 0, 1.5, 0, 0, 0, 0, 0],
    )
    metrics = LENGTH_SHAPERS.get("laser_d").bind().metrics(batch)
    assert metrics == {"laser_d/target_low": 48.0, "laser_d/target_medium": 48.0, "laser_d/target_high": 48.0}
    only_high = inputs([18, 20, 26, 30, 40, 44], [1, 1, 1, 1, 1, 0])
    assert laser_d_targets(only_high, 16, 8, 1).tolist() == [48, 48, 24]  # a band without prompts: the cap
    assert laser_d_targets(only_high, 16, 8, 2).tolist() == [48, 48, 32]  # two expected: 4 of 6 at 32
    assert laser_d_targets(only_high, 64, 8, 1).tolist() == [48, 48, 48]  # no grid under the cap
    one = inputs([12], [1])  # a group of one is high, but floor(2 / 3) = 0 rollouts can never be expected
    assert laser_d_targets(one, 8, 8, 1).tolist() == [48, 48, 48]


# --- cosine --------------------------------------------------------------------------------------


def cos_fn(t, T, at_end, at_start):
    """The paper's CosFn: at_end + 1/2 (at_start - at_end)(1 + cos(t pi / T))."""
    return at_end + 0.5 * (at_start - at_end) * (1 + math.cos(t * math.pi / T))


def test_cosine_reward_by_correctness_and_length_with_an_exceed_value():
    batch = inputs(
        [10, 20, 40, 10, 30, 45], [1, 1, 1, 0, 0, 1], cap=40, truncated=[False, False, False, False, False, True]
    )
    expected = [cos_fn(10, 40, 1, 2), cos_fn(20, 40, 1, 2), 1.0, cos_fn(10, 40, 0, -10), cos_fn(30, 40, 0, -10), -10.0]
    close(cosine_length_reward(batch), expected)
    assert expected[:3] == pytest.approx([1 + 0.5 * (1 + math.sqrt(0.5)), 1.5, 1.0])


def test_every_new_entry_is_reachable_by_name_with_its_defaults():
    batch = inputs([10, 30], [1, 0], targets=[20, 20])
    for name in ("l1_exact", "l1_max", "thinkprune", "kimi", "arora_zanette", "laser", "laser_d", "cosine"):
        rewards = LENGTH_SHAPERS.get(name).bind()(batch)
        assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all(), name


# --- end to end ----------------------------------------------------------------------------------


def test_l1_trains_two_steps_with_a_target_in_each_prompt(tmp_path, tiny_overrides):
    """The L1 recipe on the tiny lab model: targets drawn per sample reach the prompt and the
    reward, and the held-out set is evaluated once per listed target."""
    from efficient_rl.driver.loop import run_recipe

    overrides = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.every=2",
        "eval.num_problems=4",
        "logging.trackers=[]",
        "prompt.variables.target_length.high=24",
        "eval.variables={target_length: [8, 16]}",
        "logging.name=l1",
    ]
    run, summary = run_recipe(load_recipe(RECIPES / "length_penalties" / "l1_exact.yaml", overrides))
    assert summary["steps_completed"] == 2 and "final" in summary
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["l1/target_deviation"] > 0 and row["reward/mean"] < row["score/mean"]  # the distance is charged
    for target in (8, 16):
        assert 0 <= rows[1][f"eval/target_length={target}/pass@1"] <= 1
        length = rows[1][f"eval/target_length={target}/length/mean"]
        assert rows[1][f"eval/target_length={target}/length_error"] == pytest.approx((length - target) / target)
    assert rows[1]["eval/length/mean"] == pytest.approx(
        (rows[1]["eval/target_length=8/length/mean"] + rows[1]["eval/target_length=16/length/mean"]) / 2
    )
