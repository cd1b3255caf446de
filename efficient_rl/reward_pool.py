"""Reward calls in spawned worker processes, each call under a wall-clock timeout kept by the parent.

A worker that does not answer in time is killed and replaced: its call counts as a timeout. A
worker that dies (a segfault, os._exit in a reward) is replaced too: its call counts as an error.
Workers receive reward references as strings and resolve them themselves, so no user function is
ever pickled, and they call rewards in their main thread, where math-verify's signal-based
timeouts work. This module imports no torch: workers start fast.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from efficient_rl.reward_plugins import call_reward, load_reward

STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import its rewards


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


def outcome_of(function, call: RewardCall, params: dict) -> Outcome:
    """Call the reward; its failure becomes the outcome, never the caller's exception."""
    started = time.perf_counter()
    try:
        values = call_reward(function, call.completions, call.samples, params)
        return Outcome("ok", values=values, seconds=time.perf_counter() - started)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # math-verify's TimeoutException is a BaseException
        # A reward's own timeout (raised as TimeoutError, as the math reward does) counts as one.
        status = "timeout" if isinstance(err, TimeoutError) else "error"
        return Outcome(status, message=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - started)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def worker_main(connection, references: list[tuple[str, dict]]) -> None:
    """Serve calls until told to stop (None), answering each with its Outcome."""
    # Stop signals are for the driver, which finishes its step (with these workers) and then closes
    # the pool. A Slurm requeue signals every process of the job, and Ctrl-C the terminal's whole
    # process group: without this the workers would die under the driver's last step. They came
    # blocked from the parent (Worker), so none could arrive before this.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    functions = [load_reward(reference) for reference, _ in references]
    connection.send(("ready", None))  # call timeouts start only now, after the imports
    while True:
        call = connection.recv()
        if call is None:
            return
        connection.send(outcome_of(functions[call.entry], call, references[call.entry][1]))


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
            raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT} s")
        try:
            self.connection.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"a reward worker failed to start (exit code {self.process.exitcode}); "
                               "run the reward in this process (scoring.workers=0) to see why") from None
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class RewardPool:
    def __init__(self, references: list[tuple[str, dict]], workers: int, timeout: float):
        self.context = multiprocessing.get_context("spawn")  # fork would copy the trainer (and its threads)
        self.references, self.timeout = references, timeout
        self.workers = [Worker(self.context, references) for _ in range(workers)]
        self.restarts = 0  # workers killed (no answer in time) or found dead, and replaced

    def run(self, calls: list[RewardCall]) -> list[Outcome]:
        """Every call's outcome, in order; calls go to whichever worker is free."""
        outcomes: list[Outcome | None] = [None] * len(calls)
        queue = deque(range(len(calls)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (call index, deadline)
        while queue or busy:
            for slot, worker in enumerate(self.workers):
                if slot not in busy and queue:
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
                    self._replace(slot)
                    outcomes[index] = Outcome("timeout", message=f"no answer within {self.timeout:g} s")
                else:
                    continue
                del busy[slot]
        return outcomes

    def _answer(self, slot: int) -> Outcome:
        worker = self.workers[slot]
        try:
            return worker.connection.recv()
        except (EOFError, OSError):
            self._replace(slot)
            return Outcome("error", message=f"reward worker died (exit code {worker.process.exitcode})")

    def _replace(self, slot: int) -> None:
        self.workers[slot].kill()
        self.workers[slot] = Worker(self.context, self.references)
        self.restarts += 1

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.connection.send(None)
            except OSError:
                pass
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.kill()
        self.workers = []
