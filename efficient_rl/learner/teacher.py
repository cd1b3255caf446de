"""The teacher of on-policy distillation (ALGORITHMS.md §4): full-vocabulary log-probabilities at
chosen response positions of the student's own rollouts.

`embedded`: a frozen copy in every learner process, the way a KL reference model is held.
`ray`: one actor that every learner rank asks (cluster.backend: ray), so learner ranks do not
each hold the teacher. Either way only the requested positions reach the teacher's LM head.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import map_row_chunks
from efficient_rl.config import ConfigError, Recipe
from efficient_rl.learner.objective import head_logprobs
from efficient_rl.modeling import output_head, response_hidden_states
from efficient_rl.registry import Registry

TEACHERS: Registry = Registry("teacher placement")


def teacher_actor_name(recipe: Recipe) -> str:
    return f"efficient-rl-teacher-{recipe.logging.name}"


class Teacher:
    def __init__(self, model, temperature: float, chunk_rows: int):
        self.model = model.eval()
        self.temperature, self.chunk_rows = temperature, chunk_rows

    @property
    def vocab_size(self) -> int:
        return output_head(self.model).weight.shape[0]

    @torch.no_grad()
    def logprobs(self, rows: RolloutBatch, selected: torch.Tensor) -> torch.Tensor:
        """[K, V] log-softmax over the vocabulary at the K selected positions, in row-major order."""
        head = output_head(self.model)
        hidden = response_hidden_states(self.model, rows)[selected.bool()]
        return map_row_chunks(lambda h: head_logprobs(head, h, self.temperature), [hidden], self.chunk_rows)


class RemoteTeacher:
    """The learner-side handle of the teacher actor (cluster/actors.py TeacherWorker)."""

    def __init__(self, name: str):
        import ray

        self.actor = ray.get_actor(name)
        self.vocab_size = ray.get(self.actor.vocab_size.remote())

    def logprobs(self, rows: RolloutBatch, selected: torch.Tensor) -> torch.Tensor:
        import ray

        return ray.get(self.actor.logprobs.remote(rows.to("cpu"), selected.cpu()))


@TEACHERS.register("embedded")
def embedded_teacher(recipe: Recipe, device: str = "cpu") -> Teacher:
    from efficient_rl.lab.build import model_directory
    from efficient_rl.learner.torch_learner import load_model

    model = load_model(model_directory(recipe.distill.teacher, "distill.teacher")).to(device)
    return Teacher(model, recipe.rollout.temperature, recipe.distill.chunk_rows)


@TEACHERS.register("ray")
def remote_teacher(recipe: Recipe, device: str = "cpu") -> RemoteTeacher:
    return RemoteTeacher(teacher_actor_name(recipe))


def build_teacher(recipe: Recipe, device: str = "cpu"):
    """The recipe's teacher, or None when it does not distil."""
    if recipe.algorithm.objective != "distillation":
        return None
    return TEACHERS.get(recipe.distill.placement)(recipe, device)


def check_teacher(recipe: Recipe, student_vocab_size: int) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same."""
    from transformers import AutoConfig

    from efficient_rl.lab.build import model_directory

    teacher_vocab = AutoConfig.from_pretrained(model_directory(recipe.distill.teacher, "distill.teacher")).vocab_size
    if teacher_vocab != student_vocab_size:
        raise ConfigError(f"distill.teacher: a vocabulary of {teacher_vocab} tokens, the student's has "
                          f"{student_vocab_size}; on-policy distillation needs the student's tokenizer")
