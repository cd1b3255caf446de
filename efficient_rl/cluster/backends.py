"""Cluster backends: where the learner and the rollout engine run. The driver loop never knows."""

from __future__ import annotations

from efficient_rl.cluster.components import Components
from efficient_rl.registry import Registry

# name -> factory(plan, setup) returning Components. Needs: "driver_model", the policy loaded in
# the driver's process (setup.model); a backend without it gets setup.model None and loads its
# weights in its own processes.
CLUSTER_BACKENDS: Registry = Registry("cluster backend")


@CLUSTER_BACKENDS.register("embedded", needs=("driver_model",))
def embedded(plan, setup) -> Components:
    """Everything in the driver's process; the learner trains the driver's own model."""
    learner = plan["learner.backend"](plan, setup.model_dir, setup.base_model_dir, model=setup.model)
    return Components(learner=learner, engine=plan["rollout.engine"](plan, setup), close=lambda: None)


def ray_check(_, recipe) -> str | None:
    cluster = recipe.cluster
    if recipe.rollout.engine != "vllm":
        return "rollout.engine: the ray backend runs vLLM rollout workers; set rollout.engine: vllm"
    if cluster.weight_transport == "nccl" and cluster.placement == "colocate":
        # NCCL refuses two ranks of one communicator on one GPU, which colocation gives rank 0 and
        # rollout worker 0: refused here rather than after every engine has started.
        return (
            "cluster.weight_transport: nccl cannot join learner rank 0 and rollout worker 0 on the one GPU "
            "placement: colocate gives them; use weight_transport: object_store, or placement: split"
        )
    return None


@CLUSTER_BACKENDS.register("ray", check=ray_check)
def ray(plan, setup) -> Components:
    """vLLM rollout workers and learner ranks as Ray actors (efficient_rl.cluster.ray_backend)."""
    from efficient_rl.cluster.ray_backend import ray_components

    return ray_components(plan, setup)
