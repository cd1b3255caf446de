"""Prompt variables: fields drawn for every sample, and the user template that shows them.

`prompt.user_template` may name any field of a sample in braces: "{question}", a data column,
or a variable of `prompt.variables`, which draws a value for every sample from a PROMPT_VARIABLES
entry once, when the data loads. Each draw has its own random stream, seeded by (recipe seed,
split, the sample's position and id, the variable's name), so the same recipe and data give the
same prompts in every run, a resume included, and adding a variable leaves the others' values
alone. The value is stored in the sample, where length penalties (L1's per-sample target) and
rewards read it. `eval.variables` evaluates the held-out problems once per listed value.
Rules and sources: docs/algorithms.md#prompt-variables.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any, Mapping

from efficient_rl.errors import ConfigError
from efficient_rl.registry import Bound, Registry

# name -> fn(rng: random.Random, **params) -> the value of one sample
PROMPT_VARIABLES: Registry = Registry("prompt variable")

FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # "{name}"; any other brace is text


def uniform_int_check(params, recipe) -> str | None:
    return f"high: expected at least low ({params.low}), got {params.high}" if params.high < params.low else None


@PROMPT_VARIABLES.register(
    "uniform_int",
    ranges={"low": "[0, inf)", "high": "[0, inf)"},
    check=uniform_int_check,
    source="L1 (arXiv 2503.04697) §3-4: a target length uniform over the integers of [n_min, n_max] = [100, 4000]",
)
def uniform_int(rng: random.Random, *, low: int = 100, high: int = 4000) -> int:
    """An integer uniform over low..high, both included."""
    return rng.randint(low, high)


def one_of_check(params, recipe) -> str | None:
    return "values: expected at least one value" if not params.values else None


@PROMPT_VARIABLES.register("one_of", check=one_of_check, source="one of the listed values, uniformly")
def one_of(rng: random.Random, *, values: list[Any] = []) -> Any:  # noqa: B006 (a fresh copy per binding)
    return rng.choice(values)


def template_fields(template: str) -> list[str]:
    """The sample fields a template names, in order of first use."""
    return list(dict.fromkeys(FIELD.findall(template)))


def render(template: str, sample: Mapping[str, Any]) -> str:
    """The template with each "{name}" replaced by str(sample[name]); KeyError for a missing field."""
    return FIELD.sub(lambda match: str(sample[match.group(1)]), template)


def draw_variables(samples: list[dict], variables: dict[str, Bound], seed: int, split: str) -> list[dict]:
    """The samples with every variable's value added (new dicts; the inputs are left alone)."""
    drawn = []
    for position, sample in enumerate(samples):
        values = {}
        for name, entry in variables.items():
            if name in sample:
                raise ConfigError(
                    f"prompt.variables.{name}: the {split} samples already have a field {name!r} "
                    f"(a data column); name the variable otherwise"
                )
            values[name] = entry(random.Random(f"{seed}-{split}-{position}-{sample.get('id')}-{name}"))
        drawn.append({**sample, **values})
    return drawn


def check_template(template: str, samples: list[dict], field_name: str) -> None:
    """One line of error for the first sample that lacks a field the template names."""
    fields = template_fields(template)
    for number, sample in enumerate(samples, 1):
        missing = [name for name in fields if name not in sample]
        if missing:
            raise ConfigError(
                f"prompt.user_template: {{{missing[0]}}} is no field of {field_name} sample {number} "
                f"(id {sample.get('id')!r}), which has {', '.join(sample)}; add it as a data column "
                f"or with prompt.variables.{missing[0]}"
            )


def check_sample_fields(needs: dict[str, str], samples: list[dict], field_name: str) -> None:
    """Every "sample.<field>" an entry needs is a number in every sample (a target length...)."""
    for need, dotted in needs.items():
        if not need.startswith("sample."):
            continue
        name = need.removeprefix("sample.")
        for number, sample in enumerate(samples, 1):
            value = sample.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"{dotted}: reads the number {name!r} of every sample; {field_name} sample {number} "
                    f"(id {sample.get('id')!r}) has {value!r}; add it as a data column or with "
                    f"prompt.variables.{name}"
                )


def eval_variants(samples: list[dict], values: dict[str, list[Any]]) -> list[tuple[str, list[dict]]]:
    """(label, samples) for every combination of the listed values, the samples' fields set to
    them: [("target_length=512", ...), ...]. One unlabelled variant without eval.variables."""
    if not values:
        return [("", samples)]
    names = list(values)
    variants = []
    for combination in itertools.product(*(values[name] for name in names)):
        label = ",".join(f"{name}={value}" for name, value in zip(names, combination))
        variants.append((label, [{**sample, **dict(zip(names, combination))} for sample in samples]))
    return variants
