"""Starting and stopping Ray for a run.

A local cluster binds to 127.0.0.1, lives in a fresh temp dir (a reused one makes a later start
fail) and is shut down by the driver at the end or on error. With `cluster.address` the run joins
an existing cluster instead (multi-node) and leaves it running.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Ray starts its workers at niceness 15, below every ordinary process; here the actors are the run
# itself, and on a shared machine niced actors starve (a 2-step run failed after 18 minutes beside
# two busy processes). A run's own cluster gives them the driver's priority; so does the Slurm job's.
RUN_CLUSTER_CONFIG = {"worker_niceness": 0}


@dataclass
class RaySession:
    owned: bool  # started by this run, so shut down by it
    temp_dir: Path | None

    def close(self) -> None:
        import ray

        if self.owned:
            ray.shutdown()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray(address: str | None, cpus: float, gpus: float) -> RaySession:
    """Join `address`, reuse a Ray the caller started already, or start a local one with these resources."""
    if address is None and "ray" not in sys.modules:
        # A local cluster stays on the loopback address (Ray reads this when it is imported) and
        # needs no token auth (single user). Not set for multi-node clusters, which need both.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return RaySession(owned=False, temp_dir=None)
    if address is not None:
        ray.init(address=address)
        return RaySession(owned=False, temp_dir=None)
    temp_dir = Path(tempfile.mkdtemp(prefix="erl-ray-"))  # short: Ray's socket paths have a length limit
    ray.init(
        num_cpus=max(1, math.ceil(cpus)),
        num_gpus=math.ceil(gpus),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp_dir),
        _system_config=RUN_CLUSTER_CONFIG,
    )
    return RaySession(owned=True, temp_dir=temp_dir)
