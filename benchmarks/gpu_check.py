"""The first session on a GPU machine, rehearsed on the CPU by every `make test`.

    python benchmarks/gpu_check.py                    # on a GPU: Qwen2.5-1.5B's shape, bf16
    python benchmarks/gpu_check.py --scale tiny --device cpu   # what the test suite runs

One JSON line per phase, so a session that is cut short still reports what it measured:
  environment  torch, CUDA, the GPU and its memory, the packages a bare CUDA image has
  learner      the torch learner in bf16 on a randomly initialised model of the scale's shape:
               tokens/s, MFU (6 x parameters per token, recomputation not counted), peak memory,
               packed and padded
  head         the log-prob head's peak at several token counts against the memory planner's
               term for it (config/memory.py)
  buckets      the weight buckets' round trip through device memory: packed on the device, to
               the host (what Ray's object store carries), back into one device buffer, unpacked
  greedy       the transformers engine's greedy tokens on the device equal the CPU's
It needs only torch, transformers and this checkout (no vLLM, Ray or DeepSpeed, no network):
run it from the repository root with PYTHONPATH=. on a bare CUDA image. A failed phase prints
its error and the next one runs; the exit code says whether every phase passed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.config.memory import fused_head_bytes
from efficient_rl.errors import one_line
from efficient_rl.learner.objective import ObjectiveSettings
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner, enable_gradient_checkpointing
from efficient_rl.models.fused_head import HeadTiles, fused_token_logprobs
from efficient_rl.models.weights import WeightBucket, plan_buckets


@dataclass(frozen=True)
class Scale:
    shape: dict  # Qwen2 config fields
    rows: int  # rollouts per update
    prompt_tokens: int
    response_tokens: tuple[int, int]  # response lengths drawn in this range
    micro_batch_tokens: int
    updates: int  # timed updates, after one to warm up
    head_tokens: tuple[int, ...]
    head_tiles: HeadTiles = HeadTiles()  # the recipe's defaults


QWEN2_5_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
SCALES = {
    "full": Scale(QWEN2_5_1_5B, 32, 512, (256, 3500), 8192, 3, (4096, 8192, 16384)),
    "tiny": Scale(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
        8,
        16,
        (8, 96),
        256,
        1,
        (64, 128, 256),
        HeadTiles(48, 200),  # dividing neither the tokens nor the vocabulary
    ),
}
# Dense bf16 tensor-core peak (FLOP/s) by the GPU's name, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


# ---------------------------------------------------------------- memory
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once on the CPU, where no allocator counts them: every
    storage an operation returns is counted until it is freed."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view of an input (a slice of a weight made before the block) is no new storage.
        tensors = [arg for arg in tree_leaves((args, kwargs)) if isinstance(arg, torch.Tensor)]
        inputs = {tensor.untyped_storage().data_ptr() for tensor in tensors}
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.count(tensor.untyped_storage())
        return out

    def count(self, storage) -> None:
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self.release, key, storage.nbytes())

    def release(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.now -= nbytes


class PeakMemory:
    """Peak bytes allocated within the block, above what was allocated when it began."""

    def __init__(self, device: torch.device):
        self.device, self.meter, self.bytes = device, None, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.meter = LiveBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.meter.__exit__(*exc)
            self.bytes = self.meter.peak
        return False


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 4)


# ---------------------------------------------------------------- phases
def environment(device: torch.device, scale: Scale) -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("peft", "accelerate", "vllm", "ray", "deepspeed", "flash_attn"):
        found[package] = installed(package)
    found["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found.update(
            cuda=torch.version.cuda,
            gpu=properties.name,
            gpu_memory_gib=gib(properties.total_memory),
            capability=f"{properties.major}.{properties.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            gpus=torch.cuda.device_count(),
        )
    return found


def installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def random_model(scale: Scale, device: torch.device, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**scale.shape, attn_implementation="sdpa")
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype)


def random_batch(scale: Scale, device: torch.device) -> RolloutBatch:
    """Rollouts of random tokens with random advantages: prompts of one length, responses of many."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    vocab, low, high = scale.shape["vocab_size"], *scale.response_tokens
    lengths = torch.randint(low, high + 1, (scale.rows,), generator=generator, device="cpu")
    width = int(lengths.max())
    response_mask = (torch.arange(width, device="cpu")[None] < lengths[:, None]).float()
    response_ids = torch.randint(0, vocab, (scale.rows, width), generator=generator, device="cpu")
    prompt_ids = torch.randint(0, vocab, (scale.rows, scale.prompt_tokens), generator=generator, device="cpu")
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=torch.full(response_mask.shape, -2.0, device="cpu") * response_mask,
        truncated=torch.zeros(scale.rows, dtype=torch.bool, device="cpu"),
        group_ids=torch.arange(scale.rows, device="cpu") // 4,
        samples=[{}] * scale.rows,
        completions=[""] * scale.rows,
        advantages=torch.randn(scale.rows, 1, generator=generator, device="cpu") * response_mask,
    ).to(device)


def learner(device: torch.device, scale: Scale) -> dict:
    batch = random_batch(scale, device)
    tokens = int(batch.prompt_mask.sum() + batch.response_mask.sum())
    results = {"tokens_per_update": tokens}
    for name, packed in (("packed", True), ("padded", False)):
        model = random_model(scale, device)
        enable_gradient_checkpointing(model)
        parameters = sum(p.numel() for p in model.parameters())
        optim = OptimSettings(
            lr=1e-6, micro_batch_size=scale.rows, micro_batch_tokens=scale.micro_batch_tokens, precision="bf16"
        )
        learner = TorchLearner(model, ObjectiveSettings(packing=packed), optim)
        learner.update(batch)  # warm-up: kernels, allocator, optimizer state
        with PeakMemory(device) as peak:
            started = time.perf_counter()
            for _ in range(scale.updates):
                metrics = learner.update(batch)
            synchronize(device)
            seconds = (time.perf_counter() - started) / scale.updates
        results[name] = {
            "tokens_per_second": round(tokens / seconds, 1),
            "mfu": mfu(6 * parameters * tokens / seconds, device),
            "peak_gib_above_state": gib(peak.bytes),
            "padding_fraction": round(metrics["learner/padding_fraction"], 4),
            "loss_finite": bool(torch.isfinite(torch.tensor(metrics["loss"], device="cpu"))),
        }
        results["parameters"] = parameters
        del learner, model
        free(device)
    return results


def mfu(flops_per_second: float, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(device).name
    peak = next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)
    return round(flops_per_second / peak, 4) if peak else None


def head(device: torch.device, scale: Scale) -> dict:
    """The learner's fused head on bf16 inputs, forward and backward, against the planner's bytes
    (config/memory.py fused_head_bytes: float32 tiles, gradients and widened copies)."""
    hidden_size, vocab = scale.shape["hidden_size"], scale.shape["vocab_size"]
    weight = torch.randn(vocab, hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    results = {}
    for tokens in scale.head_tokens:
        hidden = torch.randn(tokens, hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,), device=device)
        tiles = scale.head_tiles
        estimate = fused_head_bytes(tokens, vocab, hidden_size, 2, tiles.tokens, tiles.vocab)
        with PeakMemory(device) as peak:
            picked, entropy = fused_token_logprobs(hidden, weight, None, targets, 1.0, True, tiles)
            picked.sum().backward()
            del picked, entropy
        # the input gradients (a hidden and a weight's worth) are not the head's own
        measured = peak.bytes - 2 * (hidden.numel() + weight.numel())
        results[str(tokens)] = {
            "measured_gib": gib(measured),
            "planner_gib": gib(estimate),
            "ratio": round(measured / estimate, 3),
        }
        weight.grad = None
        del hidden
        free(device)
    return results


def buckets(device: torch.device, scale: Scale) -> dict:
    """Pack on the device, carry to the host, receive into one device buffer, unpack: bit-equal."""
    model = random_model(scale, device, torch.bfloat16)
    named = [(name, parameter.detach()) for name, parameter in model.named_parameters()]
    plans = plan_buckets([(tensor.numel(), tensor.dtype) for _, tensor in named], 512 * 2**20)
    buffer = torch.empty(max(sum(named[i][1].nbytes for i in plan) for plan in plans), dtype=torch.uint8, device=device)
    equal, moved = True, 0
    started = time.perf_counter()
    for plan in plans:
        on_host = WeightBucket.pack([named[i] for i in plan]).on_host()
        payload = buffer[: on_host.nbytes]
        payload.copy_(torch.from_numpy(on_host.payload))
        received = WeightBucket(on_host.names, on_host.shapes, on_host.dtype, payload).unpack()
        equal &= all(torch.equal(tensor, named[i][1]) for (_, tensor), i in zip(received, plan))
        moved += on_host.nbytes
    synchronize(device)
    seconds = time.perf_counter() - started
    del model, buffer
    free(device)
    return {
        "buckets": len(plans),
        "gib": gib(moved),
        "gib_per_second": round(moved / 2**30 / seconds, 3),
        "equal": equal,
    }


def greedy(device: torch.device, scale: Scale) -> dict:
    """A small random model's greedy answers with the transformers engine, on the device and on the CPU."""
    from efficient_rl.lab.tokenizer import train_tokenizer
    from efficient_rl.rollout.base import SamplingSettings
    from efficient_rl.rollout.hf import TransformersEngine

    corpus = [f"{a} plus {b} is {a + b}" for a in range(60) for b in range(60)]
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = train_tokenizer(corpus, 256, Path(directory))
    small = replace(SCALES["tiny"], shape={**SCALES["tiny"].shape, "vocab_size": len(tokenizer)})
    prompts = [tokenizer.encode(text) for text in corpus[:: len(corpus) // 8][:8]]
    settings = SamplingSettings(n=1, max_new_tokens=32, temperature=0.0)
    answers = {}
    for where in dict.fromkeys((torch.device("cpu"), device)):
        engine = TransformersEngine(random_model(small, where), tokenizer)
        batch = engine.generate(prompts, [{}] * len(prompts), list(range(len(prompts))), settings)
        answers[where.type] = batch.response_ids[batch.response_mask > 0].tolist()
    return {"equal": answers["cpu"] == answers[device.type], "tokens": len(answers["cpu"])}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


PHASES = {"environment": environment, "learner": learner, "head": head, "buckets": buckets, "greedy": greedy}
# What a phase must show to pass, beyond running.
CHECKS = {
    "learner": lambda r: r["packed"]["loss_finite"] and r["padded"]["loss_finite"],
    "buckets": lambda r: r["equal"],
    "greedy": lambda r: r["equal"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of " + ", ".join(PHASES))
    options = parser.parse_args(argv)
    device, scale, passed = torch.device(options.device), SCALES[options.scale], True
    for name in options.phases.split(","):
        started = time.perf_counter()
        try:
            result = PHASES[name](device, scale)
            ok = CHECKS.get(name, lambda r: True)(result)
        except Exception as err:  # the next phase still runs: one line says what failed
            result, ok = {"error": f"{type(err).__name__}: {one_line(err, 400)}"}, False
        passed &= ok
        line = {"phase": name, "ok": ok, "seconds": round(time.perf_counter() - started, 2), **result}
        print(json.dumps(line), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
