"""Token-budget micro-batches and packed rows: the learner must train exactly as with row
micro-batches (same loss, gradients and statistics), only with less padding; packed sequences
must not see each other."""

import dataclasses

import pytest
import torch
from test_selected_compute import DISTILLATION, VOCAB, settings_of, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.learner.micro_batches import plan_micro_batches
from efficient_rl.learner.teacher import Teacher
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner
from efficient_rl.models.modeling import forward_positions, pack_rows, response_logprobs

ROWS = 12


def spread_batch(seed: int, keep: float = 1.0) -> RolloutBatch:
    """Rows of DLER-like spread: a few long responses, many short ones, prompts of a few widths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([30, 4, 6, 3, 22, 5, 2, 9, 7, 1, 12, 5])[:ROWS]
    prompt_lengths = torch.randint(2, 7, (ROWS,), generator=generator)
    width, prompt_width = int(lengths.max()), int(prompt_lengths.max())
    response_mask = (torch.arange(width)[None] < lengths[:, None]).float()
    prompt_mask = (torch.arange(prompt_width)[None] >= prompt_width - prompt_lengths[:, None]).long()
    kept = (torch.rand(ROWS, width, generator=generator) < keep).float() * response_mask
    return RolloutBatch(
        prompt_ids=torch.randint(1, VOCAB, (ROWS, prompt_width), generator=generator) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(1, VOCAB, (ROWS, width), generator=generator) * response_mask.long(),
        response_mask=response_mask,
        rollout_logprobs=-torch.rand(ROWS, width, generator=generator) * response_mask,
        truncated=torch.zeros(ROWS, dtype=torch.bool),
        group_ids=torch.arange(ROWS) // 3,
        samples=[{}] * ROWS,
        completions=[""] * ROWS,
        advantages=torch.randn(ROWS, width, generator=generator) * response_mask,
        loss_mask=kept if keep < 1.0 else None,
    )


class Observed(TorchLearner):
    """The torch learner, keeping the summed gradient of every optimizer step before it is applied."""

    def apply_gradients(self, loss: float) -> tuple[float, bool]:
        self.gradients.append({name: p.grad.clone() for name, p in self.model.named_parameters()})
        return super().apply_gradients(loss)


MODES = {  # name -> (micro_batch_size, micro_batch_tokens, packing)
    "rows": (4, 0, False),
    "token_budget": (4, 120, False),
    "packed_rows": (4, 0, True),
    "packed_budget": (4, 120, True),
    "tiny_budget": (4, 1, True),  # every sequence alone: the budget is below any sequence
}


def train(mode: str, batch: RolloutBatch, *overrides, teacher=None, **fields):
    size, tokens, packing = MODES[mode]
    settings = settings_of(*overrides, temperature=0.7, packing=packing, **fields)
    # One optimizer step (a second would compare weights that Adam's first step made differ by
    # float noise, amplified where a gradient is near zero).
    optim = OptimSettings(lr=1e-3, micro_batch_size=size, micro_batch_tokens=tokens)
    model, reference = tiny_model(tied=True), tiny_model(tied=False)  # a reference that differs: KL > 0
    learner = Observed(model, settings, optim, reference=reference.eval(), teacher=teacher)
    learner.gradients = []
    metrics = learner.update(batch)
    return metrics, learner.gradients


def assert_same_training(expected, got, where):
    (expected_metrics, expected_gradients), (metrics, gradients) = expected, got
    for name, value in expected_metrics.items():
        if name != "learner/padding_fraction":
            assert metrics[name] == pytest.approx(value, abs=1e-5), (where, name)
    assert len(gradients) == len(expected_gradients) == 1
    for step, (mine, theirs) in enumerate(zip(gradients, expected_gradients)):
        for name, gradient in theirs.items():
            assert torch.allclose(mine[name], gradient, atol=1e-5), (where, step, name)
    assert any(g.abs().sum() > 0 for g in gradients[0].values())


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_token_budget_and_packing_train_as_row_micro_batches(keep):
    """Policy gradient with clipping, KL to a reference (its log-probs computed micro-batch by
    micro-batch too), and a token selection when keep < 1: every grouping gives the same loss,
    gradients and statistics."""
    batch = spread_batch(seed=1, keep=keep)
    batch.old_logprobs = batch.rollout_logprobs.clone()  # ratios away from 1: clipping acts
    overrides = ("algorithm.kl_coef=0.1", "algorithm.policy_loss.clip_ratio_c=3.0")
    rows = train("rows", batch, *overrides)
    assert rows[0]["clip_ratio/high"] + rows[0]["clip_ratio/low"] > 0 and rows[0]["kl"] > 0
    for mode in MODES:
        assert_same_training(rows, train(mode, batch, *overrides), mode)


def test_distillation_with_packing_trains_as_row_micro_batches():
    teacher = Teacher(tiny_model(tied=False), temperature=0.7, chunk_rows=5)
    batch = spread_batch(seed=2, keep=0.5)
    rows = train("rows", batch, *DISTILLATION, teacher=teacher, chunk_rows=5)
    assert rows[0]["distill/divergence"] > 0
    for mode in ("token_budget", "packed_budget"):
        assert_same_training(rows, train(mode, batch, *DISTILLATION, teacher=teacher, chunk_rows=5), mode)


def test_token_statistics_are_the_same_in_every_grouping():
    teacher = Teacher(tiny_model(tied=False), temperature=0.7, chunk_rows=5)
    batch = spread_batch(seed=3)
    names = ("entropy", "reverse_kl")

    def statistics(mode):
        size, tokens, packing = MODES[mode]
        learner = TorchLearner(
            tiny_model(tied=True),
            settings_of(temperature=0.7, packing=packing),
            OptimSettings(micro_batch_size=size, micro_batch_tokens=tokens),
            teacher=teacher,
        )
        return learner.token_statistics(batch, names)

    expected = statistics("rows")
    assert (expected["entropy"][batch.response_mask > 0] > 0).all()
    for mode in ("token_budget", "packed_budget"):
        got = statistics(mode)
        for name in names:
            assert torch.allclose(got[name], expected[name], atol=1e-5), (mode, name)


def test_packing_and_the_token_budget_cut_the_padding():
    batch = spread_batch(seed=4)
    padding = {}
    for mode in ("rows", "token_budget", "packed_budget"):
        size, tokens, packing = MODES[mode]
        positions = real = 0
        for indices in plan_micro_batches(batch, size, tokens, packing):
            computed, useful = forward_positions(batch.select(indices), packing)
            positions, real = positions + computed, real + useful
            if tokens and len(indices) > 1:  # the budget holds, but for a sequence alone
                assert computed <= tokens, mode
        padding[mode] = 1 - real / positions
    assert padding["packed_budget"] < padding["token_budget"] < padding["rows"]
    metrics, _ = train("packed_budget", batch)
    assert 0 <= metrics["learner/padding_fraction"] < padding["token_budget"]


@pytest.mark.parametrize("tokens, packing", [(0, False), (50, False), (50, True), (1, True), (10_000, True)])
def test_every_row_is_in_exactly_one_micro_batch(tokens, packing):
    batch = spread_batch(seed=5)
    plan = plan_micro_batches(batch, 5, tokens, packing)
    assert sorted(i for group in plan for i in group) == list(range(ROWS))
    assert all(group for group in plan)


def llama_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize("make_model", [lambda: tiny_model(tied=True), llama_model], ids=["qwen2", "llama"])
def test_packed_sequences_do_not_attend_to_each_other(make_model):
    """Several sequences share a packed row (SDPA on CPU): each one's log-probs equal its own
    padded forward, and changing every other sequence's tokens changes none of them."""
    model = make_model()
    batch = spread_batch(seed=6)
    packed = pack_rows(batch)
    assert len(packed.input_ids) < ROWS  # rows really hold several sequences
    with torch.no_grad():
        alone = torch.zeros_like(batch.response_mask)
        for row in range(ROWS):
            single = batch.select([row])
            logprobs, _ = response_logprobs(model, single, 1.0)
            alone[row, : logprobs.shape[1]] = logprobs[0] * single.response_mask[0]
        together, _ = response_logprobs(model, batch, 1.0, packed=True)
        assert torch.allclose(together, alone, atol=1e-5)
        changed = dataclasses.replace(batch, response_ids=batch.response_ids.clone())
        changed.response_ids[1:] = (changed.response_ids[1:] + 7) % VOCAB  # all but row 0
        again, _ = response_logprobs(model, changed, 1.0, packed=True)
    assert torch.equal(again[0], together[0])
    assert not torch.allclose(again[1:], together[1:])
