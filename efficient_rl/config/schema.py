"""The recipe's schema: one dataclass per section, each field with its default and what it means.

These dataclasses are the one place for a recipe default. A recipe file may start with
`defaults: grpo.yaml` (config/loading.py), so a method reads as a small diff against GRPO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelSection:
    path: str | None = None  # a model directory, a .gguf file, a builtin (smollm2) or a Hugging Face hub id
    lab: str | None = None  # or a lab preset, built on first use and cached (efficient_rl.lab)
    # The dtype every inference copy of a model runs in: the rollout engines (vLLM's `dtype`; the
    # transformers engine generates under autocast), the KL reference and the distillation teacher.
    # Weight syncs send it. The learner's own compute is learner.precision.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # The attention kernel of the transformers models (learner, reference, teacher): sdpa on CPU;
    # flash_attention_2 on GPU where flash-attn is installed (not exercised here).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Where the models compute (docs/engines.md#devices). auto: embedded, the GPU when torch sees
    # one; under Ray, each role where its actors' cluster.<role>.gpus put it. cpu / cuda: insist.
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class DataSection:
    # "lab:<preset>" (the lab task's train split), a .jsonl / .parquet file, or "hf:<name>[:<config>]"
    # (a Hugging Face dataset: hub id or local directory, through `datasets`)
    train: str = "lab:quickstart"
    heldout: str = "lab:quickstart"  # same forms; the held-out split is used for evaluation
    # column holding the question: text, or chat turns [{role, content}, ...] (verl's and TRL's `prompt`)
    # that go through the chat template as they are. A dotted key reads a nested value.
    question_key: str = "question"
    # column holding the reference answer, text or a number (other columns ride along); a dotted key
    # reads a nested value: verl's reward_model.ground_truth
    answer_key: str = "answer"
    train_split: str = "train"  # hf: datasets only: the split to train on
    heldout_split: str = "test"  # hf: datasets only: the split to evaluate on
    train_size: int = 20000  # lab only: number of generated training problems
    heldout_size: int = 200  # lab only: number of generated held-out problems
    shuffle: bool = True  # reshuffle the training prompts every epoch (seeded)


@dataclass
class PromptSection:
    # auto: through the tokenizer's chat template when it has one, else the plain text. always: the
    # template is required (an error without one). never: the plain text even if there is one.
    chat_template: Literal["auto", "always", "never"] = "auto"
    # a system turn before the question (chat templates only; a chat-turn question with a system turn
    # of its own keeps that one)
    system_prompt: str | None = None
    # The user turn (with chat-turn data: the last turn, {question} standing for its content). A name
    # in braces stands for that field of the sample: "{question}", any data column ("{level}"), or a
    # variable below ("{target_length}"); a name no sample has is one line of error at load. Other
    # braces ("\\boxed{}") are kept as they are.
    user_template: str = "{question}"
    # Fields drawn for every sample, each from a PROMPT_VARIABLES entry (efficient_rl/data/variables.py),
    # reproducibly from the seed, once at load: L1's {target_length: {name: uniform_int, low: 100,
    # high: 4000}}. Length penalties read them from the sample (docs/algorithms.md#prompt-variables).
    variables: dict[str, Choice] = field(default_factory=dict)


@dataclass
class VLLMSection:
    """vLLM engine arguments (rollout.engine: vllm); each is vLLM's own name. Null: decided by the
    device (efficient_rl/rollout/vllm_engine.py `engine_arguments`)."""

    gpu_memory_utilization: float = 0.9  # GPU only: the share of GPU memory vLLM takes (vLLM's default)
    tensor_parallel_size: int = 1  # GPUs one engine spans
    max_num_seqs: int | None = None  # sequences scheduled at once; null: vLLM's default
    enable_prefix_caching: bool = True  # a group's rollouts share their prompt's KV (vLLM's default)
    # null: true on CPU (nothing to capture there, and compiling costs minutes on a few cores),
    # false on GPU (CUDA graphs)
    enforce_eager: bool | None = None
    cpu_kv_cache_gb: float = 1.0  # CPU only: KV-cache space (vLLM's default asks too much of 24 GiB)


@dataclass
class ThinkingBudgetSection:
    """Budget forcing (docs/engines.md#thinking-budget-rolloutthinking_budget): a response that has not
    written `close` within `tokens` tokens gets `close` + `answer_prompt` appended (written by the
    engine, never sampled: kept out of the loss), then up to `answer_tokens` more tokens to answer in,
    within max_response_length. Off by default; the same as `efficient-rl eval --force-answer`."""

    tokens: int = 0  # the reasoning budget in tokens; 0: off
    close: str = "</think>"  # the text that ends the reasoning (R1 / Qwen3 style)
    answer_prompt: str = ""  # appended after `close`, e.g. "\n\nFinal answer: "
    answer_tokens: int = 64  # tokens the answer may take after the appended text (within the cap)


@dataclass
class RolloutSection:
    engine: str = "transformers"
    group_size: int = 8  # G, rollouts per prompt (DLER: 16, TEMPO: 7)
    prompts_per_step: int = 16  # prompts per training step (DLER: 512)
    max_prompt_length: int = 256  # longer prompts are refused at load time
    # The hard generation cap. With the truncation penalty it is DLER's truncation length
    # (paper: 4000 tokens for DeepSeek-R1-1.5B/7B).
    max_response_length: int = 256
    temperature: float = 1.0  # DLER / DAPO train at 1.0
    # The engines sample from the top_k most likely tokens (0: all), then the fewest most likely
    # whose probability reaches top_p (1.0: all); the learner's log-probs are over the same tokens.
    top_p: float = 1.0
    top_k: int = 0
    max_batch_size: int = 256  # rollouts per generate call
    # Debug: after every weight sync, check the engine's greedy output (and its log-probs) on a probe
    # prompt against transformers' on the learner's weights (stale weights fail loudly). vllm only.
    verify_sync: bool = False
    thinking_budget: ThinkingBudgetSection = field(default_factory=ThinkingBudgetSection)
    vllm: VLLMSection = field(default_factory=VLLMSection)


@dataclass
class RewardEntry:
    name: str = "math"  # a built-in reward name
    weight: float = 1.0
    params: dict = field(default_factory=dict)  # keyword arguments for the reward function
    # How the function is called (efficient_rl/scoring/forms.py): native (completion, sample,
    # **params), batched, trl (TRL's reward_funcs) or verl (verl's compute_score).
    form: str = "native"


@dataclass
class ScoringSection:
    workers: int = 2  # spawned reward worker processes; 0 = call rewards in the trainer (no timeout)
    timeout: float = 10.0  # seconds per reward call; a call past it scores 0 and counts in reward/timeouts


@dataclass
class Choice:
    """A registry entry a recipe picks: its name, and the parameters the recipe sets (the others
    keep the entry's defaults). In YAML a bare name or a mapping with `name`:
    `policy_loss: {name: ppo_clip, clip_high: 0.28}`; on the command line
    `algorithm.policy_loss=gspo` (an entry with its defaults) or `algorithm.policy_loss.clip_high=0.28`.
    `efficient-rl methods` lists every entry with its parameters and defaults."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_recipe(self):
        return {"name": self.name, **self.params} if self.params else self.name


def choice(name: str) -> Any:
    return field(default_factory=lambda: Choice(name))


@dataclass
class DifficultyBand:
    """The groups a length penalty applies to: those whose `statistic` lies in [lower, upper]."""

    statistic: str = "pass_rate"  # a group statistic: pass_rate | fail_rate (shaping.py GROUP_STATISTICS)
    lower: float = 0.0
    upper: float = 1.0


@dataclass
class LengthGateSection:
    """Where the length penalty's delta (reward - score) applies, for any algorithm.length_penalty
    (docs/algorithms.md#length-gate): the penalty runs on the whole round, then its delta is kept
    only for groups in the band, times 1 for correct rollouts (0 for wrong ones under
    correct_only), times the group statistic `scale` names. The defaults keep every delta whole."""

    correct_only: bool = False  # wrong rollouts keep their scores
    scale: str = "none"  # none | pass_rate (prime-rl's success gating: spare hard prompts) | fail_rate
    difficulty: DifficultyBand = field(default_factory=DifficultyBand)


@dataclass
class AlgorithmSection:
    # Each Choice names an entry of a registry (the loader checks the entry's parameters):
    advantage: Choice = choice("grpo")  # grpo | dler | tempo (ADVANTAGES)
    policy_loss: Choice = choice("ppo_clip")  # ppo_clip | gspo | gspo_token | cispo | ctpo | gmpo
    loss_agg: Choice = choice("token-mean")  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm | balanced
    kl_coef: float = 0.0  # KL-to-reference loss weight (DLER: 0.0005); 0 loads no reference
    kl_estimator: Choice = choice("low_var_kl")  # k1 | low_var_kl (k3) | mse (k2)
    length_penalty: Choice = choice("none")  # none | truncation (DLER) | overlong (DAPO soft punishment)
    length_gate: LengthGateSection = field(default_factory=LengthGateSection)  # which deltas of it apply
    # The truncation length in force for each rollout, which the cap-reading length penalties use
    # (LENGTH_CAPS): fixed ({length: null} = rollout.max_response_length) | difficulty_aware (DA-DLER,
    # paper §3.5: a length per prompt from its group's correctness ratio, {min_correct: [0.0, 0.5],
    # truncation_lengths: [4000, 2000]})
    length_cap: Choice = choice("fixed")
    # Which generated groups a step trains on (GROUP_SAMPLERS): all (one round) | dynamic (drop the
    # groups with zero spread of `metric`: score | reward | accuracy; generate more, up to max_rounds)
    sampling: Choice = choice("all")
    # Engine/learner mismatch: "tis" weights each token's policy-gradient term by
    # min(pi_learner / pi_engine, cap) on the sampled token (truncated importance sampling).
    rollout_correction: Choice = choice("none")  # none | tis
    # policy_gradient: the RL loss above; distillation: on-policy distillation from distill.teacher
    objective: Choice = choice("policy_gradient")
    # Token-level advantage shaping after the advantage estimator (TOKEN_SHAPERS): none | decs (DeCS:
    # on correct rollouts, the tokens after the answer is first reached get min(A, 0) - penalty)
    token_shaping: Choice = choice("none")
    # Token-level efficiency (D3S, "Beyond the 80/20 rule", TIP): which response tokens enter the
    # loss; the learner runs its LM head on those only. all | high_entropy | d3s_tokens | random |
    # entropy_sampling | tip_soft_or | tip_q3 (TIP, with distillation)
    token_selection: Choice = choice("all")
    # With a token selection: average the loss over the kept tokens, or over all response tokens.
    loss_denominator: Literal["kept", "all"] = "kept"
    # Which rollouts a step learns from: none | d3s (D3S sample level: maximal advantage variance)
    sample_selection: Choice = choice("none")


@dataclass
class DistillSection:
    """The teacher of on-policy distillation (algorithm.objective: {name: distillation, divergence,
    beta}): the student samples, the teacher scores the same tokens, the loss is a per-token
    divergence over the full vocabulary."""

    teacher: str | None = None  # model directory or lab:<preset>, with the student's tokenizer
    placement: Literal["embedded", "ray"] = "embedded"  # in each learner process, or one Ray actor
    chunk_rows: int = 512  # positions per chunk of vocabulary-sized work


# Every projection of a Llama/Qwen-style block, attention and MLP
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSection:
    """Low-rank adapters through PEFT instead of full fine-tuning (docs/lora.md): each target
    linear layer W computes W x + B A x * alpha / rank, and only A and B train."""

    rank: int = 16
    alpha: float = 32.0  # the update's scale is alpha / rank
    dropout: float = 0.0  # on the adapters' input, in training only
    # Leaf names of the model's linear layers, checked against the model at load. All of them by
    # default: attention-only LoRA does worse ("LoRA Without Regret", docs/lora.md).
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class LearnerSection:
    backend: str = "torch"
    lr: float = 1e-6  # DLER / DAPO: 1e-6 for 1.5B-32B models
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # The gradient norm is clipped to this; "none": not clipped (the norm is still computed, logged
    # and checked: a non-finite loss or norm skips the step, docs/reliability.md).
    grad_clip: float | Literal["none"] = 1.0
    # The run stops after this many optimizer steps in a row were skipped for a non-finite loss or
    # gradient norm (each skip is counted in learner/skipped_steps and printed).
    max_skipped_steps: int = 3
    # torch.distributed's timeout for the DeepSpeed ranks' collectives, in minutes. DeepSpeed's own
    # default is 10; a 7B checkpoint on slow shared storage takes ~17 (docs/reliability.md).
    dist_timeout_minutes: float = 60.0
    mini_batch_prompts: int = 0  # prompts per optimizer step; 0 = all (one step per batch)
    micro_batch_size: int = 32  # rollouts per forward/backward pass (when micro_batch_tokens is 0)
    # Micro-batches by a token budget instead: rows grouped by length so that each forward pass
    # holds at most this many token positions, padding included (a longer sequence goes alone).
    micro_batch_tokens: int = 0
    # Several responses in one row (position ids restart per sequence, attention stays within
    # each): almost no padding. With micro_batch_tokens 0 the rows of micro_batch_size are packed.
    packing: bool = False
    epochs: int = 1  # PPO epochs over each rollout batch
    # bf16: passes on a bf16 copy of the model (DeepSpeed: its bf16 section), gradients, master
    # weights and optimizer state in float32; the log-probs of the loss are float32 from bf16 logits.
    precision: Literal["fp32", "bf16"] = "fp32"
    # The learning rate over training steps: constant | linear | cosine, each with warmup_steps
    # (LR_SCHEDULES in efficient_rl/learner/schedules.py)
    lr_schedule: Choice = choice("constant")
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # The fused log-prob head (efficient_rl/models/fused_head.py) computes the logits one tile of
    # [head_token_tile tokens x head_vocab_tile vocabulary entries] at a time, in float32: about two
    # such tiles are its temporaries (128 MiB each at these defaults), whatever the micro-batch.
    head_token_tile: int = 4096
    head_vocab_tile: int = 8192
    # LoRA adapters ({rank, alpha, dropout, target_modules}, LoraSection); null: full fine-tuning.
    # LoRA wants a learning rate about 10x full fine-tuning's (docs/lora.md).
    lora: LoraSection | None = None
    # deepspeed backend only:
    zero_stage: int = 2  # ZeRO stage 0, 1, 2 or 3
    offload_optimizer: bool = False  # keep optimizer state (and its step) in CPU memory


@dataclass
class RoleResources:
    workers: int = 1  # actors of this role (learner: the data-parallel world size)
    cpus: float = 1.0  # per actor
    gpus: float = 0.0  # per actor


@dataclass
class ClusterSection:
    # embedded: everything in the driver's process. ray: rollout engines and learner ranks as Ray actors.
    backend: Literal["embedded", "ray"] = "embedded"
    address: str | None = None  # an existing Ray cluster ("auto" or host:port); null starts a local one
    # split: each actor has resources of its own. colocate: rollout worker i and learner rank i
    # share bundle i of one placement group (each takes half of it), as GPU time-sharing does.
    placement: Literal["split", "colocate"] = "split"
    rollout: RoleResources = field(default_factory=RoleResources)
    learner: RoleResources = field(default_factory=RoleResources)
    # Seconds Ray may take to place the actors' bundles; past it, one line naming what the cluster lacks.
    placement_timeout: float = 600.0
    max_rollout_restarts: int = 3  # a dead rollout actor is restarted at most this often per run
    sync_bucket_mb: float = 64.0  # weights travel to the engines in buckets of this size
    # object_store: through Ray's object store (CPU, any layout; restarts dead rollout workers).
    # gloo / nccl: learner rank 0 broadcasts each bucket to the engines in a group of their own,
    # into host memory (gloo) or the engines' GPUs (nccl, not exercised on CPU machines); each
    # engine holds one bucket at a time. See docs/engines.md.
    weight_transport: Literal["object_store", "gloo", "nccl"] = "object_store"
    # How rollouts and learning take turns (PIPELINES, docs/pipeline.md): sync (generate, then
    # learn) or {name: overlapped, max_staleness: 1} (the next batch is generated while the
    # learner trains; a trained rollout lags at most max_staleness policy versions).
    pipeline: Choice = choice("sync")
    # The memory of one GPU in GiB, as the driver reports it (an H100 80GB: 79.6). `plan`, `train`
    # and `submit` estimate each GPU's peak from the model and the recipe, and refuse a recipe
    # that would not fit (docs/memory.md). null: unknown, nothing refused.
    gpu_memory_gib: float | None = None


@dataclass
class LoggingSection:
    output_dir: str = "runs"
    name: str | None = None  # run directory name; default: the recipe file's stem
    # Experiment trackers (TRACKERS in efficient_rl/driver/trackers.py, docs/trackers.md), each a name or
    # {name: wandb, project: ..., mode: offline}: tensorboard | wandb | mlflow.
    trackers: list[Choice] = field(default_factory=lambda: [Choice("tensorboard")])
    progress: bool = True
    # Every k steps (0 = never), this many of the step's rollouts (prompt, completion, score, reward
    # after shaping, length, truncation) to completions.jsonl and to the trackers as a table.
    completions_every: int = 10
    completions_samples: int = 8


@dataclass
class EvalSection:
    before_training: bool = True  # evaluate the starting model on the held-out split
    after_training: bool = True
    every: int = 0  # also every k steps (0 = never)
    num_problems: int = 200
    samples_per_problem: int = 1  # pass@1 is averaged over these samples
    max_new_tokens: int = 512  # generous cap so the starting model's long answers finish
    temperature: float = 0.6  # DLER evaluates at 0.6 / top-p 0.95
    top_p: float = 0.95
    # The held-out problems once per value of a prompt variable the user template shows, e.g. L1's
    # {target_length: [512, 1024, 2048, 3600]}: eval/target_length=512/pass@1, ..., and the
    # eval/... figures over all of them together.
    variables: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class CheckpointSection:
    every: int = 0  # save every k steps (0 = only at the end)
    keep: int = 2  # most recent checkpoints kept


@dataclass
class Recipe:
    steps: int = 100
    seed: int = 0
    # Modules (dotted names or .py files) imported when the recipe loads: where a recipe's own
    # methods register themselves (docs/extending.md).
    imports: list[str] = field(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: list[RewardEntry] = field(default_factory=lambda: [RewardEntry()])
    scoring: ScoringSection = field(default_factory=ScoringSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    learner: LearnerSection = field(default_factory=LearnerSection)
    distill: DistillSection = field(default_factory=DistillSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict:
        """The recipe as a YAML mapping that loads back into the same recipe."""
        return as_plain(self)

    def longest_sequence(self) -> int:
        """Prompt plus the longest response the run generates (training or evaluation), in tokens."""
        return self.rollout.max_prompt_length + max(self.rollout.max_response_length, self.eval.max_new_tokens)


def as_plain(node):
    """Dataclasses as mappings, a Choice in its recipe form."""
    if isinstance(node, Choice):
        return node.as_recipe()
    if dataclasses.is_dataclass(node):
        return {item.name: as_plain(getattr(node, item.name)) for item in dataclasses.fields(node)}
    if isinstance(node, list):
        return [as_plain(item) for item in node]
    if isinstance(node, dict):
        return {key: as_plain(item) for key, item in node.items()}
    return node
