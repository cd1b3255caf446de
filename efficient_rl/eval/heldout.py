"""Held-out evaluation: accuracy and response length of the current policy.

It uses the same engine and the same reward verifier as training, and runs on its own seeded
random stream so that evaluating never changes the training run's sampling.
"""

from __future__ import annotations

import torch

from efficient_rl.reward import RewardRunner
from efficient_rl.rollout.base import SamplingSettings


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float).quantile(q)) if values else 0.0


def length_stats(lengths: list[float], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}/mean": sum(lengths) / len(lengths) if lengths else 0.0,
        f"{prefix}/p50": percentile(lengths, 0.5),
        f"{prefix}/p90": percentile(lengths, 0.9),
        f"{prefix}/max": max(lengths, default=0.0),
    }


def evaluate(engine, encode, rewards: RewardRunner, samples: list[dict], settings: SamplingSettings,
             seed: int) -> dict[str, float]:
    """pass@1 (averaged over settings.n samples per problem) and response-length statistics.

    `encode` turns a sample into its prompt token ids.
    """
    prompts = [encode(s) for s in samples]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batch = engine.generate(prompts, samples, list(range(len(samples))), settings)
    result = rewards.score(batch.completions, batch.samples)
    correct = result.accuracy if result.accuracy is not None else (result.scores > 0).float()
    lengths = batch.response_lengths.float().tolist()
    return {
        "eval/accuracy": float(correct.mean()),
        **length_stats(lengths, "eval/response_length"),
        "eval/truncated_ratio": float(batch.truncated.float().mean()),
        "eval/reward_errors": float(result.errors),
        "eval/reward_timeouts": float(result.timeouts),
    }
