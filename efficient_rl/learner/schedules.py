"""Learning-rate schedules (learner.lr_schedule): the factor on learner.lr at each training step.

A schedule is an entry of LR_SCHEDULES: fn(step, total_steps, *, warmup_steps, ...) -> factor,
where `step` counts the updates done before this one (0 for the first) and `total_steps` is the
recipe's `steps`. It moves once per training step, whatever the number of optimizer steps in it
(PPO mini-batches), as verl's does, so `warmup_steps` counts in the unit `steps` does. Warmup is
linear and its first step already trains, at 1 / warmup_steps of the rate (a factor of 0 would
waste a whole rollout batch). Both learners apply it the same way (TorchLearner.update).
"""

from __future__ import annotations

import math

from efficient_rl.registry import Registry

# name -> fn(step, total_steps, *, warmup_steps, ...) -> factor on the base learning rate
LR_SCHEDULES: Registry = Registry("learning-rate schedule")
WARMUP = {"warmup_steps": "[0, inf)"}


def warmup(step: int, warmup_steps: int) -> float | None:
    """The warmup factor while warming up, else None."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


def decay_progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """0 at the first step after warmup, 1 at the last training step (and after it)."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))


@LR_SCHEDULES.register("constant", ranges=WARMUP, source="DLER, DAPO: a constant 1e-6, no warmup")
def constant(step: int, total_steps: int, *, warmup_steps: int = 0) -> float:
    ramp = warmup(step, warmup_steps)
    return ramp if ramp is not None else 1.0


@LR_SCHEDULES.register("linear", ranges={**WARMUP, "min_lr_ratio": "[0, 1]"})
def linear(step: int, total_steps: int, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Warmup, then a straight line down to min_lr_ratio at the last step."""
    ramp = warmup(step, warmup_steps)
    if ramp is not None:
        return ramp
    return 1.0 - (1.0 - min_lr_ratio) * decay_progress(step, total_steps, warmup_steps)


@LR_SCHEDULES.register("cosine", ranges={**WARMUP, "min_lr_ratio": "[0, 1]"})
def cosine(step: int, total_steps: int, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Warmup, then half a cosine down to min_lr_ratio at the last step."""
    ramp = warmup(step, warmup_steps)
    if ramp is not None:
        return ramp
    progress = decay_progress(step, total_steps, warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
