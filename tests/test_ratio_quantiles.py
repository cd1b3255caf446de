"""The learner/engine importance ratio's quantiles, from binned counts that add up over
micro-batches and ranks (learner/objective.py), against torch.quantile of the same ratios."""

import math

import pytest
import torch

from efficient_rl.learner.objective import (
    RATIO_BIN_NATS,
    ObjectiveSettings,
    engine_ratio_statistics,
    ratio_quantiles,
)


@pytest.mark.parametrize("spread", [0.002, 0.05, 0.3])
def test_quantiles_from_bins_summed_over_parts_match_the_ratios(spread):
    generator = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(4000, generator=generator, dtype=torch.float64) * spread
    tokens = (torch.rand(4000, generator=generator) < 0.8).double()
    settings = ObjectiveSettings()
    sums: dict[str, float] = {}
    for part in range(4):  # micro-batches (or ranks): their counts add up
        rows = slice(part * 1000, (part + 1) * 1000)
        for name, value in engine_ratio_statistics(log_ratio[rows], tokens[rows], settings).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    found = ratio_quantiles({name: value / tokens.sum().item() for name, value in sums.items()})
    kept = log_ratio[tokens > 0]
    for name, level in {"rollout/ratio_p1": 0.01, "rollout/ratio_p50": 0.5, "rollout/ratio_p99": 0.99}.items():
        expected = min(max(float(torch.quantile(kept, level)), -0.5), 0.5)  # past the bins: their edge
        assert math.log(found[name]) == pytest.approx(expected, abs=RATIO_BIN_NATS), name
    outside = float(((kept.exp() < 0.8) | (kept.exp() > 1.2)).double().mean())
    assert found["rollout/ratio_outside_clip"] == pytest.approx(outside)
    assert not any(name.startswith("rollout/ratio_bin/") for name in found)


def test_ratios_beyond_the_binned_range_report_its_edge():
    log_ratio = torch.tensor([-3.0, -2.0, 2.0, 3.0, 0.0] * 20, dtype=torch.float64)
    sums = engine_ratio_statistics(log_ratio, torch.ones(100, dtype=torch.float64), ObjectiveSettings())
    found = ratio_quantiles({name: float(value) / 100 for name, value in sums.items()})
    assert found["rollout/ratio_p1"] == pytest.approx(math.exp(-0.5))
    assert found["rollout/ratio_p99"] == pytest.approx(math.exp(0.5))
    assert found["rollout/ratio_outside_clip"] == pytest.approx(0.8)


def test_non_finite_log_ratios_are_left_out_of_the_bins():
    log_ratio = torch.tensor([0.0, float("nan"), float("inf"), 0.1], dtype=torch.float64)
    sums = engine_ratio_statistics(log_ratio, torch.ones(4, dtype=torch.float64), ObjectiveSettings())
    assert sum(float(value) for name, value in sums.items() if name.startswith("rollout/ratio_bin/")) == 2
