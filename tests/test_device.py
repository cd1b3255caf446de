"""Where the models compute: model.device resolved once in the plan, and no tensor of the
project's own code left to land on the CPU by default (tests/device_audit.py)."""

import pytest
import torch
from device_audit import PACKAGE, DeviceAudit, audited

from conftest import RECIPES
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.plan import Devices
from efficient_rl.driver.loop import run_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.learner.torch_learner import TorchLearner
from efficient_rl.rollout.hf import TransformersEngine

RAY = ["cluster.backend=ray", "rollout.engine=vllm"]


def devices(overrides: list[str], recipe: str = "quickstart.yaml") -> Devices:
    return validate(load_recipe(RECIPES / recipe, overrides)).devices


def test_the_embedded_backend_computes_where_torch_sees_a_gpu():
    # This machine has none: auto is the CPU, and asking for a GPU is refused in one line.
    assert not torch.cuda.is_available()
    assert devices([]) == Devices(learner="cpu", rollout="cpu", teacher="cpu")
    assert devices(["model.device=cpu"]) == Devices(learner="cpu", rollout="cpu", teacher="cpu")
    with pytest.raises(ConfigError, match=r"^model\.device: cuda, but torch .* sees no GPU") as refused:
        devices(["model.device=cuda"])
    assert "\n" not in str(refused.value)


def test_ray_roles_compute_where_their_resources_put_them():
    """The driver's own machine does not matter: each role follows its actors' GPUs."""
    split = ["cluster.rollout.gpus=1", "cluster.learner.gpus=0.5"]
    assert devices(RAY + split) == Devices(learner="cuda", rollout="cuda", teacher="cuda")
    assert devices(RAY + split + ["model.device=cuda"]) == Devices(learner="cuda", rollout="cuda", teacher="cuda")
    assert devices(RAY + ["cluster.rollout.gpus=1"]) == Devices(learner="cpu", rollout="cuda", teacher="cpu")
    assert devices(RAY) == Devices(learner="cpu", rollout="cpu", teacher="cpu")
    with pytest.raises(ConfigError, match=r"^model\.device: cuda, but cluster\.learner\.gpus is 0"):
        devices(RAY + ["model.device=cuda"])
    with pytest.raises(ConfigError, match=r"^model\.device: cpu, but cluster\.rollout\.gpus is 1"):
        devices(RAY + ["cluster.rollout.gpus=1", "model.device=cpu"])


def test_a_ray_hosted_teacher_computes_on_its_actors_cpu():
    gpus = ["cluster.learner.gpus=1", "cluster.rollout.gpus=1"]
    assert devices(RAY + gpus + ["distill.placement=ray"], "opd.yaml").teacher == "cpu"
    assert devices(RAY + gpus, "opd.yaml").teacher == "cuda"  # each learner rank holds its own


def test_the_audit_sees_a_tensor_made_without_a_device():
    """The check below is only as good as the audit: a factory call from a file in the package
    without `device=` is recorded, with `device=` or from elsewhere it is not."""
    audit = DeviceAudit()
    inside = compile("torch.zeros(2)\ntorch.ones(2, device='cpu')\n", str(PACKAGE / "somewhere.py"), "exec")
    with audit:
        exec(inside, {"torch": torch})
        torch.zeros(3)  # this test's own, outside the package
    assert audit.unplaced == {"efficient_rl/somewhere.py:1": "zeros"}


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        # packing, bf16 compute, a KL reference and old log-probs (two epochs)
        (
            "grpo.yaml",
            ["learner.packing=true", "learner.precision=bf16", "algorithm.kl_coef=0.01", "learner.epochs=2"],
        ),
        # token statistics (entropy) and a teacher the learner holds
        ("tip_opd.yaml", ["distill.teacher=lab:tiny"]),
    ],
)
def test_an_update_and_a_generation_name_the_device_of_every_tensor(
    recipe, overrides, tmp_path, tiny_overrides, monkeypatch
):
    """On a GPU a tensor made without `device=` lands on the CPU beside CUDA ones, and the step
    fails there; here the audit finds it on the CPU."""
    audit = DeviceAudit()
    for owner, method in [
        (TorchLearner, "update"),
        (TorchLearner, "token_statistics"),
        (TransformersEngine, "generate"),
    ]:
        monkeypatch.setattr(owner, method, audited(getattr(owner, method), audit))
    run_overrides = tiny_overrides + overrides + ["steps=1", "eval.before_training=false", "eval.after_training=false"]
    run_recipe(load_recipe(RECIPES / recipe, run_overrides + [f"logging.output_dir={tmp_path}"]))
    assert audit.calls > 0, "the audit saw no call: nothing was audited"
    assert audit.unplaced == {}
