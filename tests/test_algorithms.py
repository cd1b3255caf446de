"""Algorithm functions against independent references: plain-Python loops and hand-computed values."""

import math
import statistics

import pytest
import torch

from efficient_rl.algos.advantages import dler_advantages, group_stats, grpo_advantages
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.losses import (
    LossDenominators,
    LossInputs,
    kl_k1,
    kl_k3,
    kl_mse,
    ppo_clip_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
)
from efficient_rl.algos.sampling import GROUP_SAMPLERS, groups_with_spread
from efficient_rl.algos.shaping import (
    LENGTH_CAPS,
    LENGTH_SHAPERS,
    ShapingInputs,
    difficulty_caps,
    overlong_shaping,
    tier_metrics,
    truncation_penalty,
)
from efficient_rl.driver.validate import validate


def make_batch(rewards, group_ids, lengths, width=None):
    width = width or max(lengths)
    rows = len(rewards)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    return RolloutBatch(
        prompt_ids=torch.ones(rows, 2, dtype=torch.long),
        prompt_mask=torch.ones(rows, 2, dtype=torch.long),
        response_ids=torch.ones(rows, width, dtype=torch.long),
        response_mask=mask,
        rollout_logprobs=torch.zeros(rows, width),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.tensor(group_ids),
        samples=[{}] * rows,
        completions=[""] * rows,
        rewards=torch.tensor(rewards, dtype=torch.float),
    )


REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0]
GROUPS = [7, 7, 7, 7, 3, 3, 3, 9, 5]  # ids need not be contiguous or sorted; 5 is a group of one
LENGTHS = [3, 5, 1, 4, 2, 6, 3, 2, 4]


def reference_groups():
    members = {}
    for row, gid in enumerate(GROUPS):
        members.setdefault(gid, []).append(row)
    return members


def test_group_stats_match_statistics_module():
    mean, std, size = group_stats(torch.tensor(REWARDS), torch.tensor(GROUPS))
    for rows in reference_groups().values():
        values = [REWARDS[r] for r in rows]
        for r in rows:
            assert mean[r].item() == pytest.approx(statistics.mean(values))
            assert std[r].item() == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
            assert size[r].item() == len(values)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_advantages_loop_reference(norm_by_std):
    batch = make_batch(REWARDS, GROUPS, LENGTHS)
    adv = grpo_advantages(batch, norm_by_std=norm_by_std, eps=1e-6)
    for rows in reference_groups().values():
        values = [REWARDS[r] for r in rows]
        mu = sum(values) / len(values)
        sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        for r in rows:
            expected = (REWARDS[r] - mu) / (sd + 1e-6) if norm_by_std else REWARDS[r] - mu
            for t in range(adv.shape[1]):
                assert adv[r, t].item() == pytest.approx(expected if t < LENGTHS[r] else 0.0, abs=1e-5)


def test_dler_whitening_is_token_weighted():
    batch = make_batch(REWARDS, GROUPS, LENGTHS)
    adv = dler_advantages(batch)
    # Reference: centre by group mean (a group of one keeps its reward), then whiten over tokens.
    centred = []
    for r, gid in enumerate(GROUPS):
        rows = reference_groups()[gid]
        base = sum(REWARDS[k] for k in rows) / len(rows) if len(rows) > 1 else 0.0
        centred.append(REWARDS[r] - base)
    tokens = [centred[r] for r in range(len(REWARDS)) for _ in range(LENGTHS[r])]
    mu = sum(tokens) / len(tokens)
    var = sum((x - mu) ** 2 for x in tokens) / (len(tokens) - 1)
    for r in range(len(REWARDS)):
        expected = (centred[r] - mu) / math.sqrt(var + 1e-8)
        assert adv[r, : LENGTHS[r]].tolist() == pytest.approx([expected] * LENGTHS[r], abs=1e-5)
        assert adv[r, LENGTHS[r] :].abs().sum().item() == 0.0
    # Token weighting matters: a long response shifts the batch mean toward its own value.
    per_sequence_mean = sum(centred) / len(centred)
    assert abs(mu - per_sequence_mean) > 1e-3


def test_dler_hand_computed_two_groups():
    # Group A: rewards 1, 0 (lengths 1, 3) -> centred +0.5, -0.5. Group B: 1, 1 -> 0, 0 (lengths 2, 2).
    # Token values: [0.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]: mean -0.125, unbiased var = 0.875/7 = 0.125.
    batch = make_batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], [1, 3, 2, 2])
    adv = dler_advantages(batch)
    scale = 1 / math.sqrt(0.125 + 1e-8)
    assert adv[0, 0].item() == pytest.approx(0.625 * scale, rel=1e-5)
    assert adv[1, 0].item() == pytest.approx(-0.375 * scale, rel=1e-5)
    assert adv[2, 0].item() == pytest.approx(0.125 * scale, rel=1e-5)


def ppo(logp, old, adv, **params):
    """ppo_clip_loss on tensors of any shape, every token a loss token."""
    ones = torch.ones_like(adv)
    return ppo_clip_loss(
        LossInputs(logp, old, adv, mask=ones, averaged_over=ones, den=LossDenominators.of(ones.reshape(1, -1), 1)),
        **params,
    )


def ppo_reference(logp, old, adv, eps_low, eps_high, c):
    ratio = math.exp(logp - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps_low), 1 + eps_high))
    if c is not None and adv < 0:
        loss = min(loss, -adv * c)
    return loss


@pytest.mark.parametrize("c", [None, 3.0])
def test_ppo_clip_loss_elementwise_reference(c):
    torch.manual_seed(0)
    logp = torch.randn(6, 5) * 0.8
    old = torch.randn(6, 5) * 0.8
    adv = torch.randn(6, 5)
    out = ppo(logp, old, adv, clip_low=0.2, clip_high=0.28, clip_ratio_c=c)
    for i in range(6):
        for j in range(5):
            expected = ppo_reference(logp[i, j].item(), old[i, j].item(), adv[i, j].item(), 0.2, 0.28, c)
            assert out.loss[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_clip_higher_asymmetry_and_gradients():
    # ratio 1.25 sits inside clip-higher (0.28) but outside symmetric clipping (0.2).
    old = torch.zeros(2)
    logp = torch.log(torch.tensor([1.25, 0.75])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    out = ppo(logp, old, adv, clip_low=0.2, clip_high=0.28, clip_ratio_c=None)
    out.loss.sum().backward()
    assert logp.grad[0].item() == pytest.approx(-1.25)  # positive advantage, ratio 1.25 < 1.28: live
    assert logp.grad[1].item() == 0.0  # negative advantage, ratio 0.75 < 0.8: clipped
    assert out.indicators["low"].tolist() == [False, True] and out.indicators["high"].tolist() == [False, False]
    symmetric = ppo(logp.detach(), old, adv, clip_low=0.2, clip_high=0.2, clip_ratio_c=None)
    assert symmetric.indicators["high"].tolist() == [True, False]
    assert symmetric.loss[0].item() == pytest.approx(-1.2)


def test_dual_clip_caps_negative_advantage_loss():
    out = ppo(
        torch.log(torch.tensor([20.0])),
        torch.zeros(1),
        torch.tensor([-2.0]),
        clip_low=0.2,
        clip_high=0.28,
        clip_ratio_c=10.0,
    )
    assert out.loss.item() == pytest.approx(20.0)  # min(-A * ratio = 40, -A * c = 20)
    assert out.indicators["dual"].item()


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_mse(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)


def test_loss_aggregations_loop_reference():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    den = LossDenominators.of(mask, norm_length=8)
    assert token_mean(loss, mask, den).item() == pytest.approx((1 + 2 + 3 + 4 + 0.5 + 0.5) / 6)
    assert seq_mean_token_mean(loss, mask, den).item() == pytest.approx((2.0 + 4.0 + 0.5) / 3)
    assert seq_mean_token_sum_norm(loss, mask, den).item() == pytest.approx((6 + 4 + 1) / (3 * 8))


def test_micro_batch_losses_sum_to_the_mini_batch_loss():
    torch.manual_seed(1)
    loss = torch.rand(6, 7)
    mask = (torch.rand(6, 7) > 0.3).float()
    mask[:, 0] = 1
    den = LossDenominators.of(mask, norm_length=7)
    for aggregate in (token_mean, seq_mean_token_mean, seq_mean_token_sum_norm):
        whole = aggregate(loss, mask, den)
        parts = aggregate(loss[:2], mask[:2], den) + aggregate(loss[2:], mask[2:], den)
        assert parts.item() == pytest.approx(whole.item())


def shaping(scores, lengths, truncated=None, cap=None, correct=None):
    """ShapingInputs for one group of rollouts (the DLER and DAPO shapers read no group)."""
    rows = len(scores)
    return ShapingInputs(
        scores=torch.tensor(scores, dtype=torch.float),
        lengths=torch.tensor(lengths),
        truncated=torch.tensor(truncated) if truncated is not None else torch.zeros(rows, dtype=torch.bool),
        length_cap=torch.tensor(cap) if cap is not None else torch.full((rows,), max(lengths)),
        correct=torch.tensor(correct if correct is not None else scores, dtype=torch.float),
        group_ids=torch.zeros(rows, dtype=torch.long),
    )


def test_truncation_penalty_paper_and_code_modes():
    inputs = shaping([1.0, 1.0, 1.0, 0.0], [10, 12, 12, 30], truncated=[False, True, False, True], cap=[12, 12, 11, 12])
    paper = truncation_penalty(inputs, mode="paper")
    assert paper.tolist() == [1.0, 0.0, 0.0, 0.0]  # row 2 is over its own (tighter) cap
    code = truncation_penalty(inputs, mode="code", not_stopped_coef=0.1)
    assert code.tolist() == pytest.approx([1.0, 0.1, 0.1, 0.0])  # row 2 did not stop within its cap
    # Through the registry, as the trainer calls it: the bound entry's parameters are passed.
    assert LENGTH_SHAPERS.get("truncation").bind()(inputs).tolist() == paper.tolist()
    assert LENGTH_SHAPERS.get("none").bind()(inputs).tolist() == [1.0, 1.0, 1.0, 0.0]


def test_overlong_shaping_piecewise():
    # L_max = 20, L_cache = 4: no penalty up to 16, linear to -1 at 20.
    shaped = overlong_shaping(shaping([1.0] * 5, [10, 16, 17, 18, 20], cap=[20] * 5), buffer=4, factor=1.0)
    assert shaped.tolist() == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.0])


def test_dynamic_sampling_keeps_groups_with_spread():
    values = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.7])
    groups = torch.tensor([1, 1, 2, 2, 3, 3, 4])
    assert groups_with_spread(values, groups).tolist() == [False, False, True, True, False, False, True]


def test_group_samplers_keep_rows_and_bound_the_rounds():
    """`all` keeps every row of one round; `dynamic` keeps the groups whose metric has spread
    (here accuracy, where scores alone would keep group 2 too) over up to max_rounds rounds."""
    batch = make_batch([0.0] * 6, [1, 1, 2, 2, 3, 3], [1] * 6)
    batch.scores = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.0, 1.0])
    batch.accuracy = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    everything = GROUP_SAMPLERS.get("all").bind()()
    assert everything.keep(batch).tolist() == [True] * 6 and everything.max_rounds == 1
    assert everything.metrics(1, batch, batch) == {}
    dynamic = GROUP_SAMPLERS.get("dynamic")
    sampler = dynamic.bind(dynamic.params(metric="accuracy", max_rounds=3))()
    assert sampler.keep(batch).tolist() == [False, False, False, False, True, True] and sampler.max_rounds == 3
    assert sampler.metrics(2, batch.select([4, 5]), batch) == {
        "dynamic_sampling/rounds": 2.0,
        "dynamic_sampling/kept_groups": 1.0,
        "dynamic_sampling/generated_groups": 3.0,
    }
    on_scores = dynamic.bind()()  # the defaults: the pre-penalty score, 4 rounds
    assert on_scores.keep(batch).tolist() == [False, False, True, True, True, True] and on_scores.max_rounds == 4


def test_truncated_importance_sampling_weights_each_token_by_the_capped_ratio():
    from conftest import RECIPES
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.learner.objective import objective_settings, policy_gradient_loss

    torch.manual_seed(2)
    batch = make_batch(REWARDS, GROUPS, LENGTHS)
    logprobs = -torch.rand(batch.response_mask.shape) * 3  # learner, one optimizer step: old = current
    batch.rollout_logprobs = logprobs + torch.randn(logprobs.shape)  # the engine's numerics differ
    batch.advantages = torch.randn(len(REWARDS), 1) * batch.response_mask
    den = LossDenominators.of(batch.response_mask, norm_length=8)
    plain_recipe = load_recipe(RECIPES / "grpo.yaml")
    corrected_recipe = load_recipe(RECIPES / "grpo.yaml", ["algorithm.rollout_correction={name: tis, cap: 2.0}"])
    plain, _ = policy_gradient_loss(logprobs, batch, objective_settings(validate(plain_recipe)), den)
    corrected, _ = policy_gradient_loss(logprobs, batch, objective_settings(validate(corrected_recipe)), den)
    # At ratio 1 PPO-clip's token loss is -A; TIS multiplies it by min(p_learner / p_engine, 2).
    total, tokens = 0.0, 0.0
    for row in range(len(REWARDS)):
        for t in range(LENGTHS[row]):
            weight = min(math.exp(float(logprobs[row, t] - batch.rollout_logprobs[row, t])), 2.0)
            total += -float(batch.advantages[row, t]) * weight
            tokens += 1
    assert corrected.item() == pytest.approx(total / tokens, rel=1e-5)
    assert plain.item() != pytest.approx(corrected.item())


def test_difficulty_aware_caps_from_hand_built_groups():
    """DA-DLER, paper setting: ratio >= 0.5 is easy (cap 2000), below is hard (cap 4000)."""
    correct = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float)
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3, 9, 9, 9, 9, 1, 1, 1, 1, 5, 5, 5, 5])
    caps = difficulty_caps(correct, groups, max_response_length=4000)  # the entry's defaults: the paper's
    # ratios: 0.5 (exactly the threshold: easy), 0.25, 1.0, 0.0, 0.75
    assert caps.tolist() == [2000] * 4 + [4000] * 4 + [2000] * 4 + [4000] * 4 + [2000] * 4
    three = difficulty_caps(
        correct, groups, max_response_length=300, min_correct=[0.0, 0.3, 0.8], truncation_lengths=[300, 200, 100]
    )
    assert three.tolist() == [200] * 4 + [300] * 4 + [100] * 4 + [300] * 4 + [200] * 4
    # Rows of a group need not be adjacent.
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(0))
    assert difficulty_caps(correct[order], groups[order], max_response_length=4000).tolist() == caps[order].tolist()


def test_difficulty_tier_metrics_by_hand():
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # ratios 1.0, 0.0, 0.5
    lengths = torch.tensor([10, 20, 30, 50, 40, 60])
    over = torch.tensor([False, True, False, False, True, True])
    metrics = tier_metrics(correct, groups, lengths, over, min_correct=[0.0, 0.5])
    assert metrics["difficulty/tier0/prompt_share"] == pytest.approx(1 / 3)
    assert metrics["difficulty/tier0/response_length"] == 40 and metrics["difficulty/tier0/accuracy"] == 0
    assert metrics["difficulty/tier1/response_length"] == 32.5 and metrics["difficulty/tier1/accuracy"] == 0.75
    assert metrics["difficulty/tier1/over_cap"] == 0.75 and metrics["difficulty/tier0/over_cap"] == 0
    empty = tier_metrics(correct, groups, lengths, over, min_correct=[0.0, 0.5, 0.9, 0.95])
    assert math.isnan(empty["difficulty/tier2/response_length"]) and empty["difficulty/tier2/prompt_share"] == 0


def test_difficulty_tiers_recipe_resolves_to_per_prompt_caps():
    from conftest import RECIPES
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import resolve_stages

    stages = resolve_stages(validate(load_recipe(RECIPES / "dler_difficulty_aware.yaml")))
    correct, groups = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    assert stages.length_caps(correct, groups).tolist() == [32, 32, 32, 32]  # ratios 1.0 and 0.5: easy
    assert stages.length_caps(torch.tensor([1.0, 0.0, 0.0, 0.0]), groups).tolist() == [32, 32, 48, 48]
    plain = resolve_stages(validate(load_recipe(RECIPES / "dler.yaml")))
    assert plain.length_caps(correct, groups).tolist() == [48] * 4


def test_difficulty_aware_caps_a_small_batch_by_hand():
    """Three tiers from a recipe, rows of a group interleaved; each cap worked out by hand, and the
    truncation penalty zeroes exactly the rollouts over their own prompt's cap."""
    from conftest import RECIPES
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import resolve_stages

    tiers = "{name: difficulty_aware, min_correct: [0.0, 0.5, 1.0], truncation_lengths: [30, 20, 10]}"
    stages = resolve_stages(
        validate(load_recipe(RECIPES / "dler_difficulty_aware.yaml", [f"algorithm.length_cap={tiers}"]))
    )
    groups = torch.tensor([4, 8, 6, 4, 8, 6])
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    # group 4: 1 of 2 right, ratio 0.5 -> tier 1 (20); group 8: 0 of 2 -> tier 0 (30); group 6: 2 of 2 -> tier 2 (10)
    caps = stages.length_caps(correct, groups)
    assert caps.tolist() == [20, 30, 10, 20, 30, 10]
    lengths = torch.tensor([20, 31, 11, 5, 30, 10])  # over their caps: rows 1 (31 > 30) and 2 (11 > 10)
    inputs = ShapingInputs(
        scores=correct,
        lengths=lengths,
        truncated=torch.zeros(6, dtype=torch.bool),
        length_cap=caps,
        correct=correct,
        group_ids=groups,
    )
    assert stages.shape_rewards(inputs).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    metrics = stages.length_metrics(correct, groups, lengths, inputs.over_cap())
    assert metrics["difficulty/tier2/prompt_share"] == pytest.approx(1 / 3)
    assert metrics["difficulty/tier2/over_cap"] == 0.5 and metrics["difficulty/tier0/response_length"] == 30.5
    assert LENGTH_CAPS.get("fixed").bind()(correct, groups, max_response_length=48).tolist() == [48] * 6
