"""Checkpoints and exports in the model's own dtype (models/files.py): a model released in bf16
is checkpointed and exported in bf16, at half the bytes, with the learner's float32 masters saved
beside its files so that a resume continues exactly where an uninterrupted run goes."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file
from test_packing import spread_batch
from test_real_sizes import small_model
from test_selected_compute import settings_of
from test_training import deterministic, read_metrics, train

from efficient_rl.config.schema import LoraSection
from efficient_rl.errors import ConfigError
from efficient_rl.learner.torch_learner import MASTER_WEIGHTS_FILE, OptimSettings, TorchLearner
from efficient_rl.models.export import export
from efficient_rl.models.files import released_dtype
from efficient_rl.models.lora import ADAPTER_DIR, attach_lora
from efficient_rl.models.merge import merge_models
from efficient_rl.models.modeling import load_model
from efficient_rl.run.checkpoint import checkpoint_problem


def config_dtype(directory) -> str:
    return json.loads((directory / "config.json").read_text())["dtype"]


def header_bytes(path) -> int:
    """A safetensors file's bytes that are not tensor data: its length field and JSON header."""
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny lab model as a model released in bf16 would come: bf16 weights, config.json saying so."""
    directory = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(tiny_model_dir, directory)
    load_model(tiny_model_dir).to(torch.bfloat16).save_pretrained(directory)
    assert config_dtype(directory) == "bfloat16"
    return directory


def overrides(tmp_path, model_dir, name):
    from conftest import TINY_OVERRIDES

    return [o for o in TINY_OVERRIDES if not o.startswith("model.")] + [
        "model.lab=null",
        f"model.path={model_dir}",
        f"logging.output_dir={tmp_path / 'runs'}",
        f"logging.name={name}",
        "steps=3",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "algorithm.kl_coef=0.05",  # the KL reference (the base model, in model.dtype) survives the resume too
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bf16_model_dir, tiny_model_dir):
    """The bf16 model trained 3 steps straight, and interrupted after step 2 then resumed; the
    float32 lab model trained 1 step, for reference."""
    tmp_path = tmp_path_factory.mktemp("runs")
    straight, _ = train(overrides(tmp_path, bf16_model_dir, "straight"))
    train(overrides(tmp_path, bf16_model_dir, "resumed"), stop_after_step=2)
    resumed, summary = train(overrides(tmp_path, bf16_model_dir, "resumed"), resume=True)
    assert summary["steps_completed"] == 3
    float32, _ = train(overrides(tmp_path, tiny_model_dir, "float32") + ["steps=1"])
    return straight.path, resumed.path, float32.path


def checkpoint(run, step):
    return run / "checkpoints" / f"step-{step:08d}"


def test_a_bf16_model_is_checkpointed_in_bf16_at_half_the_bytes_with_float32_masters_beside(runs, tiny_model_dir):
    straight, _, float32 = runs
    ours, theirs = checkpoint(straight, 3), checkpoint(float32, 1)
    weights = load_file(ours / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and config_dtype(ours) == "bfloat16"
    # the float32 model's checkpoint: float32 files, and no second copy of its weights
    reference = load_file(theirs / "model.safetensors")
    assert {t.dtype for t in reference.values()} == {torch.float32} and config_dtype(theirs) == "float32"
    assert not (theirs / MASTER_WEIGHTS_FILE).exists()
    # Same tensors, half the data bytes each: the files differ by that and by their headers only.
    assert weights.keys() == reference.keys() and 2 * tensor_bytes(weights) == tensor_bytes(reference)
    size, reference_size = ((c / "model.safetensors").stat().st_size for c in (ours, theirs))
    assert size - header_bytes(ours / "model.safetensors") == tensor_bytes(weights)
    headers = header_bytes(ours / "model.safetensors") + header_bytes(theirs / "model.safetensors")
    assert abs(size / reference_size - 0.5) <= headers / reference_size
    # The float32 masters: what the bf16 files are rounded from, for every weight.
    masters = load_file(ours / MASTER_WEIGHTS_FILE)
    assert {t.dtype for t in masters.values()} == {torch.float32}
    for name, weight in weights.items():
        assert torch.equal(masters[name].to(torch.bfloat16), weight), name
    assert any(not torch.equal(masters[name], weight.float()) for name, weight in weights.items())
    assert checkpoint_problem(ours) is None  # the manifest lists the masters' file too


def test_a_bf16_checkpoint_resumes_bit_exactly_like_the_uninterrupted_run(runs):
    straight, resumed, _ = runs
    assert [deterministic(r) for r in read_metrics(resumed)] == [deterministic(r) for r in read_metrics(straight)]
    for name in ("model.safetensors", MASTER_WEIGHTS_FILE):
        expected, got = load_file(checkpoint(straight, 3) / name), load_file(checkpoint(resumed, 3) / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name


def test_export_and_merge_of_a_bf16_checkpoint_stay_bf16(runs, bf16_model_dir, tmp_path):
    straight, _, float32 = runs
    ours = checkpoint(straight, 3)
    export(straight, tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    saved = load_file(ours / "model.safetensors")
    assert config_dtype(tmp_path / "exported") == "bfloat16"
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert not (tmp_path / "exported" / MASTER_WEIGHTS_FILE.parent).exists()
    # a float32 model exports in float32
    export(float32, tmp_path / "float32")
    assert {t.dtype for t in load_file(tmp_path / "float32" / "model.safetensors").values()} == {torch.float32}
    # merge reads the model files only (the masters' folder is not a second weights file to it)
    merge_models(bf16_model_dir, ours, tmp_path / "merged", keep=0.25, scale=0.7)
    assert {t.dtype for t in load_file(tmp_path / "merged" / "model.safetensors").values()} == {torch.bfloat16}


def bf16_learner(model, release_dtype=torch.bfloat16):
    return TorchLearner(
        model,
        settings_of(),
        OptimSettings(lr=1e-3, micro_batch_size=4, precision="bf16"),
        release_dtype=release_dtype,
    )


def test_a_bf16_learner_resumes_its_masters_and_its_bf16_copy_from_a_bf16_checkpoint(tmp_path):
    batch = spread_batch(seed=6)
    straight = bf16_learner(small_model())
    for _ in range(2):
        straight.update(batch)
    straight.save(tmp_path)
    assert released_dtype(tmp_path) == torch.bfloat16
    resumed = bf16_learner(load_model(tmp_path))  # as a resume loads it: the bf16 files, in float32
    resumed.load_state(tmp_path)
    for (name, master), again in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(again, master), name
    for (name, computed), again in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(again, computed), name  # the compute copy refreshed from the restored masters
    assert resumed.update(batch)["loss"] == straight.update(batch)["loss"]
    for (name, master), again in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(again, master), name


def test_a_bf16_checkpoint_without_its_masters_is_refused_not_resumed_from_rounded_weights(tmp_path):
    learner = bf16_learner(small_model())
    learner.save(tmp_path)
    (tmp_path / MASTER_WEIGHTS_FILE).unlink()
    with pytest.raises(ConfigError, match="float32.safetensors: missing; the checkpoint's model files are bfloat16"):
        bf16_learner(load_model(tmp_path)).load_state(tmp_path)


def test_a_float32_model_writes_float32_files_and_no_masters(tmp_path):
    learner = bf16_learner(small_model(), release_dtype=torch.float32)
    learner.save(tmp_path)
    assert config_dtype(tmp_path) == "float32" and not (tmp_path / MASTER_WEIGHTS_FILE.parent).exists()
    saved = load_file(tmp_path / "model.safetensors")
    for name, master in learner.model.named_parameters():
        if name in saved:
            assert torch.equal(saved[name], master), name


def deepspeed_round_trip(model_dir: str, checkpoint: str, stage: int, precision: str) -> None:
    """In a process of its own (a one-rank gloo group): a DeepSpeed learner on the bf16 model
    trains and checkpoints; the model files are bf16 with no masters beside them (DeepSpeed's own
    state holds those), and a learner resumed from the checkpoint takes the same next step."""
    from pathlib import Path

    from test_lora import batch_for

    from conftest import RECIPES, TINY_OVERRIDES
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.validate import validate
    from efficient_rl.learner.deepspeed_learner import DeepSpeedLearner

    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [o for o in TINY_OVERRIDES if not o.startswith("model.")]
        + [
            "model.lab=null",
            f"model.path={model_dir}",
            "cluster.backend=ray",
            "rollout.engine=vllm",  # where DeepSpeed ranks run; this one runs here, alone
            "learner.backend=deepspeed",
            f"learner.zero_stage={stage}",
            f"learner.precision={precision}",
            "learner.lr=0.01",
            "learner.micro_batch_size=4",
        ],
    )
    plan, base, checkpoint = validate(recipe), Path(model_dir), Path(checkpoint)
    first = DeepSpeedLearner(plan, base, base)
    batch = batch_for(first.model.config.vocab_size)
    first.update(batch)
    first.save(checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and config_dtype(checkpoint) == "bfloat16"
    assert not (checkpoint / MASTER_WEIGHTS_FILE.parent).exists()
    resumed = DeepSpeedLearner(plan, checkpoint, base)  # its module loaded from the bf16 files
    resumed.load_state(checkpoint)  # then DeepSpeed's state: the float32 masters
    assert resumed.update(batch)["loss"] == first.update(batch)["loss"]
    with first.gathered(list(first.model.parameters())), resumed.gathered(list(resumed.model.parameters())):
        for (name, ours), theirs in zip(resumed.model.named_parameters(), first.model.parameters()):
            assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "bf16")])
def test_a_deepspeed_checkpoint_of_a_bf16_model_is_bf16_and_resumes_exactly(tmp_path, bf16_model_dir, stage, precision):
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    code = (
        "import test_checkpoint_dtype; "
        f"test_checkpoint_dtype.deepspeed_round_trip({str(bf16_model_dir)!r}, {str(tmp_path / 'ckpt')!r}, "
        f"{stage}, {precision!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "tests",
        env={**env, "MASTER_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_lora_checkpoint_of_a_bf16_model_holds_bf16_merged_weights_and_its_float32_adapter(tmp_path):
    """The adapter trains in float32 and a resume loads the base model as the run did: the
    adapter is all a resume needs, so no masters are written."""
    model = small_model()
    adapter = attach_lora(model, LoraSection(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    learner = TorchLearner(
        model, settings_of(), OptimSettings(lr=1e-2, micro_batch_size=4), adapter=adapter, release_dtype=torch.bfloat16
    )
    learner.update(spread_batch(seed=6))
    learner.save(tmp_path)
    weights, merged = load_file(tmp_path / "model.safetensors"), dict(learner.named_weights())
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and config_dtype(tmp_path) == "bfloat16"
    assert weights.keys() == merged.keys()
    assert all(torch.equal(merged[name].to(torch.bfloat16), weight) for name, weight in weights.items())
    trained = load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
    assert trained and {t.dtype for t in trained.values()} == {torch.float32}
    assert not (tmp_path / MASTER_WEIGHTS_FILE.parent).exists()


def without_sync_time(row: dict) -> dict:
    return {name: value for name, value in deterministic(row).items() if name != "sync/seconds"}


def test_a_resumed_vllm_engine_generates_with_the_float32_masters_not_the_bf16_files(tmp_path, bf16_model_dir):
    """The engine starts from the checkpoint's model (bf16 files) while the recipe samples in
    float32 (model.dtype): unless it takes the restored masters before the first resumed step,
    that step's rollouts come from rounded weights and the run departs from the uninterrupted one."""
    engine = ["rollout.engine=vllm", "scoring.workers=0", "algorithm.kl_coef=0.0"]
    straight, _ = train(overrides(tmp_path, bf16_model_dir, "straight") + engine)
    train(overrides(tmp_path, bf16_model_dir, "resumed") + engine, stop_after_step=2)
    resumed, _ = train(overrides(tmp_path, bf16_model_dir, "resumed") + engine, resume=True)
    expected, got = read_metrics(straight.path), read_metrics(resumed.path)
    assert [r["step"] for r in got] == [1, 2, 3]
    # every metric but the timings (sync/seconds among them): rollout/logprob_diff of step 3 is
    # 1.1e-5 from the bf16 files against 1.9e-7 from the masters
    assert [without_sync_time(r) for r in got] == [without_sync_time(r) for r in expected]
