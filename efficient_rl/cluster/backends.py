"""Cluster backends: where the learner and the rollout engine run. The driver loop never knows."""

from __future__ import annotations

from efficient_rl.cluster.components import Components
from efficient_rl.learner.base import LEARNERS
from efficient_rl.registry import Registry
from efficient_rl.rollout.base import ENGINES

# name -> factory(recipe, setup) returning Components. Needs: "driver_model", the policy loaded in
# the driver's process (setup.model); a backend without it gets setup.model None and loads its
# weights in its own processes.
CLUSTER_BACKENDS: Registry = Registry("cluster backend")


@CLUSTER_BACKENDS.register("embedded", needs=("driver_model",))
def embedded(recipe, setup) -> Components:
    """Everything in the driver's process; the learner trains the driver's own model."""
    learner = LEARNERS.get(recipe.learner.backend)(recipe, setup.model_dir, setup.base_model_dir, model=setup.model)
    return Components(learner=learner, engine=ENGINES.get(recipe.rollout.engine)(setup, recipe), close=lambda: None)


@CLUSTER_BACKENDS.register("ray")
def ray(recipe, setup) -> Components:
    """vLLM rollout workers and learner ranks as Ray actors (efficient_rl.cluster.ray_backend)."""
    from efficient_rl.cluster.ray_backend import ray_components

    return ray_components(recipe, setup)
