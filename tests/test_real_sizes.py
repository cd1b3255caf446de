"""What real model sizes need: bf16 learners on float32 master weights, weight syncs in the
engines' dtype, learning-rate schedules, and a Ray driver that never holds the weights."""

import json
import math
import shutil

import pytest
import torch
from test_packing import Observed, spread_batch
from test_selected_compute import VOCAB, settings_of
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import RECIPES, TINY_OVERRIDES
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.build import build_setup
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.learner.schedules import LR_SCHEDULES
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner, optim_settings
from efficient_rl.models.modeling import load_model, response_logprobs, token_logprobs_and_entropy

# bfloat16 keeps 8 significant bits: each rounding is off by at most 2^-9 relative, and a value
# in the backward has been through a handful of them (weights, activations, their products:
# measured 0.4-1.1% here). Eight units of 2^-8 (3%) leave room for that without letting through a
# gradient that is wrong, which is off by 100% or points elsewhere.
BF16_GRADIENT_TOLERANCE = 8 * 2**-8
BF16_LOSS_TOLERANCE = 2 * 2**-8


def small_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return Qwen2ForCausalLM(config).float()


def one_update(precision: str, batch, **optim):
    learner = Observed(
        small_model(),
        settings_of(temperature=0.7),
        OptimSettings(**{"lr": 1e-3, "micro_batch_size": 4, **optim}, precision=precision),
        sync_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
    )
    learner.gradients = []
    return learner, learner.update(batch), learner.gradients[0]


def test_a_bf16_learner_matches_float32_within_bf16_rounding():
    batch = spread_batch(seed=1)
    batch.old_logprobs = batch.rollout_logprobs.clone()  # ratios away from 1: the clipped loss
    _, fp32, fp32_gradients = one_update("fp32", batch)
    learner, bf16, bf16_gradients = one_update("bf16", batch)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=BF16_LOSS_TOLERANCE)
    assert bf16["entropy"] == pytest.approx(fp32["entropy"], rel=BF16_LOSS_TOLERANCE)
    for name, gradient in fp32_gradients.items():
        error = (bf16_gradients[name] - gradient).norm() / gradient.norm()
        assert error < BF16_GRADIENT_TOLERANCE, name
    # ... and it did compute in bf16: the gradients are not float32's bit for bit
    assert any(not torch.equal(bf16_gradients[n], g) for n, g in fp32_gradients.items())
    # float32 master weights and optimizer state, whatever the compute
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(state["exp_avg"].dtype == torch.float32 for state in learner.optimizer.state.values())
    # the passes ran on a bf16 copy (rotary frequencies left float32), refreshed from the stepped masters
    assert all(p.dtype == torch.bfloat16 for p in learner.policy.parameters())
    assert all(b.dtype == torch.float32 for b in learner.policy.buffers() if b.is_floating_point())
    for (name, master), computed in zip(learner.model.named_parameters(), learner.policy.parameters()):
        assert torch.equal(computed, master.detach().to(torch.bfloat16)), name
        assert computed.grad is None and master.grad is None  # all moved to the masters, then cleared
    with torch.no_grad():
        assert learner.policy(input_ids=batch.prompt_ids).logits.dtype == torch.bfloat16


def test_bf16_gradients_are_summed_over_micro_batches_in_float32():
    batch = spread_batch(seed=4).select(range(4))
    # four micro-batches of one row give the one-pass gradient, up to bf16 rounding
    _, _, whole = one_update("fp32", batch)
    _, _, summed = one_update("bf16", batch, micro_batch_size=1)
    for name, gradient in whole.items():
        assert (summed[name] - gradient).norm() / gradient.norm() < BF16_GRADIENT_TOLERANCE, name
    # the running sum is float32: 1 + 2^-9 is 1 in bf16 (8 significant bits), not in float32
    learner = TorchLearner(small_model(), settings_of(), OptimSettings(precision="bf16"))
    master, computed = next(pair for pair in learner.master_pairs if pair[0].dim() == 1)  # a norm's weight
    for value in (1.0, 2**-9):
        computed.grad = torch.full_like(computed, value)
        learner.add_to_master_gradients()
    assert master.grad.dtype == torch.float32 and computed.grad is None
    assert torch.equal(master.grad, torch.full_like(master, 1 + 2**-9))


def test_a_bf16_checkpoint_holds_the_float32_masters_and_resumes_to_the_same_step(tmp_path):
    batch = spread_batch(seed=6)

    def bf16_learner(model):
        return TorchLearner(model, settings_of(), OptimSettings(lr=1e-3, micro_batch_size=4, precision="bf16"))

    straight = bf16_learner(small_model())
    for _ in range(2):
        straight.update(batch)
    straight.save(tmp_path)
    saved = load_model(tmp_path)  # as a resume loads it: the policy in float32
    for name, master in straight.model.named_parameters():
        assert torch.equal(dict(saved.named_parameters())[name], master), name
    resumed = bf16_learner(saved)
    resumed.load_state(tmp_path)
    assert resumed.update(batch)["loss"] == straight.update(batch)["loss"]
    for (name, master), again in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(again, master), name


def test_log_probs_entering_the_loss_are_float32_from_bf16_logits():
    model, batch = small_model().to(torch.bfloat16), spread_batch(seed=2)
    with torch.no_grad():
        assert model(input_ids=batch.prompt_ids).logits.dtype == torch.bfloat16
        logprobs, entropy = response_logprobs(model, batch, 1.0)
        packed, _ = response_logprobs(model, batch, 1.0, packed=True)
    assert logprobs.dtype == entropy.dtype == packed.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_a_float64_log_softmax_and_keep_only_the_logits(dtype):
    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(4, 6, 50, generator=generator)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 50, (4, 6), generator=generator)
    weights = torch.randn(4, 6, generator=generator)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        logprobs, entropy = token_logprobs_and_entropy(logits, tokens, 0.7, with_entropy=True)
    (logprobs * weights).sum().backward()
    exact = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(exact / 0.7, -1)
    (log_p.gather(-1, tokens[..., None])[..., 0] * weights.double()).sum().backward()
    assert logprobs.dtype == entropy.dtype == torch.float32 and not entropy.requires_grad
    assert torch.allclose(logprobs.double(), log_p.gather(-1, tokens[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(entropy.double(), -(log_p.exp() * log_p).sum(-1), atol=1e-5)
    # the gradient in float32, then rounded once to the logits' dtype
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.double(), exact.grad.to(dtype).double(), atol=1e-6)
    # what the backward keeps with the vocabulary's width: the logits themselves, nothing float32
    assert [t.dtype for t in kept if t.shape[-1] == 50] == [dtype]


def test_weight_buckets_travel_in_the_engines_dtype():
    model = small_model()
    total = sum(p.numel() for p in model.parameters())
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
        learner = TorchLearner(model, settings_of(), OptimSettings(), sync_dtype=dtype)
        buckets = list(learner.weight_buckets(2**20))
        assert {bucket.dtype for bucket in buckets} == {dtype}
        assert sum(bucket.payload.numel() for bucket in buckets) == total * width  # bf16: half the bytes
        assert [b.nbytes for b in learner.weight_plan(2**20)] == [b.nbytes for b in buckets]
        unpacked = dict(pair for bucket in buckets for pair in bucket.unpack())
        for name, parameter in model.named_parameters():
            assert torch.equal(unpacked[name], parameter.detach().to(dtype)), name


# ---------------------------------------------------------------- learning-rate schedules
def reference_factor(name: str, step: int, total: int, warmup: int, floor: float) -> float:
    """The schedules written out directly: linear warmup from 1/warmup, then the decay from 1 at
    the first step after warmup to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return {
        "constant": 1.0,
        "linear": 1 - (1 - floor) * t,
        "cosine": floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2,
    }[name]


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules_follow_their_formulas(name):
    params = {"warmup_steps": 3} | ({} if name == "constant" else {"min_lr_ratio": 0.1})
    schedule = LR_SCHEDULES.get(name).bind(LR_SCHEDULES.get(name).params(**params))
    factors = [schedule(step, 10) for step in range(12)]
    expected = [reference_factor(name, step, 10, 3, params.get("min_lr_ratio", 1.0)) for step in range(12)]
    assert factors == pytest.approx(expected)
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(params.get("min_lr_ratio", 1.0))  # the last step


def test_the_learner_follows_its_schedule_across_a_resume(tmp_path):
    recipe = load_recipe(
        RECIPES / "grpo.yaml",
        ["steps=6", "learner.lr=0.01", "learner.lr_schedule.name=cosine", "learner.lr_schedule.warmup_steps=2"],
    )
    batch = spread_batch(seed=3)

    def learner():
        return TorchLearner(small_model(), settings_of(), optim_settings(validate(recipe)))

    straight = learner()
    rates = [straight.update(batch)["lr"] for _ in range(6)]
    assert rates == pytest.approx([0.01 * reference_factor("cosine", s, 6, 2, 0.0) for s in range(6)])
    first = learner()
    for _ in range(3):
        first.update(batch)
    first.save(tmp_path)
    resumed = learner()
    resumed.load_state(tmp_path)
    assert [resumed.update(batch)["lr"] for _ in range(3)] == pytest.approx(rates[3:])


# ---------------------------------------------------------------- the recipe keys
@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.precision=fp16", "learner.precision: expected one of 'fp32', 'bf16'"),
        ("model.dtype=half", "model.dtype: expected one of 'float32', 'bfloat16'"),
        ("learner.micro_batch_tokens=-5", "learner.micro_batch_tokens: expected an integer >= 0"),
        (
            "rollout.vllm.gpu_memory_utilization=1.5",
            "rollout.vllm.gpu_memory_utilization: expected a finite number in (0, 1]",
        ),
        (
            "learner.lr_schedule=cosin",
            "learner.lr_schedule: unknown learning-rate schedule 'cosin' (did you mean 'cosine'?)",
        ),
        ("learner.lr_schedule.warmup_steps=-1", "learner.lr_schedule.warmup_steps: expected an integer >= 0"),
        ("learner.lr_schedule.min_lr_ratio=2", "learner.lr_schedule.min_lr_ratio: unknown key"),  # constant has none
    ],
)
def test_bad_precision_batching_and_schedule_keys_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(RECIPES / "grpo.yaml", [override]))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learner.packing=true", "learner.zero_stage=3"], "learner.packing: not under ZeRO-3"),
        (
            ["learner.precision=bf16", "learner.zero_stage=0"],
            "learner.precision: bf16 on DeepSpeed needs zero_stage 1-3",
        ),
    ],
)
def test_deepspeed_refuses_what_it_cannot_do(overrides, message):
    ray = ["cluster.backend=ray", "rollout.engine=vllm", "learner.backend=deepspeed"]
    with pytest.raises(ConfigError, match=message):
        validate(load_recipe(RECIPES / "grpo.yaml", ray + overrides))


# ---------------------------------------------------------------- a driver without weights
def test_the_ray_driver_reads_config_and_tokenizer_but_never_the_weights(tmp_path, tiny_model_dir):
    """Under cluster.backend: ray the driver needs the vocabulary and the context, which the
    config has: with the weights file gone, prepare still works (and would fail if it loaded
    the model, as it did before), while the embedded backend, which trains in the driver, cannot."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    common = [o for o in TINY_OVERRIDES if not o.startswith("model.")] + [
        f"model.path={model_dir}",
        "model.lab=null",
        "scoring.workers=0",
    ]
    recipe = load_recipe(RECIPES / "quickstart.yaml", common + ["cluster.backend=ray", "rollout.engine=vllm"])
    setup = build_setup(validate(recipe))
    setup.rewards.close()
    config = json.loads((model_dir / "config.json").read_text())
    assert setup.model is None and setup.vocab_size == config["vocab_size"]
    assert setup.tokenizer is not None and setup.encode(setup.train_samples[0])
    with pytest.raises(ConfigError, match=f"model: cannot load {model_dir}"):
        build_setup(validate(load_recipe(RECIPES / "quickstart.yaml", common)))


def test_gradient_checkpointing_on_the_torch_learner_gives_the_same_gradients():
    from efficient_rl.learner.torch_learner import enable_gradient_checkpointing

    batch = spread_batch(seed=4)
    _, plain, plain_gradients = one_update("fp32", batch)
    learner = Observed(small_model(), settings_of(temperature=0.7), OptimSettings(lr=1e-3, micro_batch_size=4))
    enable_gradient_checkpointing(learner.model)
    learner.gradients = []
    checkpointed = learner.update(batch)
    assert learner.model.is_gradient_checkpointing
    assert checkpointed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    for name, gradient in plain_gradients.items():
        assert torch.allclose(learner.gradients[0][name], gradient, atol=1e-6), name
