"""Real pretrained models from GGUF files: SmolLM2-135M-Instruct converted for real, tiny GGUFs
written here for the cache, the model references and bad input."""

import json
import re
import shutil
import sys

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GgufConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import RECIPES, TINY_OVERRIDES, run_cli
from efficient_rl.config.loading import load_recipe
from efficient_rl.data.cache import cache_root
from efficient_rl.data.prompts import encode_prompt, load_tokenizer
from efficient_rl.driver.build import LOGIT_TRANSFORMS, build_setup
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError
from efficient_rl.models.sources import builtin_gguf, convert_gguf, model_directory, smollm2_model_dir
from efficient_rl.rollout.base import SamplingSettings
from efficient_rl.rollout.hf import TransformersEngine
from efficient_rl.rollout.vllm_engine import VLLMEngine

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]
GREEDY = SamplingSettings(n=1, max_new_tokens=16, temperature=0.0)

# A one-layer llama with a byte-level BPE vocabulary: converts in well under a second.
TINY_STEM = "test-tiny-llama"
HIDDEN, FFN = 32, 64
TOKENS = list(bytes_to_unicode().values()) + ["he", "lo", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TENSOR_SHAPES = {
    "token_embd.weight": (len(TOKENS), HIDDEN),
    "output_norm.weight": (HIDDEN,),
    "blk.0.attn_norm.weight": (HIDDEN,),
    "blk.0.ffn_norm.weight": (HIDDEN,),
    "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
    "blk.0.attn_k.weight": (HIDDEN // 2, HIDDEN),
    "blk.0.attn_v.weight": (HIDDEN // 2, HIDDEN),
    "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
    "blk.0.ffn_gate.weight": (FFN, HIDDEN),
    "blk.0.ffn_up.weight": (FFN, HIDDEN),
    "blk.0.ffn_down.weight": (HIDDEN, FFN),
}


def write_gguf(path, architecture="llama", embedding_type=None):
    """A tiny GGUF; `embedding_type` stores the embedding, zeroed, in that ggml quantization type."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (len(TOKENS) - 2) + [3, 3])  # 3: control (special) tokens
    writer.add_token_merges(["h e", "l o"])
    writer.add_bos_token_id(len(TOKENS) - 2)
    writer.add_eos_token_id(len(TOKENS) - 1)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    for name, shape in TENSOR_SHAPES.items():
        if embedding_type is not None and name == "token_embd.weight":
            block, size = gguf.GGML_QUANT_SIZES[embedding_type]
            writer.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=embedding_type)
        else:
            writer.add_tensor(name, rng.normal(0, 0.2, shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_conversions_removed():
    """The tiny GGUFs live in a new tmp_path every run, so each run converts them into new cache
    entries: remove those afterwards (they are all named after TINY_STEM)."""
    yield
    for directory in (cache_root() / "models").glob(f"{TINY_STEM}*"):
        shutil.rmtree(directory)


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_model_dir()  # converted once into the tests' cache, then reused


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    """The converted model and tokenizer, loaded with the gguf package hidden: plain transformers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
        model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(smollm2)
    return model, tokenizer


def greedy_rows(engine, prompts):
    batch = engine.generate(prompts, [{} for _ in prompts], list(range(len(prompts))), GREEDY)
    return [batch.response_ids[r, : int(batch.response_lengths[r])].tolist() for r in range(len(batch))]


def test_smollm2_converts_to_a_plain_model_with_the_logits_of_the_gguf(smollm2_model):
    model, tokenizer = smollm2_model
    assert model.config.model_type == "llama"
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    gguf_file = builtin_gguf("smollm2")
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_file.name, dequantize=True),
    ).eval()
    ids = torch.tensor([encode_prompt(tokenizer, QUESTIONS[0])])
    with torch.no_grad():
        gap = (model(ids).logits - direct(ids).logits).abs().max().item()
    assert gap <= 1e-5


def test_transformers_and_vllm_generate_the_same_greedy_tokens(smollm2, smollm2_model):
    model, tokenizer = smollm2_model
    prompts = [encode_prompt(tokenizer, question) for question in QUESTIONS]
    expected = greedy_rows(TransformersEngine(model, tokenizer), prompts)
    assert "Paris" in tokenizer.decode(expected[0])  # a real pretrained model, not noise
    engine = VLLMEngine(smollm2, tokenizer, max_model_len=256, seed=0)
    try:
        assert greedy_rows(engine, prompts) == expected
    finally:
        del engine


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "not a GGUF file"),
        ("architecture", "GGUF architecture 'notamodel' is not one transformers"),
        ("quantization", "has tensors of quantization type Q8_1, which the gguf package cannot dequantize"),
    ],
)
def test_bad_gguf_files_are_one_line_errors_and_leave_nothing(tmp_path, kind, message):
    bad = tmp_path / f"{kind}.gguf"
    if kind == "text":
        bad.write_text("a note, not a model\n")
    else:
        write_gguf(
            bad,
            architecture="notamodel" if kind == "architecture" else "llama",
            embedding_type=gguf.GGMLQuantizationType.Q8_1 if kind == "quantization" else None,
        )
    with pytest.raises(ConfigError) as err:
        convert_gguf(bad, tmp_path / "out")
    assert str(err.value).startswith(f"{bad}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]  # no output, no staging directory


def test_convert_command_on_a_bad_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("a note, not a model\n")
    result = run_cli("convert", bad, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"efficient-rl: error: {bad}: not a GGUF file"]
    assert not (tmp_path / "out").exists()


def test_model_references_builtin_directory_gguf_and_hub(
    tmp_path, smollm2, capsys, monkeypatch, tiny_conversions_removed
):
    assert model_directory("smollm2", "model.path") == smollm2
    assert model_directory(str(smollm2), "model.path") == smollm2

    gguf_file = write_gguf(tmp_path / f"{TINY_STEM}.gguf")
    converted = model_directory(str(gguf_file), "model.path")
    assert converted.parent == cache_root() / "models" and converted.name.startswith(f"{TINY_STEM}-")
    assert "converting" in capsys.readouterr().err
    written = (converted / "model.safetensors").stat().st_mtime_ns
    assert model_directory(str(gguf_file), "distill.teacher") == converted  # cached: not converted again
    assert "converting" not in capsys.readouterr().err
    assert (converted / "model.safetensors").stat().st_mtime_ns == written
    tokenizer = load_tokenizer(converted)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == CHAT_TEMPLATE
    assert AutoModelForCausalLM.from_pretrained(converted).generation_config.eos_token_id == tokenizer.eos_token_id
    write_gguf(gguf_file)  # a rewritten file is another model: converted anew
    assert model_directory(str(gguf_file), "model.path") != converted

    # This machine has no hub; offline mode makes the test behave the same on one that has.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        model_directory("HuggingFaceTB/SmolLM2-135M-Instruct", "model.path")
    assert str(err.value).startswith("model.path: HuggingFaceTB/SmolLM2-135M-Instruct ")
    assert "hub is unreachable" in str(err.value) and "\n" not in str(err.value)
    for reference, message in [
        (str(tmp_path / "missing.gguf"), "no such GGUF file"),
        (str(tmp_path), "is not a model directory (no config.json)"),
    ]:
        with pytest.raises(ConfigError, match=f"^model.path: .*{re.escape(message)}"):
            model_directory(reference, "model.path")


def test_model_path_takes_a_gguf_file(tmp_path, tiny_conversions_removed):
    gguf_file = write_gguf(tmp_path / f"{TINY_STEM}.gguf")
    overrides = TINY_OVERRIDES + ["model.lab=null", f"model.path={gguf_file}", "scoring.workers=0"]
    validate(load_recipe(RECIPES / "quickstart.yaml", TINY_OVERRIDES + ["model.lab=null", "model.path=smollm2"]))
    setup = build_setup(validate(load_recipe(RECIPES / "quickstart.yaml", overrides)))
    try:
        assert setup.base_model_dir == model_directory(str(gguf_file), "model.path").resolve()
        assert setup.model.config.model_type == "llama" and setup.tokenizer.eos_token == "<|im_end|>"
    finally:
        setup.rewards.close()


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625)])
def test_a_model_whose_logits_are_transformed_after_its_head_is_refused_before_anything_is_written(
    tmp_path, tiny_model_dir, field, value
):
    """Gemma 2's tanh cap, Cohere's scale: the engine samples from the transformed logits, the
    fused head would take log-probs of the head's product alone, and every ratio would be off."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    runs = tmp_path / "runs"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("model.")]
    done = run_cli(
        "train", RECIPES / "quickstart.yaml", *overrides, "model.lab=null", f"model.path={model}",
        f"logging.output_dir={runs}", "steps=1",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"efficient-rl: error: model: its config.json sets {field}: {value}, which transforms the logits after "
        f"the output head; the learner's fused log-prob head supports models whose logits are the head's "
        f"product (expected {field}: {LOGIT_TRANSFORMS[field]})"
    ]
    assert not runs.exists()
