"""Build what a plan needs, cheapest first: data, the model's files, its tokenizer, then the
checks that need them (prompt lengths, the context, LoRA targets, a teacher's vocabulary), and
only then the reward workers and the policy's weights.

The plan comes from driver/validate.py: by now the recipe is known to be valid, so a lab build
(which fine-tunes a model) never runs for a recipe that a cheaper check would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from efficient_rl.config.plan import Plan
from efficient_rl.config.schema import Recipe, RolloutSection
from efficient_rl.data.profiles import join_length_profile
from efficient_rl.data.prompts import TokenizerError, encode_user, load_tokenizer, render_prompt
from efficient_rl.data.sources import load_split
from efficient_rl.data.turns import question_key
from efficient_rl.data.variables import check_sample_fields, check_template, draw_variables, eval_variants
from efficient_rl.driver import stopping
from efficient_rl.errors import ConfigError, one_line
from efficient_rl.lab.build import lab_model_dir
from efficient_rl.learner.teacher import check_teacher
from efficient_rl.models.lora import check_lora_targets, policy_weights_dir
from efficient_rl.models.modeling import torch_device
from efficient_rl.models.sources import model_directory
from efficient_rl.rollout.budget import forced_suffix
from efficient_rl.scoring.runner import RewardRunner

if TYPE_CHECKING:  # annotations only: transformers is slow to import
    from transformers import PreTrainedTokenizerFast


@dataclass
class Setup:
    # The policy in the driver's process: the embedded backend trains and generates with it. None
    # under Ray, whose driver reads the model's config and tokenizer only (its actors load weights).
    model: torch.nn.Module | None
    vocab_size: int  # from the model's config: the sizes the driver needs without the weights
    tokenizer: PreTrainedTokenizerFast  # transformers'
    rewards: RewardRunner
    train_samples: list[dict]
    heldout_samples: list[dict]
    base_model_dir: Path  # the recipe's starting model (the KL reference), even when resuming
    # where `model` was loaded from: the base model, or a resumed run's checkpoint (with LoRA
    # `model` holds the base weights and the learner loads the checkpoint's adapter from here)
    model_dir: Path
    prompt_ids: dict[str, list[int]]  # prompt_key(sample) -> prompt token ids, encoded once at load
    user_template: str = "{question}"  # prompt.user_template: a sample's user turn

    def encode(self, sample: dict) -> list[int]:
        return self.prompt_ids[prompt_key(self.user_template, sample)]


def prompt_key(user_template: str, sample: dict) -> str:
    """What identifies a sample's prompt: its rendered user turn, or its rendered chat turns as JSON
    (a list is no dict key). Samples that render alike share their ids."""
    return question_key(render_prompt(user_template, sample))


def build_setup(plan: Plan, model_dir: Path | None = None) -> Setup:
    """Load data, tokenizer, rewards and model for a validated plan.

    `model_dir` overrides the recipe's model (a resumed run loads its latest checkpoint).
    """
    recipe = plan.recipe
    train = load_split(recipe.data.train, "train", recipe.data, recipe.seed, "data.train")
    heldout = load_split(recipe.data.heldout, "heldout", recipe.data, recipe.seed, "data.heldout")
    train, heldout = with_variables(plan, train, "train"), with_variables(plan, heldout, "heldout")
    train = with_length_profile(plan, train)
    check_sample_fields(plan.needs, train, "data.train")
    base = base_model_dir(recipe)
    teacher = teacher_model_dir(recipe)
    source = Path(model_dir or base)
    tokenizer, prompt_ids = encode_prompts(recipe, source, train, heldout)
    config = check_model_fits(recipe, source, teacher)
    rewards = start_rewards(recipe, train[0])
    try:
        holds_model = "driver_model" in plan["cluster.backend"].needs
        weights = policy_weights_dir(recipe, source, base)  # a resumed LoRA run: the base, its adapter goes on top
        # on the device the embedded learner and engine compute on, which share it
        model = (
            load_model(weights, recipe.model.attn_implementation).to(torch_device(plan.devices.learner))
            if holds_model
            else None
        )
    except BaseException:
        rewards.close()
        raise
    return Setup(
        model=model,
        vocab_size=config.vocab_size,
        tokenizer=tokenizer,
        rewards=rewards,
        train_samples=train,
        heldout_samples=heldout,
        base_model_dir=base.resolve(),
        model_dir=source.resolve(),
        prompt_ids=prompt_ids,
        user_template=recipe.prompt.user_template,
    )


# What a stop request while the model or the teacher is built or converted says (it ends that at once).
MODEL_BUILD_STOP = "stopping the model's build before training; nothing half-made is cached"
TEACHER_BUILD_STOP = "stopping the teacher's build before training; nothing half-made is cached"


def base_model_dir(recipe: Recipe) -> Path:
    """The recipe's model directory: a lab model built, or a GGUF converted, on first use.

    A stop request ends a build at once (minutes of SFT for a lab preset, of dequantizing for a
    GGUF): nothing is checkpointed before the first step, and both build into a staging directory
    that an exception removes, so the cache never holds half a model. A time-limit warning lets the
    build finish: it asks for the first step's checkpoint (stopping.py)."""
    with stopping.cut_short(MODEL_BUILD_STOP, for_warnings=False):
        if recipe.model.lab:
            return lab_model_dir(recipe.model.lab)
        return model_directory(recipe.model.path, "model.path")


def teacher_model_dir(recipe: Recipe) -> Path | None:
    """distill.teacher's model directory (None without one), built or converted on first use here,
    in the driver, before any learner loads it: so a stop request ends it as it ends the model's."""
    if recipe.distill.teacher is None:
        return None
    with stopping.cut_short(TEACHER_BUILD_STOP, for_warnings=False):
        return model_directory(recipe.distill.teacher, "distill.teacher")


def with_variables(plan: Plan, samples: list[dict], split: str) -> list[dict]:
    """The samples with prompt.variables drawn (data/variables.py), checked against the user template."""
    samples = draw_variables(samples, plan.variables, plan.recipe.seed, split)
    check_template(plan.recipe.prompt.user_template, samples, f"data.{split}")
    return samples


def with_length_profile(plan: Plan, samples: list[dict]) -> list[dict]:
    """The training samples with their prompt's reference length profile, when an entry needs one:
    read from that entry's `stats` file (data/profiles.py)."""
    field_name = plan.needs.get("length_profile")
    if field_name is None:
        return samples
    return join_length_profile(samples, Path(plan[field_name].params.stats), f"{field_name}.stats")


def start_rewards(recipe: Recipe, probe_sample: dict) -> RewardRunner:
    """Start the rewards' workers and probe each on a training sample."""
    rewards = RewardRunner(recipe.reward, recipe.scoring.workers, recipe.scoring.timeout)
    try:
        rewards.check(probe_sample)
    except BaseException:
        rewards.close()
        raise
    return rewards


def encode_prompts(recipe: Recipe, source: Path, train: list[dict], heldout: list[dict]):
    """(tokenizer, user turn -> prompt token ids) for every prompt the run sends, each within
    rollout.max_prompt_length."""
    try:
        tokenizer = load_tokenizer(source)
        # eval.variables' values are prompts too (data/variables.py)
        evaluated = (
            [
                s
                for _, variant in eval_variants(heldout[: recipe.eval.num_problems], recipe.eval.variables)
                for s in variant
            ]
            if recipe.eval.variables
            else []
        )
        prompt_ids = {}
        for sample in train + heldout + evaluated:
            key = prompt_key(recipe.prompt.user_template, sample)
            if key not in prompt_ids:
                prompt_ids[key] = encode_user(
                    tokenizer, render_prompt(recipe.prompt.user_template, sample), recipe.prompt
                )
    except TokenizerError as err:
        raise ConfigError(f"model: {err}") from None
    check_lengths(recipe, prompt_ids, {"data.train": train, "data.heldout": heldout + evaluated})
    check_forced_suffix(recipe.rollout, tokenizer)
    return tokenizer, prompt_ids


def check_forced_suffix(rollout: RolloutSection, tokenizer) -> None:
    """rollout.thinking_budget's appended text must be tokens, and leave the answer room within the cap."""
    budget = rollout.thinking_budget
    if budget.tokens == 0:
        return
    if not tokenizer.encode(budget.close, add_special_tokens=False):
        raise ConfigError(
            f"rollout.thinking_budget.close: expected text the tokenizer encodes to at least one token, "
            f"got {budget.close!r}"
        )
    appended = len(forced_suffix(tokenizer, budget.close, budget.answer_prompt))
    if budget.tokens + appended >= rollout.max_response_length:
        raise ConfigError(
            f"rollout.thinking_budget.tokens: expected the budget plus the {appended} appended tokens (close, "
            f"answer_prompt) below rollout.max_response_length {rollout.max_response_length}, got {budget.tokens}"
        )


def check_model_fits(recipe: Recipe, source: Path, teacher: Path | None = None):
    """The model's config, once the run fits it: context, the `teacher`'s vocabulary, LoRA's targets."""
    config = read_config(source)
    context = getattr(config, "max_position_embeddings", None)
    longest = recipe.longest_sequence()
    if context is not None and longest > context:
        raise ConfigError(
            f"rollout.max_prompt_length + max response length = {longest} exceeds the model's "
            f"context of {context} tokens"
        )
    if teacher is not None:
        check_teacher(teacher, config.vocab_size)
    if recipe.learner.lora is not None:
        check_lora_targets(config, recipe.learner.lora)
    check_logits_are_the_heads(config)
    return config


# Config fields of transformers models that change the logits after the output head (Gemma 2/3's
# tanh cap, Cohere's and Granite's scales), with the value that leaves them alone. The learner's
# fused head (models/fused_head.py) takes log-probs of the head's product itself, so on such a
# model its ratio against the engine's log-probs would be silently wrong.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def check_logits_are_the_heads(config) -> None:
    for field, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, field, neutral)
        if value != neutral:
            raise ConfigError(
                f"model: its config.json sets {field}: {value}, which transforms the logits after the output "
                f"head; the learner's fused log-prob head supports models whose logits are the head's product "
                f"(expected {field}: {neutral})"
            )


def load_model(source: Path, attn_implementation: str = "sdpa"):
    """The policy in float32: the master weights, whatever learner.precision computes in."""
    from transformers import AutoModelForCausalLM  # here: slow to import, and no CLI check needs it

    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, attn_implementation=attn_implementation
        )
    except Exception as err:  # truncated or missing weights, an architecture transformers lacks, ...
        # the model is input like any other: one line naming it (safetensors' errors are no OSError)
        raise ConfigError(f"model: cannot load {source} ({type(err).__name__}: {one_line(err)})") from None


def read_config(source: Path):
    """The model's config.json: vocabulary size and context, without the weights."""
    from transformers import AutoConfig  # here: slow to import, and no CLI check needs it

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # a broken config.json, a model type transformers lacks, ...
        raise ConfigError(
            f"model: cannot read the config of {source} ({type(err).__name__}: {one_line(err)})"
        ) from None


def check_lengths(recipe: Recipe, prompt_ids: dict[str, list[int]], splits: dict[str, list[dict]]) -> None:
    for field_name, samples in splits.items():
        longest = max(len(prompt_ids[prompt_key(recipe.prompt.user_template, s)]) for s in samples)
        if longest > recipe.rollout.max_prompt_length:
            raise ConfigError(
                f"rollout.max_prompt_length: {field_name} has a prompt of {longest} tokens, "
                f"longer than the cap of {recipe.rollout.max_prompt_length}"
            )
