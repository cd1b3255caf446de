"""Run directories are never lost or corrupted: run names, the run lock, damaged checkpoints,
torn metrics lines, checkpoint file modes. Real runs of the tiny lab model."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import RECIPES, TINY_OVERRIDES, wait_for
from efficient_rl.cli import main
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.loop import run_recipe
from efficient_rl.run.checkpoint import checkpoint_problem, file_modes, latest_checkpoint, lock_path, restart_mode

QUIET = ["eval.before_training=false", "eval.after_training=false", "logging.trackers=[]"]
HANG_GUARD = 1200  # seconds; only so that a broken run fails instead of hanging the suite


def overrides(output_dir, *extra):
    return [*TINY_OVERRIDES, *QUIET, f"logging.output_dir={output_dir}", *extra]


def read_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(root):
    """Every path under root, each file's size and modification time: what "untouched" means here
    (a directory's own mtime is left out: taking and releasing the run lock beside it changes it)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
        for p in root.rglob("*")
    }


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("efficient-rl: error:")]


def cli_command(output_dir, *args):
    return [
        sys.executable,
        "-m",
        "efficient_rl.cli",
        "train",
        str(RECIPES / "quickstart.yaml"),
        *overrides(output_dir),
        *args,
    ]


@contextlib.contextmanager
def process_groups(cwd):
    """start(command) -> Popen in a session of its own; on the way out every group is killed, so a
    failing test leaves no run (nor its reward workers) behind."""
    started = []

    def start(command):
        started.append(
            subprocess.Popen(
                command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
        )
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


# A run of four steps stopped after three, a checkpoint every step: step-2 and step-3 are kept.
BASE = ["steps=4", "checkpoint.every=1", "checkpoint.keep=2", "logging.name=base"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """(output directory, a pristine copy of the base run); each test puts the copy back in place."""
    root = tmp_path_factory.mktemp("base")
    run, summary = run_recipe(
        load_recipe(RECIPES / "quickstart.yaml", overrides(root / "runs", *BASE)), stop_after_step=3
    )
    run.close()
    assert summary["steps_completed"] == 3
    shutil.copytree(run.path, root / "pristine", symlinks=True)
    return root / "runs", root / "pristine"


def fresh_base(base):
    """The base run as it was trained, at the path its config.yaml names (resume checks it)."""
    output_dir, pristine = base
    shutil.rmtree(output_dir / "base", ignore_errors=True)
    shutil.copytree(pristine, output_dir / "base", symlinks=True)
    return output_dir / "base"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resume_base(output_dir):
    run, summary = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides(output_dir, *BASE)), resume=True)
    run.close()
    return summary


# ---------------------------------------------------------------- run names


@pytest.mark.parametrize("mode", ["--overwrite", "--resume-if-checkpoint"])
def test_a_run_name_must_be_one_directory_name(tmp_path, base, capsys, mode):
    output_dir = tmp_path / "runs"
    shutil.copytree(base[1], output_dir / "sibling", symlinks=True)
    before = snapshot(tmp_path)
    for name in ["", ".", "..", "../runs", "a/b", str(output_dir / "sibling"), ".hidden"]:
        code = main(
            ["train", str(RECIPES / "quickstart.yaml"), *overrides(output_dir, "steps=1"), f"logging.name={name}", mode]
        )
        stderr = capsys.readouterr().err
        assert code == 2, (name, stderr[-2000:])
        assert error_lines(stderr) == stderr.strip().splitlines(), stderr  # one line, no traceback
        assert "logging.name" in stderr and repr(name) in stderr, stderr
        assert snapshot(tmp_path) == before, name  # nothing written, nothing deleted


def test_overwrite_replaces_only_a_run_directory(tmp_path, base, capsys):
    output_dir = tmp_path / "runs"
    shutil.copytree(base[1], output_dir / "sibling", symlinks=True)
    (output_dir / "link").symlink_to(output_dir / "sibling")
    (output_dir / "notes").mkdir()
    (output_dir / "notes" / "todo.txt").write_text("mine")
    (output_dir / "file").write_text("mine")
    before = snapshot(tmp_path)
    for name, why in [("link", "symbolic link"), ("notes", "not a run directory"), ("file", "not a directory")]:
        code = main(
            [
                "train",
                str(RECIPES / "quickstart.yaml"),
                *overrides(output_dir, "steps=1"),
                f"logging.name={name}",
                "--overwrite",
            ]
        )
        stderr = capsys.readouterr().err
        assert code == 2 and why in stderr and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
        assert snapshot(tmp_path) == before, name


def train_in(output_dir, name, *mode):
    return main(
        ["train", str(RECIPES / "quickstart.yaml"), *overrides(output_dir, "steps=1"), f"logging.name={name}", *mode]
    )


def test_a_run_inside_another_run_is_refused_at_start(tmp_path, base, capsys):
    """A run whose output_dir lies inside a run directory (directly or through a link) would be
    deleted by that run's --overwrite: refused in one line, nothing written."""
    runs = tmp_path / "runs"
    shutil.copytree(base[1], runs / "outer", symlinks=True)
    (tmp_path / "link").symlink_to(runs / "outer" / "checkpoints")
    before = snapshot(tmp_path)
    for output_dir in (runs / "outer", tmp_path / "link" / "deeper"):
        assert train_in(output_dir, "inner") == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"efficient-rl: error: logging.output_dir: {output_dir} lies inside the run directory "
            f"{(runs / 'outer').resolve()}, whose --overwrite would delete this run; put the run elsewhere"
        )
        assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_tree_that_holds_another_run_or_a_live_lock(tmp_path, base, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(base[1], runs / "outer", symlinks=True)
    shutil.copytree(base[1], runs / "outer" / "tensorboard" / "nested", symlinks=True)  # as an older layout left it
    before = snapshot(tmp_path)
    assert train_in(runs, "outer", "--overwrite") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"efficient-rl: error: {runs / 'outer'}: holds another run ({runs / 'outer' / 'tensorboard' / 'nested'}); "
        "--overwrite would delete it with this one: move it out first"
    ]
    assert snapshot(tmp_path) == before
    # A run lock held now inside the tree (a run started there through a link) refuses too; the
    # same file once nobody holds it (its run was killed) refuses nothing.
    shutil.rmtree(runs / "outer" / "tensorboard" / "nested")
    lock = runs / "outer" / "tensorboard" / ".inner.lock"
    lock.write_text("{}")
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train_in(runs, "outer", "--overwrite") == 2
        assert f"holds another run ({lock})" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert train_in(runs, "outer", "--overwrite") == 0
    assert read_steps(runs / "outer") == [1] and not lock.exists()


# ---------------------------------------------------------------- the run lock


def test_two_identical_starts_one_trains_the_other_refuses(tmp_path, tiny_model_dir):
    command = cli_command(tmp_path / "runs", "steps=3", "logging.name=twin")
    with process_groups(tmp_path) as start:
        both = [start(command), start(command)]
        results = [(p.returncode, err) for p in both for _, err in [p.communicate(timeout=HANG_GUARD)]]
    assert sorted(code for code, _ in results) == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    # Refused under the lock, or (if the winner had already finished) because the run exists.
    assert len(error_lines(refused)) == 1 and "Traceback" not in refused, refused[-2000:]
    assert "in use by pid" in refused or "run directory exists" in refused, refused
    assert read_steps(tmp_path / "runs" / "twin") == [1, 2, 3]
    assert json.loads((tmp_path / "runs" / "twin" / "summary.json").read_text())["steps_completed"] == 3
    assert not lock_path(tmp_path / "runs" / "twin").exists()


def test_a_second_start_of_a_running_run_refuses_and_touches_nothing(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "runs" / "busy"
    with process_groups(tmp_path) as start:
        first = start(cli_command(tmp_path / "runs", "steps=100000", "logging.name=busy"))
        metrics = run_dir / "metrics.jsonl"
        wait_for(
            lambda: metrics.exists() and metrics.read_text().strip(),
            first,
            lambda: first.communicate()[1][-2000:],
            guard=HANG_GUARD,
        )  # it ended: its stderr says why
        assert json.loads(lock_path(run_dir).read_text())["pid"] == first.pid
        config = (run_dir / "config.yaml").stat()
        seconds = [
            start(cli_command(tmp_path / "runs", "steps=100000", "logging.name=busy", *mode))
            for mode in ([], ["--overwrite"], ["--resume"], ["--resume-if-checkpoint"])
        ]
        for second in seconds:
            _, stderr = second.communicate(timeout=HANG_GUARD)
            assert second.returncode == 2, stderr[-2000:]
            assert len(error_lines(stderr)) == 1 and "Traceback" not in stderr, stderr
            assert f"error: {run_dir}: in use by pid {first.pid} on {socket.gethostname()} (started " in stderr
            assert stderr.strip().endswith("; wait for it or stop it"), stderr
        assert first.poll() is None  # the refusals were tested against a running first run
        after = (run_dir / "config.yaml").stat()
        assert (after.st_ino, after.st_mtime_ns) == (config.st_ino, config.st_mtime_ns)
        first.send_signal(signal.SIGTERM)  # finish the step, checkpoint, exit 75
        _, stderr = first.communicate(timeout=HANG_GUARD)
    assert first.returncode == 75, stderr[-2000:]
    done = json.loads((run_dir / "summary.json").read_text())["steps_completed"]
    assert read_steps(run_dir) == list(range(1, done + 1))  # each step logged once, in order
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{done:08d}"]
    assert checkpoint_problem(run_dir / "checkpoints" / f"step-{done:08d}") is None
    assert not lock_path(run_dir).exists()


def test_a_lock_left_by_a_killed_run_blocks_nothing(tmp_path, tiny_model_dir):
    lock = lock_path(tmp_path / "runs" / "orphan")
    lock.parent.mkdir()
    # A process that took the lock and was killed with it held, as a SIGKILL or OOM kill leaves it.
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, signal, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                'os.write(fd, b\'{"pid": %d, "host": "gone", "started": "then"}\' % os.getpid())\n'
                "os.kill(os.getpid(), signal.SIGKILL)\n"
            ),
            str(lock),
        ],
        timeout=HANG_GUARD,
    )
    assert holder.returncode == -signal.SIGKILL and lock.exists()
    run, summary = run_recipe(
        load_recipe(RECIPES / "quickstart.yaml", overrides(tmp_path / "runs", "steps=1", "logging.name=orphan"))
    )
    assert summary["steps_completed"] == 1
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # the new run holds it now
    run.close()
    run.close()  # idempotent
    assert not lock.exists()


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors", "optimizer.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(base, capsys, damaged):
    run_dir = fresh_base(base)
    truncate(run_dir / "checkpoints" / "step-00000003" / damaged)
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-00000002"
    assert restart_mode(load_recipe(RECIPES / "quickstart.yaml", overrides(base[0], *BASE))) == (True, False)
    capsys.readouterr()
    summary = resume_base(base[0])
    notices = [line for line in capsys.readouterr().err.splitlines() if "step-00000003" in line]
    assert len(notices) == 1 and f"step-00000003/{damaged}: " in notices[0], notices
    assert "resuming from the earlier step-00000002" in notices[0]
    assert summary["steps_completed"] == 4
    assert read_steps(run_dir) == [1, 2, 3, 4]  # step 3 runs again and is logged once
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000003", "step-00000004"]
    assert all(checkpoint_problem(p) is None for p in checkpoints)


def test_no_usable_checkpoint_stops_with_the_files_named(base, capsys):
    run_dir = fresh_base(base)
    truncate(run_dir / "checkpoints" / "step-00000003" / "optimizer.pt")
    truncate(run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
    before = snapshot(run_dir)
    for mode in ["--resume", "--resume-if-checkpoint"]:  # a requeued job must not overwrite it either
        code = main(["train", str(RECIPES / "quickstart.yaml"), *overrides(base[0], *BASE), mode])
        stderr = capsys.readouterr().err
        assert code == 2, stderr[-2000:]
        assert error_lines(stderr) == stderr.strip().splitlines() and len(error_lines(stderr)) == 1, stderr
        assert "step-00000003/optimizer.pt: " in stderr and "step-00000002/model.safetensors: " in stderr
        assert snapshot(run_dir) == before
    assert latest_checkpoint(run_dir) is None


# ---------------------------------------------------------------- the saved recipe


def test_a_saved_recipe_with_a_retired_key_is_refused_in_one_line(base, capsys):
    run_dir = fresh_base(base)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["logging"]["tensorboard"] = False  # a run saved before logging.trackers
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    before = snapshot(run_dir)
    for mode in ["--resume", "--resume-if-checkpoint"]:
        code = main(["train", str(RECIPES / "quickstart.yaml"), *overrides(base[0], *BASE), mode])
        stderr = capsys.readouterr().err
        assert code == 2, stderr[-2000:]
        assert error_lines(stderr) == stderr.strip().splitlines() and len(error_lines(stderr)) == 1, stderr
        assert f"{run_dir / 'config.yaml'}: logging.tensorboard: retired key; " in stderr, stderr
        assert "logging.trackers" in stderr.split("retired key; ")[1], stderr
        assert snapshot(run_dir) == before


# ---------------------------------------------------------------- metrics.jsonl


def test_a_torn_last_metrics_line_is_dropped_on_resume(base, capsys):
    run_dir = fresh_base(base)
    with (run_dir / "metrics.jsonl").open("a") as out:
        out.write('{"step": 4, "reward/mean": 0.')  # killed mid-write
    capsys.readouterr()
    assert resume_base(base[0])["steps_completed"] == 4
    notices = [line for line in capsys.readouterr().err.splitlines() if "metrics.jsonl" in line]
    assert len(notices) == 1 and "dropped its last line" in notices[0], notices
    assert read_steps(run_dir) == [1, 2, 3, 4]


def test_a_torn_middle_metrics_line_is_dropped_with_a_notice(tmp_path, capsys):
    from efficient_rl.driver.metrics import read_lines

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n{"step": 2, "x": \xe2\x82\n{"step": 3}\n[3]\n')
    assert read_lines(metrics) == ['{"step": 1}', '{"step": 3}']
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 2 and "line 2" in notices[0] and "its last line" in notices[1], notices


# ---------------------------------------------------------------- file modes


def test_every_checkpoint_file_has_one_mode(base):
    file_mode, dir_mode = file_modes()
    for checkpoint in sorted((base[1] / "checkpoints").iterdir()):
        paths = [checkpoint, *checkpoint.rglob("*")]
        modes = {p.relative_to(base[1]): p.stat().st_mode & 0o777 for p in paths}
        assert {
            path: mode for path, mode in modes.items() if mode != (dir_mode if (base[1] / path).is_dir() else file_mode)
        } == {}
        assert (checkpoint / "model.safetensors").stat().st_mode & 0o777 == file_mode
