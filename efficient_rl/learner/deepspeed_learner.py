"""DeepSpeed learner: one data-parallel rank, ZeRO stage 0-3 from the recipe.

A rank is started with the usual torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), by the Ray layer or by torchrun, and is otherwise ordinary DeepSpeed
code: gloo on CPU, NCCL on GPU. It reuses the single-process update loop and changes only what
data parallelism changes (see TorchLearner).

Every rank trains on its own slice of each mini-batch with the loss denominators of the whole
mini-batch, so the rank losses add up to the single-process loss. DeepSpeed averages gradients
over ranks; the loss is scaled by the world size so that the average is that sum's gradient.
"""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.config.plan import Plan
from efficient_rl.learner.base import LEARNERS
from efficient_rl.learner.objective import called_whole, objective_settings
from efficient_rl.learner.teacher import build_teacher
from efficient_rl.learner.torch_learner import (
    OptimSettings,
    TorchLearner,
    adamw,
    enable_gradient_checkpointing,
    finite,
    load_policy,
    load_reference,
    model_dtype,
    optim_settings,
    refuse_nonfinite,
    with_adapter,
)
from efficient_rl.models.files import in_dtype, released_dtype, save_model_files
from efficient_rl.models.lora import save_adapter
from efficient_rl.models.modeling import torch_device

STATE_DIR, STATE_TAG = "deepspeed", "state"
# learner.precision -> DeepSpeed's own section for it. bf16: the module computes in bf16 and ZeRO
# (stage 1-3) keeps the float32 master partitions and optimizer state; stage 0 would step bf16
# weights directly, which deepspeed_check refuses. Gradients are summed in float32, as the torch
# learner sums them: over ranks (DeepSpeed reduces in bf16 when bf16 is on, unless told) and over
# micro-batches (kept in the model's dtype, unless told). docs/benchmarks.md has the difference.
PRECISION_CONFIG = {
    "fp32": {},
    "bf16": {"bf16": {"enabled": True}, "communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}},
}


def deepspeed_config(learner_section, optim: OptimSettings, world_size: int) -> dict:
    zero = {"stage": learner_section.zero_stage}
    if learner_section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": optim.micro_batch_size * world_size,
        # Mini-batches vary in size (dynamic sampling): the learner says when one ends by calling step().
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim.grad_clip or 0.0,  # DeepSpeed's 0: no clipping
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload with the torch optimizer, no compiled CPU Adam
        "steps_per_print": 2**31 - 1,
        **PRECISION_CONFIG[learner_section.precision],
    }


class DeepSpeedLearner(TorchLearner):
    def __init__(self, plan: Plan, model_dir: Path, base_model_dir: Path, teacher=None):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.device = torch_device(plan.devices.learner)
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=plan.recipe.learner.dist_timeout_minutes),
        )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        recipe = plan.recipe
        self.objective, self.optim = objective_settings(plan), optim_settings(plan)
        # Loaded before ZeRO-3 is configured, so the reference is an ordinary, unsharded module.
        self.reference = load_reference(recipe, base_model_dir, self.device)
        self.teacher = build_teacher(
            recipe, self.device, remote=teacher
        )  # likewise unsharded (or a Ray actor's client)
        config = deepspeed_config(recipe.learner, self.optim, self.world_size)
        # ZeRO-3 shards the weights while from_pretrained creates them, as long as this object lives.
        self._zero3_init = HfDeepSpeedConfig(config) if recipe.learner.zero_stage == 3 else None
        self.sync_dtype = model_dtype(recipe)
        self.release_dtype = released_dtype(base_model_dir)  # the model files' dtype in a checkpoint
        model = load_policy(recipe, model_dir, base_model_dir, self.device)
        if recipe.learner.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.adapter = with_adapter(recipe, model, model_dir)  # LoRA (ZeRO stages 0-2): before DeepSpeed wraps it
        self.compute_adapter = self.adapter  # with bf16 the engine's module is bf16 itself (PRECISION_CONFIG)
        # A torch optimizer: DeepSpeed's own AdamW would JIT-compile FusedAdam first.
        optimizer = adamw(model, self.optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.model = self.engine.module
        # The engine's step first completes the gradients (reduces, or finishes ZeRO's partitions),
        # then takes the optimizer step: the finiteness check goes between the two, where every
        # stage's gradients are whole (see guarded_model_step).
        self.engine._take_model_step = self.guarded_model_step(self.engine._take_model_step)
        # ZeRO-3 gathers and releases each module's weights in that module's hooks, which the
        # engine's forward sets going: calling the body and the LM head as separate submodules gave
        # different gradients (tests/test_ray_cluster.py), so under ZeRO-3 the model is called
        # whole and the fused head runs inside the LM head's forward (models/modeling.py).
        if recipe.learner.zero_stage == 3:
            self.objective = called_whole(self.objective)

    @property
    def policy(self):
        return self.engine

    def local_rows(self, mini: RolloutBatch) -> RolloutBatch:
        """This rank's contiguous slice. Every rank gets as many rows (ZeRO's collectives run once
        per forward and backward on every rank); missing rows repeat the last one, masked out."""
        per_rank = -(-len(mini) // self.world_size)
        positions = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = mini.select([min(p, len(mini) - 1) for p in positions])
        padding = torch.tensor([p >= len(mini) for p in positions])
        rows.response_mask[padding] = 0.0
        if rows.loss_mask is not None:
            rows.loss_mask[padding] = 0.0
        return rows.to(self.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def apply_gradients(self, loss: float) -> tuple[float, bool]:
        self.step_loss, self.step_taken = loss, False
        self.engine.step()  # reduce, then guarded_model_step: check, clip, step, zero
        if not self.step_taken:
            return math.nan, False
        norm = self.engine.get_global_grad_norm()  # None at stage 0, whose torch optimizer keeps none
        return float(self.stage0_norm if norm is None else norm), True

    def guarded_model_step(self, model_step: Callable) -> Callable:
        """The engine's optimizer step, taken only when every rank's loss and gradients are finite;
        otherwise the gradients are dropped as DeepSpeed drops them on an fp16 overflow. DeepSpeed
        0.19 itself skips only some cases: ZeRO-1/2 in fp32 and ZeRO-3 on a non-finite norm, not
        ZeRO-1/2 in bf16 nor stage 0 (tests/test_ray_cluster.py injects an inf gradient)."""

        def step(*args, **kwargs):
            optimizer = self.engine.optimizer
            kind = type(optimizer).__name__
            checks = GRADIENT_CHECKS.get(kind, torch_gradients_finite)
            self.step_taken = self.agreed_finite(math.isfinite(self.step_loss) and checks(optimizer))
            if kind not in GRADIENT_CHECKS:  # stage 0: every rank holds the reduced gradients whole
                self.stage0_norm = float(torch.nn.utils.get_total_norm(gradients_of(optimizer)))
            if self.step_taken:
                return model_step(*args, **kwargs)
            DISCARDS.get(kind, discard_torch_gradients)(optimizer)
            return None

        return step

    def agreed_finite(self, finite_here: bool) -> bool:
        flag = torch.tensor([0.0 if finite_here else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def total(self, values: dict[str, float]) -> dict[str, float]:
        names = sorted(values)
        sums = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return dict(zip(names, sums.tolist()))

    def agreed_count(self, count: int) -> int:
        most = torch.tensor([count], dtype=torch.long, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())

    def gathered(self, params):
        import deepspeed

        if self._zero3_init is None:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def named_weights(self):
        return [pair for bucket in self.weight_buckets(2**62) for pair in bucket.unpack()]

    def save(self, directory: Path) -> None:
        """Every rank writes its ZeRO state, then rank 0 the gathered weights in Hugging Face format.

        In that order no rank waits in a collective while rank 0 writes alone: DeepSpeed's
        save_checkpoint opens and closes with a barrier, so with the weights written first (as
        before) every other rank sat in its opening barrier for the whole write, and a slow
        filesystem ran into the process group's timeout (learner.dist_timeout_minutes). Now each
        barrier waits only for the slowest rank's own share; the group's call returns when rank 0
        is done. Refused on every rank, before anything is written, when a weight is not finite.

        The weights are written in the model's own dtype (models/files.py). The float32 masters
        are DeepSpeed's state already, which a resume restores: the module's own weights in fp32,
        and at ZeRO stages 1-3 the float32 partitions in the optimizer state."""
        # every rank takes part in the gather; rank 0 holds the result
        files = in_dtype(
            [pair for bucket in self.weight_buckets(2**62, self.release_dtype) for pair in bucket.unpack()],
            self.release_dtype,
        )
        bad = [name for name, value in files.items() if not finite(value)]
        if not self.agreed_finite(not bad):
            refuse_nonfinite(self.schedule_step, bad or ["(on rank 0)"])
        # With LoRA the frozen base weights stay out of DeepSpeed's state: the adapter is all that trains.
        self.engine.save_checkpoint(
            str(Path(directory) / STATE_DIR),
            tag=STATE_TAG,
            client_state={"schedule_step": self.schedule_step},
            exclude_frozen_parameters=self.adapter is not None,
        )
        if self.rank == 0:
            save_model_files(self.model, Path(directory), files, self.release_dtype)
            if self.adapter is not None:
                save_adapter(self.adapter, directory)

    def load_state(self, directory: Path) -> None:
        _, client_state = self.engine.load_checkpoint(
            str(Path(directory) / STATE_DIR), tag=STATE_TAG, load_module_strict=self.adapter is None
        )
        self.schedule_step = (client_state or {}).get("schedule_step", 0)


# What the engine's optimizer holds the rank's gradients in, by its class, when its step begins:
# (all finite?, drop them). A ZeRO optimizer keeps its partition of the reduced gradients and
# drops them as its own overflow branch does; BF16_Optimizer (bf16 without ZeRO partitioning of
# gradients) a float32 copy; a plain torch optimizer (stage 0) the parameters' .grad.
def gradients_of(optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def torch_gradients_finite(optimizer) -> bool:
    return all(map(finite, gradients_of(optimizer)))


def discard_torch_gradients(optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)


def zero12_gradients_finite(optimizer) -> bool:
    if optimizer.cpu_offload:
        return not optimizer.local_overflow and all(
            finite(p.grad) for p in optimizer.single_partition_of_fp32_groups if p.grad is not None
        )
    return all(finite(g) for grads in optimizer.averaged_gradients.values() for g in grads or () if g is not None)


def discard_zero12_gradients(optimizer) -> None:
    """What DeepSpeedZeroOptimizer.step does first and then when it finds an overflow. Its step
    starts by resetting the micro-step count and (offloaded) the set of accumulated parameters;
    skipped, the next passes would add to the host's non-finite sums (the offload case of the Ray
    test found it)."""
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
    optimizer.zero_grad(set_to_none=True)
    optimizer._release_preflattened_grad_buffers()
    if optimizer.cpu_offload:
        optimizer._offload_accumulated_param_ids = set()
        optimizer.reset_cpu_buffers()
    else:
        for key in optimizer.averaged_gradients:
            optimizer.averaged_gradients[key] = None
            optimizer.all_grad_tensors[key] = None


def zero3_gradients_finite(optimizer) -> bool:
    optimizer.inf_or_nan_tracker.zero_()  # what its own check would add to: this check is the one
    return finite(optimizer.grad_partitions_flat_buffer)


def discard_zero3_gradients(optimizer) -> None:
    """What DeepSpeedZeroOptimizer_Stage3.step does when it finds an overflow."""
    optimizer._pre_step()
    optimizer._partition_all_parameters()
    optimizer._overflow_clean_up(optimizer.loss_scale)


def bf16_gradients_finite(optimizer) -> bool:
    low_precision = (p.grad for group in optimizer.bf16_groups for p in group if p.grad is not None)
    return all(finite(flat) for flat in optimizer.fp32_groups_gradients_flat) and all(map(finite, low_precision))


GRADIENT_CHECKS: dict[str, Callable] = {
    "DeepSpeedZeroOptimizer": zero12_gradients_finite,
    "DeepSpeedZeroOptimizer_Stage3": zero3_gradients_finite,
    "BF16_Optimizer": bf16_gradients_finite,
}
DISCARDS: dict[str, Callable] = {
    "DeepSpeedZeroOptimizer": discard_zero12_gradients,
    "DeepSpeedZeroOptimizer_Stage3": discard_zero3_gradients,
    "BF16_Optimizer": discard_torch_gradients,  # its zero_grad drops the float32 copies too
}


def deepspeed_check(_, recipe) -> str | None:
    """What the DeepSpeed learner does not run with (yet), each in the words of the field to change."""
    learner = recipe.learner
    zero3_refusals = {  # ZeRO-3 gathers weights around the engine's whole forward
        # packing calls the body and the LM head apart (see DeepSpeedLearner)
        "learner.packing: not under ZeRO-3 (zero_stage: 3), whose weight gathering needs the model called whole; "
        "use zero_stage 0-2 or packing: false": learner.packing,
        "learner.lora: DeepSpeed zero_stage 0-2 only (LoRA over ZeRO-3's sharded base weights is not supported); "
        "the adapters are small enough for ZeRO-2": learner.lora is not None,
        f"learner.zero_stage: distill.teacher {recipe.distill.teacher} runs on ZeRO stages 0-2 (its "
        "selected-position LM head is not yet correct under ZeRO-3's weight gathering)": recipe.distill.teacher
        is not None,
    }
    if recipe.cluster.backend != "ray":
        return "learner.backend: deepspeed runs as Ray actors; set cluster.backend: ray"
    if learner.zero_stage == 3:
        return next((message for message, refused in zero3_refusals.items() if refused), None)
    if learner.precision == "bf16" and learner.zero_stage == 0:
        return (
            "learner.precision: bf16 on DeepSpeed needs zero_stage 1-3, which keep float32 master weights; "
            "stage 0 would update the bf16 weights themselves"
        )
    return None


@LEARNERS.register("deepspeed", check=deepspeed_check)
def deepspeed_learner(plan: Plan, model_dir: Path, base_model_dir: Path, model=None, teacher=None) -> DeepSpeedLearner:
    return DeepSpeedLearner(plan, model_dir, base_model_dir, teacher)
