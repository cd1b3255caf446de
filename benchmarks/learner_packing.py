"""Learner time per step: padded row micro-batches vs token-budget micro-batches vs packing.

One batch with DLER-like length spread (responses from 20 tokens to 4x the median, most of them
short, as under a truncation penalty), a randomly initialised ~22M-parameter Qwen2, float32.
Three learners from the same initial weights take turns on the same batch, step after step; the
first step of each is dropped as warm-up, the rest give a median. Also each mode's
learner/padding_fraction (the share of computed token positions that were padding).

    .venv/bin/python benchmarks/learner_packing.py --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learner_precision import qwen2_22m, side_by_side  # noqa: E402

from efficient_rl.algos.batch import RolloutBatch  # noqa: E402
from efficient_rl.learner.objective import ObjectiveSettings  # noqa: E402
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner  # noqa: E402


def spread_batch(rows: int, median: int, vocab: int, seed: int = 0) -> RolloutBatch:
    """Response lengths log-normal around `median`, clipped to [20, 4 x median]; prompts 24-48."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (median * torch.exp(0.8 * torch.randn(rows, generator=generator))).clamp(20, 4 * median).long()
    prompts = torch.randint(24, 49, (rows,), generator=generator)
    width, prompt_width = int(lengths.max()), int(prompts.max())
    response_mask = (torch.arange(width)[None] < lengths[:, None]).float()
    prompt_mask = (torch.arange(prompt_width)[None] >= prompt_width - prompts[:, None]).long()
    return RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (rows, prompt_width), generator=generator) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(0, vocab, (rows, width), generator=generator) * response_mask.long(),
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(rows, width),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.arange(rows) // 8,
        samples=[{}] * rows,
        completions=[""] * rows,
        advantages=torch.randn(rows, 1, generator=generator) * response_mask,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--median", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per pass in row mode")
    parser.add_argument("--tokens", type=int, default=4096, help="token positions per pass in the budget modes")
    args = parser.parse_args()
    modes = {  # name -> (micro_batch_tokens, packing)
        "rows": (0, False),
        "token budget": (args.tokens, False),
        "packing": (args.tokens, True),
    }
    base = ObjectiveSettings()
    learners = {
        name: TorchLearner(
            qwen2_22m(),
            dataclasses.replace(base, packing=packing),
            OptimSettings(lr=1e-6, micro_batch_size=args.micro_batch, micro_batch_tokens=tokens),
        )
        for name, (tokens, packing) in modes.items()
    }
    batch = spread_batch(args.rows, args.median, learners["rows"].model.config.vocab_size)
    lengths = batch.response_lengths.float()
    print(
        f"{args.rows} rows, response lengths min {int(lengths.min())} median {int(lengths.median())} max "
        f"{int(lengths.max())}, {int(lengths.sum())} response tokens; rows mode: {args.micro_batch} rows per pass, "
        f"budget modes: {args.tokens} positions per pass; torch threads {torch.get_num_threads()}"
    )
    times, metrics = side_by_side(learners, batch, args.steps)
    rows_median = statistics.median(times["rows"][1:])
    for name in modes:
        median = statistics.median(times[name][1:])
        print(
            f"{name:13s} median step {median:6.3f} s ({' '.join(f'{t:.2f}' for t in times[name])}), "
            f"padding fraction {metrics[name]['learner/padding_fraction']:.3f}, speed-up vs rows "
            f"{rows_median / median:.2f}x, loss {metrics[name]['loss']:.6f}"
        )


if __name__ == "__main__":
    main()
