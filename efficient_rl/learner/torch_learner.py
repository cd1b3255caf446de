"""Single-process torch learner: AdamW, gradient clipping, micro-batches, PPO mini-batches.

The update loop here is shared with the DeepSpeed learner, which overrides the four steps that
differ between one process and a data-parallel group: which rows of a mini-batch this process
trains on, backward, the optimizer step, and summing statistics over processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import TOKEN_STATISTICS, map_row_chunks
from efficient_rl.algos.losses import LossDenominators
from efficient_rl.config.plan import Plan
from efficient_rl.config.schema import LearnerSection
from efficient_rl.errors import ConfigError, WorkerFailure
from efficient_rl.learner.base import LEARNERS
from efficient_rl.learner.micro_batches import plan_micro_batches
from efficient_rl.learner.objective import (
    ObjectiveSettings,
    denominators,
    head_logprobs,
    loss_masks,
    objective_settings,
    policy_logprobs,
    ratio_quantiles,
)
from efficient_rl.learner.schedules import LR_SCHEDULES
from efficient_rl.learner.teacher import build_teacher
from efficient_rl.models.files import (
    DEFAULT_RELEASE_DTYPE,
    dtype_name,
    in_dtype,
    persistent_buffers,
    released_dtype,
    save_model_files,
)
from efficient_rl.models.lora import attach_lora, plain_weights, policy_weights_dir, save_adapter, trainable_parameters
from efficient_rl.models.modeling import (
    DTYPES,
    PRECISIONS,
    forward_positions,
    load_model,
    output_head,
    response_hidden_states,
    torch_device,
)
from efficient_rl.models.weights import WeightBucket, plan_buckets
from efficient_rl.registry import Bound

OPTIMIZER_FILE = "optimizer.pt"
NO_CLIPPING = "none"  # learner.grad_clip's value for no clipping
LEARNER_STATE_FILE = "learner_state.json"  # where the learning-rate schedule stands
# The float32 master weights, written only when the model files round them (a model released in
# bf16). In a folder of its own: vLLM and `efficient-rl merge` read every *.safetensors at the top
# of a model directory that has no index, and would take these for the model's weights.
MASTER_WEIGHTS_FILE = Path("master_weights") / "float32.safetensors"


def default_schedule() -> Bound:
    """The recipe's default learning-rate schedule (LearnerSection.lr_schedule), with its defaults."""
    return LR_SCHEDULES.get(LearnerSection().lr_schedule.name).bind()


@dataclass(frozen=True)
class OptimSettings:
    """The learner section's optimisation settings. Defaults are the recipe's (LearnerSection),
    where each is documented."""

    lr: float = LearnerSection.lr
    weight_decay: float = LearnerSection.weight_decay
    betas: tuple[float, float] = tuple(LearnerSection().betas)
    grad_clip: float | None = LearnerSection.grad_clip  # None: no clipping (learner.grad_clip: none)
    mini_batch_size: int = 0  # rollouts per optimizer step; 0 = the whole batch
    micro_batch_size: int = LearnerSection.micro_batch_size
    micro_batch_tokens: int = LearnerSection.micro_batch_tokens
    epochs: int = LearnerSection.epochs
    precision: str = LearnerSection.precision  # a PRECISIONS name
    schedule: Bound = field(default_factory=default_schedule)  # an LR_SCHEDULES entry
    total_steps: int = 1  # training steps of the run, the schedule's length


def optim_settings(plan: Plan) -> OptimSettings:
    recipe = plan.recipe
    lrn = recipe.learner
    return OptimSettings(
        lr=lrn.lr,
        weight_decay=lrn.weight_decay,
        betas=tuple(lrn.betas),
        grad_clip=None if lrn.grad_clip == NO_CLIPPING else lrn.grad_clip,
        mini_batch_size=lrn.mini_batch_prompts * recipe.rollout.group_size,
        micro_batch_size=lrn.micro_batch_size,
        micro_batch_tokens=lrn.micro_batch_tokens,
        epochs=lrn.epochs,
        precision=lrn.precision,
        schedule=plan["learner.lr_schedule"],
        total_steps=recipe.steps,
    )


def full_shape(parameter: torch.nn.Parameter) -> torch.Size:
    """The unsharded shape (ZeRO-3 keeps only a shard and records the full shape)."""
    return getattr(parameter, "ds_shape", parameter.shape)


@dataclass
class MiniBatch:
    rows: RolloutBatch  # the rows this process trains on
    den: LossDenominators  # loss denominators of the whole mini-batch, across processes


class TokenStatSums:
    """Sums of per-token statistics over micro-batches, reported as means per token."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, stats: dict[str, torch.Tensor], tokens: float) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.tokens += tokens

    def means(self, total) -> dict[str, float]:
        """Means per token, with sums first totalled over processes by `total`."""
        sums = total({**self.sums, "__tokens": self.tokens})
        tokens = max(sums.pop("__tokens"), 1.0)
        return {name: value / tokens for name, value in sums.items()}


class TorchLearner:
    rank, world_size = 0, 1  # rank 0 sends weights and writes files
    schedule_step = 0  # updates done: where the learning-rate schedule stands
    # Optimizer steps skipped in a row for a non-finite loss or gradient norm, across updates: the
    # driver stops the run when it reaches learner.max_skipped_steps.
    consecutive_skips = 0

    def __init__(
        self,
        model,
        objective: ObjectiveSettings,
        optim: OptimSettings,
        reference=None,
        teacher=None,
        sync_dtype: torch.dtype = torch.float32,
        adapter=None,
        release_dtype: torch.dtype = DEFAULT_RELEASE_DTYPE,
    ):
        # float32: the master weights, which the optimizer steps (checkpoints write the model's files
        # in its own dtype, release_dtype, and these beside them where that dtype rounds them)
        self.model = model
        self.device = model.device  # where it computes: its factory put the model there (plan.devices.learner)
        self.reference = reference  # frozen copy of the initial policy, only when KL is on (and no LoRA)
        self.adapter = adapter  # the PeftModel around `model` when learner.lora is set (efficient_rl/models/lora.py)
        self.teacher = teacher  # on-policy distillation only (learner/teacher.py)
        self.objective = objective
        self.optim = optim
        self.sync_dtype = sync_dtype  # the rollout engines' dtype (model.dtype): weights leave in it
        self.release_dtype = release_dtype  # the model's own (models/files.py): checkpoints write its files in it
        self.optimizer = adamw(model, optim)
        # What forward and backward passes run on: the model itself, or in bf16 its bf16 copy (and
        # the copy's adapters, which the KL reference switches off).
        self.compute_model, self.compute_adapter = compute_copy(model, adapter, PRECISIONS[optim.precision])
        self.master_pairs = list(zip(trainable_parameters(model), trainable_parameters(self.compute_model)))

    # ------------------------------------------------------------ the update loop
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        lr = self.optim.lr * self.optim.schedule(self.schedule_step, self.optim.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics = self._update(batch)
        self.schedule_step += 1
        return {**metrics, "lr": lr}

    def _update(self, batch: RolloutBatch) -> dict[str, float]:
        mini_size = self.optim.mini_batch_size or len(batch)
        minis = [
            self._mini_batch(batch.select(range(start, min(start + mini_size, len(batch)))))
            for start in range(0, len(batch), mini_size)
        ]
        self.policy.train()
        for mini in minis:  # both before any optimizer step: they are the pre-update policies
            if self.optim.epochs * len(minis) > 1 and "old_logprobs" in self.objective.needs:
                mini.rows.old_logprobs = self.logprobs(mini.rows, self.policy)
            if self.objective.kl_coef > 0:
                mini.rows.ref_logprobs = self.reference_logprobs(mini.rows)
        token_stats, losses, grad_norms, skipped = TokenStatSums(), [], [], 0
        self.positions = {"positions": 0.0, "tokens": 0.0}  # of the training passes, for padding_fraction
        for _ in range(self.optim.epochs):
            for mini in minis:
                loss, grad_norm, stepped = self._optimizer_step(mini, token_stats)
                losses.append(loss)
                if stepped:
                    grad_norms.append(grad_norm)
                skipped += not stepped
                self.consecutive_skips = 0 if stepped else self.consecutive_skips + 1
        losses = self.total({f"loss{i}": loss for i, loss in enumerate(losses)}).values()
        positions = self.total(self.positions)
        return {
            "loss": sum(losses) / len(losses),
            # over the steps taken: a skipped step's norm is not finite (NaN when none was taken)
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else math.nan,
            "optimizer_steps": float(len(losses)),
            "learner/skipped_steps": float(skipped),
            "learner/consecutive_skipped_steps": float(self.consecutive_skips),
            # the share of the token positions the forward passes computed that were padding
            "learner/padding_fraction": 1.0 - positions["tokens"] / max(positions["positions"], 1.0),
            **ratio_quantiles(token_stats.means(self.total)),
        }

    def _mini_batch(self, mini: RolloutBatch) -> MiniBatch:
        return MiniBatch(rows=self.local_rows(mini), den=denominators(mini, self.objective))

    def _optimizer_step(self, mini: MiniBatch, token_stats: TokenStatSums) -> tuple[float, float, bool]:
        """(this process's loss, gradient norm, whether the step was taken) of one mini-batch."""
        total_loss = 0.0
        for indices, rows in self.micro_batches(mini.rows):
            loss, stats = self._micro_batch_loss(rows, mini.den)
            self.backward(loss)
            total_loss += loss.item()
            token_stats.add(stats, float(loss_masks(rows, self.objective)[0].sum()))
            positions, tokens = forward_positions(rows, self.objective.packing, self.attn_implementation)
            self.positions["positions"] += positions
            self.positions["tokens"] += tokens if indices else 0.0  # a filler pass is all padding
        return total_loss, *self.apply_gradients(total_loss)

    def _micro_batch_loss(self, rows: RolloutBatch, den: LossDenominators):
        """The loss and its per-token statistics (sums) over the tokens that enter the loss."""
        return self.objective.objective(self.policy, rows, self.objective, den, self.teacher)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.model.config, "_attn_implementation", "sdpa")

    def micro_batches(self, batch: RolloutBatch) -> Iterator[tuple[list[int], RolloutBatch]]:
        """(row indices, rows) of each micro-batch of `batch`, as many on every process of the
        group: one with fewer passes makes up the difference with filler passes (indices [], one
        row with its masks zeroed), since collectives run in every forward and backward."""
        plan = plan_micro_batches(
            batch, self.optim.micro_batch_size, self.optim.micro_batch_tokens, self.objective.packing
        )
        for indices in plan:
            yield indices, batch.select(indices)
        for _ in range(self.agreed_count(len(plan)) - len(plan)):
            yield [], filler_row(batch)

    def over_micro_batches(self, batch: RolloutBatch, per_rows, channels: tuple[int, ...] = ()) -> torch.Tensor:
        """[B, R, *channels] from per_rows(micro-batch rows) -> [rows, width, *channels], micro-batch
        by micro-batch, each put back at its rows (widths differ: each micro-batch is trimmed)."""
        out = torch.zeros(len(batch), batch.response_ids.shape[1], *channels, device="cpu")
        for indices, rows in self.micro_batches(batch):
            values = per_rows(rows).cpu()
            if indices:
                out[indices, : values.shape[1]] = values
        return out

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, model) -> torch.Tensor:
        def of_rows(rows: RolloutBatch) -> torch.Tensor:
            logprobs, _ = policy_logprobs(model, rows, self.objective, with_entropy=False)
            return logprobs

        return self.over_micro_batches(batch, of_rows).to(batch.response_mask.device) * batch.response_mask

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """Log-probs under the KL reference: the initial policy. With LoRA that is the policy with
        its adapters switched off, so no second copy of the model is held."""
        if self.compute_adapter is None:
            return self.logprobs(batch, self.reference)
        with self.compute_adapter.disable_adapter():
            return self.logprobs(batch, self.policy)

    @torch.no_grad()
    def token_statistics(self, batch: RolloutBatch, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """[B, R] per-token statistics by TOKEN_STATISTICS name at every response token (0 on
        padding), in one pass: the student's log-probabilities once, the teacher's once if any of
        them needs it. The head runs on chunks of valid positions, so no [B, R, V] logits exist.
        Every rank of a data-parallel group computes them for the whole batch (ZeRO-3 needs them
        all in the forward anyway)."""
        head = output_head(self.policy)
        entries = [TOKEN_STATISTICS.get(name) for name in names]
        with_teacher = any("teacher" in entry.needs for entry in entries)

        def statistics(hidden: torch.Tensor, teacher=None) -> torch.Tensor:
            student = head_logprobs(head, hidden, self.objective.temperature)
            return torch.stack([entry(student, teacher) for entry in entries], -1)

        def per_token(rows: RolloutBatch) -> torch.Tensor:
            """[rows, width, channels]: the statistics at every response token, 0 on padding."""
            valid = rows.response_mask.bool()
            inputs = [response_hidden_states(self.policy, rows, self.objective.packing)[valid]]
            if with_teacher:
                inputs.append(self.teacher.logprobs(rows, valid).to(valid.device))
            values = map_row_chunks(statistics, inputs, self.objective.chunk_rows)
            return torch.zeros(*valid.shape, len(entries), dtype=values.dtype, device=values.device).masked_scatter(
                valid[..., None], values
            )

        values = self.over_micro_batches(batch, per_token, channels=(len(entries),))
        return {name: values[..., i] for i, name in enumerate(names)}

    # ------------------------------------------------------------ what a data-parallel learner changes
    @property
    def policy(self):
        """What the forward pass calls."""
        return self.compute_model

    def local_rows(self, mini: RolloutBatch) -> RolloutBatch:
        """The rows this process trains on, on its device (the driver's batches live on the host)."""
        return mini.to(self.device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.compute_model is not self.model:
            self.add_to_master_gradients()

    def add_to_master_gradients(self) -> None:
        """A bf16 pass's gradients added into the float32 masters' and cleared: summed in bf16
        over micro-batches, they would round at every pass."""
        for master, computed in self.master_pairs:
            if computed.grad is not None:
                master.grad = computed.grad.float() if master.grad is None else master.grad.add_(computed.grad)
                computed.grad = None

    def apply_gradients(self, loss: float) -> tuple[float, bool]:
        """Clip, step, clear (and refresh a bf16 copy from the stepped masters), unless the loss or
        the gradient norm is not finite: then the gradients are dropped and nothing else changes
        (weights, optimizer moments, its step count), since AdamW would turn one inf into NaN
        weights. Returns (the gradient norm before clipping, whether the step was taken)."""
        max_norm = math.inf if self.optim.grad_clip is None else self.optim.grad_clip  # inf: the norm, no clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), max_norm))
        stepped = self.agreed_finite(math.isfinite(loss) and math.isfinite(grad_norm))
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped and self.compute_model is not self.model:
            self.refresh_compute_copy()
        return grad_norm, stepped

    def agreed_finite(self, finite: bool) -> bool:
        """Whether every process of the group found its loss and gradients finite: one process here."""
        return finite

    @torch.no_grad()
    def refresh_compute_copy(self) -> None:
        for master, computed in self.master_pairs:
            computed.copy_(master)

    def total(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over the processes of the group: one process here."""
        return dict(values)

    def agreed_count(self, count: int) -> int:
        """The most micro-batches any process of the group has: one process here."""
        return count

    def gathered(self, params: list[torch.nn.Parameter]):
        """A context in which `params` hold their full values (ZeRO-3 shards them)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------ weights and checkpoints

    def named_weights(self):
        """(name, tensor) of every parameter of the plain model, tied ones once: with LoRA the
        target layers' weights merged, under the base model's names (efficient_rl/models/lora.py)."""
        return [(weight.name, weight.value()) for weight in plain_weights(self.model)]

    def weight_buckets(self, bucket_bytes: int, dtype: torch.dtype | None = None) -> Iterator[WeightBucket]:
        """The full weights in buckets, in `dtype` (by default the engines'), on rank 0; every rank
        must run this (ZeRO-3 gathers)."""
        dtype = dtype or self.sync_dtype
        weights = plain_weights(self.model)
        for indices in plan_buckets([(full_shape(w.base).numel(), dtype) for w in weights], bucket_bytes):
            with self.gathered([source for i in indices for source in weights[i].sources]):
                if self.rank == 0:
                    yield WeightBucket.pack([(weights[i].name, weights[i].value().detach().to(dtype)) for i in indices])

    def weight_plan(self, bucket_bytes: int) -> list[WeightBucket]:
        """Names, shapes and dtype of every bucket weight_buckets makes, without their data."""
        weights = plain_weights(self.model)
        plans = plan_buckets([(full_shape(w.base).numel(), self.sync_dtype) for w in weights], bucket_bytes)
        return [
            WeightBucket(
                [weights[i].name for i in indices],
                [tuple(full_shape(weights[i].base)) for i in indices],
                self.sync_dtype,
                payload=None,
            )
            for indices in plans
        ]

    def save(self, directory: Path) -> None:
        """Weights in Hugging Face format in the model's own dtype, plus the optimizer state and the
        schedule's position. Where those files round the float32 masters (a bf16 model), the
        masters go beside them (MASTER_WEIGHTS_FILE). With LoRA: the merged weights (eval, merge
        and the engines read a checkpoint as a plain model) and the adapter itself in float32 (what
        a resume loads, over the base model, which the resume loads as this run did: no masters
        needed). Refused, before anything is written, when a weight is not finite, in float32 or
        in the model's dtype."""
        directory = Path(directory)
        files = in_dtype(self.named_weights() + persistent_buffers(self.model), self.release_dtype)
        bad = [name for name, value in [*self.model.named_parameters(), *files.items()] if not finite(value)]
        refuse_nonfinite(self.schedule_step, list(dict.fromkeys(bad)))
        save_model_files(self.model, directory, files, self.release_dtype)
        if self.adapter is not None:
            save_adapter(self.adapter, directory)
        elif self.release_dtype != torch.float32:
            save_master_weights(self.model, directory / MASTER_WEIGHTS_FILE)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        (directory / LEARNER_STATE_FILE).write_text(json.dumps({"schedule_step": self.schedule_step}))

    def load_state(self, directory: Path) -> None:
        """Optimizer state and schedule from a checkpoint, and the float32 masters where its model
        files round them (the weights were loaded from those files already)."""
        directory = Path(directory)
        if self.adapter is None and restore_master_weights(self.model, directory):
            if self.compute_model is not self.model:
                self.refresh_compute_copy()
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=False))
        self.schedule_step = read_schedule_step(directory)


def finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def refuse_nonfinite(update: int, names: list[str]) -> None:
    """WorkerFailure naming the first non-finite weight: a checkpoint never holds one."""
    if names:
        raise WorkerFailure(
            f"checkpoint refused after update {update}: {len(names)} weight(s) are not finite (first: {names[0]}); "
            "the last checkpoint is intact"
        )


def master_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The float32 `model`'s parameters (tied ones once, under the names its model files use) and
    persistent buffers: what a resume must restore bit for bit."""
    return list(model.named_parameters()) + persistent_buffers(model)


def save_master_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(exist_ok=True)
    save_file({name: tensor.detach().contiguous() for name, tensor in master_tensors(model)}, str(path))


@torch.no_grad()
def restore_master_weights(model, checkpoint: Path) -> bool:
    """Copy the checkpoint's float32 masters into `model` in place (the optimizer holds its
    parameters); False when it has none, since its model files are float32 and hold them. A
    checkpoint whose files round the weights and which has no masters is refused: resumed from
    rounded weights, the run would silently differ from one never interrupted."""
    from safetensors.torch import load_file

    path = checkpoint / MASTER_WEIGHTS_FILE
    if not path.is_file():
        files_dtype = released_dtype(checkpoint)
        if files_dtype != torch.float32:
            raise ConfigError(
                f"{path}: missing; the checkpoint's model files are {dtype_name(files_dtype)} and a resume needs "
                "the float32 master weights; resume from an earlier checkpoint or start over"
            )
        return False
    saved, expected = load_file(path), master_tensors(model)
    if saved.keys() != {name for name, _ in expected}:
        raise ConfigError(f"{path}: holds other tensors than the model's ({len(saved)} for {len(expected)})")
    for name, tensor in expected:
        tensor.copy_(saved[name])
    return True


def read_schedule_step(directory: Path) -> int:
    """Updates done at the checkpoint; 0 for a checkpoint written before schedules existed."""
    path = directory / LEARNER_STATE_FILE
    return json.loads(path.read_text())["schedule_step"] if path.is_file() else 0


def filler_row(batch: RolloutBatch) -> RolloutBatch:
    """One row of `batch` that contributes nothing: its response and loss masks are zero."""
    row = batch.select([0])
    row.response_mask = torch.zeros_like(row.response_mask)
    if row.loss_mask is not None:
        row.loss_mask = torch.zeros_like(row.loss_mask)
    return row


def compute_copy(model, adapter, dtype: torch.dtype):
    """(module, adapter) that forward and backward passes run on. float32: `model` and `adapter`
    themselves. bf16: a copy whose parameters are bf16, as DeepSpeed's bf16 keeps its module: the
    activations are bf16 too (autocast on float32 weights would keep the residual stream and the
    norms' inputs in float32, and a bf16 copy of every weight for the backward). Buffers stay as
    loaded (rotary frequencies are float32). The float32 masters take the gradients and the
    optimizer step; the copy is refreshed from them after every step."""
    if dtype == torch.float32:
        return model, adapter
    copied = copy.deepcopy(adapter if adapter is not None else model)
    for parameter in copied.parameters():
        parameter.data = parameter.data.to(dtype)
    return (copied.get_base_model(), copied) if adapter is not None else (copied, None)


def model_dtype(recipe) -> torch.dtype:
    return DTYPES[recipe.model.dtype]


def adamw(model, optim: OptimSettings) -> torch.optim.AdamW:
    # Trainable parameters only: with LoRA the optimizer state is the adapters' alone.
    return torch.optim.AdamW(
        trainable_parameters(model), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )


def load_policy(recipe, model_dir: Path, base_model_dir: Path, device: torch.device) -> torch.nn.Module:
    """The policy in float32 (the master weights, whatever the compute precision), on `device`."""
    return load_model(
        policy_weights_dir(recipe, model_dir, base_model_dir), torch.float32, recipe.model.attn_implementation
    ).to(device)


def with_adapter(recipe, policy, model_dir: Path):
    """learner.lora's adapters on `policy` (a resumed run's from its checkpoint), or None."""
    return attach_lora(policy, recipe.learner.lora, model_dir, recipe.seed) if recipe.learner.lora is not None else None


def load_reference(recipe, base_model_dir: Path, device: torch.device):
    """The frozen KL reference in model.dtype on `device`, only when the recipe has a KL term and no
    LoRA (whose reference is the policy with its adapters off)."""
    if recipe.algorithm.kl_coef <= 0 or recipe.learner.lora is not None:
        return None
    return load_model(base_model_dir, model_dtype(recipe), recipe.model.attn_implementation).to(device).eval()


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant: the inputs (token ids) need no gradient for the recomputation to reach the weights.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def torch_check(_, recipe) -> str | None:
    if recipe.cluster.backend == "ray" and recipe.cluster.learner.workers > 1:
        return (
            "cluster.learner.workers: the torch learner is one process; use learner.backend: deepspeed for "
            "data parallelism"
        )
    return None


@LEARNERS.register("torch", check=torch_check)
def torch_learner(plan: Plan, model_dir: Path, base_model_dir: Path, model=None, teacher=None) -> TorchLearner:
    """`model` is the driver's own copy when embedded (the transformers engine generates with it);
    `teacher` the Ray-hosted teacher's client, when the Ray layer passes one (learner/teacher.py)."""
    recipe = plan.recipe
    device = torch_device(plan.devices.learner)
    policy = model if model is not None else load_policy(recipe, model_dir, base_model_dir, device)
    if recipe.learner.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    adapter = with_adapter(recipe, policy, model_dir)  # in place: `policy` stays the module everyone calls
    return TorchLearner(
        policy,
        objective_settings(plan),
        optim_settings(plan),
        reference=load_reference(recipe, base_model_dir, device),
        teacher=build_teacher(recipe, device, remote=teacher),
        sync_dtype=model_dtype(recipe),
        adapter=adapter,
        release_dtype=released_dtype(base_model_dir),
    )
