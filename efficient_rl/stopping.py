"""Stop requests: a signal asks a training run to finish its current step, checkpoint and exit.

SIGTERM and SIGINT (kill, Ctrl-C, a Slurm requeue or preemption) and SIGUSR1 (the warning a
Slurm job asks for before its time limit; slurm/job.sbatch passes it on) all mean the same. The
CLI installs the handlers before its slow imports, so a warning that arrives while the run is
still starting up is kept, not lost (SIGUSR1's default action would kill the process).

A signal sent before the process has installed its handlers is lost (or kills it), so a launcher
also records its request in a file: the one named by $EFFICIENT_RL_STOP_FILE. Its existence is a
stop request, however early it was written; slurm/job.sbatch writes it on the time-limit warning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped before the last step; the run is resumable
STOP_FILE_VARIABLE = "EFFICIENT_RL_STOP_FILE"
FROM_STOP_FILE = 0  # recorded in _received for a request read from the stop file (no signal is 0)

_received: list[int] = []


def _record(signum, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now
    if not _received:
        print(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(Ctrl-C again: stop now)",
              file=sys.stderr, flush=True)
    _received.append(signum)


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def requested() -> bool:
    if not _received and stop_file_written():
        print(f"{os.environ[STOP_FILE_VARIABLE]}: a stop was requested; stopping after this step and writing a "
              "checkpoint", file=sys.stderr, flush=True)
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
