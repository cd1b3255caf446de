"""The distillation teacher hosted by Ray (`distill.placement: ray`): its actor name and the
client every learner rank asks it through.

ray_backend.start_teacher starts the actor (actors.TeacherWorker, an embedded teacher inside)
under this name; LearnerWorker.setup builds the client and hands it to the learner's factory,
which is how the learner gets a Ray-hosted teacher without importing Ray itself.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.batch import RolloutBatch


def teacher_actor_name(recipe) -> str:
    return f"efficient-rl-teacher-{recipe.logging.name}"


def hosts_teacher(recipe) -> bool:
    """The recipe has a teacher (distill.teacher: whatever needs one) that runs as one Ray actor."""
    return recipe.distill.teacher is not None and recipe.distill.placement == "ray"


class RemoteTeacher:
    """The teacher actor seen from a learner rank: the same two members as learner.teacher.Teacher."""

    def __init__(self, name: str):
        import ray  # when used: Ray is the optional `distributed` extra

        self.actor = ray.get_actor(name)
        self.vocab_size = ray.get(self.actor.vocab_size.remote())

    def logprobs(self, rows: RolloutBatch, selected: torch.Tensor) -> torch.Tensor:
        import ray

        return ray.get(self.actor.logprobs.remote(rows.to("cpu"), selected.cpu()))


def teacher_client(recipe) -> RemoteTeacher | None:
    """The client of the recipe's Ray-hosted teacher, or None when it has none (the learner then
    builds its own teacher, if it distils)."""
    return RemoteTeacher(teacher_actor_name(recipe)) if hosts_teacher(recipe) else None
