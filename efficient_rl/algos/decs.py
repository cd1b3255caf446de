"""Token-level advantage shaping (`algorithm.token_shaping`, TOKEN_SHAPERS), run on the advantages
before token and sample selection; and its one method so far, DeCS's decoupled token-level rule
(docs/algorithms.md#decs): on a correct rollout, the tokens of its necessary reasoning prefix keep
their advantage, and every token after it, redundant reasoning written once the answer was already
reached, is pushed down.

The prefix end is found outside this layer (efficient_rl/scoring/answer_reached.py needs the
verifier and the tokenizer); here it is one number per rollout, `answer_end[i]`: how many response
tokens the prefix holds. A rollout with no redundant tail has answer_end = its length.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.registry import Registry

# name -> fn(batch, **params) -> [B, R] advantages, given the batch with its advantages set. An
# entry's `metrics` (batch -> {name: value}) are logged every step.
TOKEN_SHAPERS: Registry = Registry("token-level advantage shaper")


def redundant_tokens(response_mask: torch.Tensor, answer_end: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: response tokens at positions >= answer_end[i] of the correct rollouts."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    after = positions.unsqueeze(0) >= answer_end.unsqueeze(1)
    return after & (response_mask > 0) & (correct > 0).unsqueeze(1)


def decs_advantages(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    answer_end: torch.Tensor,
    correct: torch.Tensor,
    penalty: float,
) -> torch.Tensor:
    """[B, T] advantages with DeCS's tail rule: A'_{i,t} = min(A_{i,t}, 0) - penalty on the redundant
    tokens, A_{i,t} everywhere else.

    min(A, 0) is why the rule is decoupled from the sequence: a short correct rollout's positive
    advantage would otherwise reward its redundant tail too (the paper's second flaw of
    sequence-level length rewards); the penalty keeps the tail strictly negative even where A is 0
    (a group whose rollouts are all correct), so every extra redundant token lowers the rollout's
    total advantage. Prefix tokens, wrong rollouts and padding are left exactly as they were."""
    redundant = redundant_tokens(response_mask, answer_end, correct)
    tail = advantages.clamp(max=0.0) - penalty
    return torch.where(redundant, tail, advantages)


def redundant_share(response_mask: torch.Tensor, answer_end: torch.Tensor, correct: torch.Tensor) -> float:
    """The share of the correct rollouts' response tokens that are redundant (decs/redundant_share):
    1 - the paper's share of the necessary prefix, over the batch's correct answers."""
    tokens = float((response_mask * (correct > 0).unsqueeze(1)).sum())
    return float(redundant_tokens(response_mask, answer_end, correct).sum()) / tokens if tokens else 0.0


@TOKEN_SHAPERS.register("none", source="the advantage estimator's advantages, unchanged")
def no_token_shaping(batch: RolloutBatch) -> torch.Tensor:
    return batch.advantages


def decs_metrics(batch: RolloutBatch, *, penalty: float) -> dict[str, float]:
    return {"decs/redundant_share": redundant_share(batch.response_mask, batch.answer_end, batch.correctness())}


@TOKEN_SHAPERS.register(
    "decs",
    needs=("answer_end",),
    ranges={"penalty": "[0, inf)"},
    source="DeCS (arXiv 2509.25827, code pixas/DECS), docs/algorithms.md#decs",
    metrics=decs_metrics,
)
def decs(batch: RolloutBatch, *, penalty: float = 0.1) -> torch.Tensor:
    """DeCS's tail rule on the batch's advantages. The penalty's scale is our choice (the official
    code's chunk penalty is a free hyperparameter): small next to a GRPO advantage of about 1."""
    return decs_advantages(batch.advantages, batch.response_mask, batch.answer_end, batch.correctness(), penalty)
