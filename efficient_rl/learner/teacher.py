"""The teacher of on-policy distillation (docs/algorithms.md#on-policy-distillation):
full-vocabulary log-probabilities at chosen response positions of the student's own rollouts.

`embedded`: a frozen copy in every learner process, the way a KL reference model is held.
`ray`: one actor that every learner rank asks (cluster.backend: ray), so learner ranks do not
each hold the teacher. Its client is the Ray layer's (efficient_rl/cluster/teacher.py), which
hands it to the learner's factory: learner/ never imports Ray. Either way only the requested
positions reach the teacher's LM head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import map_row_chunks
from efficient_rl.config.schema import Recipe
from efficient_rl.errors import ConfigError
from efficient_rl.learner.objective import head_logprobs
from efficient_rl.models.modeling import DTYPES, load_model, output_head, response_hidden_states
from efficient_rl.models.sources import model_directory


class Teacher:
    def __init__(self, model, temperature: float, chunk_rows: int):
        self.model = model.eval()
        self.device = model.device
        self.temperature, self.chunk_rows = temperature, chunk_rows

    @property
    def vocab_size(self) -> int:
        return output_head(self.model).weight.shape[0]

    @torch.no_grad()
    def logprobs(self, rows: RolloutBatch, selected: torch.Tensor) -> torch.Tensor:
        """[K, V] log-softmax over the vocabulary at the K selected positions, in row-major order."""
        head = output_head(self.model)
        rows, selected = rows.to(self.device), selected.to(self.device)
        hidden = response_hidden_states(self.model, rows)[selected.bool()]
        return map_row_chunks(lambda h: head_logprobs(head, h, self.temperature), [hidden], self.chunk_rows)


def embedded_teacher(recipe: Recipe, device: torch.device) -> Teacher:
    """The teacher in model.dtype (an inference copy, like the rollout engines'); its
    log-probabilities are float32 from its logits either way."""
    model = load_model(
        model_directory(recipe.distill.teacher, "distill.teacher"),
        DTYPES[recipe.model.dtype],
        recipe.model.attn_implementation,
    ).to(device)
    return Teacher(model, recipe.rollout.temperature, recipe.distill.chunk_rows)


def build_teacher(recipe: Recipe, device: torch.device, remote=None):
    """The recipe's teacher, or None when it does not distil: an embedded one is loaded here, on
    `device`; a `ray` one is `remote`, the actor's client the Ray layer built (anything with
    `vocab_size` and `logprobs(rows, selected)`, like Teacher)."""
    if recipe.distill.teacher is None:  # the recipe checks made sure nothing needs one
        return None
    if recipe.distill.placement == "embedded":
        return embedded_teacher(recipe, device)
    if remote is None:
        raise ConfigError(
            "distill.placement: ray: the teacher actor's client comes from cluster.backend: ray, "
            "and this learner was started without one"
        )
    return remote


def check_teacher(teacher_dir: Path, student_vocab_size: int) -> None:
    """Distillation compares distributions token by token: the teacher's vocabulary (its model
    directory's) must be the student's."""
    from transformers import AutoConfig  # here: slow to import, and no CLI check needs it

    teacher_vocab = AutoConfig.from_pretrained(teacher_dir).vocab_size
    if teacher_vocab != student_vocab_size:
        raise ConfigError(
            f"distill.teacher: a vocabulary of {teacher_vocab} tokens, the student's has "
            f"{student_vocab_size}; on-policy distillation needs the student's tokenizer"
        )
