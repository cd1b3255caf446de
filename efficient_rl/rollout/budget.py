"""Budget forcing (rollout.thinking_budget), the same on every engine: two phases of plain generation.

Phase 1 generates up to the budget. A response that stopped, or that wrote the close marker itself,
is left to the policy: the first stops there, the second continues up to the length cap. One that
did neither gets the close marker and the answer prompt appended, written by the engine rather than
sampled, and continues for up to `answer_tokens` more. The continuation is a second generate call
whose prompt is the prompt, the first part and the appended tokens, so each engine only needs its
ordinary generate. The appended tokens are marked in `forced_mask`, which keeps them out of the loss
(RolloutBatch.sampled_mask); they stay in `response_mask`, since the tokens after them attend to them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.rollout.base import Row, SamplingSettings, rows_to_batch

# fn(prompts, samples, group_ids, settings) -> RolloutBatch: an engine's plain generate
Generate = Callable[[list[list[int]], list[dict], list[int], SamplingSettings], RolloutBatch]


def forced_suffix(tokenizer, close: str, answer_prompt: str) -> list[int]:
    """The tokens appended at the budget: the close marker and the answer prompt, no special tokens."""
    return tokenizer.encode(close + answer_prompt, add_special_tokens=False)


def generate_within_budget(generate: Generate, prompts, samples, group_ids, settings, tokenizer) -> RolloutBatch:
    """`settings.n` rollouts per prompt under settings.thinking_budget, in at most three generate calls:
    the first part, then the continuations of each room (forced rows share one, closed ones another)."""
    budget = settings.thinking_budget
    plain = dataclasses.replace(settings, thinking_budget=None)
    first = generate(prompts, samples, group_ids, dataclasses.replace(plain, max_new_tokens=budget.tokens))
    rows = rows_of(first, [prompt for prompt in prompts for _ in range(settings.n)])
    suffix = forced_suffix(tokenizer, budget.close, budget.answer_prompt)
    # room -> the rows continued with that many more tokens at most (one generate call each)
    continued: dict[int, list[Row]] = {}
    for row in rows:
        if not row.truncated:  # stopped within the budget
            continue
        if budget.close not in tokenizer.decode(row.tokens):  # reached the budget still reasoning
            row.extend(suffix, [0.0] * len(suffix), forced=1.0)  # no log-prob: not sampled
            room = min(budget.answer_tokens, settings.max_new_tokens - len(row.tokens))
        else:  # closed its reasoning itself: continue as if uninterrupted
            room = settings.max_new_tokens - len(row.tokens)
        if room > 0:
            continued.setdefault(room, []).append(row)
    for room, group in continued.items():
        rest = generate(
            [row.prompt + row.tokens for row in group],
            [row.sample for row in group],
            [row.group_id for row in group],
            dataclasses.replace(plain, n=1, max_new_tokens=room),
        )
        for row, more in zip(group, rows_of(rest, [row.prompt for row in group])):
            row.extend(more.tokens, more.logprobs, forced=0.0)
            row.truncated = more.truncated
    return rows_to_batch(rows, tokenizer)


def rows_of(batch: RolloutBatch, prompts: list[list[int]]) -> list[Row]:
    """The batch's rollouts as rows, each with the prompt it was generated from."""
    rows = []
    for index, prompt in enumerate(prompts):
        valid = batch.response_mask[index] > 0
        tokens = batch.response_ids[index][valid].tolist()
        rows.append(
            Row(
                prompt=prompt,
                sample=batch.samples[index],
                group_id=int(batch.group_ids[index]),
                tokens=tokens,
                logprobs=batch.rollout_logprobs[index][valid].tolist(),
                forced=[0.0] * len(tokens),
                truncated=bool(batch.truncated[index]),
            )
        )
    return rows
