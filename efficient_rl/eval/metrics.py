"""Per-question sampling metrics: unbiased pass@k, maj@k, short-m@k, and bootstrap intervals.

A question's n samples are given as (answer, correct, length) triples: the extracted answer
(None when there is none), whether the verifier accepted it, and the response length in tokens.
Every @k metric is the expectation over all k-subsets of the n samples, so n > k samples give
an unbiased, lower-variance estimate of drawing k.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable

from efficient_rl.data.answers import extract_answer


@dataclass(frozen=True)
class Sample:
    answer: Hashable | None  # the extracted answer (None: no answer)
    correct: bool
    length: int  # response tokens
    truncated: bool = False  # stopped by the length cap in force


def pass_at_k(samples: list[Sample], k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that a random k-subset holds a correct sample
    (Chen et al. 2021)."""
    n, c = len(samples), sum(s.correct for s in samples)
    check_k(n, k)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def maj_at_k(samples: list[Sample], k: int) -> float:
    """Expected accuracy of a plurality vote over a random k-subset. Samples without an answer do
    not vote; a tie between t answers gives 1/t credit when the correct one is among them (a fair
    coin); a subset with no votes is wrong. Exact, by counting subsets per vote profile."""
    n = len(samples)
    check_k(n, k)
    votes = Counter(s.answer for s in samples if s.answer is not None)
    correct_answers = {s.answer for s in samples if s.correct and s.answer is not None}
    abstain = n - sum(votes.values())
    expected = 0.0
    for answer in correct_answers:
        others = [count for other, count in votes.items() if other != answer]
        for x in range(1, min(votes[answer], k) + 1):  # the correct answer gets x votes
            # ways[(items, ties)]: choices from the other answers (all below x, or tied at x) and
            # the abstainers, by items drawn and number of answers tied with the correct one.
            ways = {(0, 0): 1}
            for count in others + [None]:
                grown = {}
                for (items, ties), w in ways.items():
                    for t in range(0, min(k - x - items, abstain if count is None else min(count, x)) + 1):
                        tied = count is not None and t == x
                        key = (items + t, ties + tied)
                        grown[key] = grown.get(key, 0) + w * math.comb(abstain if count is None else count, t)
                ways = grown
            expected += sum(
                w / (ties + 1) * math.comb(votes[answer], x) for (items, ties), w in ways.items() if items == k - x
            )
    return expected / math.comb(n, k)


def short_m_at_k(samples: list[Sample], m: int, k: int, max_subsets: int = 20_000, seed: int = 0) -> float:
    """short-m@k ("Don't Overthink It", Hassid et al. 2025): draw k samples, keep the m that
    finish first (shortest; ties by position), vote among them; a tie goes to the answer of the
    shortest tied sample. Exact over all k-subsets up to `max_subsets`, else a seeded estimate."""
    n = len(samples)
    check_k(n, k)
    if not 1 <= m <= k:
        raise ValueError(f"short-m@k: expected 1 <= m <= k, got m={m}, k={k}")
    order = sorted(range(n), key=lambda i: (samples[i].length, i))  # finishing order
    rank = {index: position for position, index in enumerate(order)}
    if math.comb(n, k) <= max_subsets:
        subsets = itertools.combinations(range(n), k)
        count = math.comb(n, k)
    else:
        rng = random.Random(seed)
        subsets = (rng.sample(range(n), k) for _ in range(max_subsets))
        count = max_subsets
    return sum(short_vote_correct(samples, sorted(subset, key=rank.get)[:m]) for subset in subsets) / count


def short_vote_correct(samples: list[Sample], first: list[int]) -> bool:
    """Vote among `first` (in finishing order); ties go to the earliest finisher's answer."""
    votes = Counter(samples[i].answer for i in first if samples[i].answer is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(samples[i] for i in first if samples[i].answer is not None and votes[samples[i].answer] == top)
    return winner.correct


def length_summary(lengths: list[int], prefix: str) -> dict[str, float]:
    if not lengths:
        return {f"{prefix}/{name}": math.nan for name in ("mean", "median", "p90", "max")}
    ordered = sorted(lengths)
    return {
        f"{prefix}/mean": sum(ordered) / len(ordered),
        f"{prefix}/median": (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2,
        f"{prefix}/p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
        f"{prefix}/max": float(ordered[-1]),
    }


def tradeoff_summary(questions: list[list[Sample]]) -> dict[str, float]:
    """pass@1 (averaged over each question's samples), lengths of all / correct / incorrect
    responses, truncation rate, tokens per correct answer and accuracy per 1k tokens."""
    flat = [s for samples in questions for s in samples]
    accuracy = sum(sum(s.correct for s in samples) / len(samples) for samples in questions) / len(questions)
    correct = sum(s.correct for s in flat)
    mean_length = sum(s.length for s in flat) / len(flat)
    return {
        "pass@1": accuracy,
        **length_summary([s.length for s in flat], "length"),
        **length_summary([s.length for s in flat if s.correct], "length_correct"),
        **length_summary([s.length for s in flat if not s.correct], "length_incorrect"),
        "truncation_rate": sum(s.truncated for s in flat) / len(flat),
        "tokens_per_correct": sum(s.length for s in flat) / correct if correct else math.inf,
        "accuracy_per_1k_tokens": accuracy / (mean_length / 1000) if mean_length else math.nan,
    }


def check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"@k metrics need 1 <= k <= n samples per question, got k={k}, n={n}")


def bootstrap_interval(
    values: list, statistic: Callable[[list], float], resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap over `values` (one per question): the central `level` interval."""
    rng = random.Random(seed)
    estimates = sorted(statistic([values[rng.randrange(len(values))] for _ in values]) for _ in range(resamples))
    tail = (1 - level) / 2
    return estimates[int(tail * (resamples - 1))], estimates[int(round((1 - tail) * (resamples - 1)))]


def sample_of(completion: str, correct: bool, length: int, truncated: bool) -> Sample:
    """A scored response; its vote for maj@k / short-m@k is its last \\boxed{} answer."""
    return Sample(extract_answer(completion, fallback_last_number=False), bool(correct), int(length), bool(truncated))


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    return sorted({1, n} | {2**i for i in range(1, n.bit_length()) if 2**i <= n})


def evaluation_metrics(questions: list[list[Sample]]) -> dict[str, float]:
    """Every metric of an evaluation, under the names both `efficient-rl eval` and the held-out
    evaluation during training use: the trade-off summary, a 95% bootstrap interval for pass@1,
    and pass@k, maj@k, short-1@k and short-3@k (the paper's two settings) for k = 1, 2, 4 ... n."""
    n = len(questions[0])
    per_question_accuracy = [sum(s.correct for s in q) / n for q in questions]
    low, high = bootstrap_interval(per_question_accuracy, lambda xs: sum(xs) / len(xs))
    metrics = {**tradeoff_summary(questions), "pass@1/ci_low": low, "pass@1/ci_high": high}
    for k in k_values(n):
        metrics[f"pass@{k}"] = sum(pass_at_k(q, k) for q in questions) / len(questions)
        metrics[f"maj@{k}"] = sum(maj_at_k(q, k) for q in questions) / len(questions)
        for m in (1, 3):
            if m <= k:
                metrics[f"short-{m}@{k}"] = sum(short_m_at_k(q, m, k) for q in questions) / len(questions)
    return metrics
