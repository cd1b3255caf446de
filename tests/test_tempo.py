"""TEMPO prefix-tree advantages against a brute-force reference and hand-computed values.

The reference builds P_{i,t} and B_{i,t} explicitly for every token with plain loops, straight
from the definition in docs/algorithms.md#tempo-advantage (finished siblings masked).
"""

import math
import random
import statistics

import pytest
import torch

from efficient_rl.algos.advantages import ADVANTAGES
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.tempo import prefix_td, tempo_advantages, tempo_metrics

EPS = 1e-6


def make_batch(responses, rewards, group_ids, pad_tokens=None):
    """A batch of right-padded responses; pad_tokens[i] fills row i's padding (default 0)."""
    rows, width = len(responses), max(len(r) for r in responses)
    ids, mask = [], []
    for i, response in enumerate(responses):
        pad = (pad_tokens[i] if pad_tokens else [0] * width)[: width - len(response)]
        ids.append(list(response) + list(pad))
        mask.append([1.0] * len(response) + [0.0] * (width - len(response)))
    return RolloutBatch(
        prompt_ids=torch.ones(rows, 2, dtype=torch.long),
        prompt_mask=torch.ones(rows, 2, dtype=torch.long),
        response_ids=torch.tensor(ids),
        response_mask=torch.tensor(mask),
        rollout_logprobs=torch.zeros(rows, width),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.tensor(group_ids),
        samples=[{}] * rows,
        completions=[""] * rows,
        rewards=torch.tensor(rewards, dtype=torch.float),
    )


# ---------------------------------------------------------------- brute-force reference


def reference_tree(batch):
    """(td, branching) as nested lists, from explicit prefix sets per token."""
    ids, mask = batch.response_ids.tolist(), batch.response_mask.tolist()
    groups, rewards = batch.group_ids.tolist(), batch.rewards.tolist()
    rows, width = len(ids), len(ids[0])
    td = [[0.0] * width for _ in range(rows)]
    branching = [[False] * width for _ in range(rows)]
    for i in range(rows):
        for t in range(width):
            if mask[i][t] == 0:
                continue
            siblings = [k for k in range(rows) if groups[k] == groups[i]]
            before = [k for k in siblings if mask[k][t] == 1 and ids[k][:t] == ids[i][:t]]
            including = [k for k in before if ids[k][t] == ids[i][t]]
            value_before = sum(rewards[k] for k in before) / len(before)
            value_including = sum(rewards[k] for k in including) / len(including)
            td[i][t] = value_including - value_before
            branching[i][t] = len(including) < len(before)
    return td, branching


def reference_advantages(batch, norm_by_std):
    td, _ = reference_tree(batch)
    mask, groups, rewards = batch.response_mask.tolist(), batch.group_ids.tolist(), batch.rewards.tolist()
    adv = []
    for i, row_td in enumerate(td):
        group = [rewards[k] for k in range(len(rewards)) if groups[k] == groups[i]]
        mean = statistics.mean(group)
        std = statistics.stdev(group) if len(group) > 1 else 0.0
        row = []
        for t, delta in enumerate(row_td):
            value = rewards[i] - mean + delta
            if norm_by_std:
                value /= std + EPS
            row.append(value * mask[i][t])
        adv.append(row)
    return adv


def reference_metrics(batch):
    td, branching = reference_tree(batch)
    mask = batch.response_mask.tolist()
    tokens = sum(sum(row) for row in mask)
    nonzero = sum(1 for i, row in enumerate(td) for t, d in enumerate(row) if mask[i][t] and d != 0)
    return sum(map(sum, branching)) / len(td), nonzero / tokens


# ---------------------------------------------------------------- random groups with shared prefixes


def random_group(rng, size, vocab, max_len):
    """Responses that branch off earlier ones at random points, over a tiny vocabulary.

    Some are exact copies and some stop where a sibling goes on (a finished sibling).
    """
    responses = [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))]]
    while len(responses) < size:
        parent = rng.choice(responses)
        cut = rng.randint(0, len(parent))
        kind = rng.random()
        if kind < 0.1:
            responses.append(list(parent))  # a duplicate
        elif kind < 0.25 and cut > 0:
            responses.append(parent[:cut])  # ends where its parent continues
        else:
            length = rng.randint(max(cut, 1), max_len)
            responses.append(parent[:cut] + [rng.randrange(vocab) for _ in range(length - cut)])
    return responses


def random_batch(seed, groups=4, vocab=3, max_len=9):
    """Several groups (sizes 1..7, one always of one), rows shuffled, ids not contiguous, rewards dyadic.

    Padding holds random token ids of the same vocabulary, so pads often equal a longer sibling's
    real tokens. Dyadic rewards keep means exact, so "TD != 0" compares exactly with the reference.
    """
    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        size = 1 if g == 0 else rng.randint(2, 7)
        for response in random_group(rng, size, vocab, max_len):
            rows.append((response, rng.choice([0.0, 0.25, 0.5, 1.0]), 10 * g + 3))
    rng.shuffle(rows)
    responses, rewards, group_ids = zip(*rows)
    pads = [[rng.randrange(vocab) for _ in range(max_len)] for _ in rows]
    return make_batch(responses, rewards, group_ids, pads)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_matches_brute_force_on_random_groups(seed, norm_by_std):
    batch = random_batch(seed)
    adv = tempo_advantages(batch, norm_by_std=norm_by_std, eps=EPS)
    expected = torch.tensor(reference_advantages(batch, norm_by_std), dtype=torch.float)
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(30))
def test_tree_and_metrics_match_brute_force(seed):
    batch = random_batch(seed)
    td, branching = prefix_td(batch.response_ids, batch.response_mask, batch.group_ids, batch.rewards)
    expected_td, expected_branching = reference_tree(batch)
    torch.testing.assert_close(td, torch.tensor(expected_td, dtype=torch.double), rtol=0, atol=1e-12)
    assert branching.tolist() == expected_branching
    per_response, nonzero = reference_metrics(batch)
    metrics = tempo_metrics(batch)
    assert metrics["tempo/branching_tokens_per_response"] == pytest.approx(per_response)
    assert metrics["tempo/td_nonzero_fraction"] == pytest.approx(nonzero)


def test_random_batches_exercise_the_edge_cases():
    """The generator really produces branching, finished siblings and pad/real-token collisions."""
    batch = random_batch(0)
    _, branching = reference_tree(batch)
    assert sum(map(sum, branching)) > 0
    ids, mask, groups = batch.response_ids.tolist(), batch.response_mask.tolist(), batch.group_ids.tolist()
    collisions = 0
    for i in range(len(ids)):
        for k in range(len(ids)):
            end = int(sum(mask[k]))
            if groups[i] == groups[k] and end < sum(mask[i]) and ids[k][:end] == ids[i][:end]:
                collisions += ids[k][end] == ids[i][end]  # finished k's pad equals i's next real token
    assert collisions > 0


# ---------------------------------------------------------------- hand-computed

# Rewards 1, 0, 0: mean 1/3, unbiased std sqrt(1/3). Row 2's pad at t=2 is 7 (row 0's real token
# there) and row 0's pad at t=3 is 9 (row 1's): finished rows must still not match.
TINY = dict(
    responses=[[5, 6, 7], [5, 6, 8, 9], [5, 4]],
    rewards=[1.0, 0.0, 0.0],
    group_ids=[0, 0, 0],
    pad_tokens=[[9], [], [7, 9]],
)
# t=1: P = {0,1,2}, V = 1/3; rows 0,1 take 6 -> B = {0,1}, V = 1/2; row 2 takes 4 -> B = {2}, V = 0.
# t=2: row 2 has finished, P = {0,1}, V = 1/2; row 0 -> V = 1, row 1 -> V = 0. t=3: row 1 is alone.
TINY_TD = [[0.0, 1 / 6, 1 / 2, 0.0], [0.0, 1 / 6, -1 / 2, 0.0], [0.0, -1 / 3, 0.0, 0.0]]
# r_i - mean + TD, zero on padding.
TINY_DR_GRPO = [[2 / 3, 5 / 6, 7 / 6, 0.0], [-1 / 3, -1 / 6, -5 / 6, -1 / 3], [-1 / 3, -2 / 3, 0.0, 0.0]]


def test_hand_computed_tiny_group():
    batch = make_batch(**TINY)
    td, branching = prefix_td(batch.response_ids, batch.response_mask, batch.group_ids, batch.rewards)
    torch.testing.assert_close(td, torch.tensor(TINY_TD, dtype=torch.double))
    assert branching.tolist() == [[False, True, True, False], [False, True, True, False], [False, True, False, False]]
    torch.testing.assert_close(tempo_advantages(batch, norm_by_std=False), torch.tensor(TINY_DR_GRPO))
    scaled = torch.tensor(TINY_DR_GRPO) / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(tempo_advantages(batch), scaled)
    assert tempo_metrics(batch) == pytest.approx(
        {"tempo/branching_tokens_per_response": 5 / 3, "tempo/td_nonzero_fraction": 5 / 9}
    )


def test_no_branching_is_grpo_and_group_of_one_is_zero():
    batch = make_batch([[1, 2, 3]] * 3 + [[4, 4]], [1.0, 0.0, 0.5, 1.0], [0, 0, 0, 1])
    grpo = ADVANTAGES.get("grpo")(batch)
    torch.testing.assert_close(tempo_advantages(batch), grpo)
    assert tempo_advantages(batch)[3].abs().sum() == 0
    assert tempo_metrics(batch) == {"tempo/branching_tokens_per_response": 0.0, "tempo/td_nonzero_fraction": 0.0}


def test_registered_by_name():
    assert ADVANTAGES.get("tempo").function is tempo_advantages
    assert ADVANTAGES.get("tempo").metrics is tempo_metrics
