"""Token and sample selection against brute-force references: plain-Python sorting, explicit
per-row loops, every subset via itertools.combinations, exact sampling probabilities."""

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from efficient_rl.algos.token_selection import (
    SAMPLE_SELECTORS,
    TOKEN_SELECTORS,
    TokenStats,
    d3s_sample_mask,
    d3s_schedule,
    floor_counts,
    max_variance_subset,
    quadrant_shares,
    select_d3s_tokens,
)

PAD_VALUE = 1e3  # padding carries huge statistics, so selecting it would show
VOCAB = 50
LENGTHS = [5, 0, 9, 1, 7, 3]  # an empty row and a one-token row included


def make_stats(lengths, seed=0, width=None):
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths) + 1
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])

    def token_field(scale):
        values = torch.rand(len(lengths), width, generator=generator) * scale
        return torch.where(mask > 0, values, PAD_VALUE)

    per_rollout = torch.randn(len(lengths), generator=generator)
    return TokenStats(
        mask=mask,
        advantages=torch.where(mask > 0, per_rollout[:, None], PAD_VALUE),
        statistics={
            "entropy": token_field(math.log(VOCAB)),
            "reverse_kl": token_field(3.0),
            "forward_kl": token_field(3.0),
            "jsd": token_field(math.log(2)),
        },
        vocab_size=VOCAB,
    )


STATISTICS = ("entropy", "reverse_kl", "forward_kl", "jsd")


def with_fields(stats, **changes):
    """A copy of `stats` with fields or statistics (by name; None drops one) replaced."""
    fields = dict(stats.__dict__)
    statistics = dict(fields.pop("statistics"))
    for name in STATISTICS:
        if name in changes:
            statistics[name] = changes.pop(name)
    fields.update(changes)
    return TokenStats(**fields, statistics={name: value for name, value in statistics.items() if value is not None})


def stat(stats, name):
    return stats.statistics[name]


def valid_positions(stats):
    return [(i, t) for i, row in enumerate(stats.mask.tolist()) for t, m in enumerate(row) if m > 0]


def selected(mask):
    return {(i, t) for i, row in enumerate(mask.tolist()) for t, keep in enumerate(row) if keep}


def exact_floor(fraction, count):
    return math.floor(Fraction(str(fraction)) * count)


def py_quantile(values, q):
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (pos - low) * (ordered[high] - ordered[low])


def py_min_max(table):
    low, high = min(table.values()), max(table.values())
    return {key: (value - low) / (high - low) if high > low else 0.0 for key, value in table.items()}


def run(name, stats, seed=None, **params):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return TOKEN_SELECTORS.get(name)(stats, generator=generator, **params)


SELECTOR_PARAMS = {
    "all": {},
    "high_entropy": {},
    "d3s_tokens": {},
    "tip_soft_or": {},
    "tip_q3": {},
    "entropy_sampling": {"gamma": 1.0},
    "random": {},
}


def test_registry_holds_every_selector():
    assert TOKEN_SELECTORS.names() == sorted(SELECTOR_PARAMS)


@pytest.mark.parametrize("name", sorted(SELECTOR_PARAMS))
def test_every_selector_keeps_a_subset_of_valid_tokens(name):
    for seed in range(3):
        stats = make_stats(LENGTHS, seed)
        keep = run(name, stats, seed=seed, **SELECTOR_PARAMS[name])
        assert keep.dtype == torch.bool and keep.shape == stats.mask.shape
        assert selected(keep) <= set(valid_positions(stats))
        empty = with_fields(stats, mask=torch.zeros_like(stats.mask))
        assert not run(name, empty, seed=seed, **SELECTOR_PARAMS[name]).any()


def test_all_is_the_mask():
    stats = make_stats(LENGTHS)
    assert selected(run("all", stats)) == set(valid_positions(stats))


def test_missing_statistics_are_named():
    stats = TokenStats(mask=torch.ones(2, 3))
    for name in ("high_entropy", "d3s_tokens", "tip_soft_or", "tip_q3", "entropy_sampling"):
        with pytest.raises(ValueError, match="needs the (token statistic|advantages|vocabulary size)"):
            run(name, stats, **SELECTOR_PARAMS[name])
    no_vocab = with_fields(make_stats(LENGTHS), vocab_size=None)
    with pytest.raises(ValueError, match="vocab_size"):
        run("tip_soft_or", no_vocab)
    with pytest.raises(ValueError, match="jsd"):
        run("entropy_sampling", with_fields(make_stats(LENGTHS), jsd=None), gamma=0.5)


def test_floor_counts_reads_decimal_fractions_exactly():
    counts = torch.tensor([100, 10, 7, 0, 3])
    for fraction in (0.29, 0.3, 0.57, 0.5, 1.0, 0.0):
        expected = [exact_floor(fraction, n) for n in counts.tolist()]
        assert floor_counts(fraction, counts).tolist() == expected


# --- high_entropy (docs/algorithms.md#high-entropy-forking-tokens) ------------------------------


def reference_high_entropy(stats, top_fraction):
    positions = valid_positions(stats)
    entropy = stat(stats, "entropy").tolist()
    threshold = py_quantile([entropy[i][t] for i, t in positions], 1 - top_fraction)
    return {(i, t) for i, t in positions if entropy[i][t] >= threshold}


@pytest.mark.parametrize("top_fraction", [0.2, 0.5, 0.05, 1.0])
def test_high_entropy_matches_reference(top_fraction):
    for seed in range(4):
        stats = make_stats(LENGTHS, seed)
        keep = run("high_entropy", stats, top_fraction=top_fraction)
        assert selected(keep) == reference_high_entropy(stats, top_fraction)


def test_high_entropy_edge_cases():
    stats = make_stats(LENGTHS)
    equal = with_fields(stats, entropy=torch.where(stats.mask > 0, 0.7, PAD_VALUE))
    assert selected(run("high_entropy", equal)) == set(valid_positions(stats))  # every tie kept
    one = make_stats([0, 1, 0], seed=1)
    assert selected(run("high_entropy", one)) == {(1, 0)}
    # 10 distinct values: the 0.8 quantile interpolates between the 8th and 9th smallest, so 2 pass.
    ten = with_fields(make_stats([10]), entropy=torch.tensor([[float(v) for v in range(10)] + [PAD_VALUE]]))
    assert selected(run("high_entropy", ten)) == {(0, 8), (0, 9)}
    with pytest.raises(ValueError):
        run("high_entropy", stats, top_fraction=0.0)


# --- d3s_tokens (docs/algorithms.md#d3s-token-level) --------------------------------------------


def reference_d3s_tokens(stats, keep_fraction):
    positions = valid_positions(stats)
    advantages, entropy = stats.advantages.tolist(), stat(stats, "entropy").tolist()
    width = stats.mask.shape[1]
    ranked = sorted(positions, key=lambda p: (-abs(advantages[p[0]][p[1]]) * entropy[p[0]][p[1]], p[0] * width + p[1]))
    count = max(exact_floor(keep_fraction, len(positions)), 1) if positions else 0
    return set(ranked[:count])


@pytest.mark.parametrize("keep_fraction", [0.3, 0.5, 0.01, 1.0, 0.29])
def test_d3s_tokens_matches_reference(keep_fraction):
    for seed in range(4):
        stats = make_stats(LENGTHS, seed)
        expected = reference_d3s_tokens(stats, keep_fraction)
        assert selected(select_d3s_tokens(stats, keep_fraction=keep_fraction)) == expected


def test_registered_d3s_tokens_follows_its_schedule():
    """The entry reads K off its token_fraction endpoints at the run's progress (docs/algorithms.md#d3s-schedule)."""
    for progress, fraction in ((0.0, 0.2), (0.5, 0.35), (1.0, 0.5), (1.7, 0.5)):
        stats = with_fields(make_stats(LENGTHS, seed=3), progress=progress)
        keep = run("d3s_tokens", stats, token_fraction=[0.2, 0.5])
        assert selected(keep) == reference_d3s_tokens(stats, fraction)
        entry = TOKEN_SELECTORS.get("d3s_tokens")
        assert entry.metrics(stats, token_fraction=[0.2, 0.5]) == {"d3s/token_fraction": pytest.approx(fraction)}


def test_d3s_tokens_ties_go_to_the_earlier_flat_position():
    stats = make_stats(LENGTHS, seed=5)
    rng = random.Random(5)
    # Keys drawn from a few exact values: many ties across rows and positions.
    per_rollout = torch.tensor([rng.choice([-1.0, 0.0, 1.0, 2.0]) for _ in LENGTHS])
    entropy = torch.tensor([[rng.choice([0.5, 1.0, 2.0]) for _ in range(stats.mask.shape[1])] for _ in LENGTHS])
    stats = with_fields(
        stats,
        advantages=torch.where(stats.mask > 0, per_rollout[:, None], PAD_VALUE),
        entropy=torch.where(stats.mask > 0, entropy, PAD_VALUE),
    )
    for keep_fraction in (0.1, 0.25, 0.5, 0.8):
        keep = select_d3s_tokens(stats, keep_fraction=keep_fraction)
        assert selected(keep) == reference_d3s_tokens(stats, keep_fraction)
    # All keys 0 (zero advantages): at least one token, the first valid one.
    zero = with_fields(stats, advantages=torch.zeros_like(stats.mask))
    assert selected(select_d3s_tokens(zero, keep_fraction=0.01)) == {(0, 0)}


# --- TIP Soft-OR and Q3 (docs/algorithms.md#tip-selection-rules) --------------------------------


def reference_tip(stats, rule, rho, clip_quantile=0.98):
    positions = valid_positions(stats)
    entropy, reverse, forward = (
        stat(stats, "entropy").tolist(),
        stat(stats, "reverse_kl").tolist(),
        stat(stats, "forward_kl").tolist(),
    )
    h = {p: entropy[p[0]][p[1]] / math.log(stats.vocab_size) for p in positions}
    ceiling = py_quantile(list(h.values()), clip_quantile)
    h = py_min_max({p: min(v, ceiling) for p, v in h.items()})
    if rule == "soft_or":
        d = py_min_max({p: reverse[p[0]][p[1]] for p in positions})
        score = {p: h[p] + d[p] - h[p] * d[p] for p in positions}
    else:
        score = {p: forward[p[0]][p[1]] * (1.0 - h[p]) for p in positions}
    kept = set()
    for row in range(len(stats.mask)):
        row_positions = [p for p in positions if p[0] == row]
        ranked = sorted(row_positions, key=lambda p: (-score[p], p[1]))
        kept |= set(ranked[: exact_floor(rho, len(row_positions))])
    return kept


@pytest.mark.parametrize("rule,name", [("soft_or", "tip_soft_or"), ("q3", "tip_q3")])
@pytest.mark.parametrize("rho", [0.5, 0.2, 0.7, 1.0])
def test_tip_rules_match_reference(rule, name, rho):
    for seed in range(4):
        stats = make_stats(LENGTHS + [40, 23], seed)  # long rows: the 98th-percentile clip bites
        assert selected(run(name, stats, rho=rho)) == reference_tip(stats, rule, rho)


def test_tip_clip_quantile_parameter():
    stats = make_stats(LENGTHS + [40], seed=9)
    for clip in (0.5, 1.0):
        keep = run("tip_soft_or", stats, rho=0.5, entropy_clip_quantile=clip)
        assert selected(keep) == reference_tip(stats, "soft_or", 0.5, clip)


def test_tip_ties_and_constant_axes():
    stats = make_stats(LENGTHS, seed=3)
    width = stats.mask.shape[1]
    # Constant entropy normalises to 0, so Soft-OR ranks by reverse KL alone; reverse KL with ties.
    rng = random.Random(3)
    reverse = torch.tensor([[rng.choice([0.0, 1.0, 2.0]) for _ in range(width)] for _ in LENGTHS])
    tied = with_fields(
        stats,
        entropy=torch.where(stats.mask > 0, 1.3, PAD_VALUE),
        reverse_kl=torch.where(stats.mask > 0, reverse, PAD_VALUE),
    )
    assert selected(run("tip_soft_or", tied, rho=0.5)) == reference_tip(tied, "soft_or", 0.5)
    # Both axes constant: every score is 0 and each row keeps its first floor(rho * length) tokens.
    flat = with_fields(tied, reverse_kl=torch.where(stats.mask > 0, 0.4, PAD_VALUE))
    expected = {(i, t) for i, n in enumerate(LENGTHS) for t in range(exact_floor(0.5, n))}
    assert selected(run("tip_soft_or", flat, rho=0.5)) == expected
    # Q3 with constant entropy: ĥ = 0, confidence 1, rank by forward KL.
    assert selected(run("tip_q3", tied, rho=0.4)) == reference_tip(tied, "q3", 0.4)


def test_tip_keeps_floor_rho_length_per_row():
    stats = make_stats(LENGTHS, seed=2)
    keep = run("tip_soft_or", stats, rho=0.5)
    assert keep.sum(1).tolist() == [exact_floor(0.5, n) for n in LENGTHS]  # the 1-token row keeps 0


# --- entropy_sampling and random (docs/algorithms.md#tip-selection-rules) -----------------------


def exact_inclusion(weights, count):
    """P(token j is drawn) for `count` successive draws without replacement, each ∝ weight, by
    summing the probability of every ordered sequence of draws."""
    inclusion = [0.0] * len(weights)
    for sequence in itertools.permutations(range(len(weights)), count):
        probability, remaining = 1.0, sum(weights)
        for j in sequence:
            probability *= weights[j] / remaining
            remaining -= weights[j]
        for j in sequence:
            inclusion[j] += probability
    return inclusion


@pytest.mark.parametrize(
    "name,params",
    [
        ("entropy_sampling", {}),
        ("entropy_sampling", {"gamma": 1.0, "alpha": 2.0}),
        ("random", {}),
        ("random", {"ratio": 0.29}),
    ],
)
def test_sampling_count_subset_and_reproducibility(name, params):
    stats = make_stats(LENGTHS, seed=4)
    total = len(valid_positions(stats))
    first = run(name, stats, seed=11, **params)
    assert int(first.sum()) == exact_floor(params.get("ratio", 0.5), total)
    assert selected(first) <= set(valid_positions(stats))
    assert torch.equal(first, run(name, stats, seed=11, **params))
    assert not torch.equal(first, run(name, stats, seed=12, **params))


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_entropy_sampling_inclusion_probabilities_match_exact(gamma):
    # One rollout of 5 valid tokens (and padding); ratio 0.4 draws 2 of them.
    entropy = torch.tensor([[0.2, 1.0, 2.5, 0.6, 3.0, PAD_VALUE]])
    jsd = torch.tensor([[0.5, 0.1, 0.3, 0.6, 0.2, PAD_VALUE]])
    stats = TokenStats(
        mask=torch.tensor([[1.0] * 5 + [0.0]]), statistics={"entropy": entropy, "jsd": jsd}, vocab_size=VOCAB
    )
    weights = [e * (j if gamma else 1.0) for e, j in zip(entropy[0, :5].tolist(), jsd[0, :5].tolist())]
    expected = exact_inclusion(weights, 2)
    generator = torch.Generator().manual_seed(0)
    trials = 3000
    counts = torch.zeros(6)
    for _ in range(trials):
        keep = TOKEN_SELECTORS.get("entropy_sampling")(stats, generator=generator, ratio=0.4, gamma=gamma)
        assert int(keep.sum()) == 2
        counts += keep[0].float()
    frequency = (counts / trials).tolist()
    assert frequency[5] == 0.0
    assert frequency[:5] == pytest.approx(expected, abs=0.03)
    if gamma == 0:  # higher entropy, drawn more often
        order = sorted(range(5), key=lambda j: weights[j])
        assert [frequency[j] for j in order] == sorted(frequency[:5])


def test_entropy_sampling_zero_weights_only_fill_the_count():
    stats = make_stats([6, 4], seed=6)
    zero_entropy = {(0, 1), (0, 4), (1, 0), (1, 3)}  # 4 of the 10 valid tokens have weight 0
    # Tiny positive weights: a zero weight must lose to any positive one, whatever the scale.
    entropy = stat(stats, "entropy") * 1e-6
    for i, t in zero_entropy:
        entropy[i, t] = 0.0
    stats = with_fields(stats, entropy=entropy)
    positive = set(valid_positions(stats)) - zero_entropy
    for seed in range(20):
        few = selected(run("entropy_sampling", stats, seed=seed, ratio=0.5))  # 5 <= 6 positive tokens
        assert len(few) == 5 and few <= positive
        many = selected(run("entropy_sampling", stats, seed=seed, ratio=0.8))  # 8 > 6 positive tokens
        assert len(many) == 8 and positive <= many
    fillers = [
        frozenset(selected(run("entropy_sampling", stats, seed=seed, ratio=0.8)) - positive) for seed in range(40)
    ]
    assert len(set(fillers)) > 1  # the zero-weight fill is random, not always the same tokens
    # alpha = 0: 0^0 = 1, every token weighs the same.
    for seed in range(5):
        assert len(selected(run("entropy_sampling", stats, seed=seed, ratio=0.8, alpha=0.0)) & zero_entropy) >= 2


def test_random_is_uniform():
    stats = make_stats([4, 4], seed=7)
    generator = torch.Generator().manual_seed(1)
    trials, counts = 2000, torch.zeros(2, 5)
    for _ in range(trials):
        counts += TOKEN_SELECTORS.get("random")(stats, generator=generator, ratio=0.25).float()
    frequency = counts / trials
    assert frequency[:, 4].sum() == 0
    assert frequency[:, :4].flatten().tolist() == pytest.approx([2 / 8] * 8, abs=0.035)


# --- D³S sample level and schedule (docs/algorithms.md#d3s-sample-level, #d3s-schedule) ---------


def population_variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def best_variance(values, size):
    subsets = itertools.combinations(range(len(values)), size)
    return max(population_variance([values[j] for j in subset]) for subset in subsets)


def random_values(rng, count, kind):
    if kind == "binary":
        return [float(rng.random() < 0.5) for _ in range(count)]
    if kind == "ties":
        return [float(rng.choice([-1, 0, 0, 2])) for _ in range(count)]
    return [rng.gauss(0.0, 1.0) for _ in range(count)]


@pytest.mark.parametrize("kind", ["normal", "binary", "ties"])
def test_max_variance_subset_against_all_subsets(kind):
    rng = random.Random(kind)
    for _ in range(40):
        tensor = torch.tensor(random_values(rng, rng.randint(1, 8), kind))
        values = tensor.tolist()
        for size in range(len(values) + 1):
            chosen = max_variance_subset(tensor, size)
            assert chosen.dtype == torch.long
            indices = chosen.tolist()
            assert indices == sorted(set(indices)) and len(indices) == size
            assert all(0 <= j < len(values) for j in indices)
            assert torch.equal(chosen, max_variance_subset(tensor, size))  # deterministic
            if size:
                achieved = population_variance([values[j] for j in indices])
                assert achieved == pytest.approx(best_variance(values, size), abs=1e-9)


def test_max_variance_subset_tie_breaking_and_errors():
    # Binary advantages, size 3: one 1 and two 0s or two 1s and one 0 tie; the fewest top values
    # win, the 0s are the earliest ones and the 1 the latest.
    assert max_variance_subset(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]), 3).tolist() == [1, 3, 4]
    assert max_variance_subset(torch.zeros(4), 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        max_variance_subset(torch.zeros(3), 4)


def grpo_like_advantages(rng, group_sizes):
    advantages, group_ids = [], []
    for gid, size in enumerate(group_sizes):
        rewards = random_values(rng, size, rng.choice(["binary", "normal"]))
        mean = sum(rewards) / size
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (size - 1)) if size > 1 else 0.0
        advantages += [(r - mean) / (std + 1e-6) for r in rewards]
        group_ids += [10 * gid + 3] * size  # non-contiguous ids
    return advantages, group_ids


def test_d3s_sample_mask_group_scope_against_brute_force():
    rng = random.Random(1)
    for _ in range(25):
        group_sizes = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
        advantages, group_ids = grpo_like_advantages(rng, group_sizes)
        keep_per_group = rng.randint(0, 4)
        tensor = torch.tensor(advantages)
        values = tensor.tolist()
        keep = d3s_sample_mask(tensor, torch.tensor(group_ids), keep_per_group, scope="group").tolist()
        for gid in set(group_ids):
            rows = [j for j, g in enumerate(group_ids) if g == gid]
            kept = [values[j] for j in rows if keep[j]]
            assert len(kept) == min(keep_per_group, len(rows))
            if kept:
                assert population_variance(kept) == pytest.approx(
                    best_variance([values[j] for j in rows], len(kept)), abs=1e-9
                )


def test_d3s_sample_mask_batch_scope_against_brute_force():
    rng = random.Random(2)
    for _ in range(25):
        group_sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        advantages, group_ids = grpo_like_advantages(rng, group_sizes)
        keep_per_group = rng.randint(1, 3)
        tensor = torch.tensor(advantages)
        values = tensor.tolist()
        keep = d3s_sample_mask(tensor, torch.tensor(group_ids), keep_per_group, scope="batch").tolist()
        size = min(keep_per_group * len(group_sizes), len(values))
        kept = [v for v, k in zip(values, keep) if k]
        assert len(kept) == size
        assert population_variance(kept) == pytest.approx(best_variance(values, size), abs=1e-9)


def test_d3s_batch_scope_drops_zero_advantage_groups_and_keeps_values():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep = d3s_sample_mask(advantages, group_ids, 2, scope="batch")
    assert keep.tolist() == [True] * 4 + [False] * 4
    group_keep = d3s_sample_mask(advantages, group_ids, 2, scope="group")
    assert group_keep.tolist() == [False, True, True, False, True, True, False, False]
    assert advantages.tolist() == [1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]  # not re-normalised
    with pytest.raises(ValueError):
        d3s_sample_mask(advantages, group_ids, 2, scope="global")


def test_registered_d3s_sample_selector_follows_its_schedule():
    """N rollouts per prompt move from rollouts[0] to rollouts[1] with the progress, halves up."""
    advantages = torch.randn(24, generator=torch.Generator().manual_seed(4))
    group_ids = torch.arange(24) // 8
    entry = SAMPLE_SELECTORS.get("d3s")
    for progress, per_group in ((0.0, 2), (0.5, 5), (1.0, 8)):  # 2 -> 8: 5 at the midpoint
        for scope in ("group", "batch"):
            keep = entry(advantages, group_ids, progress=progress, scope=scope, rollouts=[2, 8])
            assert keep.tolist() == d3s_sample_mask(advantages, group_ids, per_group, scope).tolist()
    assert SAMPLE_SELECTORS.get("none")(advantages, group_ids, progress=0.3).all()


def test_d3s_schedule_endpoints_midpoint_and_clamp():
    assert d3s_schedule(0.0, 4, 7, 0.1, 0.3) == (4, 0.1)
    assert d3s_schedule(1.0, 4, 7, 0.1, 0.3) == (7, 0.3)
    rollouts, keep_fraction = d3s_schedule(0.5, 4, 7, 0.1, 0.3)
    assert rollouts == 6 and keep_fraction == pytest.approx(0.2)  # 5.5 rounds half up
    assert d3s_schedule(0.25, 8, 4, 0.2, 0.6)[0] == 7
    assert d3s_schedule(-0.5, 4, 7, 0.1, 0.3) == (4, 0.1)
    assert d3s_schedule(3.0, 4, 7, 0.1, 0.3) == (7, 0.3)


def test_d3s_schedule_rounds_exact_halves_up_despite_float_error():
    assert d3s_schedule(5 / 6, 10, 1, 0.2, 1.0)[0] == 3  # 2.5 exactly; 2.4999999999999996 in floats
    # Against exact rational arithmetic, at every progress value the trainer passes:
    # (step - 1) / (steps - 1), as a float.
    for steps in range(2, 31):
        for step in range(1, steps + 1):
            exact_progress = Fraction(step - 1, steps - 1)
            for n_init, n_final in ((10, 1), (1, 10), (4, 8), (8, 2), (3, 16)):
                exact = (1 - exact_progress) * n_init + exact_progress * n_final
                expected = math.floor(exact + Fraction(1, 2))
                got = d3s_schedule((step - 1) / (steps - 1), n_init, n_final, 0.2, 0.5)[0]
                assert got == expected, (steps, step, n_init, n_final, float(exact))


# --- TIP quadrant shares (docs/algorithms.md#tip-quadrants) -------------------------------------


def test_quadrant_shares_by_hand():
    # Valid tokens: h = 0.1 0.9 0.5 | 0.7 0.3 (median 0.5), d = 0.2 0.8 0.9 | 0.1 0.6 (median 0.6).
    # High h: 0.9 0.5 0.7; high d: 0.8 0.9 0.6. Q1: two tokens, Q2 (0.7/0.1), Q3 (0.3/0.6), Q4 (0.1/0.2).
    h = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.7, 0.3, 9.0, 9.0]])
    d = torch.tensor([[0.2, 0.8, 0.9, 9.0], [0.1, 0.6, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    shares = quadrant_shares(h, d, mask)
    assert shares == pytest.approx({"tip/q1_share": 0.4, "tip/q2_share": 0.2, "tip/q3_share": 0.2, "tip/q4_share": 0.2})
    # An even count: the median is the mean of the two middle values (0.5 and 0.7 -> 0.6).
    even = quadrant_shares(torch.tensor([[0.1, 0.5, 0.7, 0.9]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]]), torch.ones(1, 4))
    assert even == pytest.approx({"tip/q1_share": 0.0, "tip/q2_share": 0.5, "tip/q3_share": 0.5, "tip/q4_share": 0.0})
    assert set(quadrant_shares(h, d, torch.zeros_like(mask)).values()) == {0.0}
