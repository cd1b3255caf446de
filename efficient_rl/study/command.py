"""`efficient-rl study run|status|check STUDY.yaml [key=value ...]` (alias `sweep`).

run     train every run that is not done (a half-trained one resumes from its checkpoint), then
        evaluate and report. Ctrl-C: the run in training checkpoints and the study stops (75);
        `study run` again resumes it. A failed run is reported and the others go on; the
        study then exits 1.
status  each run: done, training, queued, failed, partial (a checkpoint to resume) or pending.
check   load and check the study (every run's recipe too) and print its plan; writes nothing.
"""

from __future__ import annotations

from efficient_rl.driver import stopping
from efficient_rl.errors import ConfigError
from efficient_rl.study.spec import LoadedStudy, load_study, study_as_yaml


def describe_plan(loaded: LoadedStudy) -> str:
    study = loaded.study
    settings = study.eval
    lines = [
        f"study {study.name}: {len(study.runs)} runs x {len(study.seeds)} seeds = {len(loaded.planned)} "
        f"trainings ({study.launcher}), into {loaded.directory}",
        f"evaluation: {settings.data}, {settings.problems} questions x {settings.samples} samples, budgets "
        f"{', '.join(map(str, settings.budgets))}, {settings.checkpoints} checkpoints"
        + (f", baselines {', '.join(settings.baselines)}" if settings.baselines else ""),
    ]
    for item in loaded.planned:
        recipe = item.recipe
        lines.append(
            f"  {item.name:28s} {item.recipe_path.name:32s} steps={recipe.steps} "
            f"length_penalty={recipe.algorithm.length_penalty.name} advantage={recipe.algorithm.advantage.name}"
        )
    return "\n".join(lines)


def loaded_study(args):
    """The study the command names (a file, else a shipped study's name), checked."""
    from efficient_rl.config.shipped import resolve_study

    return load_study(resolve_study(args.study), args.overrides)


def check_study_directory(loaded: LoadedStudy) -> None:
    """The study's directory can be made, or is a directory to write in: what `study run` writes
    first, checked by `study check` too."""
    import os

    directory = loaded.directory
    existing = next(path for path in (directory, *directory.parents) if os.path.lexists(path))
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir: {existing} is not a directory; the study writes to {directory} (set output_dir=DIR)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {existing} is not writable; the study writes to {directory}")


def cmd_check(args) -> int:
    from efficient_rl.study.launchers import LAUNCHERS

    loaded = loaded_study(args)
    check_study_directory(loaded)
    LAUNCHERS[loaded.study.launcher].check(loaded)
    print(describe_plan(loaded))
    return 0


def cmd_status(args) -> int:
    from efficient_rl.study.progress import status_table

    print(status_table(loaded_study(args)))
    return 0


def cmd_run(args) -> int:
    from efficient_rl.run.checkpoint import acquire_run_lock, lock_path, release_run_lock, write_atomically
    from efficient_rl.study.launchers import LAUNCHERS

    loaded = loaded_study(args)
    launcher = LAUNCHERS[loaded.study.launcher]
    check_study_directory(loaded)
    # The study's own lock, beside its directory, taken at once (flock) before anything is checked
    # against its runs' records: of two `study run` of one study, exactly one gets past here.
    lock = acquire_run_lock(lock_path(loaded.directory), loaded.directory)
    try:
        launcher.check(loaded)  # every check before the study's directory is written
        loaded.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(loaded.directory / "study.yaml", study_as_yaml(loaded.study))
        return run_study(loaded, launcher)
    finally:
        release_run_lock(lock)


def run_study(loaded: LoadedStudy, launcher) -> int:
    from efficient_rl.study.launchers import StopRequests, say
    from efficient_rl.study.progress import DONE, FAILED, run_state, states
    from efficient_rl.study.report import evaluate

    with StopRequests() as stops:
        todo = [item for item in loaded.planned if run_state(item, loaded.directory).state != DONE]
        say(f"{len(loaded.planned) - len(todo)} of {len(loaded.planned)} runs done; training {len(todo)}")
        launcher.train(todo, loaded, stops)
        if stops.received:
            say("stopped; `efficient-rl study run` again resumes the study")
            return stopping.EXIT_STOPPED
        now = states(loaded)
        report = evaluate(loaded, now)
    failed = [name for name, state in now.items() if state.state == FAILED]
    say(f"report: {loaded.directory / 'report.md'} ({len(report['points'])} points)")
    for name in failed:
        say(f"failed: {name}: {now[name].detail}")
    return 1 if failed else 0


SUBCOMMANDS = {
    "run": (cmd_run, "train every run not done yet (resuming half-trained ones), evaluate, report"),
    "status": (cmd_status, "which runs are done, training, queued, failed, partial or pending"),
    "check": (cmd_check, "check the study file and every run's recipe, print the plan; writes nothing"),
}


def add_parser(commands) -> None:
    study = commands.add_parser(
        "study",
        aliases=["sweep"],
        help="several recipes x seeds trained, evaluated and compared in one report (docs/studies.md)",
    )
    subcommands = study.add_subparsers(dest="study_command", required=True)
    for name, (handler, help_text) in SUBCOMMANDS.items():
        parser = subcommands.add_parser(name, help=help_text)
        parser.add_argument("study", help="study: a YAML file, or a shipped study's name (dler_frontier, tiny)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides of the study file, e.g. output_dir=/tmp/s")
        parser.set_defaults(handler=handler)
