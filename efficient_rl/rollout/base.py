"""The rollout-engine protocol every backend implements: transformers, vLLM, Ray groups of vLLM actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.models.modeling import WHOLE_VOCABULARY, Support
from efficient_rl.registry import Registry


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1  # samples per prompt
    max_new_tokens: int = 256  # hard length cap: a response that reaches it is "truncated"
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation

    @property
    def support(self) -> Support:
        """The tokens sampled from; greedy decoding samples nothing."""
        return Support(self.top_k, self.top_p) if self.temperature > 0 else WHOLE_VOCABULARY


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], samples: list[dict], group_ids: list[int], settings: SamplingSettings
    ) -> RolloutBatch:
        """`settings.n` rollouts for every prompt, rows grouped by prompt in input order."""

    def sync_weights(self, learner) -> dict[str, float]:
        """Load the learner's current weights; returns sync metrics."""

    def pop_metrics(self) -> dict[str, float]:
        """Engine events since the last call (actor restarts), as step metrics."""

    # The overlapped pipeline (efficient_rl/driver/pipeline.py): the learner trains on while the
    # engine generates, so the weights travel as a copy taken after the update and are loaded
    # between generation requests.
    def own_weights(self) -> None:
        """Generate from weights of its own from now on, not the learner's module itself."""

    def snapshot(self, learner) -> object:
        """A copy of the learner's current weights that a later load_snapshot loads."""

    def load_snapshot(self, snapshot) -> dict[str, float]:
        """Load a snapshot (resetting any prefix cache); returns sync metrics."""


# name -> factory(plan, setup) returning a RolloutEngine, on plan.devices.rollout
ENGINES: Registry = Registry("rollout engine")
