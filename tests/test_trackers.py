"""Experiment trackers and completion logs, read back from what the real packages wrote.

wandb runs offline (its .wandb transaction log, read below with wandb's own protobuf records) and
MLflow on a SQLite store (read through MlflowClient); nothing leaves the machine.
"""

import json
import math
import os
import struct
import time
from pathlib import Path

import pytest

from conftest import RECIPES
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.loop import run_recipe
from efficient_rl.driver.trackers import TRACKERS, mlflow_name
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.run.checkpoint import RunDir

TIMING = ("step_time", "tokens_per_second", "timing/")
COMPLETION_FIELDS = {
    "step",
    "group",
    "question",
    "prompt",
    "completion",
    "answer",
    "score",
    "reward",
    "correct",
    "length",
    "truncated",
    "length_cap",
}
HANG_GUARD = 60  # seconds for wandb's service to leave once the run is closed


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def same_rows(saved: dict, expected: list[dict]) -> bool:
    """A table a tracker saved ({columns, data}) against completions.jsonl's rows (floats to 10 digits:
    pandas writes MLflow's tables at that precision)."""
    rows = [dict(zip(saved["columns"], values)) for values in saved["data"]]
    return len(rows) == len(expected) and all(
        row.keys() == want.keys()
        and all(
            math.isclose(row[k], want[k], rel_tol=1e-9, abs_tol=1e-12)
            if isinstance(want[k], float)
            else row[k] == want[k]
            for k in want
        )
        for row, want in zip(rows, expected)
    )


# ---------------------------------------------------------------- reading what wandb wrote offline
def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a LevelDB-style log (a 7-byte file header, then 32 KiB
    blocks of chunks, each with a 7-byte header: checksum, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_dir: Path) -> tuple[set[str], list[dict]]:
    """(the run ids of every offline part, the history rows of all parts in order of writing)."""
    ids, rows = set(), []
    for part in sorted((run_dir / "wandb").glob("offline-run-*")):
        for record in wandb_records(next(part.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {"_part": part}
                for item in record.history.item:  # a table is a nested value: completions -> {_type, path, ...}
                    *parents, leaf = item.nested_key or [item.key]
                    node = row
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[leaf] = json.loads(item.value_json)
                rows.append(row)
    return ids, rows


def wandb_core_children() -> list[int]:
    """Live wandb-core service processes started by this (the test's) process."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            command = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            int(fields.get("PPid", "0")) == os.getpid()
            and b"wandb-core" in command
            and not fields["State"].startswith("Z")
        ):
            found.append(int(status.parent.name))
    return found


def assert_no_wandb_service_left() -> None:
    deadline = time.monotonic() + HANG_GUARD
    while wandb_core_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not wandb_core_children(), "the wandb service outlived the run"


# ---------------------------------------------------------------- the tests
def test_wandb_and_mlflow_hold_what_metrics_jsonl_holds_and_a_resume_continues_their_runs(
    tmp_path, tiny_overrides, monkeypatch
):
    """A run that dies after logging step 2 but before checkpointing it, then --resume: every
    step reaches each tracker once, in the same tracker runs, with metrics.jsonl's values."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: <output_dir>/mlflow.db
    overrides = tiny_overrides + [
        "steps=3",
        "eval.before_training=false",
        "eval.after_training=false",
        "checkpoint.every=1",
        "logging.name=tracked",
        "logging.trackers=[{name: wandb, mode: offline, project: tests}, mlflow]",
        "logging.completions_every=2",
        "logging.completions_samples=2",
    ]
    save = RunDir.save_checkpoint

    def dies_saving_step_2(self, step, *args, **kwargs):
        if step == 2:
            raise RuntimeError("killed while saving step 2")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunDir, "save_checkpoint", dies_saving_step_2)
    with pytest.raises(RuntimeError, match="killed while saving step 2"):
        run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert_no_wandb_service_left()
    run_dir = tmp_path / "runs" / "tracked"
    first_attempt = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in first_attempt] == [1, 2]
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    _, summary = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides), resume=True)
    assert summary["steps_completed"] == 3
    assert_no_wandb_service_left()

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 2 ran again, logged once
    logged = {1: rows[0], 2: first_attempt[1], 3: rows[2]}  # the trackers kept step 2's first figures
    assert {k: v for k, v in logged[2].items() if not k.startswith(TIMING)} == {
        k: v for k, v in rows[1].items() if not k.startswith(TIMING)
    }  # and they match the re-run's
    completions = read_jsonl(run_dir / "completions.jsonl")
    assert [c["step"] for c in completions] == [2, 2]  # the re-run step's rows, once
    for row in completions:
        assert set(row) == COMPLETION_FIELDS
        assert isinstance(row["completion"], str) and row["prompt"] and 0 < row["length"] <= row["length_cap"] == 24
        assert isinstance(row["truncated"], bool) and isinstance(row["reward"], float)
    tables = {2: completions}
    state = json.loads((run_dir / "trackers.json").read_text())
    assert {name: item["last_step"] for name, item in state.items()} == {"wandb": 3, "mlflow": 3}

    # MLflow: one run, resumed, every metric at every step once, the tables, the recipe.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("efficient-rl").experiment_id])
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    for name in rows[0]:
        if name == "step":
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, mlflow_name(name)))
        assert [step for step, _ in history] == [1, 2, 3], name
        assert all(same(value, logged[step][name]) for step, value in history), name
    assert run.data.params["steps"] == "3" and run.data.params["logging.completions_samples"] == "2"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "completions")] == ["completions/step-00000002.json"]
    for step, expected in tables.items():
        saved = json.loads(
            Path(
                client.download_artifacts(
                    run.info.run_id, f"completions/step-{step:08d}.json", str(tmp_path / f"mlflow-{step}")
                )
            ).read_text()
        )
        assert same_rows(saved, expected), (saved, expected)

    # wandb: two offline parts of one run id (steps 1-2, then 3), the same values, the tables.
    ids, history = wandb_history(run_dir)
    assert ids == {state["wandb"]["run_id"]}
    assert [row["_step"] for row in history] == [1, 2, 3]
    assert len({row["_part"] for row in history}) == 2
    for row in history:
        for name, value in logged[row["_step"]].items():
            assert name == "step" or same(row[name], value), name
        if row["_step"] in tables:
            table = row["completions"]
            assert table["_type"] == "table-file" and table["nrows"] == 2
            saved = json.loads((row["_part"] / "files" / table["path"]).read_text())
            assert same_rows(saved, tables[row["_step"]]), (saved, tables[row["_step"]])
        else:
            assert "completions" not in row


class FailingTracker:
    run_id = None

    def log(self, step, metrics, completions):
        raise ValueError("the tracking server answered 500")

    def close(self, failed):
        pass


@TRACKERS.register("test_fails_to_start")
def fails_to_start(context):
    raise ConnectionError("no network")


@TRACKERS.register("test_not_installed")
def not_installed(context):
    import efficient_rl_no_such_tracker_package  # noqa: F401


@TRACKERS.register("test_fails_to_log")
def fails_to_log(context):
    return FailingTracker()


def test_a_failing_tracker_is_reported_once_and_training_finishes(tmp_path, tiny_overrides, capsys):
    overrides = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.name=failing",
        "logging.trackers=[test_fails_to_start, test_not_installed, test_fails_to_log, tensorboard, "
        "{name: wandb, mode: offline, project: 'bad/name'}]",
    ]
    run, summary = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert summary["steps_completed"] == 2
    assert [r["step"] for r in read_jsonl(run.path / "metrics.jsonl")] == [1, 2]
    lines = capsys.readouterr().err.splitlines()
    for name, line in (
        ("test_fails_to_start", "failed to start, training goes on without it: ConnectionError: no network"),
        ("test_not_installed", "failed to start, training goes on without it: ModuleNotFoundError"),
        ("test_fails_to_log", "failed at step 1, training goes on without it: ValueError: the tracking"),
        ("wandb", "failed to start, training goes on without it: UsageError: Invalid project name"),
    ):
        reported = [text for text in lines if text.startswith(f"tracker {name} ")]
        assert len(reported) == 1 and line in reported[0], lines
    assert "pip install 'efficient-rl[trackers]'" in next(t for t in lines if "test_not_installed" in t)
    assert list((run.path / "tensorboard").glob("events.out.tfevents.*"))  # the working tracker went on
    assert_no_wandb_service_left()


def test_an_mlflow_store_that_cannot_be_written_is_one_line_before_the_first_step(tmp_path, tiny_overrides, capsys):
    """/proc takes no new file, even from root: MLflow alone retried such a store for about 100 s,
    a warning at each try, before the first step."""
    overrides = tiny_overrides + [
        "steps=1",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.name=unwritable",
        "logging.trackers=[{name: mlflow, tracking_uri: 'sqlite:////proc/efficient-rl-test.db'}]",
    ]
    run, summary = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert summary["steps_completed"] == 1
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if "mlflow" in text.lower() or "sqlalchemy" in text.lower()]
    assert line == (
        "tracker mlflow failed to start, training goes on without it: OSError: the MLflow store "
        "/proc/efficient-rl-test.db cannot be written (unable to open database file)"
    )


def test_tracker_keys():
    assert load_recipe(RECIPES / "quickstart.yaml").to_dict()["logging"]["trackers"] == ["tensorboard"]
    for override, message in [
        (
            "logging.trackers=[wandbb]",
            "logging.trackers[0]: unknown experiment tracker 'wandbb' (did you mean 'wandb'?)",
        ),
        (
            "logging.trackers=[{name: wandb, mode: live}]",
            "logging.trackers[0].mode: expected one of 'online', 'offline'",
        ),
        ("logging.trackers=[{name: mlflow, uri: x}]", "logging.trackers[0].uri: unknown key"),
        ("logging.trackers=[wandb, wandb]", "logging.trackers[1]: wandb is listed twice"),
        ("logging.completions_every=-1", "logging.completions_every: expected an integer >= 0"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(load_recipe(RECIPES / "quickstart.yaml", [override]))
        assert message in str(err.value)


def test_the_retired_tensorboard_key_is_refused_in_one_line(tmp_path):
    old_recipe = tmp_path / "old.yaml"
    old_recipe.write_text(f"defaults: {RECIPES / 'quickstart.yaml'}\nlogging: {{tensorboard: false}}\n")
    for path, overrides in [
        (RECIPES / "quickstart.yaml", ["logging.tensorboard=false"]),
        (RECIPES / "quickstart.yaml", ["logging.trackers=[]", "logging.tensorboard=true"]),
        (old_recipe, []),
    ]:
        with pytest.raises(ConfigError) as err:
            load_recipe(path, overrides)
        message = str(err.value)
        assert message.startswith(f"{path}: logging.tensorboard: retired key; ") and "logging.trackers" in message
        assert "\n" not in message


def test_mlflow_names():
    assert mlflow_name("eval/pass@1") == "eval/pass_at_1"
    assert mlflow_name("response_length/p90") == "response_length/p90"
    assert mlflow_name("reward/my reward(x)") == "reward/my reward_x_"


def test_the_eval_report_shows_graded_completions_per_run(tmp_path, tiny_model_dir):
    from efficient_rl.eval.tradeoff import REPORT_SAMPLES, EvalSpec, run

    result = run(EvalSpec(models=["lab:tiny"], data="lab:tiny", budgets=[6, 12], samples=2, problems=4), tmp_path)
    report, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "## Graded completions" in report and "<h2>Graded completions</h2>" in page
    for name, graded in result["runs"].items():
        assert (
            len(graded["graded"]) == REPORT_SAMPLES and f"### {name}" in report and f"<summary>{name}</summary>" in page
        )
        cached = read_jsonl(tmp_path / "generations" / f"{name}.jsonl")
        for item, record in zip(graded["graded"], cached):
            assert item["question"] == record["question"] and item["completion"] == record["completions"][0]
            assert item["length"] == record["lengths"][0] and isinstance(item["correct"], bool)
    assert page.count("<tr>") == 3  # the table alone has rows: header + 2 runs
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["runs"]["lab_tiny@6"]["graded"] == result["runs"]["lab_tiny@6"]["graded"]
