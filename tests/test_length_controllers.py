"""DOT, Leash and the reference-profiled threshold (efficient_rl/algos/length_controllers.py)
against values computed by hand here; Leash's multiplier over a sequence of batches and across a
resume; the length profile's rows and its join on the training samples; and a short training run
with each."""

import json
import math
import statistics

import pytest
import torch

from conftest import RECIPES, run_cli
from efficient_rl.algos.length_controllers import dynamic_outlier_truncation, leash, profiled_threshold
from efficient_rl.algos.shaping import LENGTH_SHAPERS, ShapingInputs, advance_state, initial_state
from efficient_rl.config.loading import load_recipe
from efficient_rl.data.profiles import join_length_profile, profile_row
from efficient_rl.data.sources import load_split
from efficient_rl.driver.loop import PENALTY_STATE, run_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.run.checkpoint import TRAINER_STATE_FILE


def inputs(lengths, correct, groups=None, scores=None, samples=None, state=None):
    """ShapingInputs by hand: scores default to the correctness, one group unless given."""
    rows = len(lengths)
    return ShapingInputs(
        scores=torch.tensor(scores if scores is not None else correct, dtype=torch.float),
        lengths=torch.tensor(lengths),
        truncated=torch.zeros(rows, dtype=torch.bool),
        length_cap=torch.full((rows,), 4096),
        correct=torch.tensor(correct, dtype=torch.float),
        group_ids=torch.tensor(groups if groups is not None else [0] * rows),
        samples=samples if samples is not None else [{}] * rows,
        state=state if state is not None else {},
    )


def close(tensor, expected):
    assert tensor.tolist() == pytest.approx(expected, abs=1e-6)


# --- DOT -----------------------------------------------------------------------------------------

# Two prompts of four rollouts of lengths 10, 10, 10, 50: mean 20, sample std sqrt(1200 / 3) = 20.
# The first prompt is solved by every rollout, the second is not.
DOT_LENGTHS = [10, 10, 10, 50] * 2
DOT_GROUPS = [0] * 4 + [1] * 4


def dot_reference(lengths, correct, groups, scores, k, margin):
    """DOT rule by brute force: per group, with the statistics module's sample std."""
    rewards = list(scores)
    for group in set(groups):
        rows = [i for i, g in enumerate(groups) if g == group]
        if not all(correct[i] > 0 for i in rows):
            continue
        members = [lengths[i] for i in rows]
        spread = statistics.stdev(members) if len(members) > 1 else 0.0
        cutoff = math.floor(statistics.mean(members) + k * spread)
        for i in rows:
            if lengths[i] - cutoff >= margin:
                rewards[i] = min(scores[i], 0.0)
    return rewards


def test_dot_truncates_the_long_tail_of_a_group_every_rollout_solved():
    correct = [1, 1, 1, 1, 1, 1, 0, 1]
    batch = inputs(DOT_LENGTHS, correct, groups=DOT_GROUPS)
    # k = 1: cutoff floor(20 + 20) = 40, and 50 - 40 = 10 >= margin 10: the 50-token answer of the
    # solved prompt earns 0; the unsolved prompt's identical 50-token answer keeps its score.
    close(dynamic_outlier_truncation(batch, k=1.0, margin=10), [1, 1, 1, 0, 1, 1, 0, 1])
    # margin 11: 10 tokens past the cutoff are not enough.
    close(dynamic_outlier_truncation(batch, k=1.0, margin=11), correct)
    # k = 1.5: cutoff 50, the longest answer is not past it.
    close(dynamic_outlier_truncation(batch, k=1.5, margin=1), correct)
    metrics = LENGTH_SHAPERS.get("dot").bind(LENGTH_SHAPERS.get("dot").params(k=1.0, margin=10)).metrics(batch)
    assert metrics == {"dot/truncated": 1 / 8, "dot/solved_share": 4 / 8}


def test_dot_cutoff_is_floored_before_the_margin():
    # 10, 10, 10, 51: mean 20.25, sample std sqrt(1260.75 / 3) = 20.5, so with k = 1 the cutoff is
    # floor(40.75) = 40 and the long answer lies 11 tokens past it (10.25 past the unfloored value).
    batch = inputs([10, 10, 10, 51], [1, 1, 1, 1])
    close(dynamic_outlier_truncation(batch, k=1.0, margin=11), [1, 1, 1, 0])
    close(dynamic_outlier_truncation(batch, k=1.0, margin=12), [1, 1, 1, 1])


def test_dot_matches_a_brute_force_reference_on_random_groups():
    generator = torch.Generator().manual_seed(3)
    truncated = 0
    for _ in range(40):
        lengths = torch.randint(1, 200, (12,), generator=generator).tolist()
        correct = (torch.rand(12, generator=generator) < 0.8).long().tolist()
        scores = (torch.randn(12, generator=generator) * 2).tolist()
        groups = [i // 4 for i in range(12)]
        for k, margin in ((0.5, 1), (1.0, 5), (1.2, 20)):
            batch = inputs(lengths, correct, groups=groups, scores=scores)
            expected = dot_reference(lengths, correct, groups, scores, k, margin)
            close(dynamic_outlier_truncation(batch, k=k, margin=margin), expected)
            truncated += sum(e != s for e, s in zip(expected, scores))
    assert truncated > 20  # the reference did cut answers


def test_dot_pays_a_truncated_answer_at_most_zero_and_never_more_than_its_score():
    batch = inputs([10, 10, 10, 50, 10, 10, 10, 50], [1] * 8, groups=DOT_GROUPS, scores=[2, 2, 2, 2] + [-0.5] * 4)
    close(dynamic_outlier_truncation(batch, k=1.0, margin=1), [2, 2, 2, 0, -0.5, -0.5, -0.5, -0.5])


def test_dot_leaves_a_group_of_one_length_alone():
    batch = inputs([30, 30, 30], [1, 1, 1])  # std 0: the cutoff is the length itself
    close(dynamic_outlier_truncation(batch, k=0.0, margin=1), [1, 1, 1])
    single = inputs([30], [1])  # a group of one has no spread either
    close(dynamic_outlier_truncation(single, k=0.0, margin=1), [1])


# DOT shapes only all-correct groups: dynamic sampling keeps them by the shaped reward's spread
ON_REWARD = "algorithm.sampling.metric=reward"


@pytest.mark.parametrize("sampling", ["algorithm.sampling.metric=score", "algorithm.sampling.metric=accuracy"])
def test_dot_refuses_dynamic_sampling_that_drops_every_group_it_shapes(sampling):
    """DLER's filter on the score drops the all-correct groups, and with them every truncation:
    the frontier study's DOT runs trained exactly as the runs with no penalty did."""
    overrides = ["algorithm.length_penalty={name: dot, k: 2.0, margin: 1}", sampling]
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "quickstart.yaml", overrides))
    metric = sampling.rsplit("=", 1)[1]
    assert str(err.value).startswith(
        f"algorithm.length_penalty.name: dot shapes only all-correct groups, which dynamic sampling on the {metric} "
        "drops (no spread there)"
    )
    validate(load_recipe(RECIPES / "quickstart.yaml", [*overrides, ON_REWARD]))
    validate(load_recipe(RECIPES / "quickstart.yaml", [*overrides, "algorithm.sampling=all"]))


def test_dot_refuses_a_k_no_length_can_exceed_in_a_group():
    # rollout.group_size 4: no length is more than 3 / sqrt(4) = 1.5 sample standard deviations
    # above the mean
    overrides = ["rollout.group_size=4", "algorithm.length_penalty={name: dot, k: 1.5}", ON_REWARD]
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "quickstart.yaml", overrides))
    expected = "algorithm.length_penalty.k: expected below (rollout.group_size - 1) / sqrt(rollout.group_size) = 1.5,"
    assert str(err.value).startswith(expected)
    # the default k = 3 needs groups of more than 10 ((G - 1) / sqrt(G): 3.015 at 11, 2.846 at 10)
    validate(
        load_recipe(
            RECIPES / "quickstart.yaml", ["rollout.group_size=11", "algorithm.length_penalty={name: dot}", ON_REWARD]
        )
    )
    with pytest.raises(ConfigError, match=r"= 2.846, got 3.0"):
        validate(
            load_recipe(
                RECIPES / "quickstart.yaml",
                ["rollout.group_size=10", "algorithm.length_penalty={name: dot}", ON_REWARD],
            )
        )
    validate(
        load_recipe(
            RECIPES / "quickstart.yaml",
            ["rollout.group_size=4", "algorithm.length_penalty={name: dot, k: 1.4}", ON_REWARD],
        )
    )


def test_dot_refuses_a_margin_beyond_the_generation_limit():
    # the quickstart's limit is 48 tokens: no answer can lie 49 tokens past a cutoff
    overrides = ["rollout.group_size=16", "algorithm.length_penalty={name: dot, margin: 49}", ON_REWARD]
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert str(err.value).startswith("algorithm.length_penalty.margin: expected 1..rollout.max_response_length (48)")


# --- Leash ---------------------------------------------------------------------------------------


def test_leash_charges_lambda_times_the_relative_excess_over_the_target():
    batch = inputs([50, 100, 150, 300], [1, 1, 1, 0], state={"lambda": 0.5})
    # excess max(0, length / 100 - 1): 0, 0, 0.5, 2
    close(leash(batch, target=100, step_size=0.1), [1, 1, 0.75, -1])


def test_leash_before_any_step_uses_the_initial_multiplier():
    batch = inputs([50, 200], [1, 1])
    close(leash(batch, target=100, initial_lambda=0.25), [1, 0.75])


def test_leash_lambda_follows_dual_ascent_over_a_sequence_of_batches():
    penalty = LENGTH_SHAPERS.get("leash").bind(LENGTH_SHAPERS.get("leash").params(target=100, step_size=0.1))
    state = initial_state(penalty)
    assert state == {"lambda": 0.0}
    # batch mean lengths 150, 130, 60, 40, 120: violations 0.5, 0.3, -0.4, -0.6, 0.2 of the target
    batches = [[100, 200], [130, 130], [60, 60], [20, 60], [90, 150]]
    expected = [0.05, 0.08, 0.04, 0.0, 0.02]  # 0.04 - 0.06 is held at 0
    trajectory = []
    for lengths in batches:
        state = advance_state(penalty, state, inputs(lengths, [1, 1], state=state))
        trajectory.append(state["lambda"])
    assert trajectory == pytest.approx(expected, abs=1e-12)


def test_a_penalty_without_state_carries_none():
    truncation = LENGTH_SHAPERS.get("truncation").bind()
    assert initial_state(truncation) == {}
    assert advance_state(truncation, {}, inputs([10], [1])) == {}


# --- the reference-profiled threshold -------------------------------------------------------------


def profiled(passing, mean, std):
    return {"reference_passing": passing, "reference_mean": mean, "reference_std": std}


def test_profiled_threshold_penalises_lengths_from_mean_plus_n_std_of_the_reference():
    solved_often = profiled(3, 20.0, 5.0)  # threshold 20 + 1 * 5 = 25
    solved_once = profiled(1, 5.0, 0.0)  # fewer passing answers than min_passing: no threshold
    batch = inputs([24, 25, 40, 100], [1, 0, 1, 1], scores=[1, 0, 1, 1], samples=[solved_often] * 3 + [solved_once])
    close(profiled_threshold(batch, n_std=1.0, min_passing=2, penalty=0.5), [1, -0.5, 0.5, 1])
    close(profiled_threshold(batch, n_std=4.0, min_passing=1, penalty=0.5), [1, 0, 0.5, 0.5])  # 40, and 5 + 0


def test_a_profile_row_holds_the_passing_lengths_mean_and_population_std():
    row = profile_row("p1", [10, 20, 30, 99], [True, True, True, False])
    assert row == {"id": "p1", "passing_count": 3, "mean": 20.0, "std": pytest.approx(math.sqrt(200 / 3))}
    assert profile_row("p2", [40, 50], [False, False]) == {"id": "p2", "passing_count": 0, "mean": None, "std": None}


def write_profile(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_join_puts_each_prompts_profile_on_its_sample(tmp_path):
    stats = tmp_path / "stats.jsonl"
    write_profile(stats, [profile_row("b", [8, 12], [True, True]), profile_row("a", [5], [False])])
    joined = join_length_profile([{"id": "a", "question": "?"}, {"id": "b"}], stats, "algorithm.length_penalty.stats")
    assert joined[1] == {"id": "b", "reference_passing": 2, "reference_mean": 10.0, "reference_std": 2.0}
    assert joined[0]["reference_passing"] == 0 and math.isnan(joined[0]["reference_mean"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "passing_count": 1, "mean": 3, "std": 0}\n', "has no row for the training prompt id 'b'"),
        ('{"id": "a", "passing_count": 1}\n', "line 1: expected an object with id, passing_count, mean, std"),
        ('{"id": "a", "passing_count": -1, "mean": 3, "std": 0}\n', "line 1: passing_count: expected a count"),
        ("not json\n", "line 1: not JSON"),
    ],
)
def test_a_profile_that_misses_or_garbles_a_prompt_is_one_line_naming_it(tmp_path, content, message):
    stats = tmp_path / "stats.jsonl"
    stats.write_text(content)
    with pytest.raises(ConfigError) as err:
        join_length_profile([{"id": "a"}, {"id": "b"}], stats, "algorithm.length_penalty.stats")
    assert message in str(err.value) and str(stats) in str(err.value) and "\n" not in str(err.value)


def test_profiled_threshold_needs_a_stats_file():
    with pytest.raises(ConfigError, match="algorithm.length_penalty.stats: expected the path of a length profile"):
        validate(load_recipe(RECIPES / "quickstart.yaml", ["algorithm.length_penalty={name: profiled_threshold}"]))


def test_a_missing_profile_is_refused_by_validation_and_by_study_check(tmp_path, capsys):
    """Before, validation passed and `study check` said 0; every run then failed at its build."""
    from efficient_rl.cli import main

    missing = tmp_path / "nowhere.jsonl"
    penalty = f"algorithm.length_penalty={{name: profiled_threshold, stats: '{missing}'}}"
    expected = f"algorithm.length_penalty.stats: {missing} is no file; write it with efficient-rl profile-lengths"
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "quickstart.yaml", [penalty]))
    assert str(err.value) == expected
    study = tmp_path / "study.yaml"
    study.write_text(f'runs:\n  - {{method: p, recipe: {RECIPES / "quickstart.yaml"}, overrides: ["{penalty}"]}}\n')
    assert main(["study", "check", str(study), f"output_dir={tmp_path / 'out'}"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- training runs on the tiny lab model ---------------------------------------------------------


def always_right(completion, sample):
    return {"score": 1.0}


def lab_run(tiny_overrides, name, extra, steps=2, stop_after_step=None, resume=False):
    overrides = tiny_overrides + [
        f"steps={steps}",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        f"logging.name={name}",
        *extra,
    ]
    run, summary = run_recipe(
        load_recipe(RECIPES / "quickstart.yaml", overrides), resume=resume, stop_after_step=stop_after_step
    )
    return run, [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def test_dot_training_truncates_only_outliers_of_solved_groups(tmp_path, tiny_overrides):
    # Every answer scores 1, so every group is solved. Under a limit of 64 tokens a quarter of the
    # tiny model's answers stop early, so most groups hold lengths that differ, and with k = 0.5 and
    # margin 1 the longest of those lie past floor(mean + k std): the truncated ones are all that
    # lowers the reward.
    _, rows = lab_run(
        tiny_overrides,
        "dot",
        [
            "reward=[{name: 'test_length_controllers:always_right'}]",
            "rollout.max_response_length=64",
            "algorithm.length_penalty={name: dot, k: 0.5, margin: 1}",
        ],
    )
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["dot/solved_share"] == 1.0 and row["score/mean"] == 1.0
        assert row["reward/mean"] == pytest.approx(1.0 - row["dot/truncated"])
    assert sum(row["dot/truncated"] for row in rows) > 0


LEASH = ["algorithm.length_penalty={name: leash, target: 4, step_size: 0.5}"]


def test_leash_lambda_rises_while_lengths_exceed_the_target_and_survives_a_resume(tmp_path, tiny_overrides):
    """Responses of the tiny model run longer than 4 tokens on average, so lambda rises every step
    by step_size * (mean length / 4 - 1), the mean the step logged; a run stopped after step 2
    and resumed goes on from the multiplier it saved, exactly as the run that went straight."""
    _, straight = lab_run(tiny_overrides, "leash", LEASH, steps=4)
    lambdas = [row["length/leash_lambda"] for row in straight]
    assert lambdas[0] == 0.0
    assert_dual_ascent(straight, target=4, step_size=0.5)
    assert all(later > earlier for earlier, later in zip(lambdas, lambdas[1:]))
    stopped, _ = lab_run(tiny_overrides, "leash-resumed", LEASH, steps=4, stop_after_step=2)
    saved = torch.load(stopped.path / "checkpoints" / "step-00000002" / TRAINER_STATE_FILE, weights_only=False)
    assert saved["state"][PENALTY_STATE] == {"lambda": lambdas[2]}  # the one step 3 shapes with
    _, resumed = lab_run(tiny_overrides, "leash-resumed", LEASH, steps=4, resume=True)
    assert [row["length/leash_lambda"] for row in resumed] == lambdas


def assert_dual_ascent(rows, target, step_size):
    """Each step's lambda is the previous step's advanced by that step's logged mean length."""
    for row, following in zip(rows, rows[1:]):
        expected = max(0.0, row["length/leash_lambda"] + step_size * (row["response_length/mean"] / target - 1))
        assert following["length/leash_lambda"] == pytest.approx(expected, abs=1e-9), following["step"]


def test_leash_lambda_carries_across_a_resume_of_the_overlapped_pipeline(tmp_path, tiny_overrides):
    """Overlapped, the batch of step 3 is generated (and lambda advanced by it) before step 2's
    checkpoint: the checkpoint holds that batch and the lambda after it, so the resumed run's
    multipliers still follow the dual ascent step after step, across the resume too."""
    overlapped = [*LEASH, "cluster.pipeline.name=overlapped", "cluster.pipeline.max_staleness=1", "scoring.workers=0"]
    overlapped.append("algorithm.rollout_correction=tis")
    lab_run(tiny_overrides, "overlapped", overlapped, steps=4, stop_after_step=2)
    _, rows = lab_run(tiny_overrides, "overlapped", overlapped, steps=4, resume=True)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["length/leash_lambda"] == 0.0 and rows[3]["length/leash_lambda"] > rows[1]["length/leash_lambda"]
    assert_dual_ascent(rows, target=4, step_size=0.5)


def test_profiled_threshold_training_penalises_the_profiled_prompts(tmp_path, tiny_overrides):
    # Even prompts profiled with mean 1, std 0 (every response of a token or more is over it), odd
    # ones passed by the reference once, below min_passing 2: only the first are penalised.
    recipe = load_recipe(RECIPES / "quickstart.yaml", tiny_overrides)
    samples = load_split(recipe.data.train, "train", recipe.data, recipe.seed, "data.train")
    stats = tmp_path / "stats.jsonl"
    write_profile(
        stats,
        [profile_row(s["id"], [1, 1] if index % 2 == 0 else [1], [True] * 2) for index, s in enumerate(samples)],
    )
    _, rows = lab_run(
        tiny_overrides, "profiled", [f"algorithm.length_penalty={{name: profiled_threshold, stats: '{stats}'}}"]
    )
    for row in rows:
        assert 0 < row["profiled/profiled_share"] < 1
        assert row["profiled/over_threshold"] == row["profiled/profiled_share"]
        assert row["reward/mean"] == pytest.approx(row["score/mean"] - 0.5 * row["profiled/over_threshold"])


def test_a_training_prompt_missing_from_the_profile_stops_the_run_in_one_line(tmp_path, tiny_overrides):
    stats = tmp_path / "stats.jsonl"
    write_profile(stats, [profile_row("lab-0", [3, 4], [True, True])])
    done = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "steps=1",
        "logging.name=unprofiled",
        f"algorithm.length_penalty={{name: profiled_threshold, stats: '{stats}'}}",
        cwd=tmp_path,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("efficient-rl: error: algorithm.length_penalty.stats: ")
    assert str(stats) in lines[0] and "has no row for the training prompt id" in lines[0]
    assert not (tmp_path / "runs").exists(), "a refused profile left a run directory or its lock"


def test_dot_keeps_the_promises_on_random_rounds_where_it_truncates():
    """test_shaping_properties.py checks DOT at its defaults k = 3 and margin 32, which no group of
    8 reaches (7 / sqrt(8) < 3): here with k = 1 and margin 1, where it truncates, on scores of
    any sign."""
    from test_shaping_properties import broken_promises, random_round

    generator = torch.Generator().manual_seed(5)
    changed = 0
    for _ in range(60):
        batch = random_round(generator, "any")
        rewards = dynamic_outlier_truncation(batch, k=1.0, margin=1)
        changed += int((rewards != batch.scores).sum())
        assert not broken_promises(batch, rewards, "shorter")
    assert changed > 0


# --- profiling the reference -----------------------------------------------------------------------


def test_profile_lengths_samples_every_training_prompt_and_the_profile_trains(tmp_path, tiny_overrides):
    """The tiny model's answers all pass (always_right), so each row holds every answer: 3 of
    them, their lengths within the limit; a run whose penalty reads that profile then trains."""
    from efficient_rl.driver.profile import load_for_profiling, profile_lengths

    overrides = tiny_overrides + ["data.train_size=6", "reward=[{name: 'test_length_controllers:always_right'}]"]
    stats = tmp_path / "profile" / "stats.jsonl"
    assert profile_lengths(load_for_profiling(RECIPES / "quickstart.yaml", overrides), stats, samples=3) == 6
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    ids = [s["id"] for s in load_split(*train_split(overrides))]
    assert [row["id"] for row in rows] == ids
    for row in rows:
        assert row["passing_count"] == 3 and 1 <= row["mean"] <= 24 and 0 <= row["std"] <= 23 / 2
    _, metrics = lab_run(
        overrides, "from-profile", [f"algorithm.length_penalty={{name: profiled_threshold, stats: '{stats}'}}"], steps=1
    )
    assert metrics[0]["profiled/profiled_share"] == 1.0


def test_profile_lengths_samples_under_the_recipes_thinking_budget(tmp_path, tiny_overrides):
    """The profile's lengths are the ones training will see: with rollout.thinking_budget, an answer
    still reasoning at 4 tokens gets " The answer is" (3 lab tokens) and at most 2 more, so no
    length passes 4 + 3 + 2, where the tiny model left alone runs to its 24-token limit."""
    from efficient_rl.driver.profile import load_for_profiling, profile_lengths

    budget = "rollout.thinking_budget={tokens: 4, close: ' The answer is', answer_tokens: 2}"
    overrides = tiny_overrides + ["data.train_size=4", "reward=[{name: 'test_length_controllers:always_right'}]"]
    lengths = {}
    for name, extra in (("free", []), ("budget", [budget])):
        stats = tmp_path / f"{name}.jsonl"
        profile_lengths(load_for_profiling(RECIPES / "quickstart.yaml", overrides + extra), stats, samples=3)
        rows = [json.loads(line) for line in stats.read_text().splitlines()]
        # every answer passes: the largest possible length is mean + std * sqrt(n - 1) (population std)
        lengths[name] = max(row["mean"] + row["std"] * 2**0.5 for row in rows)
    assert lengths["budget"] <= 4 + 3 + 2 < lengths["free"], lengths


def train_split(overrides):
    recipe = load_recipe(RECIPES / "quickstart.yaml", overrides)
    return recipe.data.train, "train", recipe.data, recipe.seed, "data.train"


def test_profile_lengths_refuses_an_existing_file_before_building_anything(tmp_path, tiny_overrides):
    from efficient_rl.driver.profile import load_for_profiling, profile_lengths

    stats = tmp_path / "stats.jsonl"
    stats.write_text("kept\n")
    with pytest.raises(ConfigError, match=f"--out: {stats} exists"):
        profile_lengths(load_for_profiling(RECIPES / "quickstart.yaml", tiny_overrides), stats, samples=2)
    assert stats.read_text() == "kept\n"
