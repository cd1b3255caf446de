"""No way out hangs or leaves a process behind.

Each test runs a driver (the CLI, or a small program) in a session of its own, waits for it, and
then finds no live process of that session left: no reward worker, no Ray or vLLM process. The
timeouts are hang guards, never duration bounds: a hang fails the test instead of blocking CI.
"""

import contextlib
import json
import os
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
