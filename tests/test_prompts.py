"""Prompts through chat templates (system turn, user template, plain text) and the stop tokens a
model's generation config lists, on the transformers and vLLM engines."""

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from conftest import RECIPES, TINY_OVERRIDES
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.schema import PromptSection
from efficient_rl.data.prompts import TokenizerError, encode_prompt, load_tokenizer, stop_token_ids
from efficient_rl.errors import ConfigError
from efficient_rl.rollout.base import SamplingSettings
from efficient_rl.rollout.hf import TransformersEngine
from efficient_rl.rollout.vllm_engine import VLLMEngine

GREEDY = SamplingSettings(n=1, max_new_tokens=24, temperature=0.0)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_prompt_has_system_turn_and_user_template(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = PromptSection(system_prompt="Be brief.", user_template="Q: {question} A?")
    # The lab's template, written out by hand: <|im_start|>role\ncontent<|im_end|>\n per turn.
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: 2+3 A?<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tokenizer, "2+3", prompt) == ids_of(tokenizer, expected)
    assert encode_prompt(tokenizer, "2+3") == ids_of(
        tokenizer, "<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n"
    )


def test_never_gives_the_plain_user_text(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = PromptSection(chat_template="never", user_template="Question: {question}\nAnswer:")
    assert encode_prompt(tokenizer, "2+3", prompt) == tokenizer("Question: 2+3\nAnswer:")["input_ids"]


@pytest.fixture
def no_template_model(tmp_path, tiny_model_dir):
    """The tiny model with its chat template removed."""
    target = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, target)
    (target / "chat_template.jinja").unlink()
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_auto_falls_back_to_plain_text_and_always_is_refused(no_template_model, tmp_path):
    tokenizer = load_tokenizer(no_template_model)
    assert encode_prompt(tokenizer, "2+3") == tokenizer("2+3")["input_ids"]
    with pytest.raises(
        TokenizerError, match="prompt.chat_template: always, but the tokenizer of .* has no chat template"
    ):
        encode_prompt(tokenizer, "2+3", PromptSection(chat_template="always"))

    from efficient_rl.driver.loop import run_recipe

    overrides = [o for o in TINY_OVERRIDES if not o.startswith("model.lab")] + [
        "model.lab=null",
        f"model.path={no_template_model}",
        "prompt.chat_template=always",
        f"logging.output_dir={tmp_path / 'runs'}",
    ]
    with pytest.raises(ConfigError, match="^model: prompt.chat_template: always"):
        run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def extra_stop_model(tmp_path, tiny_model_dir):
    """The tiny model whose generation config also lists, as an end-of-turn token, a token it
    generates greedily for the first prompt: the engines must stop there."""
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [encode_prompt(tokenizer, q) for q in ("3+4*2", "9-5+1")]
    engine = TransformersEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    batch = engine.generate(prompts, [{}, {}], [0, 1], GREEDY)
    first = batch.response_ids[0, : int(batch.response_lengths[0])].tolist()
    # The first token that differs from the one the response starts with (the tiny model repeats itself).
    position = next((i for i, token in enumerate(first) if token != first[0]), 0)
    stop = first[position]
    assert stop != tokenizer.eos_token_id
    target = tmp_path / "extra-stop"
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, stop]
    (target / "generation_config.json").write_text(json.dumps(config))
    return target, prompts, stop, position + 1


def test_generation_config_stop_tokens_end_responses_on_both_engines(extra_stop_model):
    model_dir, prompts, stop, stopped_length = extra_stop_model
    tokenizer = load_tokenizer(model_dir)
    assert stop_token_ids(tokenizer) == sorted({tokenizer.eos_token_id, stop})
    engines = {
        "transformers": TransformersEngine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer),
        "vllm": VLLMEngine(model_dir, tokenizer, max_model_len=128, seed=0),
    }
    responses = {}
    for name, engine in engines.items():
        batch = engine.generate(prompts, [{}, {}], [0, 1], GREEDY)
        responses[name] = [batch.response_ids[r, : int(batch.response_lengths[r])].tolist() for r in range(2)]
        assert not bool(batch.truncated[0])  # stopped by the token, not by the cap
    assert responses["transformers"] == responses["vllm"]
    assert len(responses["vllm"][0]) == stopped_length and responses["vllm"][0][-1] == stop
    for response in responses["vllm"]:  # a stop token only ever ends a response
        assert all(token not in (stop, tokenizer.eos_token_id) for token in response[:-1])
