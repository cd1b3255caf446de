"""Starting and stopping Ray for a run.

A local cluster binds to 127.0.0.1, lives in a fresh temp dir (a reused one makes a later start
fail) and is shut down by the driver at the end or on error. It is started by a keeper process in a
session of its own (efficient_rl/cluster/head.py), so that a signal to the driver's process group
asks the run to stop without also killing the cluster it needs to finish the step. A signal that
reaches the cluster too (one to every process of the run) makes the keeper say so: the session is
then lost, and tells the driver (RaySession.follow), which stops at once instead of waiting on
actors that are gone. With `cluster.address` the run joins an existing cluster instead (multi-node) and
leaves it running.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Ray starts its workers at niceness 15, below every ordinary process; here the actors are the run
# itself, and on a shared machine niced actors starve (a 2-step run failed after 18 minutes beside
# two busy processes). A run's own cluster gives them the driver's priority; so does the Slurm job's.
RUN_CLUSTER_CONFIG = {"worker_niceness": 0}
START_GUARD = 600  # seconds for the keeper to report its cluster up (a hang guard: Ray has its own timeouts)
STOP_GUARD = 60  # seconds for the keeper to shut its cluster down before its session is killed
SIGNALLED = "signalled"  # the keeper's line when a stop signal reached it (and so the cluster)


class ClusterStartError(RuntimeError):
    """The keeper could not start the run's own Ray cluster; its own messages are on stderr above."""


@dataclass
class RaySession:
    owned: bool  # started by this run, so shut down by it
    temp_dir: Path | None
    keeper: subprocess.Popen | None = None  # the process that started the cluster, in its own session
    lost: threading.Event = field(default_factory=threading.Event)  # the cluster got a signal, or its keeper died
    closing: bool = False
    watcher: threading.Thread | None = None
    on_lost: Callable[[], None] = lambda: None  # follow()
    guard: threading.Lock = field(default_factory=threading.Lock)  # on_lost and lost, read and set together

    def watch(self) -> None:
        """Until the keeper says SIGNALLED, or its stdout ends (it died) before the run closes it:
        then the cluster is lost, and on_lost() is called (in this thread)."""

        def wait() -> None:
            self.keeper.stdout.readline()  # SIGNALLED, or "" at end of file
            if not self.closing:
                with self.guard:
                    self.lost.set()
                    on_lost = self.on_lost
                on_lost()

        self.watcher = threading.Thread(target=wait, name="ray-keeper-watch", daemon=True)
        self.watcher.start()

    def follow(self, on_lost: Callable[[], None]) -> None:
        """Call `on_lost` (once) when the cluster is lost, or now if it is already."""
        with self.guard:
            self.on_lost = on_lost
            lost = self.lost.is_set()
        if lost:
            on_lost()

    def close(self) -> None:
        import ray

        if self.owned:
            self.closing = True
            ray.shutdown()
            stop_keeper(self.keeper, self.watcher)
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # the keeper's job, unless it was killed


def start_keeper(temp_dir: Path, cpus: int, gpus: int) -> tuple[subprocess.Popen, str]:
    """The keeper of a new local cluster (started in a new session) and the cluster's address."""
    keeper = subprocess.Popen(
        [sys.executable, "-m", "efficient_rl.cluster.head", str(temp_dir), str(cpus), str(gpus)],
        stdin=subprocess.PIPE,  # its end of file is the keeper's signal to stop
        stdout=subprocess.PIPE,  # one line: the address
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([keeper.stdout], [], [], START_GUARD)
        address = keeper.stdout.readline().decode().strip() if ready else ""
        if not address:
            raise ClusterStartError(f"the run's Ray cluster did not start (temp dir {temp_dir})")
    except BaseException:
        stop_keeper(keeper)
        raise
    return keeper, address


def stop_keeper(keeper: subprocess.Popen, watcher: threading.Thread | None = None) -> None:
    """Close the keeper's stdin (it shuts the cluster down and exits), then kill what is left of its session."""
    with contextlib.suppress(OSError):
        keeper.stdin.close()
    try:
        keeper.wait(timeout=STOP_GUARD)
    except subprocess.TimeoutExpired:
        pass
    # The keeper leads its session's one process group; the kernel does not reuse its id while any
    # member lives, so this reaches only the cluster's own processes (a worker slow to follow its raylet).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(keeper.pid, signal.SIGKILL)
    keeper.wait()
    if watcher is not None:
        watcher.join(timeout=STOP_GUARD)  # it reads the keeper's stdout: at its end now
    keeper.stdout.close()


def start_ray(address: str | None, cpus: float, gpus: float) -> RaySession:
    """Join `address`, reuse a Ray the caller started already, or start a local one with these
    resources (watched: RaySession.follow says when it is lost)."""
    if address is None and "ray" not in sys.modules:
        # A local cluster stays on the loopback address (Ray reads this when it is imported) and
        # needs no token auth (single user). Not set for multi-node clusters, which need both.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return RaySession(owned=False, temp_dir=None)
    refuse_auto_start()
    if address is not None:
        with own_sigterm_handler():
            ray.init(address=address)
        return RaySession(owned=False, temp_dir=None)
    temp_dir = Path(tempfile.mkdtemp(prefix="erl-ray-"))  # short: Ray's socket paths have a length limit
    try:
        keeper, address = start_keeper(temp_dir, max(1, math.ceil(cpus)), math.ceil(gpus))
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    session = RaySession(owned=True, temp_dir=temp_dir, keeper=keeper)
    try:
        with own_sigterm_handler():
            ray.init(address=address)
        session.watch()
    except BaseException:
        session.close()
        raise
    return session


def refuse_auto_start() -> None:
    """Once the run has shut its Ray down (at the end, or with the cluster lost), a call from
    another thread (the overlapped pipeline's producer) must fail, not start a local Ray of its own
    (Ray's default), which kept the process a minute and then ended it with exit 1. Ray reads its
    switch (RAY_ENABLE_AUTO_CONNECT) once, at import, into a private flag: cleared here, for a Ray
    imported before the run's start too (pinned in tests/test_ray_cluster.py)."""
    import ray._private.auto_init_hook as auto_init

    auto_init.enable_auto_connect = False


@contextlib.contextmanager
def own_sigterm_handler():
    """Keeps the caller's SIGTERM handler: ray.init() sets one of its own (sys.exit), which would turn
    a stop request (driver/stopping.py) into an exit mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread sets handlers; Ray sets none there either
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler):  # a handler the caller chose (not the default, which Ray's improves on)
            signal.signal(signal.SIGTERM, handler)
