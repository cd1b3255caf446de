"""Check a recipe once and return its plan: the first thing `train`, `submit` and `study` do.

Pure: it reads files (the recipe, a model's reference, reward modules) but starts no process,
takes no lock, builds no lab model and writes nothing, so a bad recipe leaves nothing behind.
Every registry entry the recipe picks is bound here and nowhere else (config/plan.py); every
error is one line naming its field. What needs the data or the model (prompt lengths, the
context, LoRA targets, a teacher's vocabulary) is checked by driver/build.py, still before any
reward worker or model load.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Importing the backends registers them (and their own checks).
import efficient_rl.learner.deepspeed_learner  # noqa: E402,F401  (imports deepspeed only when used)
import efficient_rl.learner.torch_learner  # noqa: E402,F401
import efficient_rl.rollout.hf  # noqa: E402,F401
import efficient_rl.rollout.vllm_engine  # noqa: E402,F401  (imports vllm only when used)
from efficient_rl.algos.advantages import ADVANTAGES
from efficient_rl.algos.decs import TOKEN_SHAPERS
from efficient_rl.algos.divergence import TOKEN_STATISTICS
from efficient_rl.algos.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, ROLLOUT_CORRECTIONS
from efficient_rl.algos.sampling import GROUP_SAMPLERS
from efficient_rl.algos.shaping import (
    GROUP_STATISTICS,
    LENGTH_CAPS,
    LENGTH_SHAPERS,
    NO_SCALE,
    SCORE_NEEDS,
    GatedPenalty,
    LengthGate,
    gated_score_need,
    least_correct_score,
    promise_of,
)
from efficient_rl.algos.token_selection import SAMPLE_SELECTORS, TOKEN_SELECTORS
from efficient_rl.cluster.backends import CLUSTER_BACKENDS
from efficient_rl.cluster.teacher import hosts_teacher
from efficient_rl.config.binding import bind
from efficient_rl.config.memory import check_memory_fits
from efficient_rl.config.placement import resolve_placement
from efficient_rl.config.plan import Devices, Plan
from efficient_rl.config.rules import check_numbers
from efficient_rl.config.schema import AlgorithmSection, Recipe
from efficient_rl.data.profiles import check_profile_file
from efficient_rl.data.variables import FIELD, PROMPT_VARIABLES, template_fields
from efficient_rl.driver.pipeline import PIPELINES
from efficient_rl.driver.trackers import TRACKERS
from efficient_rl.errors import ConfigError
from efficient_rl.lab.presets import PRESETS
from efficient_rl.learner.base import LEARNERS
from efficient_rl.learner.objective import OBJECTIVES
from efficient_rl.learner.schedules import LR_SCHEDULES
from efficient_rl.models.sources import check_reference
from efficient_rl.registry import NEEDS, SAMPLE_FIELD_NEED, Bound, did_you_mean
from efficient_rl.rollout.base import ENGINES
from efficient_rl.run.checkpoint import check_run_name
from efficient_rl.scoring.runner import resolve_rewards
from efficient_rl.scoring.scale import SCORE_PROBLEMS, check_scores_fit_penalty, weighted_rewards

# The recipe's picks of registry entries with parameters (each a config Choice), and of plain
# names. Each entry's `check` holds what it does not combine with (a backend's compatibility rules).
CHOICE_FIELDS = [
    ("algorithm.advantage", ADVANTAGES),
    ("algorithm.policy_loss", POLICY_LOSSES),
    ("algorithm.loss_agg", AGGREGATIONS),
    ("algorithm.kl_estimator", KL_ESTIMATORS),
    ("algorithm.length_penalty", LENGTH_SHAPERS),
    ("algorithm.length_cap", LENGTH_CAPS),
    ("algorithm.sampling", GROUP_SAMPLERS),
    ("algorithm.rollout_correction", ROLLOUT_CORRECTIONS),
    ("algorithm.objective", OBJECTIVES),
    ("algorithm.token_shaping", TOKEN_SHAPERS),
    ("algorithm.token_selection", TOKEN_SELECTORS),
    ("algorithm.sample_selection", SAMPLE_SELECTORS),
    ("learner.lr_schedule", LR_SCHEDULES),
    ("cluster.pipeline", PIPELINES),
]
NAME_FIELDS = [("cluster.backend", CLUSTER_BACKENDS), ("rollout.engine", ENGINES), ("learner.backend", LEARNERS)]


def field_value(recipe: Recipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(recipe: Recipe) -> Plan:
    """The recipe checked and its entries bound (ConfigError in one line at the first problem)."""
    check_numbers(recipe)  # load_recipe did too; a Recipe built in Python comes here unchecked
    check_run_name(recipe.logging.name)  # submit refuses a bad name before it writes a job directory
    check_model(recipe)
    choices = {**bind_names(recipe), **bind_choices(recipe)}
    needs = recipe_needs(choices)
    plan = Plan(
        recipe=recipe,
        choices=choices,
        needs=needs,
        variables=bind_variables(recipe),
        trackers=bind_trackers(recipe),
        placement=resolve_placement(recipe.cluster),
        devices=resolve_devices(recipe, one_process="driver_model" in choices["cluster.backend"].needs),
        length_penalty=gate_penalty(choices["algorithm.length_penalty"], recipe),
    )
    check_cap_is_read(choices["algorithm.length_cap"], needs)
    check_teacher_needs(recipe, needs)
    resolve_rewards(recipe.reward)  # each reward importable, its parameters its function's
    check_scores_fit_penalty(choices["algorithm.length_penalty"], recipe.reward)  # what the penalty promises holds
    check_scores_fit_gate(plan.length_penalty, recipe)  # and what it promises behind its gate
    check_length_profile(plan)
    if len(recipe.learner.betas) != 2:
        raise ConfigError(f"learner.betas: expected [beta1, beta2], got {recipe.learner.betas}")
    check_thinking_budget(recipe)
    check_memory_fits(recipe, plan.placement)  # each GPU's planned peak within cluster.gpu_memory_gib
    return plan


def check_thinking_budget(recipe: Recipe) -> None:
    """What needs no tokenizer; driver/build.py checks the appended text's tokens."""
    budget, cap = recipe.rollout.thinking_budget, recipe.rollout.max_response_length
    if budget.tokens == 0:
        return
    if budget.tokens >= cap:
        raise ConfigError(
            f"rollout.thinking_budget.tokens: expected a budget below rollout.max_response_length {cap} "
            f"(0 for none), got {budget.tokens}"
        )
    if not budget.close:
        raise ConfigError("rollout.thinking_budget.close: expected the text that ends the reasoning, got ''")


def gate_penalty(penalty: Bound, recipe: Recipe) -> GatedPenalty:
    """algorithm.length_penalty behind algorithm.length_gate, once the gate is checked: known
    statistics, an ordered band, and a combination that keeps the penalty's promises for the
    recipe's rewards (docs/algorithms.md#length-gate). Each problem is one line naming its field."""
    section = recipe.algorithm.length_gate
    where = "algorithm.length_gate"
    check_statistic(f"{where}.scale", section.scale, allowed=(NO_SCALE,))
    check_statistic(f"{where}.difficulty.statistic", section.difficulty.statistic)
    band = section.difficulty
    if band.lower > band.upper:
        raise ConfigError(f"{where}.difficulty: expected lower <= upper, got lower {band.lower} and upper {band.upper}")
    gate = LengthGate(section.correct_only, section.scale, band.statistic, band.lower, band.upper)
    need = gated_score_need(promise_of(penalty.entry), gate)
    if need is None:
        raise ConfigError(
            f"{where}.correct_only: {penalty.name} may pay a correct rollout less than a wrong one of its length "
            "that keeps its score (its cut is unbounded); pick a penalty with a bounded cut, or correct_only: false"
        )
    return GatedPenalty(penalty, gate, need, least_correct_score(promise_of(penalty.entry), penalty.params, gate))


def check_scores_fit_gate(gated: GatedPenalty, recipe: Recipe) -> None:
    """A gate that narrows the scores the penalty keeps its promises for (correct_only with a
    penalty that may cut a correct rollout to 0 needs binary scores) refuses rewards outside them."""
    least = gated.least_correct_score
    if gated.score_need == promise_of(gated.penalty.entry).scores and least is None:
        return  # check_scores_fit_penalty has checked these
    rewards = weighted_rewards(recipe.reward)
    problem = SCORE_PROBLEMS[gated.score_need](rewards)
    if problem:
        raise ConfigError(
            f"algorithm.length_gate.correct_only: {gated.penalty.name} on correct rollouts only needs "
            f"{SCORE_NEEDS[gated.score_need][0]}, but {problem}; change `reward` or set correct_only: false"
        )
    (reward,) = rewards  # binary scores come from one reward
    correct_score = reward.weighted_range()[1]
    if least is not None and correct_score < least:
        where = "algorithm.length_gate.correct_only" if gated.gate.correct_only else "algorithm.length_penalty"
        raise ConfigError(
            f"{where}: {gated.penalty.name} can take {least:g} from a "
            f"correct rollout, more than the {correct_score:g} {reward.where} pays one, so a long correct rollout "
            "would earn less than a wrong one; make the penalty milder or pay a correct answer more"
        )


def check_statistic(dotted: str, name: str, allowed: tuple[str, ...] = ()) -> None:
    known = [*allowed, *GROUP_STATISTICS]
    if name not in known:
        raise ConfigError(f"{dotted}: unknown group statistic {name!r}; expected one of: {', '.join(known)}")


def check_model(recipe: Recipe) -> None:
    if (recipe.model.path is None) == (recipe.model.lab is None):
        raise ConfigError("model: set exactly one of model.path (a model directory) or model.lab (a lab preset)")
    if recipe.model.lab is not None and recipe.model.lab not in PRESETS:
        raise ConfigError(
            f"model.lab: unknown lab preset {recipe.model.lab!r}{did_you_mean(recipe.model.lab, PRESETS)}"
        )
    if recipe.model.path is not None:  # checked without downloading or converting
        check_reference(recipe.model.path, "model.path")


def resolve_devices(recipe: Recipe, one_process: bool) -> Devices:
    """model.device for each role. In one process (the embedded backend) auto is the GPU when torch
    sees one here. Ray actors compute where their resources put them (cluster.<role>.gpus), on
    whatever machine Ray places them: the driver's own GPUs do not matter, and model.device may only
    agree. A Ray-hosted teacher's actor asks for no GPU."""
    if one_process:
        device = local_device(recipe.model.device)
        return Devices(learner=device, rollout=device, teacher=device)
    roles = {role: "cuda" if getattr(recipe.cluster, role).gpus > 0 else "cpu" for role in ("learner", "rollout")}
    for role, device in roles.items():
        if recipe.model.device not in ("auto", device):
            raise ConfigError(
                f"model.device: {recipe.model.device}, but cluster.{role}.gpus is "
                f"{getattr(recipe.cluster, role).gpus:g}, which puts the {role} actors on the {device}; "
                f"set model.device: auto, or give cluster.{role}.gpus {'0' if device == 'cuda' else 'its share'}"
            )
    return Devices(**roles, teacher="cpu" if hosts_teacher(recipe) else roles["learner"])


def local_device(asked: str) -> str:
    """ "cpu" or "cuda" for this process; asking for a GPU torch cannot see is refused."""
    cuda = torch.cuda.is_available()
    if asked == "cuda" and not cuda:
        built_for = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        raise ConfigError(
            f"model.device: cuda, but torch {torch.__version__} (built for {built_for}) sees no GPU on this "
            "machine; use model.device: auto or cpu"
        )
    return {"auto": "cuda" if cuda else "cpu"}.get(asked, asked)


def checked(bound: Bound, recipe: Recipe, prefix: str) -> Bound:
    """`bound` once its entry's own check passes on the whole recipe."""
    check = bound.entry.check
    problem = check(bound.params, recipe) if check else None
    if problem:
        raise ConfigError(f"{prefix}{problem}")
    return bound


def bind_names(recipe: Recipe) -> dict[str, Bound]:
    """The backends picked by name; each entry's check says what it does not run with, in a line
    naming the field to change."""
    bound = {}
    for dotted, registry in NAME_FIELDS:
        name = field_value(recipe, dotted)
        if name not in registry:
            raise ConfigError(f"{dotted}: unknown {registry.kind} {name!r}{did_you_mean(name, registry.names())}")
        bound[dotted] = checked(registry.get(name).bind(), recipe, prefix="")
    return bound


def bind_choices(recipe: Recipe) -> dict[str, Bound]:
    """Every entry the recipe picks, bound: unknown names, keys, types, ranges and the entries'
    own checks fail here, each in one line naming its field."""
    return {
        dotted: checked(bind(field_value(recipe, dotted), registry, dotted), recipe, prefix=f"{dotted}.")
        for dotted, registry in CHOICE_FIELDS
    }


def bind_variables(recipe: Recipe) -> dict[str, Bound]:
    """prompt.variables bound, each error one line naming the field; eval.variables checked."""
    bound = {}
    for name, picked in recipe.prompt.variables.items():
        where = f"prompt.variables.{name}"
        if not FIELD.fullmatch(f"{{{name}}}"):
            raise ConfigError(f"{where}: expected a name of letters, digits and underscores, as the template writes it")
        bound[name] = checked(bind(picked, PROMPT_VARIABLES, where), recipe, prefix=f"{where}.")
    shown = template_fields(recipe.prompt.user_template)
    for name, values in recipe.eval.variables.items():
        if name not in shown:
            raise ConfigError(
                f"eval.variables.{name}: prompt.user_template shows no {{{name}}}, so its values would change no prompt"
            )
        if not values:
            raise ConfigError(f"eval.variables.{name}: expected at least one value")
    return bound


def bind_trackers(recipe: Recipe) -> tuple[Bound, ...]:
    """Each tracker's name and parameters (ConfigError in one line), bound; part of the recipe's
    validation (driver/validate.py), before anything runs."""
    bound = []
    for index, picked in enumerate(recipe.logging.trackers):
        if picked.name in {tracker.name for tracker in bound}:
            raise ConfigError(f"logging.trackers[{index}]: {picked.name} is listed twice")
        bound.append(bind(picked, TRACKERS, f"logging.trackers[{index}]"))
    return tuple(bound)


def recipe_needs(bound: dict[str, Bound]) -> dict[str, str]:
    """What the picked entries need, each need with the field that needs it: their own needs, and
    those of the token statistics the token selector reads (a teacher, for divergences). A need
    outside the vocabulary (registry.NEEDS) is refused: nothing would provide it."""
    needs = {}
    for dotted, entry in bound.items():
        for need in entry.needs:
            check_need(need, dotted, entry)
            needs.setdefault(need, dotted)
            if need in TOKEN_STATISTICS:
                for deeper in TOKEN_STATISTICS.get(need).needs:
                    needs.setdefault(deeper, dotted)
    return needs


def check_need(need: str, dotted: str, entry: Bound) -> None:
    if need in NEEDS or need in TOKEN_STATISTICS or (need.startswith(SAMPLE_FIELD_NEED) and need != SAMPLE_FIELD_NEED):
        return
    known = [*NEEDS, *TOKEN_STATISTICS.names(), f"{SAMPLE_FIELD_NEED}<field>"]
    raise ConfigError(
        f"{dotted}: {entry.entry.kind} {entry.name!r} needs {need!r}, which nothing provides{did_you_mean(need, known)}"
    )


def check_cap_is_read(cap: Bound, needs: dict[str, str]) -> None:
    """A cap other than the default one changes nothing unless a length penalty reads it."""
    default = AlgorithmSection().length_cap
    if "length_cap" in needs or (cap.name == default.name and cap.params == cap.entry.params(**default.params)):
        return
    readers = [
        entry.name for entry in LENGTH_SHAPERS.entries() if not callable(entry.needs) and "length_cap" in entry.needs
    ]  # those that always read it
    raise ConfigError(
        f"algorithm.length_cap: {cap.name} needs a length_penalty that uses the cap "
        f"({', '.join(readers)}); nothing in the recipe reads it"
    )


def check_length_profile(plan: Plan) -> None:
    """The profile file an entry reads its lengths from (read and joined to the data by the build)."""
    field_name = plan.needs.get("length_profile")
    if field_name is not None:
        check_profile_file(Path(plan[field_name].params.stats), f"{field_name}.stats")


def check_teacher_needs(recipe: Recipe, needs: dict[str, str]) -> None:
    """A teacher is loaded when distill.teacher is set, and only then: whatever needs one needs it
    set, and one that nothing needs would be loaded for nothing."""
    if "teacher" not in needs:
        if recipe.distill.teacher is not None:
            raise ConfigError(
                "distill.teacher: set, but nothing in the recipe needs a teacher (algorithm.objective "
                "distillation, or a token selection by teacher statistics); leave it null"
            )
        return
    if recipe.distill.teacher is None:
        user = f"{needs['teacher']} {field_value(recipe, needs['teacher']).name}"
        raise ConfigError(f"distill.teacher: {user} needs a teacher (a model directory or lab:<preset>)")
    if recipe.distill.placement == "ray" and recipe.cluster.backend != "ray":
        raise ConfigError("distill.placement: a ray teacher needs cluster.backend: ray")
