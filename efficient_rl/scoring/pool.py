"""Reward calls in spawned worker processes, each call under a wall-clock timeout kept by the parent.

A worker that does not answer in time is killed and replaced: its call counts as a timeout. A
worker that dies (a segfault, os._exit in a reward) is replaced too: its call counts as an error.
Workers receive reward references as strings and resolve them themselves, so no user function is
ever pickled, and they call rewards in their main thread, where math-verify's signal-based
timeouts work. This module imports no torch: workers start fast.

Workers ignore the stop signals (see worker_main), so nothing but this module ends them, and it
does on every way out of their owner: close(); a finalizer that kills them when the owner exits
without closing (an exception), which runs before multiprocessing's own exit handler would
SIGTERM and then join them forever; and a watch in each worker that ends it quietly once the
driver is gone (kill -9), even in the middle of a reward call.

Every worker leads a session of its own, and a reward's processes end with it (sessions.py): after
each call the worker kills those the call left running; a worker killed (a timeout), found dead or
stopped takes its whole session along. What had to be killed is counted (Outcome.leftover_processes).
Processes started while the rewards were imported serve the worker's life. (multiprocessing's
resource tracker is the driver's: a spawned worker inherits it, so a reward starts none.)
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from efficient_rl.errors import WorkerFailure
from efficient_rl.scoring.forms import RewardForm, call, form_of
from efficient_rl.scoring.plugins import load_reward
from efficient_rl.scoring.sessions import end_members, identity, last_pid, members

STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import its rewards
CLOSE_GRACE = 2.0  # seconds idle workers get, all together, to leave on their own before they are killed
KILL_WAIT = 5.0  # seconds for killed processes to die (only one stuck in the kernel takes long)
EXIT_POLL = 0.01  # seconds between looks at a worker that is leaving


@dataclass(frozen=True)
class RewardReference:
    """A reward as a worker receives it: strings and plain data, resolved in the worker."""

    name: str  # the reference: built-in, file.py:function, module:function or plugin
    params: dict
    form: str  # a name in forms.REWARD_FORMS


@dataclass(frozen=True)
class LoadedReward:
    function: object
    form: RewardForm
    params: dict


def load(reference: RewardReference) -> LoadedReward:
    function = load_reward(reference.name)
    return LoadedReward(function, form_of(reference.form, function), reference.params)


@dataclass(frozen=True)
class RewardCall:
    entry: int  # which reward of the recipe
    completions: list[str]  # one for a per-sample reward, several for a batched one
    samples: list[dict]


@dataclass
class Outcome:
    status: str  # "ok", "error" or "timeout"
    values: list | None = None  # the reward's raw return values, one per completion
    message: str = ""
    seconds: float = 0.0  # time inside the reward (0 when the worker gave no answer)
    leftover_processes: int = 0  # processes the call started and left running, killed after it


def outcome_of(reward: LoadedReward, request: RewardCall) -> Outcome:
    """Call the reward; its failure becomes the outcome, never the caller's exception."""
    started = time.perf_counter()
    try:
        values = call(reward.form, reward.function, request.completions, request.samples, reward.params)
        return Outcome("ok", values=values, seconds=time.perf_counter() - started)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # math-verify's TimeoutException is a BaseException
        # A reward's own timeout (raised as TimeoutError, as the math reward does) counts as one.
        status = "timeout" if isinstance(err, TimeoutError) else "error"
        return Outcome(status, message=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - started)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def worker_main(connection, references: list[RewardReference]) -> None:
    """Serve calls until told to stop (None), answering each with its Outcome."""
    os.setsid()  # first: every process a reward starts is then in this worker's session (sessions.py)
    # Stop signals are for the driver, which finishes its step (with these workers) and then closes
    # the pool. A Slurm requeue signals every process of the job (its cgroup, whatever the session),
    # and a user may signal every process of the run: without this the workers would die under the
    # driver's last step. They came blocked from the parent (Worker), so none could arrive before this.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    exit_with_parent()
    try:
        rewards = [load(reference) for reference in references]
    except Exception as err:  # the driver loaded them: something differs in a fresh process
        connection.send(("failed", f"{type(err).__name__}: {err}"))  # for the driver's one-line error
        return
    swept = last_pid()
    resident = set(members(os.getpid()))  # itself, and what the imports started: they serve every call
    connection.send(("ready", None))  # call timeouts start only now, after the imports
    try:
        while (request := connection.recv()) is not None:
            outcome = outcome_of(rewards[request.entry], request)
            # Reading /proc costs ~15 us a process on the machine, each call; skipped while no process
            # (or thread) was started anywhere since the last look, which began at `swept`.
            if last_pid() != swept:
                swept = last_pid()
                outcome.leftover_processes = end_members(os.getpid(), resident, time.monotonic() + KILL_WAIT)
            connection.send(outcome)
    except (EOFError, OSError):  # a pipe closed, broken or reset: the driver is gone
        end_session()  # nobody is left to answer, and a traceback here would read as the cause


def end_session() -> None:
    """Kill every other process of this worker's session: the driver is gone, nobody else will."""
    end_members(os.getpid(), {identity(os.getpid())}, time.monotonic() + KILL_WAIT)


def exit_with_parent() -> None:
    """End this worker as soon as the driver has died, whatever the worker is doing.

    Ignoring SIGTERM, a worker would otherwise outlive a killed driver inside a hung reward call.
    multiprocessing's parent sentinel is the worker's end of a pipe whose other end the driver
    holds (until it drops the Process, after the worker has exited), so it turns readable when
    the driver is gone. Portable, unlike prctl(PR_SET_PDEATHSIG), which also fires when merely the
    driver thread that started the worker ends.
    """
    parent = multiprocessing.parent_process()

    def watch() -> None:
        parent.join()  # returns when the sentinel turns readable: the parent died
        end_session()
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class Worker:
    def __init__(self, context, references):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, references), daemon=True)
        # The child inherits the signal mask: blocked until worker_main ignores them. Here they
        # only wait out the start, and then reach the driver as usual.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
        self.ready = False
        self.started = time.monotonic()

    def check_ready(self) -> None:
        """Wait for the worker's "ready" (it resolves the rewards first)."""
        if not self.connection.poll(max(0.0, self.started + STARTUP_TIMEOUT - time.monotonic())):
            raise WorkerFailure(
                f"a reward worker did not start within {STARTUP_TIMEOUT:g} s (a reward that hangs "
                "at import?); run the rewards in this process (scoring.workers=0) to see why"
            )
        try:
            status, detail = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(timeout=CLOSE_GRACE)  # it closed its end: it is exiting (then its exit code is known)
            raise WorkerFailure(
                f"a reward worker failed to start (exit code {self.process.exitcode}); "
                "run the rewards in this process (scoring.workers=0) to see why"
            ) from None
        if status == "failed":
            raise WorkerFailure(f"a reward worker could not load the rewards: {detail}")
        self.ready = True

    def ask_to_stop(self) -> None:
        try:
            self.connection.send(None)
        except OSError:
            pass  # already gone

    def kill(self) -> int:
        """End the worker now; how many other processes of its session were killed with it."""
        return self.end(deadline=time.monotonic())

    def end(self, deadline: float) -> int:
        """Wait until `deadline` for the worker to exit, kill it then, and kill what is left of its session.

        The session is swept before the worker is reaped: its zombie holds the pid, so no other
        process can take the number and start a session of that id meanwhile.
        """
        if not self.exited_by(deadline):
            self.process.kill()
            self.exited_by(time.monotonic() + KILL_WAIT)
        left = end_members(self.process.pid, set(), time.monotonic() + KILL_WAIT)
        self.process.join(timeout=KILL_WAIT)
        self.connection.close()
        return left

    def exited_by(self, deadline: float) -> bool:
        """Whether the worker has exited by `deadline`, without reaping it."""
        while True:
            try:
                if os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:
                return True  # reaped already (multiprocessing.active_children() reaps)
            if time.monotonic() >= deadline:
                return False
            time.sleep(EXIT_POLL)


def stop_workers(workers: list[Worker]) -> int:
    """Ask every worker to leave, give them CLOSE_GRACE together, then kill the rest, and with each
    worker what is left of its session; how many processes besides the workers were killed.

    Never a plain join: a worker ignores SIGTERM, and one stuck in a reward would wait forever.
    Empties `workers` in place (the finalizer holds the same list), so a second call does nothing.
    """
    live = [worker for worker in workers if worker is not None]  # None: killed, successor not started
    for worker in live:
        worker.ask_to_stop()
    deadline = time.monotonic() + CLOSE_GRACE
    left = sum(worker.end(deadline) for worker in live)
    workers.clear()
    return left


class RewardPool:
    def __init__(self, references: list[RewardReference], workers: int, timeout: float):
        self.context = multiprocessing.get_context("spawn")  # fork would copy the trainer (and its threads)
        self.references, self.timeout = references, timeout
        self.workers: list[Worker] = []
        # Runs at close(), when the pool is garbage, and at interpreter exit, before multiprocessing
        # terminates and then joins its daemonic children: our workers ignore that SIGTERM, and the
        # join would never return (a driver that raised would hang at exit, holding its allocation).
        self.finalizer = multiprocessing.util.Finalize(self, stop_workers, args=(self.workers,), exitpriority=0)
        for _ in range(workers):  # one by one: should a start fail, the finalizer has the ones before it
            self.workers.append(Worker(self.context, references))
        self.restarts = 0  # workers killed (no answer in time) or found dead, and replaced

    def run(self, calls: list[RewardCall]) -> list[Outcome]:
        """Every call's outcome, in order; calls go to whichever worker is free."""
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (call index, deadline)
        try:
            return self._run(calls, busy)
        except BaseException:
            # Cut short (Ctrl-C twice, a worker that failed to start): the busy workers' answers
            # would reach the next run as its own. Replaced, they also cannot slow the exit down.
            for slot in busy:
                self._replace(slot, start=False)
            raise

    def _run(self, calls: list[RewardCall], busy: dict[int, tuple[int, float]]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(calls)
        queue = deque(range(len(calls)))
        while queue or busy:
            for slot, worker in enumerate(self.workers):
                if slot not in busy and queue:
                    if worker is None:  # killed when an earlier run was cut short
                        worker = self.workers[slot] = Worker(self.context, self.references)
                    if not worker.ready:
                        worker.check_ready()
                    index = queue.popleft()
                    self.workers[slot].connection.send(calls[index])
                    busy[slot] = (index, time.monotonic() + self.timeout)
            soonest = min(deadline for _, deadline in busy.values())
            ready = wait([self.workers[slot].connection for slot in busy], max(0.0, soonest - time.monotonic()))
            for slot in list(busy):
                index, deadline = busy[slot]
                if self.workers[slot].connection in ready:
                    outcomes[index] = self._answer(slot)
                elif time.monotonic() >= deadline:
                    left = self._replace(slot)
                    outcomes[index] = Outcome(
                        "timeout", message=f"no answer within {self.timeout:g} s", leftover_processes=left
                    )
                else:
                    continue
                del busy[slot]
        return outcomes

    def _answer(self, slot: int) -> Outcome:
        worker = self.workers[slot]
        try:
            return worker.connection.recv()
        except (EOFError, OSError):
            left = self._replace(slot)
            message = f"reward worker died (exit code {worker.process.exitcode})"
            return Outcome("error", message=message, leftover_processes=left)

    def _replace(self, slot: int, start: bool = True) -> int:
        """Kill the worker in `slot` and its session; start its successor now, or (start=False) at its
        next call. How many processes of the session besides the worker were killed."""
        left = self.workers[slot].kill()
        self.workers[slot] = Worker(self.context, self.references) if start else None
        self.restarts += 1
        return left

    def close(self) -> int:
        """Stop every worker; how many of their sessions' other processes had to be killed. Safe to
        call again (then 0)."""
        return self.finalizer() or 0
