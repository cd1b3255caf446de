"""The interval every number of a recipe must lie in, and the check of a whole recipe against them."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable

from efficient_rl.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """Where a number may lie, written as in mathematics: "(0, 1]", "[0, inf)"."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        low, high = (float(bound) for bound in text[1:-1].split(","))
        return cls(low, high, text[0] == "(", text[-1] == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below  # NaN is in no interval: every comparison with it is false

    def __str__(self) -> str:
        """As the condition of a message: "> 0", "in (0, 1]", or nothing for any number."""
        lower = f"{'>' if self.low_open else '>='} {self.low:g}"
        upper = f"{'<' if self.high_open else '<='} {self.high:g}"
        bounded = {(False, False): "", (True, False): lower, (False, True): upper}
        return bounded.get(
            (self.low > -math.inf, self.high < math.inf),
            f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}",
        )


# Every number of a recipe, by dotted path (list items share their list's path): the interval it
# must lie in, and why where that is not obvious. Floats must be finite besides: nothing in a
# recipe means anything at NaN or infinity. tests/test_config.py checks that no numeric field of
# the dataclasses above is missing here.
ANY = "(-inf, inf)"
ROLE_RULES = {"workers": "[1, inf)", "cpus": "[0, inf)", "gpus": "[0, inf)"}
NUMBER_RULES: dict[str, str | tuple[str, str]] = {
    "steps": "[1, inf)",
    "seed": "[0, inf)",
    "data.train_size": "[1, inf)",
    "data.heldout_size": "[1, inf)",
    "rollout.group_size": "[1, inf)",
    "rollout.prompts_per_step": "[1, inf)",
    "rollout.max_prompt_length": "[1, inf)",
    "rollout.max_response_length": "[1, inf)",
    "rollout.temperature": ("(0, inf)", "the learner divides logits by it; greedy 0 is for eval.temperature only"),
    "rollout.top_p": "(0, 1]",
    "rollout.top_k": "[0, inf)",
    "rollout.max_batch_size": "[1, inf)",
    "rollout.thinking_budget.tokens": ("[0, inf)", "0 means off"),
    "rollout.thinking_budget.answer_tokens": "[1, inf)",
    "rollout.vllm.gpu_memory_utilization": "(0, 1]",
    "rollout.vllm.tensor_parallel_size": "[1, inf)",
    "rollout.vllm.max_num_seqs": "[1, inf)",
    "rollout.vllm.cpu_kv_cache_gb": ("(0, inf)", "GiB"),
    "reward.weight": (ANY, "negative for a penalty"),
    "scoring.workers": ("[0, inf)", "0 calls rewards in the trainer"),
    "scoring.timeout": ("(0, inf)", "seconds"),
    "algorithm.kl_coef": "[0, inf)",
    "algorithm.length_gate.difficulty.lower": (ANY, "the band's lower end, included"),
    "algorithm.length_gate.difficulty.upper": (ANY, "the band's upper end, included"),
    "distill.chunk_rows": "[1, inf)",
    "learner.lr": "(0, inf)",
    "learner.weight_decay": "[0, inf)",
    "learner.betas": "[0, 1)",
    "learner.grad_clip": ("(0, inf)", "gradients are clipped to this norm; none for no clipping"),
    "learner.max_skipped_steps": ("[1, inf)", "consecutive skipped optimizer steps that stop the run"),
    "learner.dist_timeout_minutes": ("(0, inf)", "minutes a collective may wait"),
    "learner.mini_batch_prompts": ("[0, inf)", "0 means the whole batch"),
    "learner.micro_batch_size": "[1, inf)",
    "learner.micro_batch_tokens": ("[0, inf)", "0 means micro_batch_size rows"),
    "learner.epochs": "[1, inf)",
    "learner.head_token_tile": ("[1, inf)", "tokens per tile of the fused log-prob head"),
    "learner.head_vocab_tile": ("[1, inf)", "vocabulary entries per tile of the fused log-prob head"),
    "learner.zero_stage": "[0, 3]",
    "learner.lora.rank": "[1, inf)",
    "learner.lora.alpha": ("(0, inf)", "the adapters' update is scaled by alpha / rank"),
    "learner.lora.dropout": "[0, 1)",
    **{f"cluster.{role}.{name}": rule for role in ("rollout", "learner") for name, rule in ROLE_RULES.items()},
    "cluster.max_rollout_restarts": "[0, inf)",
    "cluster.placement_timeout": ("(0, inf)", "seconds"),
    "cluster.sync_bucket_mb": ("[0, inf)", "0 sends a bucket per parameter"),
    "cluster.gpu_memory_gib": ("(0, inf)", "GiB of one GPU; null when unknown"),
    "logging.completions_every": ("[0, inf)", "0 means never"),
    "logging.completions_samples": "[1, inf)",
    "eval.every": ("[0, inf)", "0 means never"),
    "eval.num_problems": "[1, inf)",
    "eval.samples_per_problem": "[1, inf)",
    "eval.max_new_tokens": "[1, inf)",
    "eval.temperature": ("[0, inf)", "0 is greedy"),
    "eval.top_p": "(0, 1]",
    "checkpoint.every": ("[0, inf)", "0 saves only at the end"),
    "checkpoint.keep": "[1, inf)",
}


def number_rule(dotted: str, rules: dict = NUMBER_RULES) -> tuple[Interval, str]:
    """(interval, note) for a field path such as reward[1].weight (list items share their list's rule)."""
    spec = rules[re.sub(r"\[\d+\]", "", dotted)]
    text, note = (spec, "") if isinstance(spec, str) else spec
    return Interval.parse(text), note


def numbers(node, where: str = ""):
    """(dotted path, value) of every number in a recipe (or any of its sections), defaults included."""
    if dataclasses.is_dataclass(node):
        for item in dataclasses.fields(node):
            yield from numbers(getattr(node, item.name), f"{where}.{item.name}" if where else item.name)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from numbers(item, f"{where}[{index}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield where, node


def check_number(dotted: str, value: float, interval: Interval, note: str = "") -> None:
    """ConfigError unless `value` is finite and in `interval`; the message names `dotted`."""
    if math.isfinite(value) and value in interval:
        return
    expected = " ".join(
        part
        for part in (
            "an integer" if isinstance(value, int) else "a finite number",
            str(interval),
            f"({note})" if note else "",
        )
        if part
    )
    raise ConfigError(f"{dotted}: expected {expected}, got {value!r}")


def check_numbers(node, rules: dict = NUMBER_RULES, named: Callable[[str], str] = str) -> None:
    """Every number of a recipe against NUMBER_RULES, or of another dataclass against its own rules
    (an evaluation's, a Slurm request's); `named` gives a field path the name its error shows (a flag)."""
    for dotted, value in numbers(node):
        check_number(named(dotted), value, *number_rule(dotted, rules))


def as_flag(dotted: str) -> str:
    """A field path as the command-line flag that sets it: top_p -> --top-p."""
    return "--" + dotted.replace("_", "-")
