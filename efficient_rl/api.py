"""The library from Python: `efficient_rl.train` and `efficient_rl.evaluate` (docs/python-api.md).

They run the code `efficient-rl train` and `efficient-rl eval` run (the commands call these
functions); bad input raises ConfigError, the one line the command prints. Nothing heavy is imported
here at module level: reward worker processes import the package, and torch has no place in them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from efficient_rl.errors import ConfigError


def train(
    recipe: str | Path, overrides: Iterable[str] | Mapping = (), *, resume: bool = False, overwrite: bool = False
) -> dict:
    """Train `recipe` (a YAML file or a shipped name, e.g. "quickstart") with dotted overrides
    (["steps=1", "learner.lr=1e-4"], or {"steps": 1}); the run's summary (summary.json's content).
    The run directory, report included, is what `efficient-rl train` writes. A stop signal before the
    first step (the model's build, the evaluation before training) raises stopping.Stopped."""
    loaded = load(recipe, overrides)  # before the heavy imports: fast errors
    with stop_signals_recorded():
        summary, _ = train_recipe(loaded, resume=resume, overwrite=overwrite)
    return summary


def load(recipe: str | Path, overrides: Iterable[str] | Mapping = ()):
    """The recipe a reference names (a file, else a shipped name), overrides applied and checked."""
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.config.shipped import resolve_recipe

    return load_recipe(resolve_recipe(recipe), as_overrides(overrides))


def as_overrides(overrides: Iterable[str] | Mapping) -> list[str]:
    """Dotted `key=value` strings; a mapping's values written as JSON, which YAML reads back as they were."""
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):  # one string would otherwise be read a character at a time
        return [overrides]
    return list(overrides)


def train_recipe(recipe, resume: bool, overwrite: bool):
    """(summary, latest checkpoint) of a training run of a loaded recipe, its report written."""
    from efficient_rl.driver.loop import run_recipe
    from efficient_rl.driver.report import write_report

    run, summary = run_recipe(recipe, resume=resume, overwrite=overwrite)
    try:
        write_report(run.path, summary)  # still under the run's lock
        return summary, run.latest_checkpoint()
    finally:
        run.close()


def stop_signals_recorded():
    """A stop signal (Ctrl-C, SIGTERM) ends the run at a step's end, with a checkpoint, as under the
    command. Signal handlers can only be set from the main thread: elsewhere the signals are left be."""
    from efficient_rl.driver import stopping

    if threading.current_thread() is threading.main_thread():
        return stopping.handled()
    return contextlib.nullcontext()


def evaluate(models: str | Path | Iterable[str | Path], out: str | Path, **options) -> dict:
    """Evaluate models (directories, checkpoints or "lab:<preset>") x token budgets; `options` are
    `efficient-rl eval`'s flags as keywords (data="lab:tiny", budgets=[24, 48], samples=1, ...).
    Writes eval.json, the report and the plots into `out`; returns what eval.json holds."""
    from efficient_rl.config.rules import check_numbers
    from efficient_rl.eval.spec import EVAL_NUMBER_RULES

    spec = eval_spec(models, options)
    check_numbers(spec, EVAL_NUMBER_RULES)  # before the heavy imports: fast errors
    from efficient_rl.eval.tradeoff import run

    return run(spec, Path(out))


def eval_spec(models, options: dict):
    from efficient_rl.eval.spec import EvalSpec
    from efficient_rl.registry import did_you_mean

    known = {item.name for item in dataclasses.fields(EvalSpec)} - {"models"}
    for name in options:
        if name not in known:
            raise ConfigError(f"evaluate: {name}: unknown option{did_you_mean(name, known)}")
    listed = [models] if isinstance(models, str | Path) else list(models)
    return EvalSpec(models=[str(model) for model in listed], **options)
