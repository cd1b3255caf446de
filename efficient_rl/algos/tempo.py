"""TEMPO / Prefix-to-Tree credit assignment (docs/algorithms.md#tempo).

The responses of a group form a trie over response tokens. The value of a prefix is the mean
reward of the rollouts below it; a token's TD term is V(prefix + token) − V(prefix), which is
non-zero only where the group's responses split. TEMPO adds that term to the GRPO advantage.

Sets, for row i and response position t (response_mask[i, t] == 1):
  P_{i,t}: rollouts of i's group with the same tokens 0..t-1 that are still running at t
           (a finished sibling never matches, whatever its pad token ids are),
  B_{i,t}: the members of P_{i,t} whose token t equals i's token t.

The official code compares every rollout with its siblings token by token (O(G²·L) Python
loops). Here the rows are sorted once (by group, then lexicographically by tokens), so every
prefix's rollouts are contiguous rows and all prefix values come from segment sums: cost linear
in B × R.
"""

from __future__ import annotations

import torch

from efficient_rl.algos.advantages import ADVANTAGES, group_stats
from efficient_rl.algos.batch import RolloutBatch


def lexicographic_order(keys: torch.Tensor) -> torch.Tensor:
    """[B] row permutation sorting the rows of `keys` lexicographically (equal rows stay adjacent)."""
    _, rank = torch.unique(keys, dim=0, return_inverse=True)  # unique rows come out sorted
    return torch.argsort(rank, stable=True)


def prefix_nodes(sorted_keys: torch.Tensor) -> torch.Tensor:
    """[B, C] node index of each sorted row's prefix of key columns 0..c, numbered per column.

    Rows j-1 and j are in the same node of column c when they agree on every column up to c.
    Sorting makes each node a run of consecutive rows, so numbering the runs is a cumulative sum.
    """
    agrees = (sorted_keys[1:] == sorted_keys[:-1]).long().cummin(dim=1).values
    starts_node = torch.cat([torch.ones_like(sorted_keys[:1]), 1 - agrees])
    return starts_node.cumsum(0) - 1


def node_sums(values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """[B, R] sum of `values` over each entry's node, where nodes[:, t] numbers column t's nodes."""
    rows, width = nodes.shape
    flat = (nodes + torch.arange(width) * rows).flatten()  # node ids of different columns never collide
    totals = torch.zeros(rows * width, dtype=values.dtype).index_add_(0, flat, values.flatten())
    return totals.index_select(0, flat).view(rows, width)  # index_select: faster than totals[flat]


def prefix_td(
    response_ids: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor, rewards: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TEMPO's TD term V(s_{t+1}) − V(s_t) [B, R] (float64) and the branching tokens [B, R] (bool).

    A token branches when it splits its prefix's rollouts (|B_{i,t}| < |P_{i,t}|); every other
    token has TD exactly 0. Padding is 0 / False. Responses must be right-padded.
    """
    # Key column 0 is the group, column c > 0 is token c-1: a node of column c is one prefix of
    # length c in one group.
    keys = torch.cat([group_ids[:, None], response_ids], dim=1).long()
    order = lexicographic_order(keys)
    nodes = prefix_nodes(keys[order])
    # A rollout counts at position t only while it is running there: a finished sibling's pad ids
    # may put it in a node, but it never adds to a count or a value.
    running = response_mask[order] > 0
    live_rewards = rewards[order].double()[:, None] * running
    # P_{i,t} is the node of the prefix before token t (column t), B_{i,t} the one including it.
    before, including = nodes[:, :-1], nodes[:, 1:]
    count_before = node_sums(running.double(), before)
    count_including = node_sums(running.double(), including)
    value_before = node_sums(live_rewards, before) / count_before.clamp(min=1)
    value_including = node_sums(live_rewards, including) / count_including.clamp(min=1)
    branching = running & (count_including < count_before)
    td = torch.where(branching, value_including - value_before, 0.0)
    # Back to the batch's row order.
    unsorted_td, unsorted_branching = torch.empty_like(td), torch.empty_like(branching)
    unsorted_td[order], unsorted_branching[order] = td, branching
    return unsorted_td, unsorted_branching


def batch_td(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return prefix_td(batch.response_ids, batch.response_mask, batch.group_ids, batch.rewards)


def tempo_metrics(batch: RolloutBatch, **params) -> dict[str, float]:
    """How much of the batch TEMPO changes: branching tokens per response, share of tokens with TD != 0.

    Long responses that diverge early leave few branching tokens, and TEMPO is GRPO there
    (docs/algorithms.md#tempo-published-results, the reviewers' caveat).
    """
    td, branching = batch_td(batch)
    running = batch.response_mask > 0
    return {
        "tempo/branching_tokens_per_response": float(branching.sum()) / max(len(batch), 1),
        "tempo/td_nonzero_fraction": float(((td != 0) & running).sum()) / max(int(running.sum()), 1),
    }


@ADVANTAGES.register(
    "tempo",
    metrics=tempo_metrics,
    ranges={"eps": "(0, inf)"},
    source="TEMPO / P2T (arXiv 2509.18314), official code compute_tempo_outcome_advantage",
)
def tempo_advantages(batch: RolloutBatch, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_{i,t} = (r_i − mean_G(r) + TD_{i,t}) / (std_G(r) + eps), as the official code.

    The TD term has coefficient 1 and shares the group-std division with the outcome term.
    norm_by_std=False drops the division (Dr. GRPO form). A group of one gets 0, as with `grpo`.
    """
    mean, std, _ = group_stats(batch.rewards, batch.group_ids)
    td, _ = batch_td(batch)
    adv = (batch.rewards - mean)[:, None] + td.float()
    if norm_by_std:
        adv = adv / (std + eps)[:, None]
    return adv * batch.response_mask
