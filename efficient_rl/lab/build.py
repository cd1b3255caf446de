"""Build (or reuse from cache) a lab tokenizer and a warm-started tiny model.

A lab preset fixes everything that determines the model: task, tokenizer, architecture and SFT
schedule. Its hash keys the cache directory, so a second run reuses the model and changing any
field builds a new one. Directories are built under a temporary name and renamed into place, so
an interrupted build never leaves a half-written model behind.

The same preset need not give the same model on another machine: float rounding differs between
CPUs, and fine-tuning amplifies it. A preset with a `check` is therefore accepted only once its
warm start reaches a held-out accuracy; until then it fine-tunes further, and a build that never
gets there is an error, not a quietly weaker model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from efficient_rl.data.cache import cache_root
from efficient_rl.data.prompts import encode_prompt, encode_response, load_tokenizer
from efficient_rl.errors import ConfigError
from efficient_rl.lab.presets import PRESETS, LabPreset, ModelShape, WarmStartCheck
from efficient_rl.lab.sft import supervised_finetune
from efficient_rl.lab.tasks import boxed_answer, generate_problems, warm_start_traces
from efficient_rl.lab.tokenizer import train_tokenizer
from efficient_rl.rollout.base import SamplingSettings
from efficient_rl.rollout.hf import TransformersEngine

if TYPE_CHECKING:  # annotations only: transformers is slow to import
    from transformers import Qwen2ForCausalLM


class LabBuildError(ConfigError):
    """A lab build that did not reach its preset's check: one line, like a recipe error."""


def default_cache_dir() -> Path:
    return cache_root() / "lab"


def lab_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the built lab model for preset `name`, building it first if it is not cached."""
    if name not in PRESETS:
        raise KeyError(f"unknown lab preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    target = (cache_dir or default_cache_dir()) / f"{name}-{preset.cache_key()}"
    if not (target / "lab.json").exists():
        with build_lock(target):  # two processes asking at once: one builds, the other waits and reuses
            if not (target / "lab.json").exists():
                build_lab(preset, target)
    return target


@contextlib.contextmanager
def build_lock(target: Path):
    """A blocking flock beside `target`; the kernel drops it if its holder dies mid-build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_lab(preset: LabPreset, target: Path, log=print) -> None:
    """Build `preset` into `target`: in a staging directory renamed into place at the end, and
    removed if the build fails (a failed check, an interrupt), so nothing half-made is cached."""
    started = time.time()
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log(f"building lab model {target.name} (cached for later runs) ...")
    try:  # up to the rename: a stop request may raise anywhere in the block (driver/stopping.py)
        info = build_into(preset, target, staging, log)
        info["build_seconds"] = round(time.time() - started, 1)
        (staging / "lab.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
        raise
    log(f"lab model built in {info['build_seconds']} s: {info['parameters']:,} parameters")


def build_into(preset: LabPreset, target: Path, staging: Path, log) -> dict:
    """Tokenizer and fine-tuned, checked model saved in `staging`; returns the build's record."""
    problems = generate_problems(preset.task, "train", preset.sft_examples, preset.seed)
    traces = warm_start_traces(preset.task, problems, preset.seed)
    corpus = ["user assistant"] + [t["question"] for t in traces] + [t["response"] for t in traces]
    if preset.tokenizer_from:
        tokenizer = load_tokenizer(lab_model_dir(preset.tokenizer_from, target.parent))
        tokenizer.save_pretrained(staging)
    else:
        tokenizer = train_tokenizer(corpus, preset.vocab_size, staging)
    examples = [(encode_prompt(tokenizer, t["question"]), encode_response(tokenizer, t["response"])) for t in traces]
    model = new_model(preset.model, tokenizer, preset.seed)
    losses = supervised_finetune(
        model,
        examples,
        pad_id=tokenizer.pad_token_id,
        steps=preset.sft_steps,
        batch_size=preset.sft_batch_size,
        lr=preset.sft_lr,
        seed=preset.seed,
        log=log,
    )
    checks = check_warm_start(preset, target.name, model, tokenizer, examples, losses, log)
    model.save_pretrained(staging)
    info = {
        "preset": dataclasses.asdict(preset),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_sft_loss": sum(losses[-50:]) / len(losses[-50:]),
    }
    if checks:
        info["warm_start_check"] = {**checks[-1], "rounds": checks}
    return info


def check_warm_start(preset: LabPreset, name: str, model, tokenizer, examples, losses: list[float], log) -> list[dict]:
    """Fine-tune further rounds until the preset's check passes; the accuracy after each round.

    `losses` grows by each further round's losses. Raises LabBuildError if the last round still
    falls short. Without a check: nothing to do.
    """
    check = preset.check
    if check is None:
        return []
    problems = generate_problems(preset.task, "heldout", check.problems, f"{preset.seed}-check")
    results = []
    for extra_round in range(check.extra_rounds + 1):
        if extra_round:
            losses += supervised_finetune(
                model,
                examples,
                pad_id=tokenizer.pad_token_id,
                steps=check.round_steps,
                batch_size=preset.sft_batch_size,
                lr=preset.sft_lr / 2,
                seed=preset.seed + extra_round,
                log=log,
            )
        accuracy = warm_start_accuracy(model, tokenizer, problems, check, seed=preset.seed)
        results.append({"sft_steps": len(losses), "accuracy": accuracy})
        log(
            f"warm-start check after {len(losses)} SFT steps: {accuracy:.1%} held-out accuracy "
            f"(target {check.target:.0%})"
        )
        if accuracy >= check.target:
            return results
    raise LabBuildError(
        f"lab preset {name}: the warm start reached {accuracy:.1%} held-out accuracy after {len(losses)} "
        f"fine-tuning steps, below its target of {check.target:.0%}; nothing was cached (rebuild to retry, or "
        f"report the machine: a build is expected to pass)"
    )


def warm_start_accuracy(model, tokenizer, problems: list[dict], check: WarmStartCheck, seed: int) -> float:
    """Share of `problems` whose one sampled answer (the check's settings) is right."""
    engine = TransformersEngine(model, tokenizer)
    settings = SamplingSettings(
        n=1, max_new_tokens=check.max_new_tokens, temperature=check.temperature, top_p=check.top_p
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batch = engine.generate(
            [encode_prompt(tokenizer, p["question"]) for p in problems], problems, list(range(len(problems))), settings
        )
    right = [boxed_answer(text) == sample["answer"] for text, sample in zip(batch.completions, batch.samples)]
    return sum(right) / len(right)


def new_model(shape: ModelShape, tokenizer, seed: int) -> Qwen2ForCausalLM:
    from transformers import Qwen2Config, Qwen2ForCausalLM  # here: slow to import, and no CLI check needs it

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dataclasses.asdict(shape),
    )
    return Qwen2ForCausalLM(config)
