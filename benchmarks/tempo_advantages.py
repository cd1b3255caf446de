"""TEMPO advantages: the vectorised prefix tree against a per-rollout loop, side by side.

The loop has the official code's O(G²·L) structure (fatebreaker/tempo; docs/algorithms.md#tempo-advantage): for
each rollout, walk its tokens while the mask is 1, keep the siblings that still share its prefix
by comparing token by token, and once it is alone fill the rest with the GRPO advantage. It works
on Python lists (faster than the official per-element tensor indexing) and masks finished
siblings like efficient_rl.algos.tempo, so both must give the same advantages.

One group of `--rows` responses of `--length` tokens, each branching off an earlier one at a
uniformly random point (random tokens from a 50k vocabulary after it); binary rewards. Median of
`--repeats` timings each, then the vectorised time for 1k..16k tokens per response.

    .venv/bin/python benchmarks/tempo_advantages.py [--rows 16] [--length 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.tempo import tempo_advantages

VOCAB = 50_000
SCALING_LENGTHS = [1024, 2048, 4096, 8192, 16384]


def branching_group(rows: int, length: int, seed: int) -> RolloutBatch:
    """One group whose response k copies a random earlier response up to a random point."""
    gen = torch.Generator().manual_seed(seed)
    responses = torch.randint(VOCAB, (rows, length), generator=gen)
    for k in range(1, rows):
        parent = int(torch.randint(k, (1,), generator=gen))
        cut = int(torch.randint(length, (1,), generator=gen))
        responses[k, :cut] = responses[parent, :cut]
    rewards = torch.randint(2, (rows,), generator=gen).float()
    rewards[:2] = torch.tensor([1.0, 0.0])  # both outcomes present: the group std is not 0
    return RolloutBatch(
        prompt_ids=torch.ones(rows, 1, dtype=torch.long),
        prompt_mask=torch.ones(rows, 1, dtype=torch.long),
        response_ids=responses,
        response_mask=torch.ones(rows, length),
        rollout_logprobs=torch.zeros(rows, length),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.zeros(rows, dtype=torch.long),
        samples=[{}] * rows,
        completions=[""] * rows,
        rewards=rewards,
    )


def loop_advantages(batch: RolloutBatch, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The per-rollout loop: O(G²·L) comparisons in the worst case."""
    ids, mask = batch.response_ids.tolist(), batch.response_mask.tolist()
    groups, rewards = batch.group_ids.tolist(), batch.rewards.tolist()
    rows, width = len(ids), len(ids[0])
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    advantages = [[0.0] * width for _ in range(rows)]
    for i in range(rows):
        group_rewards = [rewards[k] for k in members[groups[i]]]
        mean = statistics.mean(group_rewards)
        std = statistics.stdev(group_rewards) if len(group_rewards) > 1 else 0.0
        scale = 1.0 / (std + eps) if norm_by_std else 1.0
        outcome = rewards[i] - mean
        length = int(sum(mask[i]))
        prefix = members[groups[i]]  # rollouts whose tokens so far equal row i's
        for t in range(length):
            prefix = [k for k in prefix if mask[k][t]]  # a finished sibling's pad never matches
            if len(prefix) == 1:  # alone from here on: no TD term, the GRPO advantage
                advantages[i][t:length] = [outcome * scale] * (length - t)
                break
            branch = [k for k in prefix if ids[k][t] == ids[i][t]]
            value_before = sum(rewards[k] for k in prefix) / len(prefix)
            value_including = sum(rewards[k] for k in branch) / len(branch)
            advantages[i][t] = (outcome + value_including - value_before) * scale
            prefix = branch
    return torch.tensor(advantages)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the loop uses one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batch = branching_group(args.rows, args.length, seed=0)
    vectorised, loop = tempo_advantages(batch), loop_advantages(batch)  # also warms up
    same = torch.allclose(vectorised, loop.float(), rtol=1e-5, atol=1e-6)
    max_diff = float((vectorised - loop.float()).abs().max())
    vectorised_s = median_seconds(lambda: tempo_advantages(batch), args.repeats)
    loop_s = median_seconds(lambda: loop_advantages(batch), args.repeats)
    print(
        f"one group of {args.rows} responses x {args.length} tokens, median of {args.repeats}, {args.threads} thread(s)"
    )
    print(f"{'vectorised':>12s} {'loop':>12s} {'ratio':>8s}  same advantages")
    print(
        f"{vectorised_s * 1e3:10.2f}ms {loop_s * 1e3:10.1f}ms {loop_s / vectorised_s:7.1f}x  "
        f"{same} (max |diff| {max_diff:.1e})"
    )

    print(f"\nvectorised, {args.rows} responses, median of {args.repeats}")
    print(f"{'tokens/response':>16s} {'time':>10s} {'per 1k tokens':>14s}")
    for length in SCALING_LENGTHS:
        scaled = branching_group(args.rows, length, seed=1)
        tempo_advantages(scaled)
        seconds = median_seconds(lambda: tempo_advantages(scaled), args.repeats)
        print(f"{length:16,d} {seconds * 1e3:8.2f}ms {seconds * 1e3 / (length / 1024):12.3f}ms")
    if not same:
        raise SystemExit("the vectorised and loop advantages differ")


if __name__ == "__main__":
    main()
