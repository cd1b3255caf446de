"""Stop requests: a signal asks a training run to finish its current step, checkpoint and exit.

SIGTERM and SIGINT (kill, Ctrl-C, a Slurm requeue or preemption) and SIGUSR1 (the warning a
Slurm job asks for before its time limit; efficient_rl/slurm/job.sbatch passes it on) all mean the same. The
CLI installs the handlers before its slow imports, so a warning that arrives while the run is
still starting up is kept, not lost (SIGUSR1's default action would kill the process).

A signal sent before the process has installed its handlers is lost (or kills it), so a launcher
also records its request in a file: the one named by $EFFICIENT_RL_STOP_FILE. Its existence is a
stop request, however early it was written; efficient_rl/slurm/job.sbatch writes it on the time-limit warning.

Work that no checkpoint would keep runs under cut_short(): there a stop request ends it at once,
with Stopped, since waiting would save nothing. That is the work after the last checkpoint (the
final evaluation) and before the first step (building or converting the model, the evaluation
before training); the CLI exits 75 with one line saying how to go on. Before the first step a
time-limit warning (SIGUSR1, the stop file) is the exception: it asks for a checkpoint before the
limit, and the time left may well hold the first step, so the run goes on to it as the warning's
promise says; a requeued attempt that stopped at once would only start over. A second Ctrl-C
always stops at once (KeyboardInterrupt; the CLI says so in one line and exits 130).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped before the last step; the run is resumable
STOP_FILE_VARIABLE = "EFFICIENT_RL_STOP_FILE"
FROM_STOP_FILE = 0  # recorded in _received for a request read from the stop file (no signal is 0)
# A Slurm time-limit warning: "checkpoint before the limit" rather than "stop now".
TIME_LIMIT_WARNINGS = (signal.SIGUSR1, FROM_STOP_FILE)


class Stopped(Exception):
    """A stop request ended a cut_short() block."""


class StoppedMidStep(Exception):
    """A stop request came with the end of the processes the step needs: a signal to every process
    of the run (systemd's KillMode=control-group, a Slurm job step, `kill` of each) ends the Ray
    cluster's too. The step in progress is lost; the last checkpoint stands, and the stop is a stop."""

    def __init__(self, step: int):
        super().__init__(f"step {step}")
        self.step = step


@dataclass(frozen=True)
class Phase:
    """What a stop request means while a block runs: the promise printed, and whether it ends the block."""

    promise: str
    ends_block: bool = False
    for_warnings: bool = True  # False: a time-limit warning passes it by, to the phase around it

    def takes(self, signum: int) -> bool:
        return self.for_warnings or signum not in TIME_LIMIT_WARNINGS


AFTER_THIS_STEP = Phase("stopping after this step and writing a checkpoint")

_received: list[int] = []
_phases: list[Phase] = [AFTER_THIS_STEP]  # the innermost block's is last
_cut: list[bool] = []  # set by cut_now() for the main thread's handler
_cut_taken: list[bool] = []  # set once a cut_now() has interrupted the main thread
_saying: list[bool] = []  # set while the handler writes its line, which a second signal must not cut in two


def _record(signum, frame) -> None:
    if _saying:
        return  # a signal while the first one's line is written: that call goes on, and sees a cut
    if _cut:
        _end_for_cut(signum)
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now
    phase = phase_of(signum)
    if not _received:
        again = "" if phase.ends_block else " (Ctrl-C again: stop now)"
        _saying.append(True)
        try:
            print(f"{signal.Signals(signum).name}: {phase.promise}{again}", file=sys.stderr, flush=True)
        finally:
            _saying.clear()
    _received.append(signum)
    if phase.ends_block:
        raise Stopped(phase.promise)
    if _cut:
        _end_for_cut(signum)


def _end_for_cut(signum: int) -> None:
    """cut_now(): a request that also ends what the main thread waits on."""
    _cut.clear()
    _cut_taken.append(True)
    _received.append(signum)
    raise KeyboardInterrupt  # the exception Ray's get passes on from a handler


def cut_now() -> None:
    """From another thread: a stop request that cannot wait for the step, since what the step needs
    is gone (the run's Ray cluster got a stop signal too: cluster/runtime.py). The main thread gets
    KeyboardInterrupt wherever it is, waiting in Ray's get included, with the request recorded;
    the loop takes it for the stop (StoppedMidStep). Outside handled() (no request can be kept
    there), nothing happens."""
    if signal.getsignal(signal.SIGTERM) is _record:
        _cut.append(True)
        # a signal, not _thread.interrupt_main(): that one wakes no main thread blocked on a lock
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


def cut_taken() -> bool:
    """Whether a cut_now() interrupted the main thread: its KeyboardInterrupt is then the stop (the
    cluster is gone), not a second Ctrl-C, wherever it surfaced (a step, actor start, an evaluation)."""
    return bool(_cut_taken)


def phase_of(signum: int) -> Phase:
    """The innermost block's phase that takes this request (the loop's, at the bottom, takes all)."""
    return next(phase for phase in reversed(_phases) if phase.takes(signum))


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def requested() -> bool:
    if not _received and stop_file_written():
        print(
            f"{os.environ[STOP_FILE_VARIABLE]}: a stop was requested; {phase_of(FROM_STOP_FILE).promise}",
            file=sys.stderr,
            flush=True,
        )
        _received.append(FROM_STOP_FILE)
    return bool(_received)


def stop_file_written() -> bool:
    path = os.environ.get(STOP_FILE_VARIABLE)
    return bool(path) and os.path.exists(path)


@contextlib.contextmanager
def handled():
    """Stop signals are recorded while the block runs; afterwards the old handlers are back and
    the request is cleared (a later run in the same process starts afresh)."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
        _cut.clear()
        _cut_taken.clear()


@contextlib.contextmanager
def cut_short(promise: str, for_warnings: bool = True):
    """While the block runs (under handled()), a stop request ends it at once with Stopped, and
    says `promise`: for work no checkpoint keeps, which a stop loses nothing of. `for_warnings`
    False: a time-limit warning does not end it (work before the first step, see above)."""
    phase = Phase(promise, ends_block=True, for_warnings=for_warnings)
    _phases.append(phase)
    try:
        end_if_requested(phase)  # one that came before the block would end nothing
        yield
        # Library code that catches Exception (transformers does) may have swallowed the Stopped
        # the handler raised; the request is still recorded, and ends the work right after.
        end_if_requested(phase)
    finally:
        _phases.pop()


def end_if_requested(phase: Phase) -> None:
    if requested() and any(phase.takes(signum) for signum in _received):
        raise Stopped(phase.promise)
