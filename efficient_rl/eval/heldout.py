"""Held-out evaluation during training: the metrics of `efficient-rl eval`, under the same names
with an `eval/` prefix (eval/pass@1, eval/length/mean, eval/truncation_rate, ...).

It uses the same engine and the same reward verifier as training, and runs on its own seeded
random stream so that evaluating never changes the training run's sampling.
"""

from __future__ import annotations

import math

import torch

from efficient_rl.eval.metrics import evaluation_metrics, sample_of
from efficient_rl.rollout.base import SamplingSettings
from efficient_rl.scoring.runner import REWARD_FAILURES, RewardRunner


def evaluate(
    engine,
    encode,
    rewards: RewardRunner,
    samples: list[dict],
    settings: SamplingSettings,
    seed: int,
    labels: list[str] | None = None,
) -> dict[str, float]:
    """`settings.n` samples per problem; `encode` turns a sample into its prompt token ids.
    Undefined values (no correct answer: no tokens per correct answer) are logged as NaN.
    `labels` (one per sample: the eval.variables values it was prompted with) adds every label's
    own figures as eval/<label>/<name>; the eval/<name> figures cover all samples."""
    prompts = [encode(s) for s in samples]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batch = engine.generate(prompts, samples, list(range(len(samples))), settings)
    result = rewards.score(batch.completions, batch.samples)
    correct = (result.accuracy if result.accuracy is not None else result.scores > 0).tolist()
    scored = [
        sample_of(*row)
        for row in zip(batch.completions, correct, batch.response_lengths.tolist(), batch.truncated.tolist())
    ]
    per_problem = [[] for _ in samples]
    for sample, problem in zip(scored, batch.group_ids.tolist()):
        per_problem[problem].append(sample)
    metrics = named(evaluation_metrics(per_problem), "eval/")
    for label in dict.fromkeys(labels or []):
        metrics.update(
            named(
                evaluation_metrics([problem for problem, of in zip(per_problem, labels) if of == label]),
                f"eval/{label}/",
            )
        )
    return {
        **metrics,
        **{f"eval/reward_{kind}": float(getattr(result, kind)) for kind in REWARD_FAILURES},
    }


def named(figures: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": value if math.isfinite(value) else math.nan for name, value in figures.items()}
