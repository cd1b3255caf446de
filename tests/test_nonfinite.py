"""Non-finite updates never land: a non-finite loss or gradient norm skips the optimizer step
(weights and optimizer state as they were), is counted, and enough of them in a row stop the run;
a checkpoint never holds a non-finite weight; learner.grad_clip: none; the DeepSpeed ranks'
timeout. The DeepSpeed ZeRO-2/3 cases run on Ray ranks, in tests/test_ray_cluster.py."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_packing import spread_batch
from test_selected_compute import settings_of, tiny_model

from conftest import RECIPES, ROOT, run_cli
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.loop import check_skipped_steps
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError, WorkerFailure
from efficient_rl.learner.deepspeed_learner import deepspeed_config
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner, optim_settings


def learner_of(precision: str = "fp32", grad_clip: float | None = 1.0) -> TorchLearner:
    optim = OptimSettings(lr=1e-2, micro_batch_size=4, precision=precision, grad_clip=grad_clip)
    return TorchLearner(tiny_model(tied=False), settings_of(temperature=0.7), optim)


def state_of(learner: TorchLearner) -> tuple[dict, dict]:
    """Copies of (the master weights, the optimizer state) to compare after an update."""
    return copy.deepcopy(learner.model.state_dict()), copy.deepcopy(learner.optimizer.state_dict())


def assert_same_state(expected: tuple[dict, dict], learner: TorchLearner) -> None:
    weights, optimizer = expected
    for name, value in learner.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    now = learner.optimizer.state_dict()
    assert now["state"].keys() == optimizer["state"].keys()
    for key, entry in optimizer["state"].items():
        for field, value in entry.items():
            assert torch.equal(now["state"][key][field], value), (key, field)


def poison_gradient(learner: TorchLearner, value: float, passes: int | None = None):
    """A hook that makes one weight's gradient `value` wherever autograd computes it (the bf16 copy's
    in bf16), in the first `passes` backward passes (all when None): the loss stays finite, only
    the gradient norm is not."""
    parameter = dict(learner.compute_model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    seen = []

    def poisoned(grad: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return torch.full_like(grad, value) if passes is None or len(seen) <= passes else grad

    return parameter.register_hook(poisoned)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("poison", [math.inf, math.nan])
def test_a_nonfinite_gradient_skips_the_step_and_changes_nothing(precision, poison):
    """good, bad, good trains exactly as good, good: the bad update changed no weight, no Adam
    moment and no step count, and left no gradient behind; it is counted, and the count of skips
    in a row resets at the next step taken."""
    first, second = spread_batch(seed=1), spread_batch(seed=2)
    clean, hit = learner_of(precision), learner_of(precision)
    for learner in (clean, hit):
        assert learner.update(first)["learner/skipped_steps"] == 0.0
    before = state_of(hit)
    hook = poison_gradient(hit, poison)
    metrics = hit.update(second)
    hook.remove()
    assert metrics["learner/skipped_steps"] == 1.0 and metrics["learner/consecutive_skipped_steps"] == 1.0
    assert metrics["optimizer_steps"] == 1.0 and math.isnan(metrics["grad_norm"])  # no step taken, no norm
    assert_same_state(before, hit)
    assert all(p.grad is None for p in hit.model.parameters())
    if precision == "bf16":  # the compute copy is still the masters' rounding
        for master, computed in hit.master_pairs:
            assert torch.equal(computed, master.to(torch.bfloat16))
    again, reference = hit.update(second), clean.update(second)
    assert again["learner/skipped_steps"] == 0.0 and again["learner/consecutive_skipped_steps"] == 0.0
    assert again["grad_norm"] == reference["grad_norm"]
    assert_same_state(state_of(clean), hit)


def test_a_nonfinite_loss_with_finite_gradients_skips_the_step_too():
    """An infinite constant in the loss leaves every gradient finite: the loss alone decides."""
    learner = learner_of()
    learner.update(spread_batch(seed=1))
    before = state_of(learner)
    objective = learner.objective.objective

    class PlusInfinity:
        needs = objective.needs

        def __call__(self, *args):
            loss, stats = objective(*args)
            return loss + math.inf, stats

    learner.objective = copy.copy(learner.objective)
    object.__setattr__(learner.objective, "objective", PlusInfinity())
    metrics = learner.update(spread_batch(seed=2))
    assert metrics["learner/skipped_steps"] == 1.0 and math.isinf(metrics["loss"])
    assert_same_state(before, learner)


def test_skips_in_a_row_are_counted_across_updates_and_steps():
    """Two optimizer steps per update (mini-batches): skipped, skipped | skipped, taken."""
    learner = TorchLearner(
        tiny_model(tied=False),
        settings_of(temperature=0.7),
        OptimSettings(lr=1e-2, micro_batch_size=4, mini_batch_size=6),
    )
    hook = poison_gradient(learner, math.inf)
    metrics = learner.update(spread_batch(seed=1))
    hook.remove()
    assert (metrics["learner/skipped_steps"], metrics["learner/consecutive_skipped_steps"]) == (2.0, 2.0)
    hook = poison_gradient(learner, math.inf, passes=2)  # the first step's two micro-batches of 4 rows
    metrics = learner.update(spread_batch(seed=2))
    hook.remove()
    assert metrics["optimizer_steps"] == 2.0 and metrics["learner/skipped_steps"] == 1.0
    assert metrics["learner/consecutive_skipped_steps"] == 0.0


def test_the_run_stops_at_the_limit_with_one_line_naming_the_step():
    check_skipped_steps(4, {"learner/skipped_steps": 1.0, "learner/consecutive_skipped_steps": 2.0}, limit=3)
    with pytest.raises(WorkerFailure) as stopped:
        check_skipped_steps(5, {"learner/skipped_steps": 1.0, "learner/consecutive_skipped_steps": 3.0}, limit=3)
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("step 5: 3 optimizer steps in a row skipped")
    assert "learner.max_skipped_steps: 3" in message


def test_a_run_whose_loss_is_never_finite_stops_and_its_checkpoints_hold_finite_weights(
    tmp_path, tiny_overrides, tiny_model_dir
):
    """Through the command: exit 1, one line naming the step; the checkpoint of step 1 (one skip)
    holds the starting weights, and none is written for the step that stopped the run."""
    result = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        f"imports=[{ROOT / 'tests' / 'nonfinite_objective.py'}]",
        "algorithm.objective=nonfinite_policy_gradient",
        "learner.max_skipped_steps=2",
        "steps=4",
        "checkpoint.every=1",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "logging.name=nonfinite",
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("efficient-rl: error:")]
    assert len(errors) == 1 and errors[0].startswith("efficient-rl: error: step 2: 2 optimizer steps in a row"), (
        result.stderr[-3000:]
    )
    assert "step 1: 1 optimizer step(s) skipped" in result.stdout + result.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "nonfinite" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001"], checkpoints
    run = tmp_path / "runs" / "nonfinite" / "checkpoints" / "step-00000001"
    saved = load_file(run / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == start.keys()
    for name, value in saved.items():
        assert torch.isfinite(value).all() and torch.equal(value, start[name]), name


def test_a_checkpoint_with_a_nonfinite_weight_is_refused_before_anything_is_written(tmp_path):
    learner = learner_of()
    with torch.no_grad():
        dict(learner.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"][0, 0] = math.nan
    with pytest.raises(WorkerFailure, match=r"1 weight\(s\) are not finite \(first: model.layers.0.self_attn"):
        learner.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_grad_clip_none_computes_the_norm_and_clips_nothing():
    batch = spread_batch(seed=3)
    unclipped, huge, tight = learner_of(grad_clip=None), learner_of(grad_clip=1e12), learner_of(grad_clip=1e-3)
    metrics = [learner.update(batch) for learner in (unclipped, huge, tight)]
    assert metrics[0]["grad_norm"] == metrics[1]["grad_norm"] == metrics[2]["grad_norm"] > 1e-3
    assert_same_state(state_of(huge), unclipped)
    assert not torch.equal(tight.model.state_dict()["lm_head.weight"], unclipped.model.state_dict()["lm_head.weight"])


def test_grad_clip_accepts_none_in_a_recipe_and_names_both_forms_otherwise():
    recipe = load_recipe(RECIPES / "grpo.yaml", ["learner.grad_clip=none"])
    assert optim_settings(validate(recipe)).grad_clip is None
    assert deepspeed_config(recipe.learner, optim_settings(validate(recipe)), world_size=2)["gradient_clipping"] == 0.0
    assert optim_settings(validate(load_recipe(RECIPES / "grpo.yaml", ["learner.grad_clip=0.5"]))).grad_clip == 0.5
    with pytest.raises(ConfigError, match="learner.grad_clip: expected a number or 'none', got str 'nonee'"):
        load_recipe(RECIPES / "grpo.yaml", ["learner.grad_clip=nonee"])
    for key in ("learner.max_skipped_steps=0", "learner.dist_timeout_minutes=0"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_recipe(RECIPES / "grpo.yaml", [key])


def test_the_recipe_timeout_reaches_the_process_group():
    """In a process of its own (a process group stays for the life of its process): a one-rank
    DeepSpeed learner, its default group's timeout read back from torch.distributed."""
    script = """
import json, os, sys, torch, torch.distributed as dist
from conftest import RECIPES, TINY_OVERRIDES
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.build import build_setup
from efficient_rl.driver.validate import validate
from efficient_rl.learner.deepspeed_learner import DeepSpeedLearner
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
overrides = TINY_OVERRIDES + ["cluster.backend=ray", "rollout.engine=vllm", "learner.backend=deepspeed"]
overrides.append("learner.dist_timeout_minutes=77")
plan = validate(load_recipe(RECIPES / "quickstart.yaml", overrides))
setup = build_setup(plan)
setup.rewards.close()
DeepSpeedLearner(plan, setup.model_dir, setup.base_model_dir)
group = dist.distributed_c10d._get_default_group()
print(json.dumps(group._get_backend(torch.device("cpu")).options._timeout.total_seconds()))
"""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-c", script, str(port)], capture_output=True, text=True, cwd=ROOT / "tests", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == 77 * 60.0


def test_the_deepspeed_internals_the_skip_reads_are_in_the_pinned_release():
    """The skip sits on DeepSpeed internals (deepspeed_learner.py): the engine's step must call
    _take_model_step after completing the gradients, and each optimizer class must hold its
    gradients and drop them under the names the checks use. A DeepSpeed upgrade that renames one
    fails here, not silently in a run (the Ray test exercises stage 0, ZeRO-2 and ZeRO-3)."""
    import inspect

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from efficient_rl.learner.deepspeed_learner import DISCARDS, GRADIENT_CHECKS

    step = inspect.getsource(DeepSpeedEngine.step)
    assert step.index("finalize_gradient_accumulation_boundary()") < step.index("self._take_model_step(lr_kwargs)")
    assert step.index("self.allreduce_gradients()") < step.index("self._take_model_step(lr_kwargs)")
    used = {
        DeepSpeedZeroOptimizer: (
            "averaged_gradients",
            "all_grad_tensors",
            "cpu_offload",
            "local_overflow",
            "single_partition_of_fp32_groups",
            "_release_preflattened_grad_buffers",
            "reset_cpu_buffers",
            "micro_step_id",
            "_offload_accumulated_param_ids",
        ),
        DeepSpeedZeroOptimizer_Stage3: (
            "grad_partitions_flat_buffer",
            "inf_or_nan_tracker",
            "_pre_step",
            "_partition_all_parameters",
            "_overflow_clean_up",
        ),
        BF16_Optimizer: ("fp32_groups_gradients_flat", "bf16_groups"),
    }
    assert set(GRADIENT_CHECKS) == set(DISCARDS) == {cls.__name__ for cls in used}
    for cls, names in used.items():
        source = inspect.getsource(cls)
        for name in names:
            assert f"self.{name}" in source or f"def {name}(" in source, (cls.__name__, name)
