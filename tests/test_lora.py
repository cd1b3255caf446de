"""LoRA (learner.lora) on the tiny lab model: only adapters train, engines and exports get the
merged weights (checked against W + B A * alpha / rank by hand), the KL reference is the base
model, a resume gives the same adapter, and bad fields are one line each."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.schema import DEFAULT_LORA_TARGETS, LoraSection
from efficient_rl.driver.loop import run_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.learner.objective import objective_settings
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner
from efficient_rl.models.lora import ADAPTER_DIR, attach_lora
from efficient_rl.models.modeling import load_model, response_logprobs

RANK, ALPHA = 4, 12.0  # scale alpha / rank = 3
ROWS, PROMPT, RESPONSE = 6, 5, 9


def batch_for(vocab: int, seed: int = 0) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, RESPONSE + 1, (ROWS,), generator=generator)
    response_mask = (torch.arange(RESPONSE)[None] < lengths[:, None]).float()
    return RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (ROWS, PROMPT), generator=generator),
        prompt_mask=torch.ones(ROWS, PROMPT, dtype=torch.long),
        response_ids=torch.randint(3, vocab, (ROWS, RESPONSE), generator=generator) * response_mask.long(),
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(ROWS, RESPONSE),
        truncated=torch.zeros(ROWS, dtype=torch.bool),
        group_ids=torch.arange(ROWS) // 2,
        samples=[{}] * ROWS,
        completions=[""] * ROWS,
        advantages=torch.randn(ROWS, RESPONSE, generator=generator) * response_mask,
        # a token selection: the learner's head runs on these positions only (selected compute)
        loss_mask=(torch.rand(ROWS, RESPONSE, generator=generator) < 0.6).float() * response_mask,
    )


def lora_learner(model_dir, kl_coef=0.1, targets=("q_proj", "v_proj", "down_proj"), precision="fp32"):
    model = load_model(model_dir)
    adapter = attach_lora(model, LoraSection(rank=RANK, alpha=ALPHA, target_modules=list(targets)))
    settings = dataclasses.replace(objective_settings(validate(load_recipe(RECIPES / "grpo.yaml"))), kl_coef=kl_coef)
    return TorchLearner(
        model, settings, OptimSettings(lr=5e-2, micro_batch_size=4, precision=precision), adapter=adapter
    )


def by_hand(learner, module: str) -> torch.Tensor:
    """W + B A * alpha / rank from the layer's own tensors."""
    layer = dict(learner.model.named_modules())[module]
    weight, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (weight + b @ a * (ALPHA / RANK)).detach()


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A LoRA learner after two updates (KL on, selected compute), and the untouched base model."""
    learner = lora_learner(tiny_model_dir)
    batch = batch_for(learner.model.config.vocab_size)
    for _ in range(2):  # the first moves B off zero, the second moves A too
        metrics = learner.update(batch)
    return learner, load_model(tiny_model_dir).eval(), batch, metrics


def test_only_adapter_parameters_change_and_engines_get_the_merged_weights(trained):
    learner, base, _, metrics = trained
    base_weights = dict(base.named_parameters())
    assert learner.reference is None and metrics["kl"] > 0
    changed = {
        name
        for name, p in learner.model.named_parameters()
        if not torch.equal(p, base_weights.get(name.replace(".base_layer", ""), torch.zeros(0)))
    }
    assert changed and all(".lora_A." in name or ".lora_B." in name for name in changed)
    assert sum(".lora_B." in name for name in changed) == 3 * 2  # every target layer of both blocks
    # Optimizer state for the adapter parameters only.
    state = learner.optimizer.state_dict()["state"]
    assert len(state) == 2 * 3 * 2  # A and B of 3 target layers in 2 blocks
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(
        p.numel() for n, p in learner.model.named_parameters() if ".lora_" in n
    )
    synced = dict(learner.named_weights())
    assert synced.keys() == base_weights.keys()  # a plain model: the base model's names, tied weights once
    for name, tensor in synced.items():
        module = name.rsplit(".", 1)[0]
        if module.endswith(("q_proj", "v_proj", "down_proj")) and name.endswith("weight"):
            assert torch.allclose(tensor, by_hand(learner, module), atol=1e-6), name
            assert not torch.equal(tensor, base_weights[name])
        else:
            assert torch.equal(tensor, base_weights[name]), name
    buckets = [pair for bucket in learner.weight_buckets(1 << 12) for pair in bucket.unpack()]
    assert [name for name, _ in buckets] == list(synced) and all(
        torch.equal(tensor, synced[name]) for name, tensor in buckets
    )
    plan = [name for bucket in learner.weight_plan(1 << 12) for name in bucket.names]
    assert plan == list(synced)


def test_the_kl_reference_is_the_base_model(trained):
    learner, base, batch, _ = trained
    selected = batch.loss_mask.bool()
    with torch.no_grad():
        expected, _ = response_logprobs(base, batch, 1.0, with_entropy=False, selected=selected)
        policy = learner.logprobs(batch, learner.policy)
    reference = learner.reference_logprobs(batch)
    assert torch.allclose(reference, expected * batch.response_mask, atol=1e-5)
    assert (policy - reference).abs()[selected].max() > 1e-3  # the adapters are on outside the context


def test_a_bf16_lora_learner_steps_float32_adapters_and_its_reference_is_the_bf16_base(tiny_model_dir):
    learner = lora_learner(tiny_model_dir, precision="bf16")
    batch = batch_for(learner.model.config.vocab_size)
    for _ in range(2):
        learner.update(batch)
    base = load_model(tiny_model_dir, torch.bfloat16).eval()
    base_weights = dict(base.named_parameters())
    computed = dict(learner.policy.named_parameters())
    for name, master in learner.model.named_parameters():
        assert master.dtype == torch.float32 and torch.equal(computed[name], master.detach().to(torch.bfloat16)), name
        if ".lora_" not in name:  # the frozen base, in the copy as loaded in bf16
            assert torch.equal(computed[name], base_weights[name.replace(".base_layer", "")]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in computed.items() if ".lora_B." in n)
    selected = batch.loss_mask.bool()
    with torch.no_grad():
        expected, _ = response_logprobs(base, batch, 1.0, with_entropy=False, selected=selected)
        policy = learner.logprobs(batch, learner.policy)
    reference = learner.reference_logprobs(batch)  # the bf16 copy with its adapters off
    assert torch.equal(reference, expected * batch.response_mask)
    assert (policy - reference).abs()[selected].max() > 1e-2


def test_merged_weights_synced_to_vllm_greedy_match_transformers_on_the_adapted_model(trained, tiny_model_dir):
    from efficient_rl.data.prompts import encode_prompt, load_tokenizer
    from efficient_rl.lab.tasks import ArithmeticTask, generate_problems
    from efficient_rl.rollout.base import SamplingSettings
    from efficient_rl.rollout.hf import TransformersEngine
    from efficient_rl.rollout.vllm_engine import VLLMEngine

    learner, base, _, _ = trained
    tokenizer = load_tokenizer(tiny_model_dir)
    problems = generate_problems(ArithmeticTask(), "heldout", 4, seed=1)
    prompts = [encode_prompt(tokenizer, p["question"]) for p in problems]
    greedy = SamplingSettings(n=1, max_new_tokens=16, temperature=0.0)

    def rows(engine):
        batch = engine.generate(prompts, problems, list(range(len(prompts))), greedy)
        return [batch.response_ids[r, : int(batch.response_lengths[r])].tolist() for r in range(len(batch))]

    engine = VLLMEngine(tiny_model_dir, tokenizer, max_model_len=128, seed=0)
    metrics = engine.load_weights(learner.named_weights())
    # transformers on the adapted module itself: base + B A x, never merged, an independent path
    expected = rows(TransformersEngine(learner.model, tokenizer))
    assert rows(engine) == expected
    assert expected != rows(TransformersEngine(base, tokenizer))  # the adapters changed the answers
    assert metrics["sync/bytes"] == sum(p.numel() * 4 for p in base.parameters())


# ---------------------------------------------------------------- end to end
def lora_overrides(tiny_overrides, name):
    return tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "learner.lr=0.01",
        "algorithm.kl_coef=0.05",
        "reward=[{name: 'test_training:parity_reward'}]",  # spread even for the untrained model: a signal
        "scoring.workers=0",  # scored in the trainer: no worker processes to start for a tiny run
        "algorithm.token_selection={name: high_entropy, top_fraction: 0.5}",  # selected-token compute
        f"learner.lora={{rank: {RANK}, alpha: {ALPHA}, target_modules: [q_proj, o_proj, up_proj]}}",
        f"logging.name={name}",
    ]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    from conftest import TINY_OVERRIDES

    overrides = TINY_OVERRIDES + [f"logging.output_dir={tmp_path_factory.mktemp('lora') / 'runs'}"]
    straight, _ = run_recipe(load_recipe(RECIPES / "quickstart.yaml", lora_overrides(overrides, "straight")))
    recipe = lambda: load_recipe(RECIPES / "quickstart.yaml", lora_overrides(overrides, "resumed"))  # noqa: E731
    run_recipe(recipe(), stop_after_step=1)
    resumed, summary = run_recipe(recipe(), resume=True)
    assert summary["steps_completed"] == 2
    return straight.path, resumed.path


def test_lora_training_resumes_to_the_same_adapter(runs, tiny_model_dir):
    straight, resumed = runs
    expected, got = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2]
    for ours, theirs in zip(got, expected):
        assert ours["kl"] == theirs["kl"] and ours["loss"] == theirs["loss"]
        assert 0 < ours["tokens/kept_fraction"] <= 0.6
    assert expected[1]["kl"] > 0  # the policy moved away from the base model
    adapters = [
        load_file(run / "checkpoints" / "step-00000002" / ADAPTER_DIR / "adapter_model.safetensors")
        for run in (straight, resumed)
    ]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 3 * 2
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    assert any(adapters[0][name].abs().max() > 0 for name in adapters[0] if "lora_B" in name)
    optimizer = torch.load(straight / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=False)
    assert len(optimizer["state"]) == len(adapters[0])  # adapter parameters only


def test_export_writes_the_merged_model(runs, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from efficient_rl.cli import main

    straight, _ = runs
    out = tmp_path / "exported"
    assert main(["export", str(straight), str(out)]) == 0
    exported = load_model(out).eval()
    assert not list(out.glob("*.pt")) and (out / "tokenizer.json").is_file()
    # The trained policy: the base model with the run's adapter on top, unmerged (PEFT's own path).
    policy = PeftModel.from_pretrained(
        load_model(tiny_model_dir), straight / "checkpoints" / "step-00000002" / ADAPTER_DIR
    ).eval()
    ids = torch.tensor([[5, 17, 30, 8, 99, 12, 41]])
    with torch.no_grad():
        expected, got, before = policy(ids).logits, exported(ids).logits, load_model(tiny_model_dir)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    "source, out, message",
    [
        ("missing", "out", "export: {tmp}/missing: no such directory"),
        ("empty", "out", "export: {tmp}/empty: neither a run directory (with checkpoints/) nor a checkpoint"),
        ("run", "taken", "export: {tmp}/taken: exists and is not an empty directory"),
    ],
)
def test_export_refuses_bad_paths_in_one_line(runs, tmp_path, capsys, source, out, message):
    from efficient_rl.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    path = runs[0] if source == "run" else tmp_path / source
    assert main(["export", str(path), str(tmp_path / out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"efficient-rl: error: {message.format(tmp=tmp_path)}")


def test_export_of_a_full_fine_tuning_checkpoint(tmp_path, tiny_overrides, tiny_model_dir):
    from efficient_rl.models.export import export

    run, _ = run_recipe(
        load_recipe(
            RECIPES / "quickstart.yaml",
            tiny_overrides
            + [
                "steps=1",
                "eval.before_training=false",
                "eval.after_training=false",
                "logging.trackers=[]",
                "learner.lr=0.01",
                "logging.name=full",
            ],
        )
    )
    checkpoint = run.path / "checkpoints" / "step-00000001"
    assert export(checkpoint, tmp_path / "out") == checkpoint
    saved, exported = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    assert not (checkpoint / ADAPTER_DIR).exists()


def test_on_policy_distillation_trains_the_students_adapter(tmp_path, tiny_overrides):
    """The teacher (lab:tiny) is its own model; the LoRA student (lab:tiny_student) learns from it."""
    run, _ = run_recipe(
        load_recipe(
            RECIPES / "tip_opd.yaml",
            tiny_overrides
            + [
                "model.lab=tiny_student",
                "distill.teacher=lab:tiny",
                "steps=1",
                "eval.before_training=false",
                "eval.after_training=false",
                "logging.trackers=[]",
                "scoring.workers=0",
                "learner.lr=0.05",
                f"learner.lora={{rank: {RANK}, alpha: {ALPHA}}}",
                "logging.name=opd",
            ],
        )
    )
    (row,) = read_metrics(run.path)
    assert row["distill/divergence"] > 0 and 0.3 < row["tokens/kept_fraction"] <= 0.5
    adapter = load_file(run.path / "checkpoints" / "step-00000001" / ADAPTER_DIR / "adapter_model.safetensors")
    targeted = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in adapter}
    assert targeted == set(DEFAULT_LORA_TARGETS)  # every projection by default
    assert any(adapter[name].abs().max() > 0 for name in adapter if "lora_B" in name)


# ---------------------------------------------------------------- bad fields
@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.lora.rank=0", "learner.lora.rank: expected an integer >= 1, got 0"),
        ("learner.lora.rank=2.5", "learner.lora.rank: expected an integer, got float 2.5"),
        ("learner.lora.alpha=0", "learner.lora.alpha: expected a finite number > 0"),
        ("learner.lora.alpha=.inf", "learner.lora.alpha: expected a finite number > 0"),
        ("learner.lora.dropout=1.0", "learner.lora.dropout: expected a finite number in [0, 1), got 1.0"),
        ("learner.lora.dropout=-0.1", "learner.lora.dropout: expected a finite number in [0, 1), got -0.1"),
        ("learner.lora.target_modules=q_proj", "learner.lora.target_modules: expected a list, got str 'q_proj'"),
        ("learner.lora.rnak=4", "learner.lora.rnak: unknown key (did you mean 'rank'?)"),
        (
            "learner.lora.target_modules=[]",
            "learner.lora.target_modules: expected a non-empty list of linear layer "
            "names; the model has: down_proj, gate_proj, k_proj, o_proj, q_proj, "
            "up_proj, v_proj",
        ),
        (
            "learner.lora.target_modules=[q_proj, qkv]",
            "learner.lora.target_modules: 'qkv' not a linear layer of the "
            "model; valid names: down_proj, gate_proj, k_proj, o_proj, "
            "q_proj, up_proj, v_proj",
        ),
        (
            "cluster.pipeline={name: overlapped, max_staleness: 0}",
            "learner.lora: not with cluster.pipeline overlapped on the transformers engine",
        ),
    ],
)
def test_bad_lora_fields_are_one_line_errors(tmp_path, tiny_overrides, override, message):
    overrides = tiny_overrides + ["scoring.workers=0", "logging.name=bad", "learner.lora.rank=4", override]
    with pytest.raises(ConfigError) as caught:
        run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "runs" / "bad").exists()


# ---------------------------------------------------------------- DeepSpeed
def deepspeed_round_trip(model_dir: str, checkpoint: str) -> None:
    """In a process of its own (a one-rank gloo group): a ZeRO-2 LoRA learner trains, saves, and a
    second one resumed from the checkpoint takes the same next step."""
    from pathlib import Path

    from conftest import TINY_OVERRIDES
    from efficient_rl.learner.deepspeed_learner import DeepSpeedLearner

    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        TINY_OVERRIDES
        + [
            "cluster.backend=ray",
            "rollout.engine=vllm",  # where DeepSpeed ranks run; this one runs here, alone
            "learner.backend=deepspeed",
            "learner.zero_stage=2",
            "learner.lr=0.05",
            "learner.micro_batch_size=4",
            "algorithm.kl_coef=0.1",
            f"learner.lora={{rank: {RANK}, alpha: {ALPHA}, target_modules: [q_proj, v_proj, down_proj]}}",
        ],
    )
    plan = validate(recipe)
    first = DeepSpeedLearner(plan, Path(model_dir), Path(model_dir))
    batch = batch_for(first.model.config.vocab_size)
    for _ in range(2):
        metrics = first.update(batch)
    assert first.reference is None and metrics["kl"] > 0
    base = dict(load_model(model_dir).named_parameters())
    for name, parameter in first.model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(parameter, base[name.replace(".base_layer", "")]), name
    synced = dict(first.named_weights())
    assert synced.keys() == base.keys()
    module = "model.layers.1.mlp.down_proj"
    assert torch.allclose(synced[f"{module}.weight"], by_hand(first, module), atol=1e-6)
    assert not torch.equal(synced[f"{module}.weight"], base[f"{module}.weight"])
    first.save(Path(checkpoint))
    assert (Path(checkpoint) / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    resumed = DeepSpeedLearner(plan, Path(checkpoint), Path(model_dir))
    resumed.load_state(Path(checkpoint))
    for (name, ours), (_, theirs) in zip(resumed.model.named_parameters(), first.model.named_parameters()):
        assert torch.equal(ours, theirs), name
    assert resumed.update(batch)["loss"] == first.update(batch)["loss"]


def test_lora_on_a_deepspeed_zero2_rank_trains_saves_and_resumes(tmp_path, tiny_model_dir):
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **__import__("os").environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    code = f"import test_lora; test_lora.deepspeed_round_trip({str(tiny_model_dir)!r}, {str(tmp_path / 'ckpt')!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
