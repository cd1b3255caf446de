"""Learner step time and memory, float32 vs bf16 (learner.precision), side by side in one process.

Two copies of one model, one per precision, take turns on the same batch, step after step; the
first step of each is dropped as warm-up, the rest give a median. Memory is counted from the
tensors themselves, not from the process (both learners share it): weights (bf16: the float32
masters and the bf16 copy the passes run on), gradients and AdamW state (float32 in both), and
the activations: every tensor the autograd graph keeps for the backward of one micro-batch,
counted once per storage and not counting the parameters themselves. Also the bytes one weight
sync sends in each dtype.

    .venv/bin/python benchmarks/learner_precision.py --model qwen2-22m --steps 6
    .venv/bin/python benchmarks/learner_precision.py --model smollm2 --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from efficient_rl.algos.batch import RolloutBatch  # noqa: E402
from efficient_rl.learner.objective import ObjectiveSettings  # noqa: E402
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner  # noqa: E402
from efficient_rl.models.modeling import PRECISIONS, load_model  # noqa: E402
from efficient_rl.models.sources import model_directory  # noqa: E402


def qwen2_22m() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).float()


MODELS = {"qwen2-22m": qwen2_22m, "smollm2": lambda: load_model(model_directory("smollm2", "model"))}


def make_batch(
    vocab: int, rows: int, prompt: int, response: int, seed: int = 0, shortest: int | None = None
) -> RolloutBatch:
    """Random rows whose responses are `shortest` (a quarter of `response` unless given) to
    `response` tokens long."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(response // 4 if shortest is None else shortest, response + 1, (rows,), generator=generator)
    response_mask = (torch.arange(response)[None] < lengths[:, None]).float()
    return RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (rows, prompt), generator=generator),
        prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
        response_ids=torch.randint(0, vocab, (rows, response), generator=generator) * response_mask.long(),
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(rows, response),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.arange(rows) // 4,
        samples=[{}] * rows,
        completions=[""] * rows,
        advantages=torch.randn(rows, 1, generator=generator) * response_mask,
    ).trim_padding()


def activation_bytes(learner: TorchLearner, rows: RolloutBatch) -> tuple[int, int]:
    """Bytes of the tensors kept for the backward of one micro-batch (parameters excluded), and
    the float32 part of them."""
    parameters = {
        p.untyped_storage().data_ptr() for module in (learner.model, learner.policy) for p in module.parameters()
    }
    kept: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, float32?)

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = (storage.nbytes(), tensor.dtype == torch.float32)
        return tensor

    den = learner._mini_batch(rows).den
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = learner._micro_batch_loss(rows, den)
    loss.backward()
    learner.model.zero_grad(set_to_none=True)
    return sum(size for size, _ in kept.values()), sum(size for size, f32 in kept.values() if f32)


def state_bytes(learner: TorchLearner) -> dict[str, int]:
    def nbytes(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    masters = nbytes(learner.model)
    copy = 0 if learner.policy is learner.model else nbytes(learner.policy)
    optimizer = sum(
        t.numel() * t.element_size()
        for state in learner.optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    return {
        "weights": masters + copy,
        "gradients": masters,
        "optimizer": optimizer,
    }  # gradients: float32, like the masters


def side_by_side(learners: dict[str, TorchLearner], batch: RolloutBatch, steps: int) -> tuple[dict, dict]:
    """Each learner updates on `batch` in turn, `steps` times: (name -> seconds of each step,
    name -> metrics of its last step). Taking turns spreads a shared machine's load over all."""
    times, metrics = {name: [] for name in learners}, {}
    for _ in range(steps):
        for name, learner in learners.items():
            started = time.perf_counter()
            metrics[name] = learner.update(batch)
            times[name].append(time.perf_counter() - started)
    return times, metrics


def matmul_ratio(size: int = 1024, repeats: int = 5) -> float:
    """Median time of a bf16 matmul over a float32 one of the same shape. Whether bf16 pays on a
    CPU depends on it: with AVX-512 BF16 / AMX oneDNN multiplies bf16 natively; on AVX2 it
    converts, and bf16 is slower than float32."""
    medians = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        medians[dtype] = statistics.median(times[1:])
    return medians[torch.bfloat16] / medians[torch.float32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="qwen2-22m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    objective = ObjectiveSettings()
    learners = {}
    for precision in PRECISIONS:
        model = MODELS[args.model]()
        learners[precision] = TorchLearner(
            model,
            objective,
            OptimSettings(lr=1e-6, micro_batch_size=args.micro_batch, precision=precision),
            sync_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[precision],
        )
    vocab = learners["fp32"].model.config.vocab_size
    batch = make_batch(vocab, args.rows, args.prompt, args.response)
    parameters = sum(p.numel() for p in learners["fp32"].model.parameters())
    print(
        f"{args.model}: {parameters / 1e6:.1f}M parameters; batch {args.rows} rows, prompt {args.prompt}, "
        f"responses {int(batch.response_lengths.min())}-{int(batch.response_lengths.max())} tokens "
        f"({int(batch.response_mask.sum())} in all), micro-batches of {args.micro_batch}; torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}: a 1024 x 1024 matmul takes "
        f"{matmul_ratio():.1f}x as long in bf16 as in float32"
    )
    times, _ = side_by_side(learners, batch, args.steps)
    micro = batch.select(range(args.micro_batch))
    memory, float32_activations = {}, {}
    for precision, learner in learners.items():
        activations, float32_activations[precision] = activation_bytes(learner, micro)
        memory[precision] = {**state_bytes(learner), "activations": activations}
    sync = {
        precision: sum(b.nbytes for b in learner.weight_plan(64 * 2**20)) for precision, learner in learners.items()
    }
    mib = 2**20
    print(
        f"{'':6s} {'median step':>12s} {'steps':>30s} {'weights':>9s} {'grads':>9s} {'adam':>9s} "
        f"{'activations':>12s} {'sum':>9s} {'sync':>9s}"
    )
    for precision in learners:
        m = memory[precision]
        print(
            f"{precision:6s} {statistics.median(times[precision][1:]):11.3f}s "
            f"{' '.join(f'{t:.2f}' for t in times[precision]):>30s} {m['weights'] / mib:8.1f}M "
            f"{m['gradients'] / mib:8.1f}M {m['optimizer'] / mib:8.1f}M {m['activations'] / mib:11.1f}M "
            f"{sum(m.values()) / mib:8.1f}M {sync[precision] / mib:8.1f}M"
        )
    ratio = lambda key: memory["bf16"][key] / memory["fp32"][key]  # noqa: E731
    print(
        f"bf16 / fp32: step {statistics.median(times['bf16'][1:]) / statistics.median(times['fp32'][1:]):.2f}x, "
        f"activations {ratio('activations'):.2f}x, "
        f"sum {sum(memory['bf16'].values()) / sum(memory['fp32'].values()):.2f}x, "
        f"sync bytes {sync['bf16'] / sync['fp32']:.2f}x  (MiB = 2^20 bytes; medians without the first step)"
    )
    print(
        f"float32 part of bf16's activations (the RMSNorms' float32 inputs, small per-token values): "
        f"{float32_activations['bf16'] / mib:.1f}M of {memory['bf16']['activations'] / mib:.1f}M"
    )


if __name__ == "__main__":
    main()
