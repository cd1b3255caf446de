"""The memory planner's learner estimate against the measured peak, for small models on CPU.

Each configuration builds the torch learner as `train` does from the recipe, in a fresh
subprocess, and runs two updates; the second is measured, when the optimizer state exists as it
does for the rest of a run. The peak is the process's resident memory at its highest during that
update (VmHWM, reset after the first) less what the process held besides the learner's tensors
once the learner was built (the resident size then, less the bytes of its parameters: what the
imports of the model code took stays out). The estimate is `efficient-rl plan`'s learner total
for the same recipe (efficient_rl/config/memory.py). Every micro-batch is full: responses at
their longest, so one pass holds the planner's token budget.

Each is measured twice. "tensors": glibc told to map every allocation over 64 KiB on its own
(MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once and the peak is the
tensors' own. "glibc default": its usual heap, which keeps freed chunks of up to 32 MiB for reuse,
so the resident peak also holds fragments between them.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_plan.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

# name -> (model shape, recipe overrides); prompts PROMPT tokens, responses RESPONSE tokens
PROMPT, RESPONSE = 16, 496
CONFIGURATIONS = {
    "fp32": (
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
        ["learner.micro_batch_tokens=2048"],
    ),
    "bf16+checkpointing+packing": (
        dict(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024
        ),
        [
            "learner.micro_batch_tokens=4096",
            "learner.precision=bf16",
            "learner.gradient_checkpointing=true",
            "learner.packing=true",
        ],
    ),
    "lora-16": (
        dict(
            hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408
        ),
        ["learner.micro_batch_tokens=2048", "learner.lora.rank=16"],
    ),
}
VOCAB = 16000


def status_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the present resident size


def write_model(shape: dict, directory: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=1024, **shape)
    Qwen2ForCausalLM(config).save_pretrained(directory)


def recipe_for(model_dir: Path, overrides: list[str]):
    from efficient_rl.config.loading import load_recipe

    return load_recipe(
        ROOT / "recipes" / "grpo.yaml",
        [
            f"model.path={model_dir}",
            "model.lab=null",
            f"rollout.max_prompt_length={PROMPT}",
            f"rollout.max_response_length={RESPONSE}",
            "logging.trackers=[]",
            *overrides,
        ],
    )


def tensor_bytes(learner) -> int:
    """Bytes of the learner's parameters and buffers (the float32 masters, and a bf16 copy)."""
    modules = {id(m): m for m in (learner.model, learner.compute_model)}.values()
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in modules for t in m.state_dict().values()
    }
    return sum(storages.values())


def measure(name: str, model_dir: Path) -> dict:
    """In this (fresh) process: one update of the recipe's learner; the peak over the baseline."""
    from efficient_rl.config.memory import GIB, plan_memory
    from efficient_rl.driver.validate import validate
    from efficient_rl.learner.torch_learner import torch_learner

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learner_precision import make_batch

    recipe = recipe_for(model_dir, CONFIGURATIONS[name][1])
    plan = validate(recipe)
    estimate = plan_memory(recipe, plan.placement).devices[0]
    sequences_per_pass = recipe.learner.micro_batch_tokens // (PROMPT + RESPONSE)
    # two full passes (every response RESPONSE tokens), one optimizer step
    batch = make_batch(VOCAB, 2 * sequences_per_pass, PROMPT, RESPONSE, shortest=RESPONSE)
    learner = torch_learner(plan, model_dir, model_dir)
    baseline = status_bytes("VmRSS") - tensor_bytes(learner)
    learner.update(batch)  # allocates the optimizer state
    reset_peak()
    learner.update(batch)
    measured = status_bytes("VmHWM") - baseline
    return {
        "name": name,
        "estimate": estimate.total,
        "measured": measured,
        "terms": {term.name: term.bytes for term in estimate.terms},
        "parameters": plan_memory(recipe, plan.placement).sizes.parameters,
        "tokens": plan_memory(recipe, plan.placement).sizes.tokens,
        "gib": GIB,
    }


def run_child(name: str, model_dir: Path, environment: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--child", name, str(model_dir)]
    env = {**os.environ, **environment}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGURATIONS), help="one configuration")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]))))
        return
    names = [args.only] if args.only else list(CONFIGURATIONS)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompts {PROMPT} + responses {RESPONSE} "
        f"tokens, vocab {VOCAB}; the second update of two full passes"
    )
    print(
        f"{'':28s} {'':>9s} {'':>7s} {'':>13s} {'tensors':>20s} {'glibc default':>21s}\n"
        f"{'configuration':28s} {'params':>9s} {'tokens':>7s} {'estimate MiB':>13s} {'measured MiB':>13s} "
        f"{'ratio':>6s} {'measured MiB':>14s} {'ratio':>6s}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            model_dir = Path(scratch) / name
            write_model(CONFIGURATIONS[name][0], model_dir)
            result = run_child(name, model_dir, {"MALLOC_MMAP_THRESHOLD_": "65536"})
            heap = run_child(name, model_dir, {})
            estimate, measured = result["estimate"], result["measured"]
            print(
                f"{name:28s} {result['parameters']:9.3g} {result['tokens']:7d} {estimate / MIB:13.1f} "
                f"{measured / MIB:13.1f} {estimate / measured:6.2f} {heap['measured'] / MIB:14.1f} "
                f"{estimate / heap['measured']:6.2f}"
            )
            terms = ", ".join(f"{term} {size / MIB:.1f}" for term, size in result["terms"].items())
            print(f"{'':28s} estimate's terms (MiB): {terms}")


if __name__ == "__main__":
    main()
