"""Study files: which runs (a recipe, overrides, a method name) x which seeds, one evaluation, and
how the runs are launched. Checked as recipes are (config.build: keys and types; number rules;
every run's recipe loaded and checked as `train` would), each error one line naming the field;
nothing is written before every check has passed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from efficient_rl.config.loading import apply_override, build, load_recipe, read_file_chain
from efficient_rl.config.rules import check_numbers
from efficient_rl.config.schema import Recipe, as_plain
from efficient_rl.errors import ConfigError
from efficient_rl.eval.spec import EVAL_NUMBER_RULES, EvalSpec, check_reward_form, check_user_template
from efficient_rl.slurm.submit import SUBMIT_NUMBER_RULES, SubmitOptions

# Method and study names become directory names (<method>-s<seed>, <output_dir>/<name>).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Fields a study sets on every run itself: an override of them would be overridden in turn.
STUDY_SET_KEYS = ("seed", "logging.output_dir", "logging.name")


@dataclass
class StudyRun:
    method: str  # the name the report groups seeds under; run directories are <method>-s<seed>
    recipe: str  # a recipe file, relative to the study file
    overrides: list[str] = field(default_factory=list)  # dotted overrides, as for `train`
    # The user turn its checkpoints are evaluated with, instead of eval.user_template: for a method
    # trained with something in its prompt, e.g. L1's target, "{question} Think for {budget} tokens."
    eval_user_template: str | None = None


@dataclass
class StudyEval(EvalSpec):
    """`efficient-rl eval`'s settings (data, budgets, samples, problems, temperature, ...: the same
    defaults), for every evaluated checkpoint of every run."""

    checkpoints: Literal["final", "all"] = "final"  # all: every checkpoint a run kept (checkpoint.every, keep)
    baselines: list[str] = field(default_factory=list)  # other models evaluated alongside, e.g. the warm start


@dataclass
class Study:
    runs: list[StudyRun]
    seeds: list[int] = field(default_factory=lambda: [0])
    name: str | None = None  # default: the study file's stem
    output_dir: str = "studies"  # the study's directory is <output_dir>/<name>
    overrides: list[str] = field(default_factory=list)  # for every run, before the run's own
    eval: StudyEval = field(default_factory=StudyEval)
    launcher: Literal["local", "slurm"] = "local"  # LAUNCHERS in efficient_rl/study/launchers.py
    slurm: SubmitOptions = field(default_factory=SubmitOptions)  # launcher: slurm: what each job asks for

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


STUDY_NUMBER_RULES = {
    "seeds": "[0, inf)",
    **{f"eval.{name}": rule for name, rule in EVAL_NUMBER_RULES.items()},
    **{f"slurm.{name}": rule for name, rule in SUBMIT_NUMBER_RULES.items()},
}


@dataclass
class PlannedRun:
    """One run of the study: a method at a seed."""

    index: int  # in the study's runs list
    method: str
    seed: int
    recipe_path: Path
    overrides: list[str]  # what `train` gets after the recipe path
    recipe: Recipe

    @property
    def name(self) -> str:
        return self.recipe.logging.name

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.logging.output_dir) / self.recipe.logging.name

    @property
    def where(self) -> str:
        return f"runs[{self.index}] ({self.name})"


@dataclass
class LoadedStudy:
    path: Path
    study: Study
    planned: list[PlannedRun]

    @property
    def directory(self) -> Path:
        return self.study.directory


def load_study(path: str | Path, overrides: list[str] = ()) -> LoadedStudy:
    """The study and its runs, every check passed; a one-line ConfigError otherwise."""
    path = Path(path)
    raw = read_study_file(path)
    for override in overrides:
        apply_override(raw, override)
    if isinstance(raw.get("eval"), dict) and "models" in raw["eval"]:
        raise ConfigError(
            f"{path}: eval.models: unknown key (the study evaluates its runs; eval.baselines adds other models)"
        )
    minutes_as_time(raw)
    study = build(Study, raw, "", source=str(path))
    study.name = study.name if study.name is not None else path.stem
    try:
        check_study(study)
        planned = plan(study, path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return LoadedStudy(path, study, planned)


def minutes_as_time(raw: dict) -> None:
    """slurm.time: a whole number is minutes, as for Slurm's --time (YAML and overrides read `30` as one)."""
    slurm = raw.get("slurm")
    if (
        isinstance(slurm, dict)
        and isinstance(slurm.get("time"), (int, float))
        and not isinstance(slurm["time"], bool)
        and float(slurm["time"]).is_integer()
    ):
        slurm["time"] = str(int(slurm["time"]))


def read_study_file(path: Path) -> dict:
    """The study file's mapping merged over its `defaults:` chain: a study that varies another
    (a sweep of a few of its runs) names it and sets only what differs; `runs` and `overrides`
    are lists, so they replace the base's, while `eval` and `slurm` merge key by key."""
    return read_file_chain(path, "study", "study sections (runs, seeds, eval, ...)")


def check_study(study: Study) -> None:
    check_numbers(study, STUDY_NUMBER_RULES)
    check_name("name", study.name)
    if not study.runs:
        raise ConfigError("runs: expected at least one run")
    if not study.seeds:
        raise ConfigError("seeds: expected at least one seed")
    repeated(study.seeds, "seeds", "seed")
    for index, run in enumerate(study.runs):
        check_name(f"runs[{index}].method", run.method)
        if run.eval_user_template is not None:
            check_user_template(run.eval_user_template, f"runs[{index}].eval_user_template")
    repeated([run.method for run in study.runs], "runs", "method")
    for where, items in [("overrides", study.overrides)] + [
        (f"runs[{i}].overrides", run.overrides) for i, run in enumerate(study.runs)
    ]:
        check_overrides(where, items)
    check_eval(study.eval)


def check_name(where: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: expected a name of letters, digits, '_', '-' and '.' (it names directories), got {name!r}"
        )


def repeated(values: list, where: str, what: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"{where}: {what} {value!r} appears twice")
        seen.add(value)


def check_overrides(where: str, overrides: list[str]) -> None:
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if "=" not in override:
            raise ConfigError(f"{where}: {override!r}: expected key.path=value")
        if key in STUDY_SET_KEYS:
            raise ConfigError(f"{where}: {override!r}: the study sets {key} itself (seeds:, output_dir:, the method)")


def check_eval(settings: StudyEval) -> None:
    from efficient_rl.eval.tradeoff import EVAL_ENGINES, load_questions

    if settings.engine not in EVAL_ENGINES:
        raise ConfigError(f"eval.engine: expected one of {', '.join(EVAL_ENGINES)}, got {settings.engine!r}")
    if not settings.budgets:
        raise ConfigError("eval.budgets: expected at least one token budget")
    check_user_template(settings.user_template, "eval.user_template")
    check_reward_form(settings.reward_form, "eval.reward_form")
    load_questions(settings, field_name="eval.data")  # a data source that cannot be read fails now, not after training


def plan(study: Study, path: Path) -> list[PlannedRun]:
    """Every (run, seed), its recipe loaded and checked as `train` would check it."""
    from efficient_rl.driver.validate import validate

    planned = []
    for index, run in enumerate(study.runs):
        recipe_path = path.parent / run.recipe
        for seed in study.seeds:
            overrides = (
                study.overrides
                + run.overrides
                + [
                    f"seed={seed}",
                    f"logging.output_dir={study.directory / 'runs'}",
                    f"logging.name={run.method}-s{seed}",
                ]
            )
            try:
                recipe = load_recipe(recipe_path, overrides)
                validate(recipe)
            except ConfigError as err:
                raise ConfigError(f"runs[{index}] ({run.method}): {err}") from None
            planned.append(PlannedRun(index, run.method, seed, recipe_path, overrides, recipe))
    for item in planned:
        check_same_recipe(item)
    return planned


def check_same_recipe(item: PlannedRun) -> None:
    """A run trained before under another recipe is neither resumed nor counted as done: the
    study file changed under it."""
    from efficient_rl.run.checkpoint import changed_section

    if (item.run_dir / "config.yaml").is_file():
        section = changed_section(item.run_dir, item.recipe)
        if section is not None:
            raise ConfigError(
                f"{item.where}: {item.run_dir} was trained with another recipe ({section} differs "
                "from its config.yaml; only 'steps' may change); restore the study file, or remove "
                "the run directory to train it anew"
            )


def study_as_yaml(study: Study) -> str:
    return yaml.safe_dump(as_plain(study), sort_keys=False)


def eval_spec(settings: StudyEval, models: list[str]) -> EvalSpec:
    """The evaluation of `models` with the study's settings."""
    shared = {item.name: getattr(settings, item.name) for item in dataclasses.fields(EvalSpec) if item.name != "models"}
    return EvalSpec(models=models, **shared)
