"""The learner protocol every backend implements: single-process torch, DeepSpeed ranks, Ray groups."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.registry import Registry


class Learner(Protocol):
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Optimizer steps on one rollout batch (advantages filled in); returns step metrics."""

    def token_statistics(self, batch: RolloutBatch, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """[B, R] per-token statistics of the current policy by TOKEN_STATISTICS name (entropy,
        divergences from the teacher...): what the token selector needs, in one call."""

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The full current weights (tied parameters once), for the rollout engines."""

    def save(self, directory: Path) -> None:
        """Weights in Hugging Face format plus whatever a resume needs (optimizer state)."""

    def load_state(self, directory: Path) -> None:
        """Restore the optimizer state saved by `save` (the weights were loaded from there), and
        the float32 master weights where the checkpoint's model files round them."""


# name -> factory(recipe, model_dir, base_model_dir, model=None, teacher=None) returning a Learner;
# `teacher` is a distillation teacher built elsewhere (the Ray layer's client of its teacher actor).
LEARNERS: Registry = Registry("learner")
