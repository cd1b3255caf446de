"""The forms a reward function comes in, and how each form is called.

A recipe entry declares its reward's form (`form:`, RewardEntry); each form says how to call the
function on completions and their samples, and what must come back:

  native   fn(completion, sample, **params) -> number | dict          one call per completion
  batched  fn(completions, samples, **params) -> one value each       one call per batch
  trl      fn(completions, prompts=..., **columns, **params) -> list  as TRL's GRPOTrainer calls reward_funcs
  verl     fn(data_source, solution_str, ground_truth, extra_info, **params) -> number | dict
                                                                      as verl's reward manager calls compute_score

A native entry whose function sets `batched = True` is called in the batched form. verl's
ground_truth is the sample's reward_model["ground_truth"] as the row holds it (a list, a number),
as verl's reward manager passes it; without that mapping, the mapped answer. An entry's params go
in as keywords beside the call's own and may not share a name with one (refused, never a silent
winner). No torch import here: reward workers load this module.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

from efficient_rl.registry import did_you_mean

# Sample keys TRL never hands a reward as columns: it drops "prompt", "completion" and
# "completion_ids" from the dataset's columns, and "prompts"/"completions" are the call's own.
TRL_RESERVED_COLUMNS = frozenset({"prompt", "prompts", "completion", "completions", "completion_ids"})
# Arguments TRL's trainer adds that exist only there (token ids, the trainer's state and loggers):
# not passed here, so a function must not require them.
TRL_TRAINER_ARGUMENTS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
# A parameter name that gives a function's form away: the hint when it is called in another form.
FORM_BY_PARAMETER = {"completions": "trl", "prompts": "trl", "solution_str": "verl", "data_source": "verl"}
# Names TRL rewards give their second parameter (a column or the prompts): where the batched form
# would put the list of sample dicts, scoring every row against a dict without an error.
TRL_SECOND_PARAMETERS = frozenset({"prompts", "solution", "solutions", "ground_truth", "answer", "answers"})


class FormError(ValueError):
    """A reward's return value does not fit the form it was called in."""


@dataclass(frozen=True)
class RewardForm:
    name: str
    contract: str  # the call and what it returns, as messages show it
    batched: bool  # one call for the whole batch, else one call per completion
    # (function, completions, samples, params) -> (args, kwargs) of one call
    arguments: Callable[..., tuple[tuple, dict]]
    allows_none: bool = False  # None: "this reward does not apply to this sample" (TRL's contract)
    # (signature bound to a call) -> why the binding, though it fits, is a mistake; or None
    misfit: Callable[[inspect.BoundArguments], str | None] | None = None


REWARD_FORMS: dict[str, RewardForm] = {}


def register_form(form: RewardForm) -> None:
    if form.name in REWARD_FORMS:
        raise ValueError(f"reward form {form.name!r} is registered twice")
    REWARD_FORMS[form.name] = form


def native_arguments(function, completions, samples, params):
    return (completions[0], samples[0]), dict(params)


def batched_arguments(function, completions, samples, params):
    return (completions, samples), dict(params)


def samples_under_a_column_name(bound: inspect.BoundArguments) -> str | None:
    """A TRL reward marked `batched = True` (as these docs once advised) binds the batched call,
    its column parameter taking the sample dicts: refused, since it would score quietly wrong."""
    second = list(bound.signature.parameters)[1:2]
    if second and second[0] in TRL_SECOND_PARAMETERS:
        return (
            f"its parameter {second[0]!r} would receive the sample dicts: a TRL reward? "
            "declare `form: trl` in the reward entry (and drop `batched = True`)"
        )
    return None


def trl_arguments(function, completions, samples, params):
    """Keywords only, as TRL passes them: the prompts, the completions, and every other column of
    the samples as a list (one value per completion). A chat prompt (a list of turns) makes the
    call conversational: its completion comes as [{"role": "assistant", "content": text}]."""
    columns = {key: [sample.get(key) for sample in samples] for key in samples[0] if key not in TRL_RESERVED_COLUMNS}
    prompts = [sample.get("question") for sample in samples]
    own = {
        "prompts": prompts,
        "completions": [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(prompts, completions)
        ],
    }
    keywords = with_params({**own, **columns}, params, "columns of the data or TRL's own arguments")
    if not takes_any_keyword(function):  # a function naming its columns gets only those
        accepted = inspect.signature(function).parameters
        keywords = {key: value for key, value in keywords.items() if key in accepted}
    return (), keywords


def verl_arguments(function, completions, samples, params):
    """verl's reward manager reads data_source and extra_info from the row's columns and
    ground_truth from reward_model.ground_truth (verl_ground_truth)."""
    sample = samples[0]
    own = {
        "data_source": sample.get("data_source"),
        "solution_str": completions[0],
        "ground_truth": verl_ground_truth(sample),
        "extra_info": sample.get("extra_info", {}),  # verl's reward managers default it to {}
    }
    return (), with_params(own, params, f"verl's own arguments ({', '.join(own)})")


def verl_ground_truth(sample: dict):
    """The row's reward_model["ground_truth"] untouched, as verl hands it over: a list of accepted
    answers or a number stays one (the answer column is text, so it cannot carry them). A row without
    that mapping (a TRL or plain dataset) gives the recipe's answer column (data.answer_key)."""
    reward_model = sample.get("reward_model")
    if isinstance(reward_model, Mapping) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    return sample.get("answer")


def with_params(keywords: dict, params: dict, what: str) -> dict:
    """A keyword form's call: its own keywords and the entry's params. A param named like one of the
    call's keywords would silently replace it (or be replaced): refused, naming it, so it is renamed."""
    shadowed = [name for name in params if name in keywords]
    if shadowed:
        raise FormError(f"the entry's params {', '.join(sorted(shadowed))} are also {what}: rename them")
    return {**keywords, **params}


register_form(RewardForm("native", "fn(completion, sample, **params) -> number | dict", False, native_arguments))
register_form(
    RewardForm(
        "batched",
        "fn(completions, samples, **params) -> a list, one value each",
        True,
        batched_arguments,
        misfit=samples_under_a_column_name,
    )
)
register_form(
    RewardForm(
        "trl",
        "TRL's fn(completions, prompts=..., **columns) -> list[float | None]",
        True,
        trl_arguments,
        allows_none=True,
    )
)
register_form(
    RewardForm(
        "verl",
        "verl's compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict",
        False,
        verl_arguments,
    )
)


def takes_any_keyword(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except ValueError:
        return True  # no inspectable signature (a builtin): pass everything
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def check_form_name(name: str) -> None:
    if name not in REWARD_FORMS:
        raise FormError(f"unknown reward form {name!r}{did_you_mean(name, REWARD_FORMS)}")


def form_of(name: str, function) -> RewardForm:
    """The form an entry declares; a native function with `batched = True` is called batched."""
    check_form_name(name)
    if name == "native" and getattr(function, "batched", False):
        return REWARD_FORMS["batched"]
    return REWARD_FORMS[name]


def call(form: RewardForm, function, completions: list[str], samples: list[dict], params: dict) -> list:
    """The raw return values, one per completion (FormError when a batched call's answer does not fit)."""
    args, kwargs = form.arguments(function, completions, samples, params)
    returned = function(*args, **kwargs)
    if inspect.iscoroutine(returned):  # an `async def` reward (TRL takes them): awaited here, one call at a time
        returned = asyncio.run(returned)
    return values_of(form, returned, len(completions))


def values_of(form: RewardForm, returned, count: int) -> list:
    if not form.batched:
        return [returned]
    if isinstance(returned, (str, bytes, dict)) or not hasattr(returned, "__len__"):
        raise FormError(f"returned {shortened(returned)}; expected a list of {count} values")
    values = list(returned)
    if len(values) != count:
        raise FormError(f"returned {len(values)} values for {count} completions")
    return values


def check_signature(form: RewardForm, function, params: dict, sample: dict | None = None) -> None:
    """The function must accept the form's call. Without a sample (recipe validation, before any
    data is read) a named parameter is taken for a data column; the probe call's check passes the
    real sample, where a column the data lacks is refused."""
    try:
        signature = inspect.signature(function)
    except ValueError:
        return  # builtins without an inspectable signature: the probe call decides
    sample = sample if sample is not None else placeholder_sample(signature, params)
    args, kwargs = form.arguments(function, ["completion"], [sample], params)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        name = getattr(function, "__name__", "the function")
        raise FormError(
            f"{name} cannot be called as {form.contract} (form: {form.name}): {err}{hint(form, signature)}"
        ) from None
    why = form.misfit(bound) if form.misfit else None
    if why:
        raise FormError(f"{getattr(function, '__name__', 'the function')} in the {form.name} form: {why}")


def placeholder_sample(signature: inspect.Signature, params: dict) -> dict:
    """A sample with the columns every sample has and those the function names (but the entry's
    params, and TRL's trainer-only arguments: a function requiring one of those must be refused)."""
    named = {
        name: None
        for name, parameter in signature.parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        and name not in TRL_TRAINER_ARGUMENTS
        and name not in params
    }
    return {**named, "id": None, "question": "", "answer": ""}


def hint(form: RewardForm, signature: inspect.Signature) -> str:
    """How to declare the form the function's parameters suggest, or what this library does not pass
    ("" when neither: a parameter the recipe entry misses, say)."""
    trainer_only = [name for name in TRL_TRAINER_ARGUMENTS if name in signature.parameters]
    if form.name == "trl" and trainer_only:
        return f"; {', '.join(trainer_only)} come from TRL's trainer and are not passed here: give them a default"
    suggested = next((FORM_BY_PARAMETER[name] for name in signature.parameters if name in FORM_BY_PARAMETER), None)
    if suggested and suggested != form.name:
        return f"; its parameters look like the {suggested} form: declare `form: {suggested}` in the reward entry"
    return ""


def shortened(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
