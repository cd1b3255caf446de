"""The learner protocol every backend implements (single-process torch here, DeepSpeed later)."""

from __future__ import annotations

from typing import Protocol

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.registry import Registry


class Learner(Protocol):
    model: object  # the policy module (the embedded engine generates with it directly)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Optimizer steps on one rollout batch (advantages filled in); returns step metrics."""

    def state_dict(self) -> dict:
        """Everything besides the model weights that a resume needs (optimizer state)."""

    def load_state_dict(self, state: dict) -> None: ...


LEARNERS: Registry = Registry("learner")
