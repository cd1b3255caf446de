"""Learner memory and step time, full fine-tuning vs LoRA (learner.lora), side by side in one process.

Three copies of one model (full, LoRA rank 16, LoRA rank 64 on every projection) take turns on
the same batch, step after step; the first step of each is dropped as warm-up, the rest give a
median. Memory is counted from the tensors, as in benchmarks/learner_precision.py (whose batch and
activation count this reuses): weights (with LoRA: the frozen base plus the adapters), gradients
(trainable parameters only), AdamW state as the optimizer holds it after the steps, and the
activations one micro-batch keeps for its backward.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learner_precision import activation_bytes, make_batch, side_by_side  # noqa: E402

from efficient_rl.config.schema import LoraSection  # noqa: E402
from efficient_rl.learner.objective import ObjectiveSettings  # noqa: E402
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner  # noqa: E402
from efficient_rl.models.lora import attach_lora, trainable_parameters  # noqa: E402
from efficient_rl.models.modeling import load_model  # noqa: E402
from efficient_rl.models.sources import model_directory  # noqa: E402

RANKS = {"full": None, "lora-16": 16, "lora-64": 64}  # alpha = 2 x rank: the same scale for both


def build(rank: int | None, optim: OptimSettings) -> TorchLearner:
    model = load_model(model_directory("smollm2", "model"))
    adapter = attach_lora(model, LoraSection(rank=rank, alpha=2.0 * rank)) if rank else None
    return TorchLearner(model, ObjectiveSettings(), optim, adapter=adapter)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory(learner: TorchLearner, micro) -> dict[str, int]:
    state = [t for s in learner.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "weights": nbytes(learner.model.parameters()),
        "gradients": nbytes(trainable_parameters(learner.model)),
        "optimizer": nbytes(state),
        "activations": activation_bytes(learner, micro)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    optim = OptimSettings(lr=1e-5, micro_batch_size=args.micro_batch)
    learners = {name: build(rank, optim) for name, rank in RANKS.items()}
    batch = make_batch(learners["full"].model.config.vocab_size, args.rows, args.prompt, args.response)
    print(
        f"SmolLM2-135M: batch {args.rows} rows, prompt {args.prompt}, responses up to {args.response} tokens "
        f"({int(batch.response_mask.sum())} in all), micro-batches of {args.micro_batch}; torch threads "
        f"{torch.get_num_threads()}; LoRA on {', '.join(LoraSection().target_modules)}"
    )
    times, _ = side_by_side(learners, batch, args.steps)
    micro = batch.select(range(args.micro_batch))
    figures = {name: memory(learner, micro) for name, learner in learners.items()}
    trainable = {
        name: sum(p.numel() for p in trainable_parameters(learner.model)) for name, learner in learners.items()
    }
    mib = 2**20
    print(
        f"{'':8s} {'trainable':>10s} {'median step':>12s} {'steps':>20s} {'weights':>9s} {'grads':>9s} "
        f"{'adam':>9s} {'activations':>12s} {'sum':>9s}"
    )
    for name, m in figures.items():
        print(
            f"{name:8s} {trainable[name] / 1e6:9.2f}M {statistics.median(times[name][1:]):11.2f}s "
            f"{' '.join(f'{t:.2f}' for t in times[name]):>20s} {m['weights'] / mib:8.1f}M "
            f"{m['gradients'] / mib:8.1f}M {m['optimizer'] / mib:8.1f}M {m['activations'] / mib:11.1f}M "
            f"{sum(m.values()) / mib:8.1f}M"
        )
    full = figures["full"]
    for name in ("lora-16", "lora-64"):
        m = figures[name]
        print(
            f"{name} / full: step {statistics.median(times[name][1:]) / statistics.median(times['full'][1:]):.2f}x, "
            f"optimizer state {full['optimizer']} -> {m['optimizer']} bytes "
            f"({m['optimizer'] / full['optimizer']:.4f}x), "
            f"sum {sum(m.values()) / sum(full.values()):.2f}x  (MiB = 2^20 bytes; medians without the first step)"
        )


if __name__ == "__main__":
    main()
