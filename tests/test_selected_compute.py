"""Selected-token compute: the LM head, log-softmax and loss on the kept positions only must give
the loss and gradients of full compute followed by masking (TIP / D3S compute savings)."""

import dataclasses

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import RECIPES
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.losses import LossDenominators
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.learner.objective import loss_masks, objective_settings, policy_gradient_loss
from efficient_rl.models.modeling import response_logprobs, sequence_inputs

VOCAB, PROMPT, RESPONSE, ROWS = 97, 5, 11, 6


# The distillation objective; the teacher is named for the recipe's check and passed in by the test.
DISTILLATION = ("algorithm.objective=distillation", "distill.teacher=lab:tiny")


def settings_of(*overrides, **fields):
    """The objective settings of grpo.yaml with recipe overrides, then settings fields replaced."""
    return dataclasses.replace(
        objective_settings(validate(load_recipe(RECIPES / "grpo.yaml", list(overrides)))), **fields
    )


def tiny_model(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return Qwen2ForCausalLM(config).float()


def random_batch(generator: torch.Generator, keep: float) -> RolloutBatch:
    lengths = torch.randint(1, RESPONSE + 1, (ROWS,), generator=generator)
    prompt_lengths = torch.randint(1, PROMPT + 1, (ROWS,), generator=generator)
    response_mask = (torch.arange(RESPONSE)[None] < lengths[:, None]).float()
    prompt_mask = (torch.arange(PROMPT)[None] >= PROMPT - prompt_lengths[:, None]).long()  # left-padded
    kept = (torch.rand(ROWS, RESPONSE, generator=generator) < keep).float() * response_mask
    return RolloutBatch(
        prompt_ids=torch.randint(0, VOCAB, (ROWS, PROMPT), generator=generator) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(0, VOCAB, (ROWS, RESPONSE), generator=generator) * response_mask.long(),
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(ROWS, RESPONSE),
        truncated=torch.zeros(ROWS, dtype=torch.bool),
        group_ids=torch.arange(ROWS) // 2,
        samples=[{}] * ROWS,
        completions=[""] * ROWS,
        advantages=torch.randn(ROWS, RESPONSE, generator=generator) * response_mask,
        old_logprobs=-torch.rand(ROWS, RESPONSE, generator=generator) * 3,  # ratios away from 1: clipping acts
        loss_mask=kept,
    )


def loss_and_gradients(model, batch, settings, selected_compute: bool):
    model.zero_grad()
    logprobs, entropy = response_logprobs(
        model, batch, temperature=0.7, selected=batch.loss_mask if selected_compute else None
    )
    _, averaged_over = loss_masks(batch, settings)
    loss, _ = policy_gradient_loss(logprobs, batch, settings, LossDenominators.of(averaged_over, RESPONSE))
    loss.backward()
    kept = batch.loss_mask.bool()
    return loss.detach(), entropy.detach()[kept], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("denominator", ["kept", "all"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_selected_compute_equals_full_compute_then_masking(tied, denominator, keep):
    model = tiny_model(tied)
    settings = settings_of("algorithm.policy_loss.clip_ratio_c=3.0", loss_denominator=denominator)
    batch = random_batch(torch.Generator().manual_seed(int(keep * 10) + 100 * tied), keep)
    assert 0 < batch.loss_mask.sum() < batch.response_mask.sum()
    full_loss, full_entropy, full_grads = loss_and_gradients(model, batch, settings, selected_compute=False)
    loss, entropy, grads = loss_and_gradients(model, batch, settings, selected_compute=True)
    assert loss.item() == pytest.approx(full_loss.item(), abs=1e-5)
    assert torch.allclose(entropy, full_entropy, atol=1e-5)
    for name, gradient in full_grads.items():
        assert torch.allclose(grads[name], gradient, atol=1e-5), name
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_inside_the_whole_models_forward_equals_the_head_on_the_bodys_states(tied):
    """ZeRO-3's path (the model called whole, the fused head in the LM head's forward, a token
    selection honoured there) against the body called on its own: values, entropies, gradients."""
    model = tiny_model(tied)
    batch = random_batch(torch.Generator().manual_seed(7 + tied), 0.5)
    results = []
    for whole_model in (False, True):
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, batch, 0.7, selected=batch.loss_mask, whole_model=whole_model)
        (logprobs * batch.advantages + 0.1 * entropy).sum().backward()
        results.append((logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logprobs, entropy, grads), (whole_logprobs, whole_entropy, whole_grads) = results
    assert (whole_logprobs[batch.loss_mask == 0] == 0).all() and (whole_logprobs[batch.loss_mask > 0] < 0).all()
    assert torch.allclose(whole_logprobs, logprobs, atol=1e-5) and torch.allclose(whole_entropy, entropy, atol=1e-5)
    for name, gradient in grads.items():
        assert torch.allclose(whole_grads[name], gradient, atol=1e-5), name
    assert type(model.lm_head).forward is torch.nn.Linear.forward and "forward" not in vars(model.lm_head)


def test_the_denominator_choice_scales_the_token_mean_loss():
    model = tiny_model(tied=True)
    batch = random_batch(torch.Generator().manual_seed(3), 0.5)
    kept_loss, _, _ = loss_and_gradients(model, batch, settings_of(loss_denominator="kept"), True)
    all_loss, _, _ = loss_and_gradients(model, batch, settings_of(loss_denominator="all"), True)
    ratio = batch.loss_mask.sum() / batch.response_mask.sum()
    assert all_loss.item() == pytest.approx(kept_loss.item() * ratio.item(), rel=1e-5)


def test_learner_token_entropy_matches_the_full_logits():
    from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner

    model = tiny_model(tied=True)
    batch = random_batch(torch.Generator().manual_seed(5), 0.5)
    learner = TorchLearner(model, settings_of(temperature=0.7), OptimSettings(micro_batch_size=4))
    with torch.no_grad():
        _, full = response_logprobs(model, batch, temperature=0.7)
    entropy = learner.token_statistics(batch, ("entropy",))["entropy"]
    assert entropy.shape == batch.response_mask.shape
    assert torch.allclose(entropy, full * batch.response_mask, atol=1e-5)
    assert (entropy[batch.response_mask == 0] == 0).all() and (entropy[batch.response_mask == 1] > 0).all()


def reverse_kl_reference(student_logits, teacher_logits):
    """KL(P_S || P_T) per position, directly from the definition."""
    p = torch.softmax(student_logits.double(), -1)
    return (p * (p.log() - torch.log_softmax(teacher_logits.double(), -1))).sum(-1)


@pytest.mark.parametrize("keep", [0.4, 1.0])
def test_distillation_loss_on_selected_tokens_equals_the_masked_full_reverse_kl(keep):
    from efficient_rl.learner.teacher import Teacher

    student, teacher_model = tiny_model(tied=True), tiny_model(tied=False)
    teacher = Teacher(teacher_model, temperature=1.0, chunk_rows=3)
    batch = random_batch(torch.Generator().manual_seed(11), keep)
    settings = settings_of(*DISTILLATION, temperature=1.0, chunk_rows=3)
    kept = batch.loss_mask
    loss, stats = settings.objective(student, batch, settings, LossDenominators.of(kept, RESPONSE), teacher)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    width = RESPONSE + 1
    inputs = dict(zip(("input_ids", "attention_mask", "position_ids"), sequence_inputs(batch)))
    student_logits = student(**inputs, logits_to_keep=width).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher_model(**inputs, logits_to_keep=width).logits[:, :-1]
    reference = (reverse_kl_reference(student_logits, teacher_logits) * kept).sum() / kept.sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert stats["distill/divergence"].item() == pytest.approx((reference * kept.sum()).item(), rel=1e-4)
    for name, parameter in student.named_parameters():
        assert torch.allclose(grads[name], parameter.grad, atol=1e-5), name


def test_distillation_updates_pull_the_student_to_the_teacher_and_stats_match_the_definitions():
    from efficient_rl.learner.teacher import Teacher
    from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner

    student, teacher_model = tiny_model(tied=True), tiny_model(tied=False)
    batch = random_batch(torch.Generator().manual_seed(13), 1.0)
    batch.loss_mask = None
    learner = TorchLearner(
        student,
        settings_of(*DISTILLATION, temperature=1.0, chunk_rows=4),
        OptimSettings(lr=1e-2, micro_batch_size=4),
        teacher=Teacher(teacher_model, 1.0, 4),
    )
    names = ("entropy", "reverse_kl", "forward_kl", "jsd")
    stats = learner.token_statistics(batch, names)
    inputs = dict(zip(("input_ids", "attention_mask", "position_ids"), sequence_inputs(batch)))
    with torch.no_grad():
        s = student(**inputs, logits_to_keep=RESPONSE + 1).logits[:, :-1]
        t = teacher_model(**inputs, logits_to_keep=RESPONSE + 1).logits[:, :-1]
    mask = batch.response_mask
    assert torch.allclose(stats["reverse_kl"], (reverse_kl_reference(s, t) * mask).float(), atol=1e-5)
    assert torch.allclose(stats["forward_kl"], (reverse_kl_reference(t, s) * mask).float(), atol=1e-5)
    p = torch.softmax(s.double(), -1)
    assert torch.allclose(stats["entropy"], (-(p * p.log()).sum(-1) * mask).float(), atol=1e-5)
    q = torch.softmax(t.double(), -1)
    mixture = 0.5 * (p + q)
    jsd = 0.5 * (p * (p / mixture).log()).sum(-1) + 0.5 * (q * (q / mixture).log()).sum(-1)
    assert torch.allclose(stats["jsd"], (jsd * mask).float(), atol=1e-5)  # entropy_sampling's gamma term

    before = float((stats["reverse_kl"] * mask).sum() / mask.sum())
    losses = [learner.update(batch)["loss"] for _ in range(8)]
    after = float((learner.token_statistics(batch, ("reverse_kl",))["reverse_kl"] * mask).sum() / mask.sum())
    assert losses[0] == pytest.approx(before, rel=1e-4)  # the loss is the mean reverse KL
    assert after < 0.5 * before
