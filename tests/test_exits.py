"""No way out hangs or leaves a process behind.

Each test runs a driver (the CLI, or a small program) in a session of its own, waits for it, and
then finds no live process of that session left: no reward worker, no Ray or vLLM process. The
timeouts are hang guards, never duration bounds: a hang fails the test instead of blocking CI.
"""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import RECIPES

HANG_GUARD = 1200  # seconds for a driver to exit (generous: a busy machine is slow)
DRIVER_MARK = "EFFICIENT_RL_TEST_DRIVER"  # an environment variable naming the driver under test
LEFTOVER_GUARD = 120  # seconds for its session to empty once it has (the resource tracker leaves last)

# Rewards that misbehave where a test needs it; written into each test's directory.
REWARDS = '''
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

IN_A_WORKER = multiprocessing.parent_process() is not None


def ok(completion, sample):
    return 1.0


def held(completion, sample):
    """Waits while the file `hold` exists, after saying so in `held` (the driver is mid-step then)."""
    if Path("hold").exists():
        Path("held").touch()
        while Path("hold").exists():
            time.sleep(0.1)
    return 1.0


def held_after_probe(completion, sample):
    """Returns at once for the startup probe (the first call), then behaves as `held`."""
    if not Path("probed").exists():
        Path("probed").touch()
        return 1.0
    return held(completion, sample)


def hang(completion, sample):
    """Hangs waiting for a helper process that hangs too."""
    if completion == "hang":
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        Path(f"busy-{os.getpid()}").touch()
        helper.wait()
    return 1.0
'''
BROKEN_IN_WORKERS = {  # reward file -> what it does at import in a reward worker (the driver imports it fine)
    "raises": "if IN_A_WORKER:\n    raise ImportError('no GPU in this process')\n",
    "exits": "if IN_A_WORKER:\n    os._exit(3)\n",
}


# ---------------------------------------------------------------- harness
def session_members(session: int, mark: bytes) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process in `session`, or carrying `mark` in its
    environment: reward workers lead sessions of their own, and inherit the driver's environment."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]  # the name may hold spaces
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            marked = mark in (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # exited while we looked
        if (int(sid) == session or marked) and state != "Z":
            members[int(stat.parent.name)] = command
    return members


def assert_nothing_left(session: int, mark: bytes) -> None:
    deadline = time.monotonic() + LEFTOVER_GUARD
    while (left := session_members(session, mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"processes left behind: {left}")


class Driver:
    """A program in a session of its own; its output goes to files, so a leftover child holding
    them open cannot make waiting for the program itself hang."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.out, self.err = cwd / f"stdout-{time.monotonic_ns()}", cwd / f"stderr-{time.monotonic_ns()}"
        mark = f"{os.getpid()}-{time.monotonic_ns()}"  # in the environment every process it starts inherits
        self.mark = f"{DRIVER_MARK}={mark}".encode()
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                args,
                cwd=cwd,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
                env={**os.environ, **(env or {}), DRIVER_MARK: mark},
            )

    def finish(self) -> int:
        """Its exit status, after checking that it exited and its session emptied."""
        try:
            self.process.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"hung: no exit within {HANG_GUARD} s; stderr ends {self.stderr[-2000:]}")
        finally:
            assert_nothing_left(self.process.pid, self.mark)  # the session id is the leader's pid
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def python(code: str, cwd: Path) -> Driver:
    return Driver([sys.executable, "-c", textwrap.dedent(code)], cwd)


def train(cwd: Path, overrides: list[str], patch: str = "", env: dict | None = None) -> Driver:
    """`efficient-rl train` on the tiny model, after `patch` (code that plants a fault in the driver)."""
    code = f"import sys\n{textwrap.dedent(patch)}\nfrom efficient_rl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return Driver([sys.executable, "-c", code, "train", str(RECIPES / "quickstart.yaml"), *overrides], cwd, env)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture
def run_dir(tmp_path, tiny_overrides):
    """(working directory with the rewards file, overrides of a short run, its run directory)."""
    (tmp_path / "exit_rewards.py").write_text(REWARDS)
    overrides = tiny_overrides + [
        "steps=1",
        "eval.before_training=false",
        "logging.trackers=[]",
        "logging.name=exits",
        "reward=[{name: exit_rewards.py:ok}]",
    ]
    return tmp_path, overrides, tmp_path / "runs" / "exits"


# ---------------------------------------------------------------- reward workers alone
def test_a_program_that_raises_after_starting_reward_workers_exits(tmp_path):
    """The reproducer: multiprocessing's exit handler SIGTERMs its children and joins them, and
    reward workers ignore SIGTERM; the pool's finalizer must get to them first."""
    driver = python(
        """
        from efficient_rl.config.schema import RewardEntry
        from efficient_rl.scoring.runner import RewardRunner

        runner = RewardRunner([RewardEntry(name="math")], workers=2, timeout=5.0)
        runner.check({"question": "1 + 1 =", "answer": "2"})
        raise RuntimeError("after the rewards started")
        """,
        tmp_path,
    )
    assert driver.finish() == 1
    assert last_line(driver.stderr) == "RuntimeError: after the rewards started"


def test_killed_driver_takes_its_reward_workers_along_quietly(tmp_path):
    """kill -9 of the driver while one worker is stuck in a reward and one waits: both leave at
    once, with the stuck reward's helper process, without the EOFError tracebacks that would read as
    the cause."""
    (tmp_path / "exit_rewards.py").write_text(REWARDS)
    driver = python(
        """
        import os, signal, threading, time
        from pathlib import Path
        from efficient_rl.config.schema import RewardEntry
        from efficient_rl.scoring.runner import RewardRunner

        runner = RewardRunner([RewardEntry(name="exit_rewards.py:hang")], workers=2, timeout=3600.0)
        runner.check({"question": "1 + 1 =", "answer": "2"})
        threading.Thread(target=runner.score, args=(["hang"], [{}]), daemon=True).start()
        while not list(Path().glob("busy-*")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    assert driver.finish() == -signal.SIGKILL
    assert "Traceback" not in driver.stderr and "EOFError" not in driver.stderr, driver.stderr


# ---------------------------------------------------------------- training runs
@pytest.mark.parametrize("broken", sorted(BROKEN_IN_WORKERS))
def test_a_reward_that_fails_at_import_in_its_worker_is_one_line(run_dir, broken):
    cwd, overrides, run = run_dir
    (cwd / "broken_reward.py").write_text(REWARDS + BROKEN_IN_WORKERS[broken])
    driver = train(cwd, overrides + ["reward=[{name: broken_reward.py:ok}]"])
    assert driver.finish() == 2, driver.stderr[-3000:]
    line = last_line(driver.stderr)
    assert line.startswith("efficient-rl: error: reward: a reward worker ")
    assert {"raises": "ImportError: no GPU in this process", "exits": "exit code 3"}[broken] in line
    assert not run.exists()


# Faults planted in the driver, each where a real one strikes: the run directory taken by a
# second `train` of the same run between the check and its creation (the reported race), the
# rollout engine failing to start, the learner failing mid-step, the final evaluation failing.
FAULTS = {
    "run directory": (
        """
        from efficient_rl.run.checkpoint import RunDir
        def create(self):
            raise FileExistsError(17, "File exists", str(self.path))
        RunDir.create = create
        """,
        "FileExistsError",
    ),
    "engine start": (
        """
        from efficient_rl.rollout.hf import TransformersEngine
        def start(self, *args, **kwargs):
            raise RuntimeError("the engine did not start")
        TransformersEngine.__init__ = start
        """,
        "RuntimeError: the engine did not start",
    ),
    "learner step": (
        """
        from efficient_rl.learner.torch_learner import TorchLearner
        def update(self, batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        TorchLearner.update = update
        """,
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    ),
    "final evaluation": (
        """
        import efficient_rl.driver.loop
        def evaluate(*args, **kwargs):
            raise RuntimeError("the evaluation failed")
        efficient_rl.driver.loop.evaluate = evaluate
        """,
        "RuntimeError: the evaluation failed",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_an_error_anywhere_in_a_run_exits_non_zero_and_leaves_nothing(run_dir, fault):
    cwd, overrides, _ = run_dir
    patch, message = FAULTS[fault]
    driver = train(cwd, overrides, patch)
    assert driver.finish() == 1, driver.stderr[-3000:]
    assert message in last_line(driver.stderr)


def test_ctrl_c_twice_stops_at_once_in_one_line(run_dir):
    """Ctrl-C reaches the terminal's whole process group: the workers outlive it, the driver
    stops mid-step on the second one, and says so in a line, not a traceback."""
    cwd, overrides, run = run_dir
    driver = train(cwd, overrides + ["steps=50", "checkpoint.every=1", "reward=[{name: exit_rewards.py:held}]"])
    metrics = run / "metrics.jsonl"
    while driver.process.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    (cwd / "hold").touch()  # the next step's reward calls wait: the driver is mid-step
    while driver.process.poll() is None and not (cwd / "held").exists():
        time.sleep(0.1)
    os.killpg(driver.process.pid, signal.SIGINT)
    while driver.process.poll() is None and "SIGINT: stopping after this step" not in driver.stderr:
        time.sleep(0.1)
    os.killpg(driver.process.pid, signal.SIGINT)
    assert driver.finish() == 130, driver.stderr[-3000:]
    assert "Traceback" not in driver.stderr
    first, second = driver.stderr.strip().splitlines()[-2:]
    assert first == "SIGINT: stopping after this step and writing a checkpoint (Ctrl-C again: stop now)"
    assert second.startswith(
        "efficient-rl: interrupted; stopped at once, mid-step; continue with --resume "
        f"(checkpoint in {run / 'checkpoints' / 'step-'}"
    )


def test_ctrl_c_in_the_final_evaluation_cuts_it_short_and_resume_runs_it(run_dir):
    """The last step's checkpoint is written before the final evaluation: a stop then promises
    no checkpoint, exits 75 (stopped), and --resume only evaluates."""
    cwd, overrides, run = run_dir
    interrupt_the_evaluation = """
        import os, signal
        import efficient_rl.driver.loop
        evaluate = efficient_rl.driver.loop.evaluate
        def interrupted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
            return evaluate(*args, **kwargs)
        efficient_rl.driver.loop.evaluate = interrupted
        """
    driver = train(cwd, overrides, interrupt_the_evaluation)
    assert driver.finish() == 75, driver.stderr[-3000:]
    assert driver.stderr.strip().splitlines()[-2:] == [
        "SIGINT: every step is done and checkpointed; stopping the final evaluation (--resume runs it)",
        f"stopped after the last step (1) without the final evaluation; --resume runs it "
        f"(checkpoint in {run / 'checkpoints' / 'step-00000001'})",
    ]
    assert "final" not in json.loads((run / "summary.json").read_text())

    resumed = train(cwd, overrides + ["--resume"])
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_completed"] == 1 and 0.0 <= summary["final"]["accuracy"] <= 1.0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


# ---------------------------------------------------------------- stops before the first step
NO_CHECKPOINT_YET = "stopped before training; the run has no checkpoint yet (start it again with --overwrite)"


def wait_for(driver: Driver, started) -> None:
    """Until `started()` says the phase has begun (or the driver has exited, which the test then reports)."""
    while driver.process.poll() is None and not started():
        time.sleep(0.05)


def stop_once(driver: Driver) -> int:
    """One SIGTERM to the driver's whole session, as Slurm sends it; its exit status once it is gone."""
    os.killpg(driver.process.pid, signal.SIGTERM)
    return driver.finish()


def test_a_stop_during_the_evaluation_before_training_ends_it_and_a_restart_runs(run_dir):
    """The reported case: the warm-start evaluation ran on for minutes after SIGTERM. It now ends
    at once, records nothing, and the restart --resume-if-checkpoint does (Slurm's) starts over."""
    cwd, overrides, run = run_dir
    overrides = overrides + ["eval.before_training=true", "reward=[{name: exit_rewards.py:held_after_probe}]"]
    (cwd / "hold").touch()  # the evaluation's reward calls wait: the run is in the warm-start evaluation
    driver = train(cwd, overrides)
    wait_for(driver, (cwd / "held").exists)
    assert stop_once(driver) == 75, driver.stderr[-3000:]
    assert driver.stderr.strip().splitlines()[-2:] == [
        "SIGTERM: stopping the evaluation before training; nothing of it is recorded",
        NO_CHECKPOINT_YET,
    ]
    assert not (run / "checkpoints").exists() and not (run / "summary.json").exists()

    (cwd / "hold").unlink()
    restarted = train(cwd, overrides + ["--resume-if-checkpoint"])
    assert restarted.finish() == 0, restarted.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_completed"] == 1 and "warm_start" in summary


def test_the_clusters_loss_during_the_evaluation_before_training_is_a_stop(run_dir):
    """A signal to every process of a Ray run while it evaluates before training: the keeper's
    report (stopping.cut_now, here called as the watcher thread calls it) interrupts the main
    thread's wait. Before, that KeyboardInterrupt read as a second Ctrl-C: "interrupted", exit 130."""
    cwd, overrides, run = run_dir
    cluster_lost_mid_evaluation = """
        import threading, time
        import efficient_rl.driver.loop
        from efficient_rl.driver import stopping
        def evaluate(*args, **kwargs):
            threading.Thread(target=stopping.cut_now).start()
            time.sleep(600)  # a wait on actors that are gone
        efficient_rl.driver.loop.evaluate = evaluate
        """
    driver = train(cwd, overrides + ["eval.before_training=true"], cluster_lost_mid_evaluation)
    assert driver.finish() == 75, driver.stderr[-3000:]
    assert "Traceback" not in driver.stderr, driver.stderr[-3000:]
    assert last_line(driver.stderr) == (
        "stopped: the stop signal reached the run's Ray cluster too; the run has no checkpoint yet "
        "(start it again with --overwrite)"
    )
    assert not (run / "checkpoints").exists() and not (run / "summary.json").exists()


def test_a_time_limit_warning_during_the_evaluation_before_training_waits_for_the_first_step(run_dir):
    """SIGUSR1 asks for a checkpoint before the limit: the evaluation goes on, step 1 is checkpointed."""
    cwd, overrides, run = run_dir
    overrides = overrides + [
        "steps=50",
        "eval.before_training=true",
        "reward=[{name: exit_rewards.py:held_after_probe}]",
    ]
    (cwd / "hold").touch()
    driver = train(cwd, overrides)
    wait_for(driver, (cwd / "held").exists)
    os.kill(driver.process.pid, signal.SIGUSR1)  # the job's shell passes it on to the driver alone
    wait_for(driver, lambda: "SIGUSR1: stopping after this step" in driver.stderr)
    (cwd / "hold").unlink()
    assert driver.finish() == 75, driver.stderr[-3000:]
    assert last_line(driver.stderr).startswith("stopped after step 1 of 50; continue with --resume")
    assert "warm_start" in json.loads((run / "summary.json").read_text())


def stop_in_a_build(driver: Driver, started, whose: str) -> None:
    """SIGTERM once `started()`: the run says it ended `whose` build, and that it has no checkpoint yet."""
    wait_for(driver, started)
    assert stop_once(driver) == 75, driver.stderr[-3000:]
    assert driver.stderr.strip().splitlines()[-2:] == [
        f"SIGTERM: stopping {whose} build before training; nothing half-made is cached",
        NO_CHECKPOINT_YET,
    ]


def building_lab_model(driver: Driver) -> bool:
    return driver.out.exists() and "building lab model tiny-" in driver.out.read_text()


def lab_entries(cache: Path) -> list[str]:
    """The lab models in `cache`, built or half-built (the build locks beside them aside)."""
    return [entry.name for entry in (cache / "lab").iterdir() if not entry.name.endswith(".lock")]


def test_a_stop_during_the_lab_build_caches_nothing(run_dir):
    """A fresh cache: the tiny preset builds first (tokenizer, then SFT); a stop ends the build."""
    cwd, overrides, run = run_dir
    cache = cwd / "cache"
    driver = train(cwd, overrides, env={"EFFICIENT_RL_CACHE": str(cache), "PYTHONUNBUFFERED": "1"})
    stop_in_a_build(driver, lambda: building_lab_model(driver), "the model's")
    assert lab_entries(cache) == []
    assert not run.exists()  # the run directory is made once the model is there


def test_a_stop_during_a_gguf_conversion_caches_nothing(run_dir):
    """The builtin SmolLM2's GGUF (the tests' cache holds it) converted into a fresh cache."""
    from efficient_rl.models.sources import builtin_gguf

    cwd, overrides, run = run_dir
    cache = cwd / "cache"
    gguf = builtin_gguf("smollm2")
    driver = train(cwd, overrides + ["model.lab=null", f"model.path={gguf}"], env={"EFFICIENT_RL_CACHE": str(cache)})
    stop_in_a_build(driver, lambda: f"converting {gguf}" in driver.stderr, "the model's")
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []
    assert not run.exists()


def test_a_stop_during_the_teachers_build_caches_nothing_and_a_restart_runs(run_dir, tiny_model_dir):
    """On-policy distillation from lab:tiny, built into a fresh cache (the student is the tests'
    tiny model, already built): a stop ends the teacher's build as it ends the model's."""
    cwd, overrides, run = run_dir
    cache = cwd / "cache"
    overrides = overrides + [
        "model.lab=null",
        f"model.path={tiny_model_dir}",
        "algorithm.objective={name: distillation}",
        "distill.teacher=lab:tiny",
    ]
    env = {"EFFICIENT_RL_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    driver = train(cwd, overrides, env=env)
    stop_in_a_build(driver, lambda: building_lab_model(driver), "the teacher's")
    assert lab_entries(cache) == []
    assert not run.exists()

    restarted = train(cwd, overrides, env=env)
    assert restarted.finish() == 0, restarted.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps_completed"] == 1
    assert [entry.parent.name.split("-")[0] for entry in (cache / "lab").glob("*/lab.json")] == ["tiny"]


def fail(*args, **kwargs):
    raise RuntimeError("planted fault")


@pytest.mark.parametrize(
    "where", ["efficient_rl.run.checkpoint.RunDir.create", "efficient_rl.learner.torch_learner.TorchLearner.update"]
)
def test_run_recipe_closes_what_it_started_before_the_exception_leaves_it(run_dir, monkeypatch, where):
    """In the same process, with no exit handler to help: the cleanup scope of run_recipe itself."""
    import multiprocessing

    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import run_recipe

    cwd, overrides, _ = run_dir
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(where, fail)
    before = set(multiprocessing.active_children())  # another test's, should one have any
    with pytest.raises(RuntimeError, match="planted fault"):
        run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert set(multiprocessing.active_children()) <= before  # the reward workers are closed (and joined)


# ---------------------------------------------------------------- the same report's smaller item
def test_reward_check_averages_a_metric_over_the_rows_that_reported_it():
    """Failed rows have no metric: counting them as 0 would halve a mean when half the calls fail."""
    import torch

    from efficient_rl.scoring.check import format_report
    from efficient_rl.scoring.runner import RewardResult

    result = RewardResult(
        scores=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        accuracy=None,
        extras={"words/count": [10.0, 0.0, 20.0, 0.0], "words/all": [1.0] * 4},
        reported={"words/count": [0, 2], "words/all": [0, 1, 2, 3]},
        errors=2,
        call_seconds=[0.01] * 4,
    )
    report = format_report("words", [{}] * 4, result, seconds=1.0).splitlines()
    assert "metric  words/count: mean 15.0000 over 2 of 4 samples (2 failed)" in report
    assert "metric  words/all: mean 1.0000" in report


def test_a_listing_piped_into_head_ends_quietly():
    # `efficient-rl methods | head -1`: the reader closes the pipe early; no traceback, exit 0.
    listing = subprocess.Popen(
        [sys.executable, "-m", "efficient_rl.cli", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = listing.stdout.readline()
    listing.stdout.close()
    stderr = listing.stderr.read()
    assert listing.wait(timeout=HANG_GUARD) == 0 and first.startswith("algorithm."), stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# ---------------------------------------------------------------- a Ray run
def sessions_of_children(parent: int) -> set[int]:
    """The session ids of `parent`'s live children: a child that started a session of its own shows here."""
    sessions = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            _, ppid, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]  # state, parent, group, session
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(ppid) == parent:
            sessions.add(int(sid))
    return sessions


def temp_dirs_named_in(session: int, mark: bytes) -> set[str]:
    """The run's Ray temp dirs (erl-ray-*) named on the command lines of `session`'s processes."""
    commands = session_members(session, mark).values()
    return {word for command in commands for word in command.split() if "erl-ray-" in word}


def test_a_signal_to_the_whole_process_group_stops_a_ray_run_after_its_step(run_dir):
    """`timeout`, a terminal or a launcher signals the driver's whole process group: the run's own
    Ray cluster is not in it, so the driver finishes its step on it, checkpoints, exits 75 (stopped),
    and the cluster goes with its temp dir. (Before, the signal killed the Ray head too: 'Failed to
    connect to GCS', exit 1, the temp dir left.)"""
    cwd, overrides, run = run_dir
    ray_run = ["cluster.backend=ray", "rollout.engine=vllm", "learner.backend=deepspeed", "cluster.learner.workers=1"]
    driver = train(cwd, overrides + ray_run + ["steps=50", "checkpoint.every=1"])
    metrics = run / "metrics.jsonl"
    while driver.process.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)  # step 1 is done: the cluster is up and the actors work
    clusters = sessions_of_children(driver.process.pid) - {driver.process.pid}
    temp_dirs = {word for session in clusters for word in temp_dirs_named_in(session, driver.mark)}
    os.killpg(driver.process.pid, signal.SIGTERM)
    assert driver.finish() == 75, driver.stderr[-3000:]
    assert clusters and temp_dirs  # the cluster ran in a session of its own, and its temp dir was named
    for session in clusters:
        assert_nothing_left(session, driver.mark)
    assert not [path for path in temp_dirs if Path(path).exists()]
    assert "Traceback" not in driver.stderr
    assert last_line(driver.stderr).startswith("stopped after step ")
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*/checkpoint_manifest.json"))


PIPELINES = {  # cluster.pipeline: the driver waits on the actors itself, or on its producer thread that does
    "sync": [],
    "overlapped": ["cluster.pipeline.name=overlapped", "cluster.pipeline.max_staleness=0"],
}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_signal_to_every_process_of_a_ray_run_stops_it_resumably(run_dir, pipeline):
    """systemd's KillMode=control-group, a Slurm step signal, `kill -TERM` of every process: the
    run's Ray processes get the SIGTERM too, whatever their session (the actors end, the GCS and
    raylet stop serving), so the step in progress is lost with them. The keeper tells the driver,
    which takes that as the stop: exit 75 and one line naming the last checkpoint, which resumes;
    the keeper removes the cluster's temp dir. (Before: nothing told the driver, which waited on its
    actors until its Ray client gave up on the GCS, "Failed to connect to GCS", exit 1.)"""
    cwd, overrides, run = run_dir
    ray_run = ["cluster.backend=ray", "rollout.engine=vllm", "learner.backend=deepspeed", "cluster.learner.workers=1"]
    overrides = overrides + ray_run + PIPELINES[pipeline] + ["steps=3", "checkpoint.every=1"]
    driver = train(cwd, overrides)
    first = run / "checkpoints" / "step-00000001" / "checkpoint_manifest.json"
    wait_for(driver, first.exists)  # the last file of step 1's checkpoint: step 2 is under way
    members = session_members(driver.process.pid, driver.mark)  # the keeper's session's carry the mark too
    temp_dirs = {word for command in members.values() for word in command.split() if "erl-ray-" in word}
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert driver.finish() == 75, driver.stderr[-3000:]
    assert temp_dirs and not [path for path in temp_dirs if Path(path).exists()]
    assert "Traceback" not in driver.stderr, driver.stderr[-3000:]
    assert last_line(driver.stderr).startswith("stopped "), driver.stderr[-3000:]
    assert f"continue with --resume (checkpoint in {run / 'checkpoints' / 'step-0000000'}" in last_line(driver.stderr)

    resumed = train(cwd, overrides + ["--resume"])
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def processes_naming(text: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line holds `text`."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        if text in command:
            found[int(cmdline.parent.name)] = command
    return found


def test_a_killed_driver_takes_its_own_ray_cluster_and_temp_dir_along(tmp_path):
    """kill -9 of the driver runs none of its cleanup: the cluster's keeper, in a session of its
    own, sees the driver's pipe end, shuts Ray down and removes the temp dir. (Before, Ray's
    processes died with the driver but left the temp dir.)"""
    driver = python(
        """
        import os, signal
        from efficient_rl.cluster.runtime import start_ray
        session = start_ray(None, cpus=1, gpus=0)
        print(session.temp_dir, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    assert driver.finish() == -signal.SIGKILL, driver.stderr[-3000:]
    temp_dir = driver.out.read_text().strip()
    assert "erl-ray-" in temp_dir
    deadline = time.monotonic() + LEFTOVER_GUARD
    while (left := processes_naming(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    assert not Path(temp_dir).exists()


def line_within(stream, guard: float) -> str:
    """The next line of a pipe nothing else has read ahead of; a hang guard, not a duration bound."""
    ready, _, _ = select.select([stream], [], [], guard)
    if not ready:
        pytest.fail(f"no line within {guard} s: a hang")
    return stream.readline().strip()


def test_a_signalled_keeper_says_so_and_ends_its_cluster_after_its_grace():
    """A SIGTERM to the keeper: it tells the driver (the line the driver's watcher reads), and with
    the driver's pipe still open it shuts its cluster down and removes the temp dir once its grace
    (1 s here) is over: a driver that never closes cannot keep the cluster up."""
    import shutil
    import tempfile

    from efficient_rl.cluster.runtime import SIGNALLED

    temp_dir = Path(tempfile.mkdtemp(prefix="erl-ray-"))  # short, as start_ray's (socket path limit)
    code = f"import efficient_rl.cluster.head as head; head.STOP_GRACE = 1; head.keep({str(temp_dir)!r}, 1, 0)"
    keeper = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert line_within(keeper.stdout, HANG_GUARD)  # the cluster's address: it is up
        os.kill(keeper.pid, signal.SIGTERM)  # any of its threads may take it (Ray's block none)
        assert line_within(keeper.stdout, HANG_GUARD) == SIGNALLED
        assert keeper.wait(timeout=HANG_GUARD) == 0  # stdin still open: the grace ended it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(keeper.pid, signal.SIGKILL)
        keeper.wait()
        keeper.stdin.close()
        keeper.stdout.close()
    left = temp_dir.exists()
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left
    assert_nothing_left(keeper.pid, b"no mark")
