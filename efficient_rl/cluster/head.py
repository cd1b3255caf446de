"""The keeper of a run's own Ray cluster: a process in a session of its own that starts the cluster and ends it.

ray.init() starts the GCS, the raylet and through it every actor as children of the caller, in the
caller's process group. A signal to the driver's whole group (`timeout`, a terminal, some launchers)
would then reach them too, and the run, asked to finish its step and checkpoint, would find its
cluster gone. So the driver starts this keeper with a new session, the keeper calls ray.init() (the
Ray processes are its children, in its session, and Ray ends them when it dies: PR_SET_PDEATHSIG),
prints the cluster's address, and reads its stdin until end of file. End of file comes when the
driver closes the pipe, or when the driver dies however it dies (the kernel closes its end, even on
a kill -9); then the keeper shuts Ray down and removes the cluster's temp dir.

A signal to every process of the run (systemd's KillMode=control-group, a Slurm job step, `kill`
of each) reaches the cluster too, whatever its session: the actors end on SIGTERM, and the GCS and
the raylet stop serving (Ray 2.60: they linger unreachable until killed). The driver, waiting on an
actor, would learn nothing until its Ray client gives up on the GCS a minute later and ends the
process (exit 1). So on a SIGTERM or SIGINT the keeper says SIGNALLED on its stdout (the driver
stops waiting and stops the run: runtime.py) and then waits for the driver's pipe as before, but
at most STOP_GRACE seconds: then it shuts Ray down anyway, so that nothing waits on a driver that
never closes.

Run as `python -m efficient_rl.cluster.head TEMP_DIR CPUS GPUS`; only efficient_rl.cluster.runtime does.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys

from efficient_rl.cluster.runtime import RUN_CLUSTER_CONFIG, SIGNALLED

STOP_GRACE = 60  # seconds the cluster stays up after a stop signal, for the driver to stop and close it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _leave(signum, frame) -> None:
    raise SystemExit(0)  # through the finally below: Ray shut down, temp dir removed


def _leave_soon(signum, frame) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the grace runs from the first signal; later ones change nothing
    signal.alarm(STOP_GRACE)
    print(SIGNALLED, flush=True)  # the driver stops waiting on the cluster (runtime.py)


def wait_for_end_of_input() -> None:
    """Until stdin ends. Ray's threads block no signal, so a signal may go to any of them, and a main
    thread blocked in read() would never run its handler; Python's wakeup fd, written on every
    signal whichever thread takes it, wakes this select instead, and the handler runs here."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    while True:
        ready, _, _ = select.select([sys.stdin, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 512)  # the handlers run as this returns
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            return


def keep(temp_dir: str, cpus: int, gpus: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _leave)  # until the cluster is up: nothing to wait for yet
    signal.signal(signal.SIGALRM, _leave)
    # The keeper inherits the driver's environment, so Ray reads the same settings in both: the
    # driver resolves the address it is given as this cluster states it. A loopback-only cluster
    # (start_ray sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 unless Ray was imported first) binds to 127.0.0.1.
    loopback = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    try:
        import ray

        ray.init(
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=False,
            log_to_driver=False,  # the keeper runs no tasks; the driver shows its actors' output
            _node_ip_address="127.0.0.1" if loopback else None,
            _temp_dir=temp_dir,
            _system_config=RUN_CLUSTER_CONFIG,
        )
        print(ray.get_runtime_context().gcs_address, flush=True)
        for sig in STOP_SIGNALS:  # after ray.init(), which sets a SIGTERM handler of its own (sys.exit)
            signal.signal(sig, _leave_soon)
        wait_for_end_of_input()  # until the driver closes the pipe or dies
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGALRM):
            signal.signal(sig, signal.SIG_IGN)  # a later signal or the grace's end must not cut the cleanup short
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    keep(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
