"""A recipe once checked: what every component is built from (driver/validate.py makes it).

Every registry entry the recipe picks is bound here, once, to its checked parameters; the trainer,
selection, the objective, the learners (in Ray actors too) and the pipeline read their entries
from the plan and never bind a raw choice again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from efficient_rl.algos.shaping import GatedPenalty
from efficient_rl.config.placement import Placement
from efficient_rl.config.schema import Recipe
from efficient_rl.registry import Bound


@dataclass(frozen=True)
class Devices:
    """Where each role computes, "cpu" or "cuda", resolved from model.device by driver/validate.py.
    Each process turns its role's into a torch.device (models/modeling.py torch_device)."""

    learner: str  # the policy, its KL reference and a teacher the learner holds itself
    rollout: str  # the rollout engines (embedded: the learner's own model)
    teacher: str  # the distillation teacher: the learner's device, or a Ray-hosted teacher's


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    choices: Mapping[str, Bound]  # field path ("algorithm.advantage") -> its entry, bound
    needs: Mapping[str, str]  # what the picked entries need (NEEDS in registry.py) -> the field that needs it
    variables: Mapping[str, Bound]  # prompt.variables: name -> its PROMPT_VARIABLES entry, bound
    trackers: tuple[Bound, ...]  # logging.trackers, in order
    placement: Placement  # where the Ray actors go (cluster.backend ray); resolved for every recipe
    devices: Devices
    length_penalty: GatedPenalty  # algorithm.length_penalty behind algorithm.length_gate: what shapes rewards

    def __getitem__(self, dotted: str) -> Bound:
        return self.choices[dotted]
