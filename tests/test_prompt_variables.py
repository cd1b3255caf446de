"""Prompt variables (efficient_rl/data/variables.py): the user template shows any sample field, a
missing one is one line of error at load, variables are drawn per sample reproducibly from the
seed, and eval.variables gives the held-out problems once per value."""

import re

import pytest

from conftest import RECIPES
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.schema import Choice
from efficient_rl.data.variables import (
    PROMPT_VARIABLES,
    check_sample_fields,
    check_template,
    draw_variables,
    eval_variants,
    render,
    template_fields,
)
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError

L1 = RECIPES / "length_penalties" / "l1_exact.yaml"
SAMPLES = [{"id": f"q{i}", "question": f"Compute {i} + 1.", "answer": str(i + 1)} for i in range(200)]


def test_the_template_shows_any_sample_field_and_leaves_other_braces():
    template = "{question} Think for {target_length} tokens, {level} level. Box it: \\boxed{} {1} {not a field}"
    sample = {"question": "Compute 2 + 3.", "target_length": 512, "level": "easy"}
    assert render(template, sample) == (
        "Compute 2 + 3. Think for 512 tokens, easy level. Box it: \\boxed{} {1} {not a field}"
    )
    assert template_fields(template) == ["question", "target_length", "level"]
    assert render("{question}", {"question": "has {question} inside"}) == "has {question} inside"  # one pass


def test_a_missing_field_is_one_line_naming_it_and_the_sample():
    with pytest.raises(ConfigError) as err:
        check_template("{question} Think for {target_length} tokens.", SAMPLES[:3], "data.train")
    assert str(err.value) == (
        "prompt.user_template: {target_length} is no field of data.train sample 1 (id 'q0'), "
        "which has id, question, answer; add it as a data column or with "
        "prompt.variables.target_length"
    )


def bound(variables):
    recipe = load_recipe(L1, [f"prompt.variables={variables}"])
    return validate(recipe).variables


def test_targets_are_drawn_per_sample_reproducibly_from_the_seed():
    variables = bound("{target_length: {name: uniform_int, low: 1, high: 3}}")
    first = draw_variables(SAMPLES, variables, seed=0, split="train")
    again = draw_variables(SAMPLES, variables, seed=0, split="train")
    targets = [s["target_length"] for s in first]
    assert targets == [s["target_length"] for s in again]  # the same recipe and data: the same prompts
    assert set(targets) == {1, 2, 3}  # both ends included
    assert targets != [s["target_length"] for s in draw_variables(SAMPLES, variables, seed=1, split="train")]
    assert targets != [s["target_length"] for s in draw_variables(SAMPLES, variables, seed=0, split="heldout")]
    assert "target_length" not in SAMPLES[0] and first[0]["question"] == SAMPLES[0]["question"]  # copies
    # Another variable has streams of its own: the targets stay as they were.
    more = bound("{target_length: {name: uniform_int, low: 1, high: 3}, mode: {name: one_of, values: [max, exact]}}")
    both = draw_variables(SAMPLES, more, seed=0, split="train")
    assert [s["target_length"] for s in both] == targets and {s["mode"] for s in both} == {"max", "exact"}


def test_a_variable_may_not_shadow_a_data_column():
    with pytest.raises(
        ConfigError,
        match=re.escape("prompt.variables.answer: the train samples already have a field 'answer' (a data column)"),
    ):
        draw_variables(SAMPLES, bound("{answer: {name: uniform_int}}"), seed=0, split="train")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "prompt.variables.target_length={name: uniform, low: 1}",
            "prompt.variables.target_length: unknown prompt variable 'uniform' (did you mean 'uniform_int'?)",
        ),
        (
            "prompt.variables.target_length.high=4",
            "prompt.variables.target_length.high: expected at least low (8), got 4",
        ),
        (
            "prompt.variables.target_length.low=-1",
            "prompt.variables.target_length.low: expected an integer >= 0, got -1",
        ),
        ("prompt.variables.target_length.lo=1", "prompt.variables.target_length.lo: unknown key (did you mean 'low'?)"),
        ("prompt.variables={mode: {name: one_of}}", "prompt.variables.mode.values: expected at least one value"),
        ("prompt.variables=[target_length]", "prompt.variables: expected a mapping, got list"),
        ("eval.variables={level: [1, 2]}", "eval.variables.level: prompt.user_template shows no {level}"),
        ("eval.variables={target_length: []}", "eval.variables.target_length: expected at least one value"),
        ("eval.variables={target_length: 8}", "eval.variables.target_length: expected a list, got int 8"),
    ],
)
def test_variables_are_checked_at_load_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(L1, [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_penalty_that_reads_a_target_names_the_sample_that_lacks_it():
    plan = validate(load_recipe(L1))
    needs = plan.needs
    assert needs["sample.target_length"] == "algorithm.length_penalty"
    with pytest.raises(ConfigError) as err:
        check_sample_fields(needs, SAMPLES[:2], "data.train")
    assert str(err.value) == (
        "algorithm.length_penalty: reads the number 'target_length' of every sample; data.train "
        "sample 1 (id 'q0') has None; add it as a data column or with "
        "prompt.variables.target_length"
    )
    check_sample_fields(needs, draw_variables(SAMPLES[:2], plan.variables, 0, "train"), "data.train")


def test_eval_variants_set_each_listed_value():
    variants = eval_variants(SAMPLES[:2], {"target_length": [8, 16]})
    assert [label for label, _ in variants] == ["target_length=8", "target_length=16"]
    assert [[s["target_length"] for s in samples] for _, samples in variants] == [[8, 8], [16, 16]]
    assert eval_variants(SAMPLES[:2], {}) == [("", SAMPLES[:2])]
    grid = eval_variants(SAMPLES[:1], {"a": [1, 2], "b": ["x"]})
    assert [label for label, _ in grid] == ["a=1,b=x", "a=2,b=x"]


def test_the_recipe_form_round_trips_and_every_numeric_parameter_has_a_range():
    recipe = load_recipe(L1, ["prompt.variables.target_length.high=24"])
    assert recipe.prompt.variables == {"target_length": Choice("uniform_int", {"low": 8, "high": 24})}
    assert recipe.to_dict()["prompt"]["variables"] == {"target_length": {"name": "uniform_int", "low": 8, "high": 24}}
    for entry in PROMPT_VARIABLES.entries():
        for name, value in entry.defaults().items():
            if isinstance(value, (int, float)):
                assert name in entry.ranges, f"{entry.name}: no range for {name}"


def test_the_encoded_prompt_shows_the_samples_target(tiny_model_dir):
    from efficient_rl.config.schema import PromptSection
    from efficient_rl.data.prompts import encode_prompt, encode_sample, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = PromptSection(chat_template="never", user_template="{question} Think in {target_length} tokens.")
    ids = encode_sample(tokenizer, {"question": "Compute 1 + 2.", "target_length": 12}, prompt)
    assert tokenizer.decode(ids).strip() == "Compute 1 + 2. Think in 12 tokens."  # the lab has no "f"
    assert encode_prompt(tokenizer, "Compute 1 + 2.") == encode_sample(tokenizer, {"question": "Compute 1 + 2."})
    with pytest.raises(
        ConfigError, match=re.escape("user template: {level} names a sample field, but only {question} is known here")
    ):
        encode_prompt(tokenizer, "Compute 1 + 2.", PromptSection(user_template="{question} {level}"))
