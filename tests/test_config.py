"""Recipes: every shipped one validates; bad input is one line naming the field, exit 2, nothing written."""

import dataclasses
import re

import pytest

from conftest import RECIPES, ROOT, run_cli
from efficient_rl.algos.losses import POLICY_LOSSES
from efficient_rl.config.binding import bind
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.schema import Choice
from efficient_rl.config.shipped import shipped_name, shipped_recipes
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    validate(recipe)
    assert recipe.logging.name == path.stem


@pytest.mark.parametrize(
    "tiers, message",
    [
        (
            "min_correct: [0.5], truncation_lengths: [32]",
            "algorithm.length_cap.min_correct: must start at 0.0 and increase up to at most 1.0, got [0.5]",
        ),
        ("min_correct: [0.0, 0.0], truncation_lengths: [48, 32]", "algorithm.length_cap.min_correct: must start"),
        ("min_correct: [], truncation_lengths: []", "algorithm.length_cap.min_correct: must start at 0.0"),
        (
            "min_correct: [0.0, 1.5], truncation_lengths: [48, 32]",
            "algorithm.length_cap.min_correct[1]: expected a finite number in [0, 1], got 1.5",
        ),
        (
            "min_correct: [0.0], truncation_lengths: [4000]",
            "algorithm.length_cap.truncation_lengths[0]: expected 1..rollout.max_response_length (48), got 4000",
        ),
        (
            "min_correct: [0.0, 0.5], truncation_lengths: [48, 0]",
            "algorithm.length_cap.truncation_lengths[1]: expected an integer >= 1, got 0",
        ),
        (
            "min_correct: [0.0, 0.5], truncation_lengths: [48]",
            "algorithm.length_cap.truncation_lengths: expected one per min_correct tier (2), got [48]",
        ),
        (
            "min_correct: [0.0], truncation_lenghts: [40]",
            "algorithm.length_cap.truncation_lenghts: unknown key (did you mean 'truncation_lengths'?)",
        ),
        ("min_correct: 0.5", "algorithm.length_cap.min_correct: expected a list"),
    ],
)
def test_bad_difficulty_aware_caps_name_the_field(tiers, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_recipe(RECIPES / "dler.yaml", [f"algorithm.length_cap={{name: difficulty_aware, {tiers}}}"]))


@pytest.mark.parametrize(
    "sampling, message",
    [
        (
            "{name: dynamic, metric: scroe}",
            "algorithm.sampling.metric: unknown dynamic sampling metric 'scroe' (did you mean 'score'?)",
        ),
        (
            "{name: dynamic, metric: entropy}",
            "algorithm.sampling.metric: unknown dynamic sampling metric 'entropy'; "
            "expected one of: accuracy, reward, score",
        ),
        ("{name: dynamic, max_rounds: -1}", "algorithm.sampling.max_rounds: expected an integer >= 0, got -1"),
        ("{name: dynamic, max_round: 3}", "algorithm.sampling.max_round: unknown key (did you mean 'max_rounds'?)"),
        ("{name: all, max_rounds: 3}", "algorithm.sampling.max_rounds: unknown key"),
        ("dynamik", "algorithm.sampling: unknown group sampler 'dynamik' (did you mean 'dynamic'?)"),
    ],
)
def test_bad_group_samplers_name_the_field(sampling, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_recipe(RECIPES / "grpo.yaml", [f"algorithm.sampling={sampling}"]))


@pytest.mark.parametrize(
    "override, instead",
    [
        ("algorithm.dynamic_sampling=true", "algorithm.sampling: dynamic (or all)"),
        ("algorithm.dynamic_sampling_metric=accuracy", "algorithm.sampling: {name: dynamic, metric: ...}"),
        ("algorithm.max_sampling_rounds=3", "algorithm.sampling: {name: dynamic, max_rounds: N}"),
        ("algorithm.truncation_length=40", "algorithm.length_cap: {name: fixed, length: N}"),
        (
            "algorithm.difficulty_tiers=[{min_correct: 0.0, truncation_length: 48}]",
            "algorithm.length_cap: {name: difficulty_aware, min_correct: [...], truncation_lengths: [...]}",
        ),
    ],
)
def test_retired_algorithm_keys_are_refused_naming_the_new_key(override, instead):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPES / "dler.yaml", [override])
    assert str(err.value) == f"{RECIPES / 'dler.yaml'}: {key}: retired key; write {instead}"


def test_methods_are_diffs_against_grpo():
    grpo, dler = load_recipe(RECIPES / "grpo.yaml"), load_recipe(RECIPES / "dler.yaml")
    assert dler.algorithm.advantage.name == "dler" and grpo.algorithm.advantage.name == "grpo"
    # dler.yaml sets two PPO-clip parameters; the third is grpo.yaml's, merged under the same entry.
    assert dler.algorithm.policy_loss == Choice("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0})
    assert dler.learner == grpo.learner  # not repeated in dler.yaml, inherited


def test_dotted_override_with_type_conversion():
    recipe = load_recipe(
        RECIPES / "dler.yaml", ["algorithm.policy_loss.clip_high=0.3", "learner.lr=1", "rollout.top_p=0.9"]
    )
    assert recipe.algorithm.policy_loss.params["clip_high"] == 0.3
    assert isinstance(recipe.learner.lr, float) and recipe.learner.lr == 1.0


def test_an_entry_named_anew_starts_from_its_own_defaults():
    """Naming another entry drops the parameters set for the old one (they mean nothing to it), in
    a recipe file or on the command line; setting a parameter of an entry given by name keeps it."""
    gspo = load_recipe(RECIPES / "dler.yaml", ["algorithm.policy_loss=gspo"])
    assert gspo.algorithm.policy_loss == Choice("gspo")
    by_key = load_recipe(RECIPES / "dler.yaml", ["algorithm.policy_loss={name: cispo, clip_high: 2.0}"])
    assert by_key.algorithm.policy_loss == Choice("cispo", {"clip_high": 2.0})
    tempo = load_recipe(RECIPES / "grpo.yaml", ["algorithm.advantage=tempo", "algorithm.advantage.norm_by_std=false"])
    assert tempo.algorithm.advantage == Choice("tempo", {"norm_by_std": False})
    bound = bind(gspo.algorithm.policy_loss, POLICY_LOSSES, "algorithm.policy_loss")
    assert (bound.params.clip_low, bound.params.clip_high) == (3e-4, 4e-4)  # GSPO's own, not PPO's 0.2 / 0.28


def test_a_recipe_round_trips_through_its_config_yaml(tmp_path):
    """The run directory's config.yaml loads back into the same recipe (resume compares them)."""
    import yaml

    for path in shipped_recipes():
        recipe = load_recipe(path)
        saved = tmp_path / "config.yaml"
        saved.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        assert load_recipe(saved) == recipe, path.name


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "algorithm.policy_loss.clip_hihg=0.3",
            "algorithm.policy_loss.clip_hihg: unknown key (did you mean 'clip_high'?)",
        ),
        (
            "algorithm.policy_loss.clip_high=.nan",
            "algorithm.policy_loss.clip_high: expected a finite number >= 0, got nan",
        ),
        ("algorithm.policy_loss.clip_ratio_c=0.5", "algorithm.policy_loss.clip_ratio_c: expected a finite number > 1"),
        ("algorithm.policy_loss.clip_low=high", "algorithm.policy_loss.clip_low: expected a number, got str 'high'"),
        ("algorithm.policy_loss=gspoo", "algorithm.policy_loss: unknown policy loss 'gspoo' (did you mean 'gspo'?)"),
        (
            "algorithm.length_penalty={name: truncation, mode: sometimes}",
            "algorithm.length_penalty.mode: expected one of 'paper', 'code'",
        ),
        (
            "algorithm.token_selection={name: high_entropy, top_fraction: 1.5}",
            "algorithm.token_selection.top_fraction: expected a finite number in (0, 1]",
        ),
        (
            "algorithm.token_selection={name: d3s_tokens, token_fraction: [0.2, 1.5]}",
            "algorithm.token_selection.token_fraction[1]: expected a finite number in (0, 1]",
        ),
        (
            "algorithm.token_selection={name: d3s_tokens, token_fraction: [0.2]}",
            "algorithm.token_selection.token_fraction: expected [start, end], got [0.2]",
        ),
        (
            "algorithm.sample_selection={name: d3s, rollouts: [4, 9]}",
            "algorithm.sample_selection.rollouts: expected [N_init, N_final] within 1..rollout.group_size (8)",
        ),
        (
            "algorithm.objective={name: distillation, beta: 1}",
            "algorithm.objective.beta: expected a finite number in (0, 1)",
        ),
        (
            "algorithm.token_selection=tip_soft_or",
            "distill.teacher: algorithm.token_selection tip_soft_or needs a teacher",
        ),
        ("algorithm.advantage=[grpo]", "algorithm.advantage: expected a name, or a mapping with 'name'"),
        (
            "algorithm.length_cap={name: difficulty_aware, truncation_lengths: [200, 100]}",
            "algorithm.length_cap: difficulty_aware needs a length_penalty that uses the cap (cosine, laser_d, "
            "overlong, thinkprune, truncation); nothing in the recipe reads it",
        ),
        ("algorithm.length_cap.length=100", "algorithm.length_cap: fixed needs a length_penalty that uses the cap"),
    ],
)
def test_entries_and_their_parameters_are_checked_before_anything_runs(override, message):
    """Every registry entry a recipe picks is bound by check_recipe (train and submit call it first,
    before any model loads): name, keys, types, ranges and the entry's own checks."""
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "grpo.yaml", [override]))
    assert message in str(err.value)


def test_every_numeric_entry_parameter_has_a_declared_range():
    """A numeric parameter of a registry entry without a range would go unchecked."""
    import typing

    from efficient_rl.driver.validate import CHOICE_FIELDS

    for dotted, registry in CHOICE_FIELDS:
        for entry in registry.entries():
            for item in dataclasses.fields(entry.params):
                kinds = set(typing.get_args(item.type)) | {item.type, typing.get_origin(item.type)}
                if kinds & {int, float} or any(typing.get_args(k) in ((int,), (float,)) for k in kinds if k):
                    assert item.name in entry.ranges, f"{registry.kind} {entry.name}: no range for {item.name}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.clip_hihg=0.3", "algorithm.clip_hihg: unknown key"),
        ("rollout.group_size=eight", "rollout.group_size: expected an integer, got str 'eight'"),
        ("rollout.group_size=2.5", "rollout.group_size: expected an integer"),
        ("algorithm.loss_denominator=sometimes", "algorithm.loss_denominator: expected one of 'kept', 'all'"),
        ("learner.betas=0.9", "learner.betas: expected a list"),
        ("reward=[{nme: math}]", "reward[0].nme: unknown key (did you mean 'name'?)"),
        ("nonsense=1", "nonsense: unknown key"),
    ],
)
def test_bad_recipe_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPES / "grpo.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "algorithm.advantage=grpoo",
            "algorithm.advantage: unknown advantage estimator 'grpoo' (did you mean 'grpo'?)",
        ),
        ("algorithm.loss_agg=token-sum", "algorithm.loss_agg: unknown loss aggregation"),
        ("rollout.max_response_length=0", "rollout.max_response_length: expected an integer >= 1, got 0"),
        (
            "algorithm.length_cap.length=999",
            "algorithm.length_cap.length: expected 1..rollout.max_response_length (256), got 999",
        ),
    ],
)
def test_semantic_checks_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "grpo.yaml", [override]))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["algorithm.policy_loss.clip_hihg=0.3"], "did you mean 'clip_high'"),
        (["model.lab=null", "model.path=/does/not/exist"], "model.path: /does/not/exist is not a model directory"),
        (["data.train=/does/not/exist.jsonl"], "data.train: data file /does/not/exist.jsonl not found"),
        (["data.train=EMPTY"], "data.train:"),
        (["rollout.max_prompt_length=5"], "rollout.max_prompt_length: data.train has a prompt of"),
        # Numbers out of range, refused at load (they used to train: NaN weights, greedy, no nucleus).
        (["learner.lr=nan"], "learner.lr: expected a finite number > 0, got nan"),
        (["rollout.temperature=-1"], "rollout.temperature: expected a finite number > 0"),
        (["rollout.top_p=5"], "rollout.top_p: expected a finite number in (0, 1], got 5.0"),
        (["eval.temperature=-0.5"], "eval.temperature: expected a finite number >= 0 (0 is greedy), got -0.5"),
        (["learner.betas=[0.9, 1.5]"], "learner.betas[1]: expected a finite number in [0, 1), got 1.5"),
        (["reward=[{name: math, weight: .inf}]"], "reward[0].weight: expected a finite number"),
    ],
)
def test_cli_bad_input_exit_2_one_line_nothing_written(tmp_path, tiny_overrides, extra, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = [e.replace("EMPTY", str(empty)) for e in extra]
    result = run_cli("train", str(RECIPES / "quickstart.yaml"), *tiny_overrides, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efficient-rl: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_directory_is_refused(tmp_path, tiny_overrides):
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    result = run_cli("train", str(RECIPES / "quickstart.yaml"), *tiny_overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert "run directory exists; pass --resume" in result.stderr
    assert list((tmp_path / "runs" / "quickstart").iterdir()) == []


def test_recipes_command_lists_every_recipe():
    result = run_cli("recipes", cwd=ROOT)
    assert result.returncode == 0
    listed = sorted(line.split()[0] for line in result.stdout.splitlines())
    assert listed == sorted(shipped_name(path) for path in shipped_recipes())
    assert "ablation/dler_ablation_0_truncation" in listed  # subfolders are shipped recipes too
    stems = [path.stem for path in shipped_recipes()]
    assert len(stems) == len(set(stems))  # a recipe's run directory is named by its stem


def test_jsonl_without_the_mapped_column_names_file_and_line(tmp_path):
    from efficient_rl.config.schema import DataSection
    from efficient_rl.data.sources import load_split

    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: missing column 'answer'"):
        load_split(str(data), "train", DataSection(), seed=0, field_name="data.train")
    data.write_text("not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not a JSON object"):
        load_split(str(data), "train", DataSection(), seed=0, field_name="data.train")


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef: expected a finite number >= 0, got -0.1"),
        ("learner.grad_clip=0", "learner.grad_clip: expected a finite number > 0"),
        ("learner.weight_decay=-.inf", "learner.weight_decay: expected a finite number >= 0, got -inf"),
        ("learner.zero_stage=4", "learner.zero_stage: expected an integer in [0, 3], got 4"),
        ("scoring.timeout=0", "scoring.timeout: expected a finite number > 0 (seconds), got 0.0"),
        ("cluster.rollout.workers=0", "cluster.rollout.workers: expected an integer >= 1, got 0"),
        ("eval.top_p=0", "eval.top_p: expected a finite number in (0, 1], got 0.0"),
        ("checkpoint.keep=0", "checkpoint.keep: expected an integer >= 1, got 0"),
    ],
)
def test_numbers_out_of_range_are_refused_at_load_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPES / "grpo.yaml", [override])
    assert str(err.value).startswith(f"{RECIPES / 'grpo.yaml'}: {message}")


def test_greedy_evaluation_is_a_temperature_of_zero():
    assert load_recipe(RECIPES / "grpo.yaml", ["eval.temperature=0"]).eval.temperature == 0.0


def test_every_numeric_field_has_a_declared_range():
    """A number added to a recipe section without a rule in NUMBER_RULES would go unchecked."""
    from efficient_rl.config.rules import NUMBER_RULES, number_rule, numbers
    from efficient_rl.config.schema import LoraSection, Recipe

    recipe = Recipe()
    recipe.rollout.vllm.max_num_seqs = 64  # optional: None by default
    recipe.learner.lora = LoraSection()  # likewise
    recipe.cluster.gpu_memory_gib = 79.6  # likewise
    paths = [path for path, _ in numbers(recipe)]
    assert "reward[0].weight" in paths and "cluster.learner.gpus" in paths and "learner.betas[1]" in paths
    for path in paths:
        number_rule(path)  # KeyError names a field without a rule
    unused = set(NUMBER_RULES) - {re.sub(r"\[\d+\]", "", path) for path in paths}
    assert not unused, f"rules for fields that do not exist: {unused}"


def test_a_recipe_built_in_python_is_checked_too():
    from efficient_rl.config.schema import Recipe

    recipe = Recipe()
    recipe.model.lab = "tiny"
    recipe.rollout.top_p = float("nan")
    with pytest.raises(ConfigError, match=r"^rollout.top_p: expected a finite number in \(0, 1\], got nan$"):
        validate(recipe)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "5"], "--top-p: expected a finite number in (0, 1], got 5.0"),
        (["--temperature", "nan"], "--temperature: expected a finite number >= 0 (0 is greedy), got nan"),
        (["--samples", "0"], "--samples: expected an integer >= 1, got 0"),
    ],
)
def test_eval_command_numbers_are_checked_like_a_recipes(tmp_path, flags, message):
    result = run_cli("eval", "lab:tiny", "--out", str(tmp_path / "out"), *flags, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"efficient-rl: error: {message}"
    assert not (tmp_path / "out").exists()
