"""`efficient-rl profile-lengths RECIPE --out stats.jsonl`: the length profile the reference-profiled
threshold reads (docs/algorithms.md#reference-profiled-threshold).

The recipe's initial model answers every training prompt `samples` times, sampled as training
samples (its thinking budget included, so the profile's lengths are the ones training will see);
the recipe's rewards score the answers; each prompt's row is the count, mean and std of its
passing answers' lengths (data/profiles.py `profile_row`). It reuses the training path: the recipe
validated and built as for training (its data, prompt variables, tokenizer, rewards and model),
the transformers engine, and the reward runner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from efficient_rl.config.loading import load_recipe
from efficient_rl.config.schema import Recipe
from efficient_rl.config.shipped import resolve_recipe
from efficient_rl.data.profiles import profile_row
from efficient_rl.driver.build import build_setup
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.eval.tradeoff import transformers_engine
from efficient_rl.rollout.base import SamplingSettings, rollout_sampling
from efficient_rl.rollout.hf import TransformersEngine

PROMPTS_PER_CALL = 64  # prompts generated and scored at a time: bounds memory, not the result
# The recipe's length shaping is set aside: its penalty may be the profiled threshold, whose
# profile this writes, and the reference is sampled as it is, under the generation limit.
PROFILING_OVERRIDES = ["algorithm.length_penalty={name: none}", "algorithm.length_cap={name: fixed}"]


def load_for_profiling(reference: str | Path, overrides: list[str]) -> Recipe:
    """The recipe a reference names (a file, else a shipped name), set for profiling."""
    return load_recipe(resolve_recipe(reference), [*overrides, *PROFILING_OVERRIDES])


def profile_lengths(recipe: Recipe, out: Path, samples: int) -> int:
    """Write the profile of the recipe's training prompts to `out`; returns the number of rows.
    `recipe`: as load_for_profiling reads it. Nothing is written before every check passed; the
    file appears whole or not at all."""
    if samples < 1:
        raise ConfigError(f"--samples: expected at least 1 answer per prompt, got {samples}")
    if out.exists():
        raise ConfigError(f"--out: {out} exists; remove it or name another file")
    plan = validate(recipe)
    setup = build_setup(plan)
    try:
        engine = (
            TransformersEngine(setup.model, setup.tokenizer)
            if setup.model is not None
            else transformers_engine(setup.model_dir, setup.tokenizer, 0, recipe.seed)
        )
        settings = rollout_sampling(recipe.rollout, samples)  # as training samples, budget forcing included
        torch.manual_seed(recipe.seed)
        rows = []
        prompts = setup.train_samples
        for start in range(0, len(prompts), PROMPTS_PER_CALL):
            rows += profile_chunk(engine, setup, prompts[start : start + PROMPTS_PER_CALL], settings)
    finally:
        setup.rewards.close()
    write_whole(out, rows)
    return len(rows)


def profile_chunk(engine, setup, prompts: list[dict], settings: SamplingSettings) -> list[dict]:
    """One row per prompt of `prompts`, from `settings.n` answers each."""
    batch = engine.generate([setup.encode(sample) for sample in prompts], prompts, list(range(len(prompts))), settings)
    result = setup.rewards.score(batch.completions, batch.samples)
    passed = (result.accuracy if result.accuracy is not None else result.scores > 0).bool().tolist()
    lengths, groups = batch.response_lengths.tolist(), batch.group_ids.tolist()
    return [
        profile_row(
            str(sample["id"]),
            [length for length, group in zip(lengths, groups) if group == index],
            [ok for ok, group in zip(passed, groups) if group == index],
        )
        for index, sample in enumerate(prompts)
    ]


def write_whole(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    staging.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(staging, out)
