"""Learner peak memory and step time when only the selected tokens reach the LM head.

One torch-learner update (forward, loss, backward, AdamW step) on a batch of long responses
with a large vocabulary, at keep ratios 1.0 (every token: the full [B, R, V] logits, as TRL and
verl compute them before masking) and below (random selections of that share of the tokens:
the body runs on the full sequences, the head, log-softmax, entropy and loss on the kept
positions only). Each ratio runs in its own process, so each peak is its own; the peak is the
process's maximum resident memory, and its growth over the updates (above the model and batch:
the optimizer state plus the update's transient peak).

    .venv/bin/python benchmarks/selected_tokens.py [--vocab 32768] [--rows 8] [--length 512] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

RATIOS = (1.0, 0.5, 0.2)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(ratio: float, vocab: int, rows: int, length: int, steps: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from efficient_rl.algos.batch import RolloutBatch
    from efficient_rl.learner.objective import ObjectiveSettings
    from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    learner = TorchLearner(Qwen2ForCausalLM(config), ObjectiveSettings(), OptimSettings(lr=1e-5, micro_batch_size=rows))
    prompt = 32
    response_mask = torch.ones(rows, length)
    batch = RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (rows, prompt)),
        prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
        response_ids=torch.randint(0, vocab, (rows, length)),
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(rows, length),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.arange(rows) // 4,
        samples=[{}] * rows,
        completions=[""] * rows,
        advantages=torch.randn(rows, length),
        loss_mask=None if ratio == 1.0 else (torch.rand(rows, length) < ratio).float(),
    )
    before, times = max_rss_mb(), []  # the model and the batch
    learner.update(batch)  # warm-up; allocates the optimizer state
    for _ in range(steps):
        started = time.perf_counter()
        learner.update(batch)
        times.append(time.perf_counter() - started)
    peak = max_rss_mb()  # ru_maxrss is the process's high-water mark over every update
    return {"ratio": ratio, "peak_mb": peak, "update_mb": peak - before, "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ratio", type=float, help="internal: measure one keep ratio, print JSON")
    args = parser.parse_args()
    if args.ratio is not None:
        print("RESULT " + json.dumps(measure(args.ratio, args.vocab, args.rows, args.length, args.steps)))
        return
    results = []
    for ratio in RATIOS:
        output = subprocess.run(
            [
                sys.executable,
                __file__,
                "--ratio",
                str(ratio),
                "--vocab",
                str(args.vocab),
                "--rows",
                str(args.rows),
                "--length",
                str(args.length),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results.append(json.loads(output.split("RESULT ", 1)[1]))
    full = results[0]
    print(f"vocab {args.vocab}, {args.rows} x {args.length} response tokens, median of {args.steps} updates")
    print(
        f"{'keep':>6s} {'peak RSS MB':>12s} {'vs keep 1.0':>12s} {'update MB':>10s} {'vs keep 1.0':>12s} "
        f"{'step s':>8s} {'vs keep 1.0':>12s}"
    )
    for r in results:
        print(
            f"{r['ratio']:6.1f} {r['peak_mb']:12.0f} {r['peak_mb'] / full['peak_mb'] - 1:+12.1%} "
            f"{r['update_mb']:10.0f} {r['update_mb'] / full['update_mb'] - 1:+12.1%} "
            f"{r['step_s']:8.2f} {r['step_s'] / full['step_s'] - 1:+12.1%}"
        )


if __name__ == "__main__":
    main()
