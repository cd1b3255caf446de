"""Every process a reward starts ends with its call, its worker's timeout or crash, or the pool's close,
and each one that had to be killed is counted (issue 33). Processes are counted from /proc, by parent
and session, before and after."""

import os
import time
from pathlib import Path

import pytest

from efficient_rl.config.schema import RewardEntry
from efficient_rl.scoring.runner import RewardRunner

SAMPLE = {"question": "1 + 1 =", "answer": "2"}
MARK = "EFFICIENT_RL_TEST_REWARDS"  # an environment variable marking the processes a test starts
HANG_GUARD = 60.0  # seconds for a killed process to be gone (generous: the kill is SIGKILL)

# Rewards that start processes and leave them; each writes the pids it started as files `pid-<pid>`.
REWARDS = '''
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def started(pid):
    Path(f"pid-{pid}").touch()


def forks(completion, sample):
    """Forks as many children as the completion says, each sleeping forever, and returns."""
    for _ in range(int(completion)):
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        started(pid)
    return 1.0


def stuck(completion, sample):
    """Starts a helper that hangs, then hangs waiting for it ("hang") or dies ("crash")."""
    helper = subprocess.Popen(SLEEPER)
    started(helper.pid)
    if completion == "crash":
        os._exit(3)
    helper.wait()
    return 1.0


def locks(completion, sample):
    """A spawn-context lock, which starts multiprocessing's resource tracker (a worker is daemonic:
    multiprocessing refuses it children of its own, Process and Pool alike)."""
    lock = multiprocessing.get_context("spawn").Lock()
    with lock:
        return 1.0
'''
# A reward module that starts a helper when a worker imports it, for all its calls.
RESIDENT = """
import multiprocessing
from process_rewards import SLEEPER, started, subprocess

if multiprocessing.parent_process() is not None:  # in a reward worker (the driver imports it too)
    started(subprocess.Popen(SLEEPER).pid)


def resident(completion, sample):
    return 1.0
"""


def stat_of(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = stat_of(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def family(mark: bytes) -> set[tuple[int, int]]:
    """(pid, start time) of every live process carrying `mark` in its environment: the test's own
    children and everything they start inherit it, and nothing else on the machine has it (a process
    the CI harness starts meanwhile in the test's session is none of the pool's)."""
    found = set()
    for entry in os.listdir("/proc"):
        fields = stat_of(entry) if entry.isdigit() else None
        try:
            marked = fields is not None and mark in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        if marked and fields[0] not in ("Z", "X"):
            found.add((int(entry), int(fields[19])))
    return found


class Watch:
    """What is alive among the processes started since the test set its mark that was not before,
    other than the pool's current workers."""

    def __init__(self, runner: RewardRunner):
        self.runner = runner
        self.mark = f"{MARK}={os.environ[MARK]}".encode()
        self.before = family(self.mark)

    def new(self) -> set[int]:
        current = {worker.process.pid for worker in self.runner.pool.workers if worker is not None}
        return {pid for pid, _ in family(self.mark) - self.before if pid not in current}


def started_pids(directory: Path) -> list[int]:
    return [int(path.name.removeprefix("pid-")) for path in directory.glob("pid-*")]


def gone_within_guard(pids: list[int]) -> list[int]:
    """The pids still alive after the hang guard (none, once they are killed)."""
    deadline = time.monotonic() + HANG_GUARD
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "process_rewards.py").write_text(REWARDS)
    (tmp_path / "resident_rewards.py").write_text(RESIDENT)
    monkeypatch.chdir(tmp_path)  # the rewards write their pid files here
    monkeypatch.setenv(MARK, tmp_path.name)  # inherited by the workers and all they start
    return tmp_path


def runner_of(reference: str, timeout: float = 60.0) -> RewardRunner:
    return RewardRunner([RewardEntry(name=reference)], workers=1, timeout=timeout)


def kill_all(pids) -> None:
    """After a failed assertion: leave nothing for the next test."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, 9)


def test_children_a_call_leaves_running_are_killed_and_counted_after_it(rewards):
    runner = runner_of("process_rewards.py:forks")
    watch = Watch(runner)
    try:
        result = runner.score(["5", "3"], [SAMPLE] * 2)
        children = started_pids(rewards)
        left, new = [pid for pid in children if alive(pid)], watch.new()
    finally:
        runner.close()
        kill_all(started_pids(rewards))
    assert len(children) == 8 and result.scores.tolist() == [1.0, 1.0]
    assert left == [] and new == set(), (left, new)  # right after the call, not eventually
    assert result.leftover_processes == 8 and result.errors == 0


@pytest.mark.parametrize("how, kind", [("hang", "timeouts"), ("crash", "errors")])
def test_a_worker_killed_at_its_timeout_or_dead_takes_its_helper_along(rewards, how, kind):
    runner = runner_of("process_rewards.py:stuck", timeout=3.0)
    watch = Watch(runner)
    first_worker = runner.pool.workers[0].process.pid
    try:
        result = runner.score([how], [SAMPLE])
        helpers = started_pids(rewards)
        left = [pid for pid in [*helpers, first_worker] if alive(pid)]
    finally:
        runner.close()
        # After the close: the pool starts the dead worker's successor in the background, which a
        # busy machine may not have registered yet right after the call.
        new = watch.new()
        kill_all(started_pids(rewards))
    assert len(helpers) == 1 and getattr(result, kind) == 1
    assert left == [] and new == set(), (left, new)
    assert result.leftover_processes == 1


def test_multiprocessing_in_a_reward_starts_no_resource_tracker_of_its_own(rewards):
    """A spawned worker shares the driver's resource tracker, which is no reward's process: a lock
    (which registers with the tracker) leaves nothing behind, after the calls or the pool's close."""
    runner = runner_of("process_rewards.py:locks")
    watch = Watch(runner)
    try:
        result = runner.score(["a", "b"], [SAMPLE] * 2)
        after_calls = watch.new()
        closed_with = runner.close()
        after_close = watch.new()
    finally:
        runner.close()
        kill_all(watch.new())
    assert result.scores.tolist() == [1.0, 1.0] and result.errors == result.leftover_processes == 0
    assert after_calls == after_close == set() and closed_with == 0, (after_calls, after_close)


def test_a_helper_started_at_import_serves_every_call_and_ends_with_the_pool(rewards):
    runner = runner_of("resident_rewards.py:resident")
    watch = Watch(runner)
    try:
        result = runner.score(["a", "b"], [SAMPLE] * 2)
        helpers = started_pids(rewards)
        kept = [pid for pid in helpers if alive(pid)]
        closed_with = runner.close()
        left, new = gone_within_guard(helpers), watch.new()
    finally:
        runner.close()
        kill_all(started_pids(rewards))
    assert len(helpers) == 1 and kept == helpers and result.leftover_processes == 0
    assert closed_with == 1 and left == [] and new == set(), (closed_with, left, new)
