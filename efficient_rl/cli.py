"""efficient-rl command line: train, plan, submit, jobs, study, eval, merge, export, reward check, recipes, lab."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from efficient_rl import api
from efficient_rl.driver import stopping
from efficient_rl.errors import ConfigError, OutputFailure, WorkerFailure

DISTRIBUTION = "efficient-rl"  # the name pip knows the package by (pyproject.toml)

RECIPE_EXAMPLES = "e.g. quickstart, dler, ablation/dler_ablation_0_truncation"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended
CLUSTER_TOO = "the stop signal reached the run's Ray cluster too"  # its processes, and so the work on them, are gone


def cmd_train(args) -> int:
    with stopping.handled():  # from the start: a stop signal during the slow imports is kept, not fatal
        return train(args)


def train(args) -> int:
    recipe = api.load(args.recipe, args.overrides)  # before the heavy imports: fast errors
    resume, overwrite = args.resume, args.overwrite
    if args.resume_if_checkpoint:
        from efficient_rl.run.checkpoint import restart_mode

        resume, overwrite = restart_mode(recipe)
    try:
        summary, checkpoint = api.train_recipe(recipe, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:  # Ctrl-C twice (stopping.py): everything the run started is closed by now
        if stopping.cut_taken():  # the cluster's loss outside a step: actor start, an evaluation
            print(
                f"stopped: {CLUSTER_TOO}; {what_resume_has(recipe)}",
                file=sys.stderr,
            )
            return stopping.EXIT_STOPPED
        print(f"efficient-rl: interrupted; stopped at once, mid-step; {what_resume_has(recipe)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except stopping.Stopped:  # a stop before the first step (the model's build, the evaluation before training)
        print(f"stopped before training; {what_resume_has(recipe)}", file=sys.stderr)
        return stopping.EXIT_STOPPED
    except stopping.StoppedMidStep as stop:  # the stop's signal reached the Ray cluster too
        print(
            f"stopped in step {stop.step} of {recipe.steps}: {CLUSTER_TOO}, so that step is lost; "
            f"{what_resume_has(recipe)}",
            file=sys.stderr,
        )
        return stopping.EXIT_STOPPED
    return exit_status(recipe, summary, checkpoint)


def what_resume_has(recipe) -> str:
    from efficient_rl.run.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(Path(recipe.logging.output_dir) / recipe.logging.name)
    if checkpoint is None:
        return "the run has no checkpoint yet (start it again with --overwrite)"
    return f"continue with --resume (checkpoint in {checkpoint})"


def exit_status(recipe, summary: dict, checkpoint) -> int:
    """0 for a finished run; EXIT_STOPPED, saying what --resume still does, for one a stop request ended."""
    from efficient_rl.run.checkpoint import what_is_left

    left = what_is_left(recipe, summary)
    if left is None:
        return 0
    print(f"{left} (checkpoint in {checkpoint})", file=sys.stderr)
    return stopping.EXIT_STOPPED


def cmd_recipes(args) -> int:
    """The shipped recipes by name (what train, plan and submit take besides a path), each method's choices."""
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.config.shipped import shipped_name, shipped_recipes

    for path in shipped_recipes():
        recipe = load_recipe(path)
        alg = recipe.algorithm
        print(
            f"{shipped_name(path):45s} advantage={alg.advantage.name} "
            f"policy_loss={alg.policy_loss.name} "
            f"length_penalty={alg.length_penalty.name} token_selection={alg.token_selection.name}"
        )
    return 0


def cmd_recipes_copy(args) -> int:
    from efficient_rl.config.shipped import copy_recipe

    written = copy_recipe(args.name, Path(args.destination), force=args.force)
    print(f"{written}: edit it, then: efficient-rl train {written}")
    return 0


def cmd_plan(args) -> int:
    """The recipe validated (refused as `train` would), then its memory plan per GPU."""
    from efficient_rl.config.memory import memory_table, plan_memory
    from efficient_rl.driver.validate import validate

    recipe = api.load(args.recipe, args.overrides)
    if args.no_check:  # the table of a recipe that does not fit, to see where its memory goes
        from efficient_rl.config.placement import resolve_placement

        plan = plan_memory(recipe, resolve_placement(recipe.cluster))
    else:
        plan = plan_memory(recipe, validate(recipe).placement)
    print(memory_table(plan, recipe.model.path or f"lab:{recipe.model.lab}"))
    return 0


def cmd_methods(args) -> int:
    """Every registry entry a recipe can pick, with its parameters, defaults, needs and source."""
    from efficient_rl.data.variables import PROMPT_VARIABLES
    from efficient_rl.driver.trackers import TRACKERS
    from efficient_rl.driver.validate import CHOICE_FIELDS

    listed = CHOICE_FIELDS + [("prompt.variables.<name>", PROMPT_VARIABLES), ("logging.trackers[]", TRACKERS)]
    for dotted, registry in listed:
        print(f"{dotted} ({registry.kind})")
        for entry in registry.entries():
            params = ", ".join(f"{name}={value!r}" for name, value in entry.defaults().items())
            needs = entry.needs if not callable(entry.needs) else "depends on the parameters"
            print(f"  {entry.name}({params})" + (f"  needs {needs}" if needs else ""))
            if entry.source:
                print(f"      {entry.source}")
    return 0


def cmd_reward_check(args) -> int:
    from efficient_rl.scoring.check import check_reward

    report = check_reward(
        args.spec,
        Path(args.data),
        args.completion_key,
        args.params,
        args.workers,
        args.timeout,
        args.form,
        question_key=args.question_key,
    )
    print(report.text)
    return 1 if report.failed else 0  # a reward that fails on some rows is a failed check


def cmd_profile_lengths(args) -> int:
    from efficient_rl.driver.profile import load_for_profiling, profile_lengths

    rows = profile_lengths(load_for_profiling(args.recipe, args.overrides), Path(args.out), args.samples)
    print(f"wrote the length profile of {rows} training prompts to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from efficient_rl.config.rules import as_flag, check_numbers
    from efficient_rl.eval.spec import EVAL_NUMBER_RULES, EvalSpec

    spec = EvalSpec(**{item.name: getattr(args, item.name) for item in dataclasses.fields(EvalSpec)})
    check_numbers(spec, EVAL_NUMBER_RULES, named=as_flag)  # before the heavy imports: fast errors
    from efficient_rl.eval.tradeoff import compare, report_markdown, run, write_outputs

    if args.models[0] == "compare":  # efficient-rl eval compare DIR... --out DIR
        if len(args.models) < 2:
            raise ConfigError("eval compare: give the output directories of one or more evaluations")
        result = compare([Path(directory) for directory in args.models[1:]])
        write_outputs(result, Path(args.out))
    else:
        result = run(spec, Path(args.out))
    print(report_markdown(result))
    print(f"outputs: {args.out}/eval.json, report.md, report.html, tradeoff.png, lengths.png")
    return 0


def cmd_lab(args) -> int:
    from efficient_rl.lab.build import lab_model_dir

    print(lab_model_dir(args.preset))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="efficient-rl", description="RL post-training recipes for efficient reasoning")
    root.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = root.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a recipe: efficient-rl train RECIPE [key.path=value ...]")
    train.add_argument("recipe", help=f"recipe: a YAML file, or a shipped recipe's name ({RECIPE_EXAMPLES})")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.policy_loss.clip_high=0.28")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    mode.add_argument(
        "--resume-if-checkpoint",
        action="store_true",
        help="resume if the run has a checkpoint, else start it (how a requeued Slurm job restarts)",
    )
    train.set_defaults(handler=cmd_train)

    plan = commands.add_parser(
        "plan",
        help="each GPU's memory, estimated from the model and the recipe: efficient-rl plan RECIPE [key=value ...]",
    )
    plan.add_argument("recipe", help="recipe: a YAML file, or a shipped recipe's name (e.g. dler_r1_1p5b)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.micro_batch_tokens=4096")
    plan.add_argument(
        "--no-check", action="store_true", help="print the table without validating (a recipe that does not fit)"
    )
    plan.set_defaults(handler=cmd_plan)

    recipes = commands.add_parser(
        "recipes", help="list the shipped recipes; `recipes copy NAME FILE` writes one out to start your own from"
    )
    recipes.set_defaults(handler=cmd_recipes)
    recipes_commands = recipes.add_subparsers(dest="recipes_command")
    copy = recipes_commands.add_parser("copy", help="copy a shipped recipe to a file of your own")
    copy.add_argument("name", help="a shipped recipe's name, as `efficient-rl recipes` lists it")
    copy.add_argument("destination", help="the file to write, e.g. my_dler.yaml")
    copy.add_argument("--force", action="store_true", help="replace the file if it exists")
    copy.set_defaults(handler=cmd_recipes_copy)

    methods = commands.add_parser(
        "methods", help="list every method a recipe can pick: registry entries with their parameters and defaults"
    )
    methods.set_defaults(handler=cmd_methods)

    reward = commands.add_parser("reward", help="work with reward functions")
    reward_commands = reward.add_subparsers(dest="reward_command", required=True)
    from efficient_rl.config.schema import RewardEntry

    check = reward_commands.add_parser("check", help="score saved completions with a reward and report")
    check.add_argument("spec", help="a reward: built-in name, file.py:function, module:function or plugin name")
    check.add_argument("--data", required=True, help="JSONL: one sample per line, with its completion")
    check.add_argument("--completion-key", default="completion", help="column holding the completion")
    check.add_argument(
        "--question-key",
        help="column holding the question (text or chat turns; a dotted key reads a nested value), given to the "
        "reward as the sample's question, as data.question_key maps it (TRL's prompts); default: the rows' own",
    )
    check.add_argument("--params", default="{}", help="the reward's keyword arguments, as JSON")
    check.add_argument("--workers", type=int, default=2, help="reward worker processes (0: in this process)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    check.add_argument(
        "--form", default=RewardEntry.form, help="how the function is called: native, batched, trl or verl"
    )
    check.set_defaults(handler=cmd_reward_check)

    evaluate = commands.add_parser(
        "eval", help="length/accuracy trade-offs of models x token budgets; `eval compare DIR...` merges evaluations"
    )
    evaluate.add_argument(
        "models",
        nargs="+",
        help="model or checkpoint directories, or lab:<preset>; or `compare` and evaluation output directories",
    )
    from efficient_rl.eval.spec import EvalSpec

    defaults = EvalSpec()
    evaluate.add_argument(
        "--data",
        default=defaults.data,
        help="lab:<preset> (held-out split), gsm8k:test100, a JSONL or Parquet file, or "
        "hf:<dataset>[:<config>] "
        "(a Hugging Face hub id, a local dataset directory or a save_to_disk directory)",
    )
    evaluate.add_argument("--split", default=defaults.split, help="split of an hf: dataset")
    evaluate.add_argument(
        "--question-key",
        default=defaults.question_key,
        help="column holding the question: text or chat turns; a dotted key reads a nested value",
    )
    evaluate.add_argument(
        "--answer-key",
        default=defaults.answer_key,
        help="column holding the reference answer; a dotted key reads a nested value (reward_model.ground_truth)",
    )
    evaluate.add_argument("--engine", default=defaults.engine, help="transformers or vllm")
    evaluate.add_argument("--budgets", type=int, nargs="+", default=defaults.budgets, help="response token caps")
    evaluate.add_argument("--samples", type=int, default=defaults.samples, help="samples per question")
    evaluate.add_argument("--problems", type=int, default=defaults.problems, help="questions (the first N)")
    evaluate.add_argument("--temperature", type=float, default=defaults.temperature)
    evaluate.add_argument("--top-p", type=float, default=defaults.top_p)
    evaluate.add_argument("--reward", default=defaults.reward, help="the verifier: any reward reference")
    evaluate.add_argument(
        "--reward-form",
        default=defaults.reward_form,
        help="how the verifier is called, as a reward entry's form: native, batched, trl (TRL's) or verl (verl's)",
    )
    evaluate.add_argument("--seed", type=int, default=defaults.seed)
    evaluate.add_argument(
        "--chat-template",
        default=defaults.chat_template,
        choices=["auto", "always", "never"],
        help="prompts through the tokenizer's chat template: when it has one / required / never",
    )
    evaluate.add_argument(
        "--system-prompt",
        help="a system turn before each question (chat templates only; chat turns with their own keep it)",
    )
    evaluate.add_argument(
        "--user-template",
        default=defaults.user_template,
        help='the user turn; "{question}" and "{budget}" (the token cap) are replaced',
    )
    evaluate.add_argument(
        "--force-answer",
        action="store_true",
        default=defaults.force_answer,
        help="at each budget also close the reasoning there and let the answer finish (budget forcing): "
        "pass@1/forced and length/forced beside the cut-at-budget numbers",
    )
    evaluate.add_argument(
        "--force-close", default=defaults.force_close, help="the text that closes the reasoning (--force-answer)"
    )
    evaluate.add_argument(
        "--force-answer-prompt",
        default=defaults.force_answer_prompt,
        help='appended after --force-close, e.g. "\\n\\nFinal answer: "',
    )
    evaluate.add_argument(
        "--force-answer-tokens",
        type=int,
        default=defaults.force_answer_tokens,
        help="tokens the forced answer may take after the appended text",
    )
    evaluate.add_argument("--out", required=True, help="output directory; re-running resumes from its cache")
    evaluate.set_defaults(handler=cmd_eval)

    profile = commands.add_parser(
        "profile-lengths",
        help="a reference's lengths per training prompt, for the profiled_threshold length penalty: "
        "efficient-rl profile-lengths RECIPE --out stats.jsonl [key.path=value ...]",
    )
    profile.add_argument(
        "recipe", help="recipe: a YAML file or a shipped name; its initial model, training data, rewards and sampling"
    )
    profile.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train_size=1000")
    profile.add_argument("--out", required=True, help="the JSON-lines profile to write (it must not exist)")
    profile.add_argument("--samples", type=int, default=8, help="answers per training prompt")
    profile.set_defaults(handler=cmd_profile_lengths)

    from efficient_rl.models.export import add_parser as add_export_parser
    from efficient_rl.models.merge import add_parser as add_merge_parser
    from efficient_rl.models.sources import add_parser as add_convert_parser
    from efficient_rl.slurm.jobs import add_parser as add_jobs_parser
    from efficient_rl.slurm.submit import add_parser as add_submit_parser
    from efficient_rl.study.command import add_parser as add_study_parser

    add_merge_parser(commands)
    add_export_parser(commands)
    add_convert_parser(commands)
    add_submit_parser(commands)
    add_jobs_parser(commands)
    add_study_parser(commands)

    lab = commands.add_parser("lab", help="build (or find in the cache) a lab model and print its path")
    lab.add_argument("preset", nargs="?", default="quickstart")
    lab.set_defaults(handler=cmd_lab)
    return root


def package_version() -> str:
    """The installed distribution's version; from pyproject.toml beside the package in a source
    tree run without an install (PYTHONPATH)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"] if pyproject.is_file() else "unknown"


def main(argv: list[str] | None = None) -> int:
    root = parser()
    # Overrides may come before or after flags: `train R --resume a.b=1` and `train R a.b=1 --resume`.
    args, extra = root.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and args.command not in ("train", "plan", "profile-lengths", "submit", "study", "sweep")):
        root.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides += extra
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"efficient-rl: error: {err}", file=sys.stderr)
        return 2
    except (WorkerFailure, OutputFailure) as err:
        print(f"efficient-rl: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `efficient-rl methods | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except KeyboardInterrupt:  # Ctrl-C in any other command (or in train's imports)
        # Everything the command started was closed on the way here; a traceback would only
        # show where the interrupt happened to land.
        print("efficient-rl: interrupted; stopped at once", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
