"""The memory planner (efficient_rl/config/memory.py, docs/memory.md): each term of a tiny model
against numbers worked out by hand here, ZeRO's partitions, the shipped 1.5B recipe's table and
its refusal at the old micro-batch, and the `plan` / `train` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from efficient_rl.cli import main
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.memory import GIB, check_memory_fits, plan_memory
from efficient_rl.config.placement import resolve_placement
from efficient_rl.config.schema import LoraSection, Recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError

RECIPES = Path(__file__).resolve().parent.parent / "efficient_rl" / "recipes"
R1_RECIPE = RECIPES / "dler_r1_1p5b.yaml"

# A Llama of hidden 8, 2 layers, 2 heads of 4 (1 key/value head), MLP 16, vocabulary 32, untied.
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 32,
    "tie_word_embeddings": False,
}
# Per layer: q 8x8 = 64, k 8x4 = 32, v 32, o 64, gate 8x16 = 128, up 128, down 128 (576) + two
# norms 16 = 592; x 2 layers = 1184; embeddings and head 2 x 32 x 8 = 512; final norm 8.
TINY_PARAMETERS = 1184 + 512 + 8  # 1704
# micro_batch_size 2 rows x (prompt 3 + response 5)
TINY_TOKENS = 16


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return tmp_path


def tiny_recipe(model_dir: Path, **learner) -> Recipe:
    recipe = Recipe()
    recipe.model.path, recipe.model.lab = str(model_dir), None
    recipe.rollout.max_prompt_length, recipe.rollout.max_response_length = 3, 5
    recipe.learner.micro_batch_size = 2
    for name, value in learner.items():
        setattr(recipe.learner, name, value)
    return recipe


def terms(recipe: Recipe, device: int = 0) -> dict[str, float]:
    plan = plan_memory(recipe, resolve_placement(recipe.cluster))
    return {term.name: term.bytes for term in plan.devices[device].terms}


def test_parameters_of_a_tiny_config_and_of_the_r1_distill(tiny_dir):
    plan = plan_memory(tiny_recipe(tiny_dir), resolve_placement(Recipe().cluster))
    assert plan.sizes.parameters == TINY_PARAMETERS == 1704
    r1 = plan_memory(load_recipe(R1_RECIPE), resolve_placement(load_recipe(R1_RECIPE).cluster))
    # DeepSeek-R1-Distill-Qwen-1.5B: per layer q 1536^2 + 1536 bias, k and v 1536 x 256 + 256 each,
    # o 1536^2, MLP 3 x 1536 x 8960, norms 2 x 1536 = 46,797,824; x 28 = 1,310,339,072; embeddings
    # and an untied head 2 x 151936 x 1536 = 466,747,392; final norm 1536.
    assert r1.sizes.parameters == 1_310_339_072 + 466_747_392 + 1536 == 1_777_088_000


def test_torch_learner_fp32_terms_by_hand(tiny_dir):
    assert terms(tiny_recipe(tiny_dir)) == {
        "weights": 4 * 1704,  # float32 masters
        "gradients": 4 * 1704,
        "optimizer": 8 * 1704,  # Adam's two float32 moments
        # per token and layer: norms 2 x (4 + 4) x 8 = 128, q/k/v input, q, k, v, attention out,
        # o_proj input, MLP input 7 x 4 x 8 = 224, gate, SiLU, up, product 4 x 4 x 16 = 256: 608
        "activations": 16 * 2 * 608,
        # the fused head: a float32 [16 x 32] tile and half of one (the tiles are larger than the pass), and the
        # float32 gradients of the hidden states and of a vocabulary tile of the weight
        "log-prob head": 6 * 16 * 32 + 4 * (16 + 32) * 8,
    }


def test_torch_learner_bf16_checkpointed_terms_by_hand(tiny_dir):
    recipe = tiny_recipe(tiny_dir, precision="bf16", gradient_checkpointing=True)
    assert terms(recipe) == {
        "weights": 4 * 1704 + 2 * 1704,  # float32 masters + the bf16 copy the passes run on
        "gradients": 4 * 1704 + 2 * 1704,  # float32 + a pass's bf16 ones
        "optimizer": 8 * 1704,
        # each layer's bf16 input 2 x 8, twice, + one layer recomputed: norms 2 x (4 + 2) x 8 = 96,
        # 7 x 2 x 8 = 112, 4 x 2 x 16 = 128
        "activations": 16 * (2 * 16 + 96 + 112 + 128),
        "log-prob head": 6 * 16 * 32 + 4 * (16 + 32) * 8 + 4 * (16 + 32) * 8,  # + float32 copies of bf16
    }


def test_lora_trains_and_steps_only_the_adapters(tiny_dir):
    recipe = tiny_recipe(tiny_dir, lora=LoraSection(rank=2))
    # rank 2 x (in + out): q 16, k 12, v 12, o 16, gate 24, up 24, down 24 = 128 x 2 = 256 per
    # layer, 512 in all
    found = terms(recipe)
    assert found["weights"] == 4 * (1704 + 512)
    assert found["gradients"] == 4 * 512 and found["optimizer"] == 8 * 512


def ray_recipe(model_dir: Path, ranks: int, **learner) -> Recipe:
    recipe = tiny_recipe(model_dir, backend="deepspeed", precision="bf16", **learner)
    recipe.cluster.backend = "ray"
    recipe.cluster.learner.workers = ranks
    return recipe


@pytest.mark.parametrize(
    "stage, weights, gradients, optimizer",
    [
        # bf16 module 2 x 1704; ZeRO 1-3 float32 masters and Adam over 4 ranks: 4 x 1704 / 4, 8 x 1704 / 4;
        # gradients summed in float32
        (
            1,
            2 * 1704 + 1704,
            4 * 1704 + 4 * 1704 / 4,
            8 * 1704 / 4,
        ),  # full gradients + the step's float32 partition
        (
            2,
            2 * 1704 + 1704,
            4 * 1704 / 4 + 4 * 1704 + 4 * 1704 / 4,
            8 * 1704 / 4,
        ),  # partition + reduce bucket (all 1704)
        (3, 2 * 1704 / 4 + 1704, 4 * 1704 / 4 + 4 * 1704 + 4 * 1704 / 4, 8 * 1704 / 4),  # the module partitioned too
    ],
)
def test_zero_partitions_by_hand(tiny_dir, stage, weights, gradients, optimizer):
    found = terms(ray_recipe(tiny_dir, 4, zero_stage=stage))
    assert (found["weights"], found["gradients"], found["optimizer"]) == (weights, gradients, optimizer)


@pytest.mark.parametrize("stage", [2, 3])
def test_every_zero_stage_plans_the_fused_heads_tiles(tiny_dir, stage):
    """ZeRO-3 runs the fused head inside the model's whole forward: the same tiles as ZeRO-2."""
    found = terms(ray_recipe(tiny_dir, 4, zero_stage=stage))
    # a float32 [16 x 32] tile and half of one; float32 gradients and bf16 passes' float32 copies of 16 hidden
    # states of 8 and of a 32-entry vocabulary tile of the weight
    assert found["log-prob head"] == 6 * 16 * 32 + 2 * 4 * (16 + 32) * 8


def test_zero_optimizer_partitions_add_up_to_the_whole(tiny_dir):
    for ranks in (1, 2, 8):
        partitioned = terms(ray_recipe(tiny_dir, ranks, zero_stage=2))["optimizer"]
        assert partitioned * ranks == terms(tiny_recipe(tiny_dir))["optimizer"]
    assert terms(ray_recipe(tiny_dir, 4, zero_stage=2, offload_optimizer=True))["optimizer"] == 0


def test_colocated_gpu_holds_the_engine_share(tiny_dir):
    recipe = ray_recipe(tiny_dir, 2, zero_stage=2)
    recipe.cluster.placement, recipe.rollout.engine = "colocate", "vllm"
    recipe.cluster.learner.gpus = recipe.cluster.rollout.gpus = 1
    recipe.cluster.rollout.workers = 2
    recipe.cluster.gpu_memory_gib = 10.0
    plan = plan_memory(recipe, resolve_placement(recipe.cluster))
    [device] = plan.devices
    assert (device.kind, device.count) == ("learner + rollout GPU", 2)
    found = {term.name: term.bytes for term in device.terms}
    assert found["rollout engine"] == 0.9 * 10 * GIB  # vLLM's default share of 10 GiB
    assert found["CUDA runtime"] == 1 * GIB


def r1(*overrides: str) -> Recipe:
    return load_recipe(R1_RECIPE, list(overrides))


def test_r1_recipe_fits_at_its_micro_batch():
    recipe = r1()
    assert recipe.learner.micro_batch_tokens == 16384 and recipe.cluster.gpu_memory_gib == 79.6
    plan = check_memory_fits(recipe, resolve_placement(recipe.cluster))
    [device] = plan.devices
    head = {term.name: term.bytes for term in device.terms}["log-prob head"]
    # the fused head: a float32 [4096 x 8192] tile and half of one; the float32 gradient of 16384 hidden states
    # of 1536 and of a vocabulary tile of the weight, and float32 copies of both (bf16 passes)
    assert head == 6 * 4096 * 8192 + 2 * 4 * (16384 + 8192) * 1536
    assert device.total < 79.6 * GIB


def test_r1_recipe_with_the_whole_rows_head_is_refused_naming_term_and_knob():
    """A truncated support keeps TokenLogprobs' [tokens x vocabulary] buffers: 16384 tokens do not fit."""
    recipe = r1("rollout.top_p=0.95")
    with pytest.raises(ConfigError) as refused:
        validate(recipe)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("learner.micro_batch_tokens: a learner + rollout GPU needs")
    assert "log-prob head, 41.7 GiB" in message  # 16384 x 151936 x 18 B
    assert "lower learner.micro_batch_tokens to at most" in message


def test_the_suggested_micro_batch_fits_and_one_more_block_does_not():
    message = ""
    try:
        validate(r1("rollout.top_p=0.95"))
    except ConfigError as err:
        message = str(err)
    suggested = int(message.split("at most ")[1].split(" ")[0])
    validate(r1("rollout.top_p=0.95", f"learner.micro_batch_tokens={suggested}"))
    with pytest.raises(ConfigError):
        validate(r1("rollout.top_p=0.95", f"learner.micro_batch_tokens={suggested + 1024}"))


def test_engine_share_too_large_names_its_own_knob():
    with pytest.raises(ConfigError, match=r"^rollout.vllm.gpu_memory_utilization: .*rollout engine"):
        validate(r1("rollout.vllm.gpu_memory_utilization=0.95"))


def test_nothing_refused_without_a_gpu_memory_a_gpu_or_a_shape(tiny_dir):
    validate(r1("learner.micro_batch_tokens=65536", "cluster.gpu_memory_gib=null"))
    cpu = tiny_recipe(tiny_dir, micro_batch_size=10**6)
    cpu.cluster.gpu_memory_gib = 1.0  # on CPU (embedded): shown, never checked
    check_memory_fits(cpu, resolve_placement(cpu.cluster))
    unknown = r1("model.path=some-org/unknown-model", "learner.micro_batch_tokens=65536")
    plan = check_memory_fits(unknown, resolve_placement(unknown.cluster))
    assert plan.devices == [] and "shape is unknown" in plan.notes[0]


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", str(R1_RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "learner + rollout GPU (x16)" in out
    assert "log-prob head" in out and "fits" in out


def test_train_of_a_recipe_that_cannot_fit_exits_2_writing_nothing(tmp_path, capsys):
    code = main(["train", str(R1_RECIPE), "rollout.top_p=0.95", f"logging.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("efficient-rl: error: learner.micro_batch_tokens:")
    assert list(tmp_path.iterdir()) == []


def test_submit_refuses_it_the_same_way_before_any_job_is_written(tmp_path, capsys):
    overrides = ["rollout.top_p=0.95", f"logging.output_dir={tmp_path}"]
    code = main(["submit", str(R1_RECIPE), *overrides, "--nodes", "2", "--gpus-per-node", "8", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "learner.micro_batch_tokens: a learner + rollout GPU needs" in err
    assert list(tmp_path.iterdir()) == []
