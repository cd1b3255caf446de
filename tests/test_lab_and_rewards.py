"""The synthetic lab (tasks, splits, traces, tokenizer, cache) and the reward runner."""

import dataclasses
import json
import statistics

import pytest
import torch

from efficient_rl.config.schema import RewardEntry
from efficient_rl.data.prompts import encode_prompt, encode_response, load_tokenizer
from efficient_rl.lab.build import LabBuildError, build_lab, lab_model_dir
from efficient_rl.lab.presets import PRESETS, WarmStartCheck
from efficient_rl.lab.tasks import ArithmeticTask, generate_problems, warm_start_traces
from efficient_rl.rewards.math import extract_answer, math_reward
from efficient_rl.rollout.base import SamplingSettings
from efficient_rl.rollout.hf import TransformersEngine
from efficient_rl.scoring.runner import RewardRunner


def evaluate_expression(question: str) -> int:
    tokens = question.removeprefix("Compute ").rstrip(".").split()
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = value + int(operand) if op == "+" else value - int(operand)
    return value


def test_problems_have_correct_answers_and_disjoint_reproducible_splits():
    task = ArithmeticTask()
    train = generate_problems(task, "train", 500, seed=3)
    heldout = generate_problems(task, "heldout", 100, seed=3)
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}
    assert train == generate_problems(task, "train", 500, seed=3)
    for p in train + heldout:
        assert int(p["answer"]) == evaluate_expression(p["question"])
        assert task.min_ops <= p["num_ops"] <= task.max_ops


def test_warm_start_traces_are_correct_and_wordy(tiny_model_dir):
    task = PRESETS["quickstart"].task
    problems = generate_problems(task, "train", 400, seed=0)
    traces = warm_start_traces(task, problems, seed=0)
    tokenizer = load_tokenizer(tiny_model_dir)
    wordy, shortest = [], []
    for problem, trace in zip(problems, traces):
        assert math_reward(trace["response"], problem)["score"] == 1.0
        assert math_reward(problem["shortest_solution"], problem)["score"] == 1.0
        wordy.append(len(encode_response(tokenizer, trace["response"])))
        shortest.append(len(encode_response(tokenizer, problem["shortest_solution"])))
    assert statistics.mean(wordy) >= 3 * statistics.mean(shortest)


def test_tokenizer_round_trip_and_chat_prompt(tiny_model_dir):
    from tokenizers import Tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    # It must split exactly like the tokenizer that was trained and saved (not a look-alike class).
    text = "Compute 12 + 5. 12 + 5 = 17."
    saved = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == saved.encode(text).ids
    text = "7 + 5 - 3 = 12 - 3 = 9. The answer is \\boxed{9}."
    ids = encode_response(tokenizer, text)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = tokenizer.decode(encode_prompt(tokenizer, "Compute 1 + 2."))
    assert prompt.startswith("<|im_start|>user\nCompute 1 + 2.<|im_end|>") and prompt.endswith("assistant\n")


def test_lab_model_is_cached_by_config(tiny_model_dir):
    built_at = (tiny_model_dir / "lab.json").stat().st_mtime
    assert lab_model_dir("tiny") == tiny_model_dir
    assert (tiny_model_dir / "lab.json").stat().st_mtime == built_at  # reused, not rebuilt
    assert PRESETS["tiny"].cache_key() != PRESETS["quickstart"].cache_key()


def test_a_checked_build_is_cached_only_once_its_warm_start_passes(tmp_path):
    """The build fine-tunes further rounds until the held-out check passes, and one that never
    does is a one-line error that caches nothing. The tiny preset answers (almost) nothing right:
    a target of 0 passes at once, a target of 99% never does."""
    quick = WarmStartCheck(target=0.0, problems=16, max_new_tokens=32, extra_rounds=1, round_steps=5)
    target = tmp_path / "passes"
    build_lab(dataclasses.replace(PRESETS["tiny"], check=quick), target, log=lambda line: None)
    record = json.loads((target / "lab.json").read_text())["warm_start_check"]
    assert record["sft_steps"] == PRESETS["tiny"].sft_steps and len(record["rounds"]) == 1

    lines = []
    never = dataclasses.replace(PRESETS["tiny"], check=dataclasses.replace(quick, target=0.99))
    with pytest.raises(
        LabBuildError,
        match=r"lab preset fails: the warm start reached .* after 35 fine-tuning "
        r"steps, below its target of 99%",
    ):
        build_lab(never, tmp_path / "fails", log=lines.append)
    assert [line for line in lines if line.startswith("warm-start check")] == [
        f"warm-start check after {steps} SFT steps: 0.0% held-out accuracy (target 99%)" for steps in (30, 35)
    ]
    assert list(tmp_path.iterdir()) == [target]  # neither the model nor its staging directory is left
    assert PRESETS["quickstart"].check is not None and PRESETS["quickstart"].check.target >= 0.97


def test_a_lab_build_asked_for_twice_at_once_is_built_once(tmp_path):
    """A second process asking for a model being built waits on the build's lock (seen waiting in
    /proc/locks) and then reuses the model instead of building it again over the first."""
    import os
    import subprocess
    import sys

    from conftest import wait_for
    from efficient_rl.lab.build import build_lock

    def waiting_for_a_lock(pid: int) -> bool:  # /proc/locks marks a blocked request "->"
        return any(
            fields[1:2] == ["->"] and fields[5:6] == [str(pid)]
            for fields in map(str.split, open("/proc/locks").read().splitlines())
        )

    env = {**os.environ, "EFFICIENT_RL_CACHE": str(tmp_path)}
    target = tmp_path / "lab" / f"tiny-{PRESETS['tiny'].cache_key()}"
    with build_lock(target):
        second = subprocess.Popen(
            [sys.executable, "-c", "from efficient_rl.lab.build import lab_model_dir; print(lab_model_dir('tiny'))"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: waiting_for_a_lock(second.pid), second, lambda: "the second process ended without waiting")
        build_lab(PRESETS["tiny"], target, log=lambda line: None)
        built_at = (target / "lab.json").stat().st_mtime_ns
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0 and output.splitlines() == [str(target)]  # no "building" line: reused
    assert (target / "lab.json").stat().st_mtime_ns == built_at


def test_engine_logprobs_caps_and_stop_reasons(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = TransformersEngine(model, tokenizer)
    problems = generate_problems(ArithmeticTask(), "heldout", 3, seed=0)
    prompts = [encode_prompt(tokenizer, p["question"]) for p in problems]
    torch.manual_seed(0)
    batch = engine.generate(prompts, problems, [10, 11, 12], SamplingSettings(n=2, max_new_tokens=12))
    assert len(batch) == 6 and batch.group_ids.tolist() == [10, 10, 11, 11, 12, 12]
    assert int(batch.response_lengths.max()) <= 12
    for row in range(len(batch)):
        length = int(batch.response_lengths[row])
        ended_with_eos = batch.response_ids[row, length - 1].item() == tokenizer.eos_token_id
        assert bool(batch.truncated[row]) == (not ended_with_eos)
        # Reference log-probs: a teacher-forced forward pass of this row alone, without padding.
        ids = torch.tensor([prompts[row // 2] + batch.response_ids[row, :length].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[row // 2]) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, -length:, None])[:, 0]
        assert torch.allclose(batch.rollout_logprobs[row, :length], expected, atol=1e-3)


def test_math_reward_extraction():
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("cut off \\boxed{1", fallback_last_number=False) is None
    assert extract_answer("the answer is 42", fallback_last_number=True) == "42"
    assert math_reward("x \\boxed{ 3.0 }", {"answer": "3"})["score"] == 1.0
    assert math_reward("x \\boxed{4}", {"answer": "3"})["score"] == 0.0
    assert math_reward("the result is 3", {"answer": "3"})["score"] == 0.0  # no box, no fallback


def broken_reward(completion, sample):
    if "bad" in completion:
        raise RuntimeError("verifier crashed")
    return 1.0


def test_reward_errors_are_counted_not_hidden(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "broken_reward", broken_reward)
    runner = RewardRunner([RewardEntry(name=f"{__name__}:broken_reward", weight=2.0), RewardEntry(name="math")])
    result = runner.score(["ok \\boxed{1}", "bad", "ok"], [{"answer": "1"}] * 3)
    assert result.scores.tolist() == [3.0, 0.0, 2.0]
    assert result.errors == 1 and "verifier crashed" in result.error_messages[0]
    assert result.accuracy.tolist() == [1.0, 0.0, 0.0]


def test_math_reward_checks_non_numbers_with_math_verify():
    assert math_reward("so \\boxed{\\frac{1}{2}}", {"answer": "0.5"})["score"] == 1.0
    assert math_reward("\\boxed{\\sqrt{4}}", {"answer": "2"})["score"] == 1.0
    assert math_reward("\\boxed{x + 1}", {"answer": "1+x"})["score"] == 1.0
    assert math_reward("\\boxed{x + 2}", {"answer": "1+x"})["score"] == 0.0
    assert math_reward("\\boxed{\\frac{1}{2}}", {"answer": "0.5"}, use_math_verify=False)["score"] == 0.0


def test_format_reward_needs_tags_in_order_and_a_boxed_answer_after_them():
    from efficient_rl.rewards.format import format_reward

    think = {"tags": ["think"]}
    assert format_reward("<think>7 + 5 = 12</think> The answer is \\boxed{12}.", {}, **think)["score"] == 1.0
    assert format_reward("<think>7 + 5 = 12 The answer is \\boxed{12}.", {}, **think)["score"] == 0.0  # not closed
    assert format_reward("<think>\\boxed{12}</think> so 12", {}, **think)["score"] == 0.0  # box inside the tag
    assert format_reward("<think>ok</think> 12", {}, tags=["think"], require_boxed=False)["score"] == 1.0
    assert format_reward("</think><think>", {}, **think)["tags_ok"] == 0.0  # closed before opened
    assert format_reward("<a>1</a><b>2</b> \\boxed{3}", {}, tags=["a", "b"])["score"] == 1.0
    assert format_reward("<b>2</b><a>1</a> \\boxed{3}", {}, tags=["a", "b"])["score"] == 0.0  # wrong order
    assert format_reward("just \\boxed{3}", {})["score"] == 1.0


def test_choice_reward_extracts_the_letter_and_matches_letters_or_choice_text():
    from efficient_rl.rewards.multiple_choice import choice_reward, extract_choice

    assert extract_choice("so \\boxed{B}") == "B"
    assert extract_choice("so \\boxed{(C)}") == "C"
    assert extract_choice("The answer is (D), clearly.") == "D"
    assert extract_choice("Answer: A") == "A"
    assert extract_choice("After checking each option, the best is C.") == "C"
    assert extract_choice("I think it's a") is None  # the article is not choice A
    assert extract_choice("\\boxed{E}") is None
    assert choice_reward("\\boxed{B}", {"answer": "B"})["score"] == 1.0
    assert choice_reward("\\boxed{B}", {"answer": "Paris", "choices": ["London", "Paris"]})["score"] == 1.0
    assert choice_reward("\\boxed{A}", {"answer": "Paris", "choices": ["London", "Paris"]})["score"] == 0.0
    with pytest.raises(ValueError, match="neither a letter"):
        choice_reward("\\boxed{A}", {"answer": "Rome", "choices": ["London", "Paris"]})


def test_length_helpers():
    from efficient_rl.rewards.length import length_metric, length_reward

    assert length_reward("one two three four five", {}, max_words=20) == {"score": 0.75, "words": 5.0}
    assert length_reward("w " * 50, {}, max_words=20)["score"] == 0.0
    assert length_metric("a b c", {}) == {"score": 0.0, "words": 3.0}


def test_math_answer_extraction_is_configurable():
    pattern = {"answer_pattern": r"Answer:\s*(\S+)"}
    assert math_reward("work... Answer: 12", {"answer": "12"}, **pattern)["score"] == 1.0
    assert math_reward("Answer: 3, no wait. Answer: 12", {"answer": "12"}, **pattern)["score"] == 1.0  # the last
    assert math_reward("\\boxed{12}", {"answer": "12"}, **pattern)["score"] == 0.0  # the box is not the pattern
    assert math_reward("it is 12", {"answer": "12"}, fallback_last_number=True, **pattern)["score"] == 1.0
