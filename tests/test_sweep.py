"""`efficient-rl study` (alias `sweep`): a study trained end to end, stopped and resumed, its
report; bad study files; the shipped studies check. The Slurm launcher: tests/test_slurm.py."""

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import RECIPES, wait_for
from efficient_rl.cli import main
from efficient_rl.errors import ConfigError

TINY_STUDY = RECIPES / "studies" / "tiny.yaml"
HANG_GUARD = 1200  # seconds: only turns a hang into a failure


def study(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "efficient_rl.cli", "study", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )


def logged_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_stopped_study_resumes_without_retraining_its_finished_run(tmp_path, capsys, tiny_model_dir):
    directory = tmp_path / "tiny"
    finished, stopped = directory / "runs" / "grpo-s0", directory / "runs" / "dler-s0"
    command = [sys.executable, "-m", "efficient_rl.cli", "sweep", "run", str(TINY_STUDY), f"output_dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Stop the study (as Ctrl-C would) once the second run has its first checkpoint.
    wait_for(
        (stopped / "checkpoints" / "step-00000001").is_dir,
        process,
        lambda: process.communicate()[0][-3000:],
        guard=HANG_GUARD,
        pause=0.05,
    )
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=HANG_GUARD)[0]
    assert process.returncode == 75, output[-3000:]  # stopped, resumable
    summaries = {run: json.loads((run / "summary.json").read_text()) for run in (finished, stopped)}
    assert summaries[finished]["steps_completed"] == 4 and 1 <= summaries[stopped]["steps_completed"] < 4
    assert "stopping the study" in output and not (directory / "report.json").exists()
    trained_before = (stopped / "metrics.jsonl").read_text()
    assert len(trained_before.splitlines()) == summaries[stopped]["steps_completed"]

    status = study("status", str(TINY_STUDY), f"output_dir={tmp_path}", cwd=tmp_path)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[2:4]}
    assert status.returncode == 0 and rows["grpo-s0"][3] == "done" and rows["dler-s0"][3] == "partial", status.stdout

    files_of_the_finished_run = {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()}
    resumed = study("run", str(TINY_STUDY), f"output_dir={tmp_path}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 of 2 runs done; training 1" in resumed.stdout
    # The finished run was not trained again: not one of its files was rewritten, and its log holds one attempt.
    assert {
        path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()
    } == files_of_the_finished_run
    assert (directory / "logs" / "grpo-s0.log").read_text().count("=== study attempt") == 1
    # The stopped one continued from its checkpoint: its first steps' lines are kept, every step ran once.
    assert (directory / "logs" / "dler-s0.log").read_text().count("=== study attempt") == 2
    assert (stopped / "metrics.jsonl").read_text().startswith(trained_before)
    assert logged_steps(stopped) == [1, 2, 3, 4]

    report = json.loads((directory / "report.json").read_text())
    assert {name: run["state"] for name, run in report["runs"].items()} == {"grpo-s0": "done", "dler-s0": "done"}
    points = {(p["method"], p["budget"]): p for p in report["points"]}
    assert set(points) == {(method, budget) for method in ("grpo", "dler", "lab:tiny") for budget in (8, 24)}
    assert points[("dler", 24)]["step"] == 4 and points[("dler", 24)]["seed"] == 0
    assert report["pareto"] and set(report["pareto"]) <= {p["name"] for p in report["points"]}
    assert report["oracle_frontier"][0] == [0.0, 0.0]
    methods = {(row["method"], row["budget"]): row for row in report["methods"]}
    assert (
        methods[("grpo", 8)]["seeds"] == 1 and methods[("grpo", 8)]["pass@1"]["mean"] == points[("grpo", 8)]["pass@1"]
    )
    # Budgets 8 and 24: one trapezoid over log2 budget, so a seed's area is the mean of its two pass@1s.
    sweeps = {(row["method"], row["step"]): row for row in report["sweeps"]}
    assert set(sweeps) == {("grpo", 4), ("dler", 4), ("lab:tiny", 0)}
    dler_area = (points[("dler", 8)]["pass@1"] + points[("dler", 24)]["pass@1"]) / 2
    assert sweeps[("dler", 4)]["seeds"] == 1 and sweeps[("dler", 4)]["auc_log_budget"]["mean"] == pytest.approx(
        dler_area
    )
    markdown = (directory / "report.md").read_text()
    assert "| grpo-s0_step-00000004@8" in markdown and "| dler-s0_step-00000004@24" in markdown
    assert "## Budget sweep per method" in markdown
    assert (directory / "frontier.png").stat().st_size > 10_000
    assert (directory / "eval" / "report.html").is_file()  # the evaluation's own outputs, for every point

    # Again with every kept checkpoint evaluated (checkpoint.keep 2: steps 3 and 4): nothing is trained.
    assert main(["study", "run", str(TINY_STUDY), f"output_dir={tmp_path}", "eval.checkpoints=all"]) == 0
    report = json.loads((directory / "report.json").read_text())
    assert {(p["method"], p["step"]) for p in report["points"]} == {
        ("lab:tiny", 0),
        ("grpo", 3),
        ("grpo", 4),
        ("dler", 3),
        ("dler", 4),
    }
    assert {row["step"] for row in report["methods"] if row["method"] == "dler"} == {3, 4}
    assert (directory / "logs" / "grpo-s0.log").read_text().count("=== study attempt") == 1

    # A method evaluated with a prompt of its own (as L1 is, with its target): its checkpoints get
    # an evaluation of their own, nothing is trained, and the report sets every run on one frontier.
    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["runs"] = [{**run, "recipe": str(RECIPES / Path(run["recipe"]).name)} for run in raw["runs"]]
    raw["runs"][1]["eval_user_template"] = "{question} Think in {budget} tokens."
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert main(["study", "run", str(tmp_path / "tiny.yaml"), f"output_dir={tmp_path}"]) == 0
    own = json.loads((directory / "eval-dler" / "eval.json").read_text())
    assert own["spec"]["user_template"] == "{question} Think in {budget} tokens."
    assert {run["model"] for run in own["runs"].values()} == {str(stopped / "checkpoints" / "step-00000004")}
    report = json.loads((directory / "report.json").read_text())
    assert report["eval"]["run_user_templates"] == {"dler": "{question} Think in {budget} tokens."}
    assert {(p["method"], p["budget"]) for p in report["points"]} == {
        (method, budget) for method in ("grpo", "dler", "lab:tiny") for budget in (8, 24)
    }
    assert set(report["pareto"]) <= {p["name"] for p in report["points"]}
    assert (directory / "logs" / "dler-s0.log").read_text().count("=== study attempt") == 2

    # A study file changed under a trained run is refused, not resumed or counted as done.
    raw["overrides"].append("learner.lr=0.5")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert main(["study", "run", str(tmp_path / "tiny.yaml"), f"output_dir={tmp_path}"]) == 2
    assert "runs[0] (grpo-s0): " in capsys.readouterr().err


def good_study(tmp_path) -> dict:
    return {
        "output_dir": str(tmp_path / "out"),
        "seeds": [0],
        "overrides": ["model.lab=tiny", "data.train=lab:tiny", "data.heldout=lab:tiny"],
        "runs": [{"method": "a", "recipe": str(RECIPES / "grpo.yaml")}],
        "eval": {"data": "lab:tiny", "budgets": [8]},
    }


def changed(study: dict, dotted: str, value) -> dict:
    """`study` with `dotted` (a.b or runs.0.key) set to `value`, or removed for DELETE."""
    *parents, leaf = dotted.split(".")
    node = study
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return study


DELETE = object()


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("seed", [1], "seed: unknown key (did you mean 'seeds'?)"),
        ("runs", DELETE, "expected runs to be set"),
        ("runs", [], "runs: expected at least one run"),
        ("runs.0.recipe", "nope.yaml", "nope.yaml: recipe file not found"),
        ("runs.0.method", "a/b", "runs[0].method: expected a name of letters"),
        ("runs.0.overrides", ["seed=3"], "runs[0].overrides: 'seed=3': the study sets seed itself"),
        (
            "runs.0.eval_user_template",
            "{question} {level}",
            "runs[0].eval_user_template: {level} is not a field an evaluation knows",
        ),
        ("eval.user_template", "{level}", "eval.user_template: {level} is not a field an evaluation knows"),
        ("runs.0.overrides", ["algorithm.nope=1"], "algorithm.nope: unknown key"),
        ("runs.0.overrides", ["rollout.group_size=0"], "rollout.group_size: expected an integer >= 1, got 0"),
        (
            "runs",
            [
                {"method": "a", "recipe": str(RECIPES / "grpo.yaml")},
                {"method": "a", "recipe": str(RECIPES / "dler.yaml")},
            ],
            "runs: method 'a' appears twice",
        ),
        ("seeds", [0, 0], "seeds: seed 0 appears twice"),
        ("seeds", [-1], "seeds[0]: expected an integer >= 0, got -1"),
        ("eval.budgets", [0], "eval.budgets[0]: expected an integer >= 1, got 0"),
        ("eval.samples", "four", "eval.samples: expected an integer, got str 'four'"),
        ("eval.data", "lab:nope", "eval.data: unknown lab preset 'nope'"),
        ("eval.models", ["lab:tiny"], "eval.models: unknown key"),
        ("eval.checkpoints", "some", "eval.checkpoints: expected one of 'final', 'all', got 'some'"),
        ("eval.engine", "magic", "eval.engine: expected one of transformers, vllm"),
        ("launcher", "kubernetes", "launcher: expected one of 'local', 'slurm', got 'kubernetes'"),
        ("slurm.nodes", 0, "slurm.nodes: expected an integer >= 1, got 0"),
    ],
)
def test_bad_study_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, dotted, value, message):
    study_file = tmp_path / "study.yaml"
    raw = changed(good_study(tmp_path), dotted, value)
    study_file.write_text(yaml.safe_dump(raw))
    status = main(["study", "run", str(study_file)])
    stderr = capsys.readouterr().err
    assert status == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(f"efficient-rl: error: {study_file}: ")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_study_is_one_line(tmp_path, capsys):
    for text, message in (
        ("runs: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping of study sections (runs, seeds, eval, ...)"),
    ):
        (tmp_path / "study.yaml").write_text(text)
        for command in ("check", "status"):  # every subcommand loads the study alike
            assert main(["study", command, str(tmp_path / "study.yaml")]) == 2
            assert message in capsys.readouterr().err
    assert main(["study", "check", str(tmp_path / "missing.yaml")]) == 2
    assert "study file not found" in capsys.readouterr().err


def test_a_study_varies_another_named_as_its_defaults(tmp_path):
    """Lists (runs, overrides) replace the base's, mappings (eval) merge key by key, the name is the
    file's own; a chain that loops back is one line."""
    from efficient_rl.study.spec import load_study

    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({**good_study(tmp_path), "eval": {"data": "lab:tiny", "budgets": [8], "samples": 3}})
    )
    sweep = {"defaults": "base.yaml", "seeds": [1, 2], "runs": [{"method": "b", "recipe": str(RECIPES / "dler.yaml")}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**sweep, "eval": {"budgets": [4, 16]}}))
    loaded = load_study(tmp_path / "sweep.yaml")
    assert loaded.study.name == "sweep" and [run.method for run in loaded.study.runs] == ["b"]
    assert loaded.study.overrides == good_study(tmp_path)["overrides"] and loaded.study.seeds == [1, 2]
    assert (loaded.study.eval.data, loaded.study.eval.budgets, loaded.study.eval.samples) == ("lab:tiny", [4, 16], 3)
    assert [(item.method, item.seed, item.recipe.model.lab) for item in loaded.planned] == [
        ("b", 1, "tiny"),
        ("b", 2, "tiny"),
    ]
    (tmp_path / "base.yaml").write_text("defaults: sweep.yaml\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml: 'defaults' chain loops back to itself$"):
        load_study(tmp_path / "sweep.yaml")


@pytest.mark.parametrize(
    "name, trainings",
    [
        ("dler_frontier", 48),
        ("dler_frontier_2026", 48),
        ("dler_ablation_2026", 21),
        ("dler_frontier_sweeps", 8),
        ("tiny", 2),
    ],
)
def test_the_shipped_studies_check(tmp_path, capsys, name, trainings):
    status = main(["study", "check", str(RECIPES / "studies" / f"{name}.yaml"), f"output_dir={tmp_path / 'out'}"])
    printed = capsys.readouterr().out
    assert status == 0 and f"= {trainings} trainings" in printed, printed
    assert len(printed.splitlines()) == 2 + trainings
    assert not (tmp_path / "out").exists()


def test_the_shipped_profiled_study_checks_once_its_profile_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the study reads its profile from the directory it is run from
    check = ["study", "check", str(RECIPES / "studies" / "dler_profiled_2026.yaml"), f"output_dir={tmp_path / 'out'}"]
    assert main(check) == 2
    assert (
        "lab_easy_mixed.profile.jsonl is no file; write it with efficient-rl profile-lengths" in capsys.readouterr().err
    )
    (tmp_path / "lab_easy_mixed.profile.jsonl").write_text("")
    assert main(check) == 0
    assert "= 3 trainings" in capsys.readouterr().out


def test_every_launcher_a_study_may_name_can_launch_and_be_followed():
    import typing

    from efficient_rl.study.launchers import LAUNCHERS
    from efficient_rl.study.progress import LAUNCH_ACTIVITY
    from efficient_rl.study.spec import Study

    names = set(typing.get_args(typing.get_type_hints(Study)["launcher"]))
    assert names == set(LAUNCHERS) == set(LAUNCH_ACTIVITY) == {"local", "slurm"}


def test_a_study_whose_output_dir_is_a_file_fails_check_as_run_would(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    for command in ("check", "run"):
        assert main(["study", command, str(TINY_STUDY), f"output_dir={tmp_path / 'taken'}"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"efficient-rl: error: output_dir: {tmp_path / 'taken'} is not a directory; the study writes to "
            f"{tmp_path / 'taken' / 'tiny'} (set output_dir=DIR)"
        ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_a_second_study_run_of_one_study_is_refused_before_it_checks_anything(tmp_path):
    """The study's lock is taken first, atomically (an flock), so of two `study run` started at once
    exactly one gets past start-up; the other says who holds the study and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".tiny.lock"  # where `study run` of tiny into `out` locks
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = study("run", str(TINY_STUDY), f"output_dir={out}", cwd=tmp_path)
    finally:
        os.close(fd)
    assert refused.returncode == 2, refused.stderr[-2000:]
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"efficient-rl: error: {out / 'tiny'}: in use by ") and line.endswith(
        "; wait for it or stop it"
    )
    assert sorted(path.name for path in out.iterdir()) == [".tiny.lock"]  # the holder's file, nothing of the study's
