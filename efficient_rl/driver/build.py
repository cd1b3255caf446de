"""Turn a recipe into ready components, validating every input before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from efficient_rl.algos.advantages import ADVANTAGES
from efficient_rl.algos.divergence import TOKEN_STATISTICS
from efficient_rl.algos.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, ROLLOUT_CORRECTIONS
from efficient_rl.algos.sampling import FILTER_METRICS
from efficient_rl.algos.shaping import LENGTH_SHAPERS
from efficient_rl.algos.token_selection import SAMPLE_SELECTORS, TOKEN_SELECTORS
from efficient_rl.run.checkpoint import check_run_name
from efficient_rl.cluster.backends import CLUSTER_BACKENDS
from efficient_rl.driver.pipeline import PIPELINES
from efficient_rl.config.binding import bind
from efficient_rl.config.rules import check_numbers
from efficient_rl.config.schema import Recipe
from efficient_rl.errors import ConfigError, one_line
from efficient_rl.data.sources import load_split
from efficient_rl.lab.build import lab_model_dir
from efficient_rl.lab.presets import PRESETS
from efficient_rl.learner.base import LEARNERS
from efficient_rl.learner.objective import OBJECTIVES
from efficient_rl.learner.schedules import LR_SCHEDULES
from efficient_rl.learner.teacher import check_teacher
from efficient_rl.models.lora import check_lora_targets, policy_weights_dir
from efficient_rl.models.sources import check_reference, model_directory
from efficient_rl.data.prompts import TokenizerError, encode_user, load_tokenizer
from efficient_rl.registry import Bound, did_you_mean
from efficient_rl.scoring.runner import RewardRunner
from efficient_rl.rollout.base import ENGINES
from efficient_rl.driver.trackers import check_trackers
from efficient_rl.data.variables import (bind_variables, check_sample_fields, check_template, draw_variables, eval_variants,
                                    render)

# Importing the backends registers them.
import efficient_rl.learner.deepspeed_learner  # noqa: E402,F401  (imports deepspeed only when used)
import efficient_rl.learner.torch_learner  # noqa: E402,F401
import efficient_rl.rollout.hf  # noqa: E402,F401
import efficient_rl.rollout.vllm_engine  # noqa: E402,F401  (imports vllm only when used)


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
    prompt_ids: dict[str, list[int]]  # user turn -> prompt token ids, encoded once at load
    user_template: str = "{question}"  # prompt.user_template: a sample's user turn

    def encode(self, sample: dict) -> list[int]:
        return self.prompt_ids[render(self.user_template, sample)]


# The recipe's picks of registry entries with parameters (each a config.Choice), and of plain names.
CHOICE_FIELDS = [
    ("algorithm.advantage", ADVANTAGES),
    ("algorithm.policy_loss", POLICY_LOSSES),
    ("algorithm.loss_agg", AGGREGATIONS),
    ("algorithm.kl_estimator", KL_ESTIMATORS),
    ("algorithm.length_penalty", LENGTH_SHAPERS),
    ("algorithm.dynamic_sampling_metric", FILTER_METRICS),
    ("algorithm.rollout_correction", ROLLOUT_CORRECTIONS),
    ("algorithm.objective", OBJECTIVES),
    ("algorithm.token_selection", TOKEN_SELECTORS),
    ("algorithm.sample_selection", SAMPLE_SELECTORS),
    ("learner.lr_schedule", LR_SCHEDULES),
    ("cluster.pipeline", PIPELINES),
]
NAME_FIELDS = [("rollout.engine", ENGINES), ("learner.backend", LEARNERS)]


def field_value(recipe: Recipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_recipe(recipe: Recipe) -> None:
    """Checks that need more than types: numbers in range, names in registries, consistent sizes."""
    check_numbers(recipe)  # load_recipe did too; a Recipe built in Python comes here unchecked
    check_run_name(recipe.logging.name)  # submit refuses a bad name before it writes a job directory
    for dotted, registry in NAME_FIELDS:
        name = field_value(recipe, dotted)
        if name not in registry:
            raise ConfigError(f"{dotted}: unknown {registry.kind} {name!r}{did_you_mean(name, registry.names())}")
    needs = recipe_needs(bind_choices(recipe))
    check_trackers(recipe)  # names and parameters of logging.trackers
    bind_variables(recipe)  # prompt.variables and eval.variables
    if (recipe.model.path is None) == (recipe.model.lab is None):
        raise ConfigError("model: set exactly one of model.path (a model directory) or model.lab (a lab preset)")
    if recipe.model.lab is not None and recipe.model.lab not in PRESETS:
        raise ConfigError(f"model.lab: unknown lab preset {recipe.model.lab!r}{did_you_mean(recipe.model.lab, PRESETS)}")
    if recipe.model.path is not None:  # checked without downloading or converting: submit calls this too
        check_reference(recipe.model.path, "model.path")
    cap = recipe.algorithm.truncation_length
    if cap is not None and not 1 <= cap <= recipe.rollout.max_response_length:
        raise ConfigError(f"algorithm.truncation_length: expected 1..rollout.max_response_length "
                          f"({recipe.rollout.max_response_length}), got {cap}")
    check_difficulty_tiers(recipe, needs)
    check_teacher_needs(recipe, needs)
    check_cluster(recipe)
    check_learner(recipe)
    check_lora(recipe)
    if len(recipe.learner.betas) != 2:
        raise ConfigError(f"learner.betas: expected [beta1, beta2], got {recipe.learner.betas}")


def bind_choices(recipe: Recipe) -> dict[str, Bound]:
    """Every entry the recipe picks, bound: unknown names, keys, types, ranges and the entries'
    own checks fail here, at load, each in one line naming its field."""
    bound = {}
    for dotted, registry in CHOICE_FIELDS:
        bound[dotted] = bind(field_value(recipe, dotted), registry, dotted)
        check = bound[dotted].entry.check
        problem = check(bound[dotted].params, recipe) if check else None
        if problem:
            raise ConfigError(f"{dotted}.{problem}")
    return bound


def recipe_needs(bound: dict[str, Bound]) -> dict[str, str]:
    """What the picked entries need, each need with the field that needs it: their own needs, and
    those of the token statistics the token selector reads (a teacher, for divergences)."""
    needs = {}
    for dotted, entry in bound.items():
        for need in entry.needs:
            needs.setdefault(need, dotted)
            if need in TOKEN_STATISTICS:
                for deeper in TOKEN_STATISTICS.get(need).needs:
                    needs.setdefault(deeper, dotted)
    return needs


def check_difficulty_tiers(recipe: Recipe, needs: dict[str, str]) -> None:
    alg, limit = recipe.algorithm, recipe.rollout.max_response_length
    tiers = alg.difficulty_tiers
    if not tiers:
        return
    if "length_cap" not in needs or alg.truncation_length is not None:
        raise ConfigError("algorithm.difficulty_tiers: needs a length_penalty that uses the cap (truncation, "
                          "overlong) and replaces truncation_length (leave it null)")
    bounds = [tier.min_correct for tier in tiers]
    if bounds[0] != 0.0 or any(later <= earlier for earlier, later in zip(bounds, bounds[1:])) or bounds[-1] > 1.0:
        raise ConfigError(f"algorithm.difficulty_tiers: min_correct must start at 0.0 and increase up to at most "
                          f"1.0, got {bounds}")
    for index, tier in enumerate(tiers):
        if not 1 <= tier.truncation_length <= limit:
            raise ConfigError(f"algorithm.difficulty_tiers[{index}].truncation_length: expected 1..rollout."
                              f"max_response_length ({limit}), got {tier.truncation_length}")


def check_teacher_needs(recipe: Recipe, needs: dict[str, str]) -> None:
    """A teacher is loaded when distill.teacher is set, and only then: whatever needs one needs it
    set, and one that nothing needs would be loaded for nothing."""
    if "teacher" not in needs:
        if recipe.distill.teacher is not None:
            raise ConfigError("distill.teacher: set, but nothing in the recipe needs a teacher (algorithm.objective "
                              "distillation, or a token selection by teacher statistics); leave it null")
        return
    user = f"{needs['teacher']} {field_value(recipe, needs['teacher']).name}"
    if recipe.distill.teacher is None:
        raise ConfigError(f"distill.teacher: {user} needs a teacher (a model directory or lab:<preset>)")
    if recipe.learner.backend == "deepspeed" and recipe.learner.zero_stage == 3:
        raise ConfigError(f"learner.zero_stage: {user} needs a teacher, which runs on ZeRO stages 0-2 (its "
                          f"selected-position LM head is not yet correct under ZeRO-3's weight gathering)")
    if recipe.distill.placement == "ray" and recipe.cluster.backend != "ray":
        raise ConfigError("distill.placement: a ray teacher needs cluster.backend: ray")


def check_cluster(recipe: Recipe) -> None:
    cluster = recipe.cluster  # its numbers (workers, cpus, gpus, ...) are checked by check_numbers
    if cluster.backend == "ray":
        if recipe.rollout.engine != "vllm":
            raise ConfigError("rollout.engine: the ray backend runs vLLM rollout workers; set rollout.engine: vllm")
        if recipe.learner.backend == "torch" and cluster.learner.workers > 1:
            raise ConfigError("cluster.learner.workers: the torch learner is one process; "
                              "use learner.backend: deepspeed for data parallelism")
    elif recipe.learner.backend == "deepspeed":
        raise ConfigError("learner.backend: deepspeed runs as Ray actors; set cluster.backend: ray")


def check_lora(recipe: Recipe) -> None:
    """What LoRA does not combine with (yet); its target modules are checked against the model later."""
    if recipe.learner.lora is None:
        return
    if recipe.learner.backend == "deepspeed" and recipe.learner.zero_stage == 3:
        raise ConfigError("learner.lora: DeepSpeed zero_stage 0-2 only (LoRA over ZeRO-3's sharded base weights is "
                          "not supported); the adapters are small enough for ZeRO-2")
    if recipe.cluster.pipeline.name == "overlapped" and recipe.rollout.engine == "transformers":
        raise ConfigError("learner.lora: not with cluster.pipeline overlapped on the transformers engine (its own "
                          "copy of the policy loads plain weights by name); use rollout.engine: vllm or pipeline: sync")


def check_learner(recipe: Recipe) -> None:
    learner = recipe.learner
    if learner.backend != "deepspeed":
        return
    # ZeRO-3 gathers weights around the engine's whole forward; packing, like selected compute,
    # calls the body and the LM head apart (see DeepSpeedLearner).
    if learner.packing and learner.zero_stage == 3:
        raise ConfigError("learner.packing: not under ZeRO-3 (zero_stage: 3), whose weight gathering needs the "
                          "model called whole; use zero_stage 0-2 or packing: false")
    if learner.precision == "bf16" and learner.zero_stage == 0:
        raise ConfigError("learner.precision: bf16 on DeepSpeed needs zero_stage 1-3, which keep float32 master "
                          "weights; stage 0 would update the bf16 weights themselves")


def prepare(recipe: Recipe, model_dir: Path | None = None) -> Setup:
    """Validate the recipe and load model, tokenizer, data and rewards.

    `model_dir` overrides the recipe's model (a resumed run loads its latest checkpoint).
    """
    check_recipe(recipe)
    train = load_split(recipe.data.train, "train", recipe.data, recipe.seed, "data.train")
    heldout = load_split(recipe.data.heldout, "heldout", recipe.data, recipe.seed, "data.heldout")
    train, heldout = with_variables(recipe, train, "train"), with_variables(recipe, heldout, "heldout")
    check_sample_fields(recipe_needs(bind_choices(recipe)), train, "data.train")
    rewards = start_rewards(recipe, train[0])
    try:
        return load_model_and_prompts(recipe, model_dir, rewards, train, heldout)
    except BaseException:
        rewards.close()
        raise


def with_variables(recipe: Recipe, samples: list[dict], split: str) -> list[dict]:
    """The samples with prompt.variables drawn (variables.py), checked against the user template."""
    samples = draw_variables(samples, bind_variables(recipe), recipe.seed, split)
    check_template(recipe.prompt.user_template, samples, f"data.{split}")
    return samples


def start_rewards(recipe: Recipe, probe_sample: dict) -> RewardRunner:
    """Resolve the rewards, start their workers and probe each on a training sample."""
    rewards = RewardRunner(recipe.reward, recipe.scoring.workers, recipe.scoring.timeout)
    try:
        rewards.check(probe_sample)
    except BaseException:
        rewards.close()
        raise
    return rewards


def load_model_and_prompts(recipe: Recipe, model_dir: Path | None, rewards: RewardRunner, train: list[dict],
                           heldout: list[dict]) -> Setup:
    base = lab_model_dir(recipe.model.lab) if recipe.model.lab else model_directory(recipe.model.path, "model.path")
    source = model_dir or base
    try:
        tokenizer = load_tokenizer(source)
        # eval.variables' values are prompts too (efficient_rl/data/variables.py)
        evaluated = [s for _, variant in eval_variants(heldout[: recipe.eval.num_problems], recipe.eval.variables)
                     for s in variant] if recipe.eval.variables else []
        prompt_ids = {}
        for sample in train + heldout + evaluated:
            user = render(recipe.prompt.user_template, sample)
            if user not in prompt_ids:
                prompt_ids[user] = encode_user(tokenizer, user, recipe.prompt)
    except TokenizerError as err:
        raise ConfigError(f"model: {err}") from None
    check_lengths(recipe, prompt_ids, {"data.train": train, "data.heldout": heldout + evaluated})
    config = read_config(source)
    context = getattr(config, "max_position_embeddings", None)
    longest = recipe.longest_sequence()
    if context is not None and longest > context:
        raise ConfigError(f"rollout.max_prompt_length + max response length = {longest} exceeds the model's "
                          f"context of {context} tokens")
    if recipe.distill.teacher is not None:
        check_teacher(recipe, config.vocab_size)
    if recipe.learner.lora is not None:
        check_lora_targets(config, recipe.learner.lora)
    holds_model = "driver_model" in CLUSTER_BACKENDS.get(recipe.cluster.backend).needs
    weights = policy_weights_dir(recipe, Path(source), base)  # a resumed LoRA run: the base, its adapter goes on top
    model = load_model(weights, recipe.model.attn_implementation) if holds_model else None
    return Setup(model=model, vocab_size=config.vocab_size, tokenizer=tokenizer, rewards=rewards, train_samples=train, heldout_samples=heldout,
                 base_model_dir=base.resolve(), model_dir=Path(source).resolve(), prompt_ids=prompt_ids,
                 user_template=recipe.prompt.user_template)


def load_model(source: Path, attn_implementation: str = "sdpa"):
    """The policy in float32: the master weights, whatever learner.precision computes in."""
    from transformers import AutoModelForCausalLM  # here: slow to import, and no CLI check needs it

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=attn_implementation)
    except Exception as err:  # truncated or missing weights, an architecture transformers lacks, ...
        # the model is input like any other: one line naming it (safetensors' errors are no OSError)
        raise ConfigError(f"model: cannot load {source} ({type(err).__name__}: {one_line(err)})") from None


def read_config(source: Path):
    """The model's config.json: vocabulary size and context, without the weights."""
    from transformers import AutoConfig  # here: slow to import, and no CLI check needs it

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # a broken config.json, a model type transformers lacks, ...
        raise ConfigError(f"model: cannot read the config of {source} ({type(err).__name__}: {one_line(err)})") from None


def check_lengths(recipe: Recipe, prompt_ids: dict[str, list[int]], splits: dict[str, list[dict]]) -> None:
    for field_name, samples in splits.items():
        longest = max(len(prompt_ids[render(recipe.prompt.user_template, s)]) for s in samples)
        if longest > recipe.rollout.max_prompt_length:
            raise ConfigError(f"rollout.max_prompt_length: {field_name} has a prompt of {longest} tokens, "
                              f"longer than the cap of {recipe.rollout.max_prompt_length}")
