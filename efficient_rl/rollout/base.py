"""The rollout-engine protocol every backend implements: transformers, vLLM, Ray groups of vLLM actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.models.modeling import WHOLE_VOCABULARY, Support
from efficient_rl.registry import Registry


@dataclass(frozen=True)
class ThinkingBudget:
    """Budget forcing (rollout/budget.py): after `tokens` tokens without `close`, the engine appends
    `close` + `answer_prompt` and lets the answer run for up to `answer_tokens` more."""

    tokens: int
    close: str
    answer_prompt: str = ""
    answer_tokens: int = 64


def thinking_budget(section) -> ThinkingBudget | None:
    """rollout.thinking_budget (config/schema.py ThinkingBudgetSection) as the engines take it; 0 tokens is off."""
    if section.tokens == 0:
        return None
    return ThinkingBudget(section.tokens, section.close, section.answer_prompt, section.answer_tokens)


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1  # samples per prompt
    max_new_tokens: int = 256  # hard length cap: a response that reaches it is "truncated"
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    thinking_budget: ThinkingBudget | None = None  # None: no budget forcing

    @property
    def support(self) -> Support:
        """The tokens sampled from; greedy decoding samples nothing."""
        return Support(self.top_k, self.top_p) if self.temperature > 0 else WHOLE_VOCABULARY


def rollout_sampling(rollout, n: int) -> SamplingSettings:
    """The recipe's `rollout` section (config/schema.py RolloutSection) as the engines take it,
    `n` answers a prompt: training's rollouts, and what else must sample as training does (the
    reference's length profile)."""
    return SamplingSettings(
        n=n,
        max_new_tokens=rollout.max_response_length,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        thinking_budget=thinking_budget(rollout.thinking_budget),
    )


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, device=device)
            mask[row, width - len(seq) :] = 1
    return ids, mask


@dataclass
class Row:
    """One rollout as an engine hands it over, or while it is being assembled (budget forcing):
    its prompt, tokens and log-probs so far."""

    prompt: list[int]
    sample: dict
    group_id: int
    tokens: list[int]
    logprobs: list[float]
    forced: list[float]  # 1.0 where the engine wrote the token
    truncated: bool

    def extend(self, tokens: list[int], logprobs: list[float], forced: float) -> None:
        self.tokens, self.logprobs = self.tokens + tokens, self.logprobs + logprobs
        self.forced = self.forced + [forced] * len(tokens)


def rows_to_batch(rows: list[Row], tokenizer) -> RolloutBatch:
    """Assembled rollouts as a batch on the host, tokens an engine appended (budget forcing) in
    forced_mask: what every engine that hands its completions over as lists returns."""
    host, pad = torch.device("cpu"), tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([row.prompt for row in rows], pad, host)
    width = max(len(row.tokens) for row in rows)
    shape = (len(rows), width)
    response_ids = torch.full(shape, pad, dtype=torch.long, device=host)
    response_mask, logprobs, forced = (torch.zeros(shape, device=host) for _ in range(3))
    for index, row in enumerate(rows):
        end = len(row.tokens)
        response_ids[index, :end] = torch.tensor(row.tokens, dtype=torch.long, device=host)
        response_mask[index, :end] = 1.0
        logprobs[index, :end] = torch.tensor(row.logprobs, device=host)
        forced[index, :end] = torch.tensor(row.forced, device=host)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=logprobs,
        truncated=torch.tensor([row.truncated for row in rows], device=host),
        group_ids=torch.tensor([row.group_id for row in rows], dtype=torch.long, device=host),
        samples=[row.sample for row in rows],
        completions=[tokenizer.decode(row.tokens, skip_special_tokens=True) for row in rows],
        forced_mask=forced,
    )


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
