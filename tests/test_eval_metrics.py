"""Trade-off metrics against brute force over all k-subsets and hand-made tables."""

import itertools
import math
import random
import statistics
from collections import Counter

import pytest

from efficient_rl.eval.frontier import (
    Point,
    distance_from_oracle,
    oracle_accuracy_at,
    oracle_frontier,
    oracle_length_at,
    pareto_frontier,
    token_complexities,
)
from efficient_rl.eval.metrics import Sample, bootstrap_interval, maj_at_k, pass_at_k, short_m_at_k, tradeoff_summary


def random_question(rng, n):
    """Answers from a small alphabet with ties likely; "a" is the right one; some give none."""
    samples = []
    for _ in range(n):
        answer = rng.choice(["a", "b", "c", None])
        samples.append(Sample(answer, answer == "a", rng.randint(5, 50)))
    return samples


def brute_pass(samples, k):
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s.correct for s in subset) for subset in subsets) / len(subsets)


def brute_maj(samples, k):
    total = 0.0
    subsets = list(itertools.combinations(samples, k))
    for subset in subsets:
        votes = Counter(s.answer for s in subset if s.answer is not None)
        if not votes:
            continue
        top = max(votes.values())
        winners = [answer for answer, count in votes.items() if count == top]
        total += sum(any(s.correct for s in subset if s.answer == w) for w in winners) / len(winners)
    return total / len(subsets)


@pytest.mark.parametrize("seed", range(30))
def test_pass_and_maj_at_k_equal_brute_force_over_all_subsets(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    samples = random_question(rng, n)
    for k in range(1, n + 1):
        assert pass_at_k(samples, k) == pytest.approx(brute_pass(samples, k))
        assert maj_at_k(samples, k) == pytest.approx(brute_maj(samples, k))


def test_maj_at_k_hand_values():
    a, b = Sample("a", True, 1), Sample("b", False, 1)
    assert maj_at_k([a, b], 2) == 0.5  # a tie: a fair coin
    assert maj_at_k([a, a, b], 3) == 1.0
    assert maj_at_k([a, b, b], 3) == 0.0
    assert maj_at_k([a, b, b], 1) == pytest.approx(1 / 3)
    assert maj_at_k([Sample(None, False, 1)] * 2, 2) == 0.0


def test_short_m_at_k_hand_values():
    # lengths 10 (right), 20 (wrong "b"), 30 (wrong "b"): short-1@2 takes the shorter of each pair.
    samples = [Sample("a", True, 10), Sample("b", False, 20), Sample("b", False, 30)]
    assert short_m_at_k(samples, m=1, k=2) == pytest.approx(2 / 3)  # pairs {0,1}, {0,2} right, {1,2} wrong
    assert short_m_at_k(samples, m=1, k=3) == 1.0
    assert short_m_at_k(samples, m=3, k=3) == 0.0  # b outvotes a
    assert short_m_at_k(samples, m=2, k=3) == 1.0  # a and b tie: the first to finish (a) wins
    rng = random.Random(1)
    many = random_question(rng, 14)
    exact = short_m_at_k(many, m=2, k=5)
    assert short_m_at_k(many, m=2, k=5, max_subsets=1000) == pytest.approx(exact, abs=0.05)  # the sampled path


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k([Sample("a", True, 1)], 2)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = random.Random(0)
    mean = statistics.fmean
    small = [float(rng.random() < 0.7) for _ in range(50)]
    large = [float(rng.random() < 0.7) for _ in range(2000)]
    low, high = bootstrap_interval(small, mean)
    assert low <= mean(small) <= high
    assert bootstrap_interval(small, mean) == (low, high)  # seeded
    low_large, high_large = bootstrap_interval(large, mean)
    assert high_large - low_large < (high - low) / 3


@pytest.mark.parametrize("seed", range(10))
def test_pareto_frontier_equals_brute_force_dominance(seed):
    rng = random.Random(seed)
    points = [Point(f"r{i}", rng.randint(1, 10), rng.randint(0, 5) / 5) for i in range(12)]

    def dominated(p):
        return any(
            q.mean_length <= p.mean_length
            and q.accuracy >= p.accuracy
            and (q.mean_length < p.mean_length or q.accuracy > p.accuracy)
            for q in points
        )

    expected = {(p.mean_length, p.accuracy) for p in points if not dominated(p)}
    assert {(p.mean_length, p.accuracy) for p in pareto_frontier(points)} == expected


def test_token_complexity_and_oracle_frontier_on_a_hand_made_table():
    run_a = {"q1": [(True, 10), (False, 3)], "q2": [(False, 40)], "q3": [(False, 9)]}
    run_b = {"q1": [(True, 5)], "q2": [(True, 20), (True, 25)], "q3": [(False, 2)]}
    complexity = token_complexities([run_a, run_b])
    assert complexity == {"q1": 5, "q2": 20, "q3": math.inf}
    frontier = oracle_frontier(complexity)
    assert frontier == [(0.0, 0.0), (5 / 3, 1 / 3), (25 / 3, 2 / 3)]
    # Brute force: the best accuracy within a mean-length budget over every set of solved questions.
    for budget in [0, 5 / 3, 3.0, 25 / 3, 12.0]:
        best = max(len(s) / 3 for r in range(3) for s in itertools.combinations([5, 20], r) if sum(s) / 3 <= budget)
        assert oracle_accuracy_at(frontier, budget) >= best - 1e-12
    assert oracle_length_at(frontier, 0.5) == pytest.approx(5 / 3 + (25 / 3 - 5 / 3) / 2)
    assert oracle_length_at(frontier, 0.9) == math.inf  # q3 was never solved
    # A run at 2/3 accuracy spending 15 tokens a question: 1.8x the oracle's length; at 15 tokens
    # the oracle already has every solvable question.
    distance = distance_from_oracle(Point("b", 15.0, 2 / 3), frontier)
    assert distance == {"accuracy_gap": pytest.approx(0.0), "length_ratio": pytest.approx(15 / (25 / 3))}


def test_tradeoff_summary_hand_computed():
    questions = [
        [Sample("a", True, 10), Sample("a", True, 30), Sample("b", False, 100, truncated=True)],
        [Sample("c", False, 40)],
    ]
    summary = tradeoff_summary(questions)
    assert summary["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["length/mean"] == 45 and summary["length/median"] == 35 and summary["length/max"] == 100
    assert summary["length/p90"] == 100
    assert summary["length_correct/mean"] == 20 and summary["length_incorrect/mean"] == 70
    assert summary["truncation_rate"] == 0.25
    assert summary["tokens_per_correct"] == 180 / 2
    assert summary["accuracy_per_1k_tokens"] == pytest.approx((1 / 3) / 0.045)
