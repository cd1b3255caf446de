"""The keeper of a run's own Ray cluster: a process in a session of its own that starts the cluster and ends it.

ray.init() starts the GCS, the raylet and through it every actor as children of the caller, in the
caller's process group. A signal to the driver's whole group (`timeout`, a terminal, some launchers)
would then reach them too, and the run, asked to finish its step and checkpoint, would find its
cluster gone. So the driver starts this keeper with a new session, the keeper calls ray.init() (the
Ray processes are its children, in its session, and Ray ends them when it dies: PR_SET_PDEATHSIG),
prints the cluster's address, and reads its stdin until end of file. End of file comes when the
driver closes the pipe, or when the driver dies however it dies (the kernel closes its end, even on
a kill -9); then the keeper shuts Ray down and removes the cluster's temp dir. A SIGTERM or SIGINT
sent to the keeper itself does the same.

Run as `python -m efficient_rl.cluster.head TEMP_DIR CPUS GPUS`; only efficient_rl.cluster.runtime does.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

from efficient_rl.cluster.runtime import RUN_CLUSTER_CONFIG


def _leave(signum, frame) -> None:
    raise SystemExit(0)  # through the finally below: Ray shut down, temp dir removed


def keep(temp_dir: str, cpus: int, gpus: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave)
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
        sys.stdin.read()  # until the driver closes the pipe or dies
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    keep(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
