"""The memory planner: each GPU's peak, estimated from the model's shape and the recipe.

`efficient-rl plan RECIPE` prints the estimate per kind of GPU; validation (driver/validate.py)
refuses a recipe whose estimate exceeds `cluster.gpu_memory_gib`, in one line naming the largest
term and the knob that shrinks it. Pure arithmetic on the model's config (a local config.json, a
lab preset, or a small table of known hub models): no torch, nothing loaded. docs/memory.md
derives every formula; benchmarks/memory_plan.py checks the learner's terms against measured peaks.

The estimate is a sum of what the learner rank keeps (weights, gradients, optimizer state, a KL
reference or teacher), what one forward/backward pass adds (activations, the log-prob head), and
what else shares its GPU (the rollout engine's share, the CUDA runtime). The step-time gradient
copies and the pass's activations never coexist, so the sum is a little above the true peak.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from efficient_rl.config.placement import Placement
from efficient_rl.config.schema import Recipe
from efficient_rl.errors import ConfigError
from efficient_rl.lab.presets import PRESETS

GIB = 2**30
FLOAT32_BYTES = 4
COMPUTE_BYTES = {"fp32": 4, "bf16": 2}  # learner.precision -> bytes per value of the passes
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # model.dtype -> bytes per value of inference copies
ADAM_STATES = 2  # AdamW keeps two float32 moments per trained parameter


def logprob_head_float32_buffers() -> int:
    """float32 [tokens x vocab] temporaries the TokenLogprobs head (models/modeling.py) holds at its
    peak, beside the logits in the compute dtype: the scaled logits, the log-softmax, its exp and
    their product for the entropy. Measured on CPU (a bf16 pass peaked at 4.5 float32 buffers: 4
    plus the bf16 logits; an fp32 pass at 5). Only truncated supports still use it."""
    return 4


def fused_head_bytes(tokens: int, vocab: int, hidden: int, compute_bytes: int, token_tile: int, vocab_tile: int) -> int:
    """What the fused head (models/fused_head.py) holds at its peak besides its inputs and the
    weight's gradient: a float32 [token tile x vocab tile] tile (the logits) and half of one (their
    exp, half the rows at a time); the float32 gradient of the hidden states, summed over
    vocabulary tiles, and of one vocabulary tile of the weight, summed over token tiles; and in
    bf16 the float32 copies of the hidden states and of one vocabulary tile of the weight the
    products are taken from."""
    rows, columns = min(tokens, token_tile), min(vocab, vocab_tile)
    widened = FLOAT32_BYTES * (tokens + columns) * hidden if compute_bytes != FLOAT32_BYTES else 0
    tiles = 3 * FLOAT32_BYTES * rows * columns // 2
    return tiles + FLOAT32_BYTES * (tokens + columns) * hidden + widened


# DeepSpeed's ZeRO-1/2 default reduce_bucket_size (elements): ZeRO-2 reduces gradients through a
# contiguous buffer of this many values in the gradient dtype.
DEEPSPEED_REDUCE_BUCKET = 500_000_000
# What a GPU process holds outside its tensors: the CUDA context, cuBLAS workspaces, NCCL buffers.
CUDA_RUNTIME_GIB = 1.0


# ---------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class Architecture:
    """A Llama/Qwen-style decoder: what the memory of its weights and passes follows from."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q, k and v; Llama none

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer, by its leaf name."""
        hidden, kv, inner = self.hidden_size, self.kv_size, self.intermediate_size
        return {
            "q_proj": (hidden, hidden),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden),
            "gate_proj": (hidden, inner),
            "up_proj": (hidden, inner),
            "down_proj": (inner, hidden),
        }

    def parameters(self) -> int:
        biases = self.hidden_size + 2 * self.kv_size if self.qkv_bias else 0
        layer = sum(i * o for i, o in self.linear_shapes().values()) + biases + 2 * self.hidden_size  # 2 norms
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + self.hidden_size  # + the final norm

    def lora_parameters(self, rank: int, targets: list[str]) -> int:
        """A and B of every targeted projection: rank x (in + out) each, in every layer."""
        shapes = self.linear_shapes()
        return self.num_hidden_layers * sum(rank * sum(shapes[name]) for name in targets if name in shapes)


# Hub models a recipe names without a local copy: their config.json's shape, so a recipe is
# planned before (and without) any download.
KNOWN_ARCHITECTURES = {
    # Qwen2.5-Math-1.5B's shape, with an untied output head (1.78e9 parameters)
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": Architecture(1536, 28, 12, 2, 8960, 151936, False, True),
    # the builtin `smollm2` (SmolLM2-135M-Instruct, a Llama)
    "smollm2": Architecture(576, 30, 9, 3, 1536, 49152, True, False),
}


def lab_architecture(preset_name: str) -> Architecture:
    """A lab preset's Qwen2 (lab/build.py); the vocabulary is its tokenizer's target size."""
    preset = PRESETS[preset_name]
    vocab = PRESETS[preset.tokenizer_from].vocab_size if preset.tokenizer_from else preset.vocab_size
    shape = preset.model
    return Architecture(
        shape.hidden_size,
        shape.num_hidden_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads,
        shape.intermediate_size,
        vocab,
        tie_word_embeddings=True,
        qkv_bias=True,
    )


def config_architecture(config_file: Path) -> Architecture | None:
    """A model directory's config.json as an Architecture (None: not a decoder of this kind)."""
    config = json.loads(config_file.read_text())
    try:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return Architecture(
            hidden,
            config["num_hidden_layers"],
            heads,
            config.get("num_key_value_heads") or heads,
            config["intermediate_size"],
            config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        )
    except KeyError:
        return None


def architecture_of(reference: str | None, lab: str | None = None) -> Architecture | None:
    """The shape of a model reference (model.path / model.lab, distill.teacher), or None where it
    cannot be known without downloading or converting it."""
    if lab is not None:
        return lab_architecture(lab) if lab in PRESETS else None
    if reference is None:
        return None
    if reference.startswith("lab:"):
        return architecture_of(None, reference.removeprefix("lab:"))
    if reference in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[reference]
    config_file = Path(reference) / "config.json"
    return config_architecture(config_file) if config_file.is_file() else None


# ---------------------------------------------------------------- terms
@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    how: str  # the formula with the recipe's numbers in it

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class Sizes:
    """The numbers every term is computed from."""

    architecture: Architecture
    parameters: int  # of the policy, LoRA adapters included
    trained: int  # parameters the optimizer steps (the LoRA adapters' only, with LoRA)
    ranks: int  # data-parallel learner ranks (ZeRO partitions over them)
    compute_bytes: int  # per value of the learner's passes
    tokens: int  # token positions of one forward/backward pass, at most


def learner_ranks(recipe: Recipe) -> int:
    return recipe.cluster.learner.workers if recipe.cluster.backend == "ray" else 1


def pass_tokens(recipe: Recipe) -> int:
    """The most token positions one training pass holds: the budget, or a longer sequence alone;
    without a budget, micro_batch_size rows as wide as the longest sequence."""
    longest = recipe.rollout.max_prompt_length + recipe.rollout.max_response_length
    learner = recipe.learner
    return (
        max(learner.micro_batch_tokens, longest)
        if learner.micro_batch_tokens > 0
        else learner.micro_batch_size * longest
    )


def tokens_knob(recipe: Recipe) -> str:
    return "learner.micro_batch_tokens" if recipe.learner.micro_batch_tokens > 0 else "learner.micro_batch_size"


def sizes_of(recipe: Recipe, architecture: Architecture) -> Sizes:
    base, lora = architecture.parameters(), recipe.learner.lora
    adapters = architecture.lora_parameters(lora.rank, lora.target_modules) if lora is not None else 0
    return Sizes(
        architecture,
        parameters=base + adapters,
        trained=adapters or base,
        ranks=learner_ranks(recipe),
        compute_bytes=COMPUTE_BYTES[recipe.learner.precision],
        tokens=pass_tokens(recipe),
    )


def count(value: float) -> str:
    return f"{value:.3g}"


def torch_state(recipe: Recipe, s: Sizes) -> list[Term]:
    """The single-process learner (learner/torch_learner.py): float32 masters the optimizer steps;
    in bf16 a bf16 copy the passes run on, whose gradients are added into float32 ones."""
    bf16 = s.compute_bytes < FLOAT32_BYTES
    weights = FLOAT32_BYTES * s.parameters + (s.compute_bytes * s.parameters if bf16 else 0)
    gradients = FLOAT32_BYTES * s.trained + (s.compute_bytes * s.trained if bf16 else 0)
    return [
        Term(
            "weights",
            weights,
            f"4 B x {count(s.parameters)} float32 masters"
            + (f" + 2 B x {count(s.parameters)} bf16 copy" if bf16 else ""),
        ),
        Term(
            "gradients",
            gradients,
            f"4 B x {count(s.trained)} float32" + (f" + 2 B x {count(s.trained)} bf16 of a pass" if bf16 else ""),
        ),
        Term("optimizer", ADAM_STATES * FLOAT32_BYTES * s.trained, f"Adam: 8 B x {count(s.trained)}"),
    ]


def deepspeed_gradients(stage: int, s: Sizes) -> Term:
    """Summed in float32 (learner/deepspeed_learner.py sets DeepSpeed's accumulation and reduction
    dtypes so): ZeRO 0-1 whole, ZeRO-2/3 a partition plus the reduce bucket; ZeRO 1-3 add the
    float32 partition the step makes."""
    b, trained, ranks = FLOAT32_BYTES, s.trained, s.ranks
    step_copy = FLOAT32_BYTES * trained / ranks if stage >= 1 else 0
    step_how = f" + 4 B x {count(trained)} / {ranks} for the step" if stage >= 1 else ""
    if stage >= 2:
        bucket = min(DEEPSPEED_REDUCE_BUCKET, trained)
        how = f"{b} B x {count(trained)} / {ranks} + {b} B x {count(bucket)} bucket{step_how}"
        return Term("gradients", b * trained / ranks + b * bucket + step_copy, how)
    return Term("gradients", b * trained + step_copy, f"{b} B x {count(trained)}{step_how}")


def deepspeed_state(recipe: Recipe, s: Sizes) -> list[Term]:
    """A DeepSpeed rank (learner/deepspeed_learner.py): the module in the compute dtype (ZeRO-3:
    its partition); ZeRO 1-3 float32 master and Adam partitions over the ranks; the gradients."""
    stage, ranks, b = recipe.learner.zero_stage, s.ranks, s.compute_bytes
    module = b * s.parameters / (ranks if stage == 3 else 1)
    masters = FLOAT32_BYTES * s.trained / ranks if stage >= 1 else 0
    weights_how = (
        f"{b} B x {count(s.parameters)}"
        + (f" / {ranks}" if stage == 3 else "")
        + (f" + 4 B x {count(s.trained)} / {ranks} masters" if masters else "")
    )
    optimizer_share = ranks if stage >= 1 else 1
    if recipe.learner.offload_optimizer:
        optimizer = Term("optimizer", 0.0, "offloaded to CPU (learner.offload_optimizer)")
    else:
        adam = ADAM_STATES * FLOAT32_BYTES * s.trained / optimizer_share
        optimizer = Term("optimizer", adam, f"Adam: 8 B x {count(s.trained)} / {optimizer_share}")
    return [Term("weights", module + masters, weights_how), deepspeed_gradients(stage, s), optimizer]


# learner.backend -> what a rank keeps between passes (weights, gradients, optimizer state)
LEARNER_STATE: dict[str, Callable[[Recipe, Sizes], list[Term]]] = {"torch": torch_state, "deepspeed": deepspeed_state}


def layer_activation_bytes(architecture: Architecture, compute_bytes: int) -> int:
    """Bytes autograd keeps per token for one decoder layer: each RMSNorm a float32 copy of its
    input and its normalised output (4 + b) H; the q/k/v input, q, k and v at full width (GQA's
    keys and values repeated for sdpa), the attention output and o_proj's input, the MLP's input
    (7 b H); gate, SiLU(gate), up and their product (4 b I)."""
    hidden, b = architecture.hidden_size, compute_bytes
    return 2 * (FLOAT32_BYTES + b) * hidden + 7 * b * hidden + 4 * b * architecture.intermediate_size


def activations(recipe: Recipe, s: Sizes) -> Term:
    """Per token: every layer's activations; with gradient checkpointing each layer's input (b H)
    plus one layer's activations, recomputed in the backward."""
    layer = layer_activation_bytes(s.architecture, s.compute_bytes)
    layers = s.architecture.num_hidden_layers
    if recipe.learner.gradient_checkpointing:
        per_token = layers * s.compute_bytes * s.architecture.hidden_size + layer
        how = f"{s.tokens} tokens x ({layers} layers x {s.compute_bytes * s.architecture.hidden_size} B + {layer} B)"
    else:
        per_token = layers * layer
        how = f"{s.tokens} tokens x {layers} layers x {layer} B"
    return Term("activations", s.tokens * per_token, how)


def logprob_head(recipe: Recipe, s: Sizes) -> Term:
    """The fused head's tiles, or where the learner still forms [t x V] logits (a truncated
    support, which needs whole rows) TokenLogprobs' buffers."""
    vocab, learner = s.architecture.vocab_size, recipe.learner
    if not fused_head_used(recipe):
        buffers = logprob_head_float32_buffers()
        how = f"{s.tokens} tokens x {vocab} vocab x ({s.compute_bytes} B logits + {buffers} x 4 B float32)"
        return Term("log-prob head", s.tokens * vocab * (s.compute_bytes + FLOAT32_BYTES * buffers), how)
    hidden = s.architecture.hidden_size
    rows, columns = min(s.tokens, learner.head_token_tile), min(vocab, learner.head_vocab_tile)
    nbytes = fused_head_bytes(
        s.tokens, vocab, hidden, s.compute_bytes, learner.head_token_tile, learner.head_vocab_tile
    )
    copies = 2 if s.compute_bytes != FLOAT32_BYTES else 1
    how = f"1.5 x 4 B x {rows} x {columns} tiles + {copies} x 4 B x ({s.tokens} tokens + {columns}) x {hidden} hidden"
    return Term("log-prob head", nbytes, how)


def fused_head_used(recipe: Recipe) -> bool:
    """Whether the learner's log-probs go through the fused head (models/modeling.py): on every
    learner and ZeRO stage, unless the engine samples from a truncated support."""
    return recipe.rollout.top_k == 0 and recipe.rollout.top_p == 1.0


def reference(recipe: Recipe, s: Sizes) -> Term | None:
    """The frozen KL reference in model.dtype (LoRA's is the policy with its adapters off)."""
    if recipe.algorithm.kl_coef <= 0 or recipe.learner.lora is not None:
        return None
    b = DTYPE_BYTES[recipe.model.dtype]
    return Term("KL reference", b * s.parameters, f"{b} B x {count(s.parameters)}")


def teacher(recipe: Recipe, s: Sizes) -> Term | None:
    """An embedded distillation teacher in model.dtype, and its float32 [tokens x vocab] log-probs."""
    if recipe.distill.teacher is None or recipe.distill.placement != "embedded":
        return None
    shape = architecture_of(recipe.distill.teacher)
    if shape is None:
        return Term("teacher", 0.0, f"unknown: no shape for {recipe.distill.teacher} (not counted)")
    b = DTYPE_BYTES[recipe.model.dtype]
    logprobs = FLOAT32_BYTES * s.tokens * shape.vocab_size
    return Term(
        "teacher",
        b * shape.parameters() + logprobs,
        f"{b} B x {count(shape.parameters())} + 4 B x {s.tokens} tokens x {shape.vocab_size} vocab",
    )


def learner_terms(recipe: Recipe, s: Sizes) -> list[Term]:
    state = LEARNER_STATE.get(recipe.learner.backend, torch_state)
    extra = [term for term in (reference(recipe, s), teacher(recipe, s)) if term is not None]
    return [*state(recipe, s), activations(recipe, s), logprob_head(recipe, s), *extra]


def vllm_share(recipe: Recipe, s: Sizes, gpu_gib: float | None) -> Term:
    utilization = recipe.rollout.vllm.gpu_memory_utilization
    if gpu_gib is None:
        return Term(
            "rollout engine", 0.0, f"vLLM: {utilization:g} x the GPU's memory (unknown: cluster.gpu_memory_gib)"
        )
    return Term("rollout engine", utilization * gpu_gib * GIB, f"vLLM: {utilization:g} x {gpu_gib:g} GiB")


def transformers_share(recipe: Recipe, s: Sizes, gpu_gib: float | None) -> Term:
    b = DTYPE_BYTES[recipe.model.dtype]
    return Term(
        "rollout engine", b * s.parameters, f"transformers: {b} B x {count(s.parameters)} (KV cache not counted)"
    )


# rollout.engine -> the memory its engine takes on a GPU it occupies
ENGINE_SHARES: dict[str, Callable[[Recipe, Sizes, float | None], Term]] = {
    "vllm": vllm_share,
    "transformers": transformers_share,
}


def runtime_term() -> Term:
    return Term("CUDA runtime", CUDA_RUNTIME_GIB * GIB, "context, cuBLAS and NCCL buffers (a constant)")


# ---------------------------------------------------------------- per GPU
@dataclass(frozen=True)
class Device:
    """One kind of GPU (or the learner's CPU process) and what each of them holds."""

    kind: str  # "learner + rollout GPU", "learner GPU", "rollout GPU", "learner process (CPU)"
    count: int
    terms: list[Term]
    on_gpu: bool = True

    @property
    def total(self) -> float:
        return sum(term.bytes for term in self.terms)


@dataclass(frozen=True)
class MemoryPlan:
    architecture: Architecture | None
    sizes: Sizes | None
    gpu_memory_gib: float | None
    devices: list[Device] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the plan could not know


def per_gpu(role_gpus: float) -> int:
    """Actors of one role a GPU holds: two at gpus 0.5, one at 1 or more."""
    return max(1, math.floor(1 / role_gpus)) if role_gpus < 1 else 1


def scaled(terms: list[Term], actors: int) -> list[Term]:
    if actors == 1:
        return terms
    return [replace(term, bytes=term.bytes * actors, how=f"{actors} x ({term.how})") for term in terms]


def devices_of(recipe: Recipe, placement: Placement, s: Sizes) -> list[Device]:
    """Each kind of GPU the placement fills, with its terms; the learner as a CPU process where
    no GPU is asked for (shown, never checked)."""
    cluster, gpu_gib = recipe.cluster, recipe.cluster.gpu_memory_gib
    learner = learner_terms(recipe, s)
    engine = ENGINE_SHARES.get(recipe.rollout.engine)
    rollout = [engine(recipe, s, gpu_gib)] if engine else []
    on_gpu = cluster.backend == "ray"
    learner_gpus = on_gpu and cluster.learner.gpus > 0
    rollout_gpus = on_gpu and cluster.rollout.gpus > 0
    if on_gpu and cluster.placement == "colocate" and (learner_gpus or rollout_gpus):
        count_ = placement.counts[placement.groups["learner"]]
        return [Device("learner + rollout GPU", count_, [*learner, *rollout, runtime_term()])]
    devices = []
    if learner_gpus:
        devices.append(
            Device(
                "learner GPU",
                cluster.learner.workers,
                [*scaled(learner, per_gpu(cluster.learner.gpus)), runtime_term()],
            )
        )
    else:
        devices.append(Device("learner process (CPU)", learner_ranks(recipe), learner, on_gpu=False))
    if rollout_gpus:
        devices.append(Device("rollout GPU", cluster.rollout.workers, scaled(rollout, per_gpu(cluster.rollout.gpus))))
    return devices


def plan_memory(recipe: Recipe, placement: Placement) -> MemoryPlan:
    """The estimate for every kind of GPU the recipe uses; without the model's shape, notes only."""
    architecture = architecture_of(recipe.model.path, recipe.model.lab)
    if architecture is None:
        note = f"model.path {recipe.model.path}: its shape is unknown without downloading it; memory not planned"
        return MemoryPlan(None, None, recipe.cluster.gpu_memory_gib, notes=[note])
    sizes = sizes_of(recipe, architecture)
    notes = []
    if recipe.learner.backend not in LEARNER_STATE:
        notes.append(f"learner.backend {recipe.learner.backend}: planned as the torch learner")
    if recipe.rollout.engine not in ENGINE_SHARES:
        notes.append(f"rollout.engine {recipe.rollout.engine}: its share is unknown (not counted)")
    return MemoryPlan(architecture, sizes, recipe.cluster.gpu_memory_gib, devices_of(recipe, placement, sizes), notes)


# ---------------------------------------------------------------- the check
TOKEN_TERMS = ("activations", "log-prob head", "teacher")  # grow with the pass's tokens


def fitting_tokens(recipe: Recipe, plan: MemoryPlan, device: Device) -> int:
    """The most tokens per pass that fit the device, every other term held (0: none do)."""
    room = plan.gpu_memory_gib * GIB - sum(t.bytes for t in device.terms if t.name not in TOKEN_TERMS)
    per_token = sum(t.bytes for t in device.terms if t.name in TOKEN_TERMS) / plan.sizes.tokens
    return max(0, int(room / per_token)) if per_token else 0


def term_fix(recipe: Recipe, plan: MemoryPlan, device: Device, term: Term) -> str:
    """The knob that shrinks `term`, as the fix to write."""
    if term.name in TOKEN_TERMS:
        fits = fitting_tokens(recipe, plan, device)
        longest = recipe.rollout.max_prompt_length + recipe.rollout.max_response_length
        if recipe.learner.micro_batch_tokens > 0 and fits >= longest:
            return f"lower learner.micro_batch_tokens to at most {fits // 1024 * 1024 or fits}"
        if recipe.learner.micro_batch_tokens == 0 and fits >= longest:
            return f"lower learner.micro_batch_size to at most {fits // longest}"
        if term.name == "activations" and not recipe.learner.gradient_checkpointing:
            return "set learner.gradient_checkpointing: true"
        return f"shorten rollout.max_response_length (one sequence of {longest} tokens does not fit)"
    return TERM_FIXES[term.name](recipe)


# term name -> the fix for the terms that do not grow with the pass's tokens
TERM_FIXES: dict[str, Callable[[Recipe], str]] = {
    "rollout engine": lambda r: "lower rollout.vllm.gpu_memory_utilization, or cluster.placement: split",
    "weights": lambda r: "set learner.zero_stage: 3 (partitions the weights) or learner.lora",
    "gradients": lambda r: "set learner.zero_stage: 2 (partitions the gradients) or learner.lora",
    "optimizer": lambda r: (
        "set learner.zero_stage: 1-3 over more ranks, learner.offload_optimizer: true, or learner.lora"
    ),
    "KL reference": lambda r: "set algorithm.kl_coef: 0, or learner.lora (its reference is the policy, adapters off)",
    "CUDA runtime": lambda r: "use a GPU with more memory",
}
TERM_FIELDS = {  # the field each fix names first, for the error's "field: ..." form
    "rollout engine": "rollout.vllm.gpu_memory_utilization",
    "weights": "learner.zero_stage",
    "gradients": "learner.zero_stage",
    "optimizer": "learner.zero_stage",
    "KL reference": "algorithm.kl_coef",
    "teacher": "distill.placement",
    "CUDA runtime": "cluster.gpu_memory_gib",
}


def check_memory_fits(recipe: Recipe, placement: Placement) -> MemoryPlan:
    """The plan; ConfigError in one line where a GPU's estimate exceeds cluster.gpu_memory_gib,
    naming the largest term and its fix. Nothing is refused where the GPU's memory or the
    model's shape is unknown, or where nothing runs on a GPU."""
    plan = plan_memory(recipe, placement)
    if plan.gpu_memory_gib is None or plan.sizes is None:
        return plan
    for device in plan.devices:
        if device.on_gpu and device.total > plan.gpu_memory_gib * GIB:
            raise ConfigError(over_budget(recipe, plan, device))
    return plan


def over_budget(recipe: Recipe, plan: MemoryPlan, device: Device) -> str:
    largest = max(device.terms, key=lambda term: term.bytes)
    field_name = tokens_knob(recipe) if largest.name in TOKEN_TERMS else TERM_FIELDS[largest.name]
    return (
        f"{field_name}: a {device.kind} needs {device.total / GIB:.1f} GiB, more than its "
        f"{plan.gpu_memory_gib:g} GiB (cluster.gpu_memory_gib); the largest term is the {largest.name}, "
        f"{largest.gib:.1f} GiB; {term_fix(recipe, plan, device, largest)} (efficient-rl plan prints every term)"
    )


# ---------------------------------------------------------------- the table
def memory_table(plan: MemoryPlan, model_name: str) -> str:
    lines = []
    if plan.architecture is not None:
        a, s = plan.architecture, plan.sizes
        lines.append(
            f"model {model_name}: {count(s.parameters)} parameters ({count(s.trained)} trained), hidden "
            f"{a.hidden_size}, {a.num_hidden_layers} layers, vocab {a.vocab_size}; {s.tokens} tokens per pass, "
            f"{s.ranks} learner rank(s)"
        )
    memory = (
        f"{plan.gpu_memory_gib:g} GiB" if plan.gpu_memory_gib is not None else "unknown (set cluster.gpu_memory_gib)"
    )
    lines.append(f"GPU memory: {memory}")
    for device in plan.devices:
        unit, size = ("GiB", GIB) if device.total >= GIB else ("MiB", 2**20)
        lines += ["", f"{device.kind} (x{device.count})", f"  {'term':16s} {unit:>8s}  how"]
        lines += [f"  {term.name:16s} {term.bytes / size:8.2f}  {term.how}" for term in device.terms]
        lines.append(f"  {'total':16s} {device.total / size:8.2f}  {verdict(plan, device)}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def verdict(plan: MemoryPlan, device: Device) -> str:
    if not device.on_gpu:
        return "on CPU: not checked"
    if plan.gpu_memory_gib is None:
        return "not checked: the GPU's memory is unknown"
    left = plan.gpu_memory_gib - device.total / GIB
    return f"fits, {left:.1f} GiB to spare" if left >= 0 else f"does NOT fit: {-left:.1f} GiB over"
