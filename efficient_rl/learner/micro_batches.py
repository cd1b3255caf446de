"""Which rows of a mini-batch go through one forward/backward pass together.

Row mode (`learner.micro_batch_tokens: 0`): consecutive runs of `learner.micro_batch_size` rows,
each padded to its longest prompt and response. Token budget (`micro_batch_tokens > 0`): rows
sorted by length and grouped so that each pass computes at most that many token positions,
padding included, so rows of similar length share a pass and little of it is padding. With
packing (`learner.packing`) the budget counts the packed rows (modeling.pack_rows): the same
first-fit, longest first, in rows as wide as the longest sequence of the pass.

The grouping never changes the loss: every loss is a sum over rows divided by denominators of
the whole mini-batch (learner/objective.py `denominators`), so micro-batch losses and gradients
add up to the same totals in any grouping. A sequence longer than the budget goes alone.
"""

from __future__ import annotations

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.models.modeling import sequence_lengths


def plan_micro_batches(
    rows: RolloutBatch, micro_batch_size: int, micro_batch_tokens: int, packed: bool
) -> list[list[int]]:
    """Row indices of each micro-batch."""
    if micro_batch_tokens <= 0:
        return [
            list(range(start, min(start + micro_batch_size, len(rows))))
            for start in range(0, len(rows), micro_batch_size)
        ]
    prompt_lengths, response_lengths = sequence_lengths(rows)
    plan = packed_budget if packed else padded_budget
    return plan(prompt_lengths, response_lengths, micro_batch_tokens)


def padded_budget(prompt_lengths: list[int], response_lengths: list[int], budget: int) -> list[list[int]]:
    """Rows longest response first; a pass holds rows x (longest prompt + longest response)."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-response_lengths[i], -prompt_lengths[i]))
    groups, current, widest_prompt = [], [], 0
    for index in order:
        prompt = max(widest_prompt, prompt_lengths[index])
        # sorted by response length: the group's first row has its longest response
        response = response_lengths[current[0]] if current else response_lengths[index]
        if current and (len(current) + 1) * (prompt + response) > budget:
            groups.append(current)
            current, prompt = [], prompt_lengths[index]
        current.append(index)
        widest_prompt = prompt
    return groups + [current] if current else groups


def packed_budget(prompt_lengths: list[int], response_lengths: list[int], budget: int) -> list[list[int]]:
    """Sequences longest first into rows as wide as the pass's first (longest) one, first fit; a
    pass holds rows x width positions."""
    lengths = [p + r for p, r in zip(prompt_lengths, response_lengths)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current, room = [], [], []
    for index in order:
        fit = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if fit is None:
            width = lengths[current[0]] if current else lengths[index]
            if current and (len(room) + 1) * width > budget:
                groups.append(current)
                current, room, width = [], [], lengths[index]
            room.append(width)
            fit = len(room) - 1
        room[fit] -= lengths[index]
        current.append(index)
    return groups + [current] if current else groups
