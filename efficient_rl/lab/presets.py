"""The lab presets: everything that determines a lab model (task, tokenizer, architecture, SFT
schedule), and the key of its cache directory.

Plain data with no torch or engine import: data sources read a preset's task from here without
pulling in the lab's build (lab/build.py, which trains with a rollout engine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from efficient_rl.lab.tasks import ArithmeticTask

LAB_VERSION = 1  # bump when the build procedure changes in a way the preset fields do not show


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class WarmStartCheck:
    """The held-out accuracy a warm start must reach before its build is accepted.

    Sampled as the recipes evaluate (grpo.yaml's eval section: temperature 0.6, top-p 0.95, 256
    tokens), on held-out problems of the preset's task drawn with their own seed.
    """

    target: float = 0.97
    problems: int = 400
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256
    extra_rounds: int = 3  # further fine-tuning rounds before giving up
    round_steps: int = 600  # steps of each further round, a cosine schedule from half the peak lr


# Fields added after the first presets were cached. Left at these values they are not part of the
# key, so the caches of presets that do not use them stay valid.
LATER_FIELDS = {"tokenizer_from": None, "check": None}


@dataclass(frozen=True)
class LabPreset:
    task: ArithmeticTask = field(default_factory=ArithmeticTask)
    model: ModelShape = field(default_factory=ModelShape)
    vocab_size: int = 400
    sft_examples: int = 20000
    sft_steps: int = 1200
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    seed: int = 0
    # Another preset whose tokenizer this model uses instead of training its own: a distillation
    # student shares its teacher's vocabulary.
    tokenizer_from: str | None = None
    check: WarmStartCheck | None = None  # None: accepted after sft_steps, however good

    def cache_key(self) -> str:
        fields = dataclasses.asdict(self)
        if self.tokenizer_from:  # a rebuilt source preset means another tokenizer
            fields["tokenizer_from"] = f"{self.tokenizer_from}-{PRESETS[self.tokenizer_from].cache_key()}"
        for name, value in LATER_FIELDS.items():
            if fields[name] == value:
                del fields[name]
        payload = json.dumps({"version": LAB_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# 1 to 5 operations: easy and hard questions in one task.
MIXED_TASK = ArithmeticTask(min_ops=1, max_ops=5, max_rechecks=10)
# Head size 32: vLLM's CPU attention has no kernel for 16.
TINY_SHAPE = ModelShape(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)

PRESETS: dict[str, LabPreset] = {
    # The quickstart's model: accurate (>= 97% held-out, checked) and wordy (~3x the shortest solution).
    "quickstart": LabPreset(check=WarmStartCheck()),
    # The mixed task with a shorter warm start, so the model errs on the long questions: for the
    # DA-DLER and TEMPO comparisons (benchmarks/lab_methods.py) and as the distillation teacher.
    "mixed": LabPreset(task=MIXED_TASK, sft_steps=900),
    # Seconds to build; for tests that need a real model, not a good one.
    "tiny": LabPreset(model=TINY_SHAPE, sft_examples=500, sft_steps=30, sft_batch_size=16),
    # On-policy distillation (efficient_rl/recipes/opd.yaml): a student a quarter of `mixed`'s size, warm-started
    # briefly on the same task with the same tokenizer; `mixed` is its teacher.
    "student": LabPreset(
        task=MIXED_TASK,
        model=dataclasses.replace(TINY_SHAPE, intermediate_size=192),
        sft_steps=1500,
        tokenizer_from="mixed",
    ),
    # One or two operations: the task a small real model (SmolLM2-135M-Instruct,
    # efficient_rl/recipes/smollm2_dler_cpu.yaml) gets some right, as data.train=lab:easy. Its own lab model is
    # a tiny one, built only if a recipe asks for model.lab=easy.
    "easy": LabPreset(
        task=ArithmeticTask(min_ops=1, max_ops=2), model=TINY_SHAPE, sft_examples=500, sft_steps=30, sft_batch_size=16
    ),
    # Seconds to build too, and it writes its answers in the lab's format: a tiny model on one- and
    # two-operation questions that re-checks up to 10 times; the budget-forcing test's.
    "tiny_rechecks": LabPreset(
        task=ArithmeticTask(min_ops=1, max_ops=2, max_rechecks=10),
        model=TINY_SHAPE,
        sft_examples=1000,
        sft_steps=300,
        sft_batch_size=16,
    ),
    # The tests' distillation pair: lab:tiny teaches it.
    "tiny_student": LabPreset(
        model=dataclasses.replace(TINY_SHAPE, num_hidden_layers=1),
        sft_examples=500,
        sft_steps=10,
        sft_batch_size=16,
        tokenizer_from="tiny",
    ),
}
