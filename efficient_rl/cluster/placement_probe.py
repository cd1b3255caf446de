"""Where a run's actors would land on a running Ray cluster, and what each would see, found by
starting a small stand-in in each actor's place: the same placement groups and the same per-actor
options as a run (ray_backend.place, PlacementGroups.options), but no engine, learner or model.

`efficient-rl submit --placement-only` runs it inside the job, after the job's own `ray start`
lines, so it shows what Slurm and Ray did with the allocation: each node's CPUs and GPUs as Ray
counts them with the GPUs Slurm gave that node, and each actor's node, Ray GPU ids and
CUDA_VISIBLE_DEVICES. It works with Slurm's GPUs whether or not they can compute (the local test
cluster's are fake), since nothing here touches a device.
"""

from __future__ import annotations

import os

from efficient_rl.cluster.ray_backend import place
from efficient_rl.config.placement import ROLES, Placement

# What each stand-in reports from its process's environment. Ray starts actors with the raylet's
# environment (for a Slurm job: the `srun` step's, so SLURMD_NODENAME and SLURM_STEP_GPUS name the
# Slurm node and the GPUs Slurm gave it) and sets CUDA_VISIBLE_DEVICES itself from the actor's GPUs.
REPORTED_ENV = {"slurm_node": "SLURMD_NODENAME", "slurm_gpus": "SLURM_STEP_GPUS"}


class StandIn:
    """Takes an actor's place and reports what that actor would see."""

    def report(self) -> dict:
        import ray

        return {
            "ray_node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **{key: os.environ.get(variable) for key, variable in REPORTED_ENV.items()},
        }


def node_report() -> dict:
    """What one node's processes see (a zero-CPU task pinned to each node runs this)."""
    return {key: os.environ.get(variable) for key, variable in REPORTED_ENV.items()}


def nodes_view() -> dict[str, dict]:
    """Each live Ray node, by id: its CPUs and GPUs as Ray counts them, and what its processes see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [node for node in ray.nodes() if node["Alive"]]
    report = ray.remote(num_cpus=0)(node_report)
    seen = ray.get(
        [
            report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            for node in alive
        ]
    )
    return {
        node["NodeID"]: {
            "cpus": node["Resources"].get("CPU", 0.0),
            "gpus": node["Resources"].get("GPU", 0.0),
            **here,
        }
        for node, here in zip(alive, seen)
    }


def probe_placement(placement: Placement, workers: dict[str, int], timeout: float) -> dict:
    """On the connected Ray cluster: every node's view, and for each actor (`rollout0`, `learner1`,
    ...; `workers` per role) what it would see in its place. Everything started is removed again."""
    import ray

    groups = place(placement, timeout)
    stand_in = ray.remote(StandIn)
    try:
        actors = {
            f"{role}{index}": stand_in.options(**groups.options(role, index)).remote()
            for role in ROLES
            for index in range(workers[role])
        }
        reports = dict(zip(actors, ray.get([actor.report.remote() for actor in actors.values()])))
        for actor in actors.values():
            ray.kill(actor)
    finally:
        groups.remove()
    return {"nodes": nodes_view(), "actors": reports}
