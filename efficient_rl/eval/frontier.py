"""Trade-off frontiers between response length and accuracy.

- The Pareto frontier of evaluated runs: those no other run beats on both axes.
- The token-complexity oracle frontier ("How Well do LLMs Compress Their Own Chain-of-Thought?
  A Token Complexity Approach", Lee et al. 2025): a question's token complexity is the shortest
  correct response any evaluated run produced for it. An oracle that answers the questions in
  increasing order of token complexity, spending exactly that many tokens on each and none on
  the rest, reaches accuracy j/N at mean length (sum of the j smallest complexities)/N: the best
  accuracy reachable at each mean length with the responses seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    name: str
    mean_length: float
    accuracy: float


def pareto_frontier(points: list[Point]) -> list[Point]:
    """The non-dominated points (shorter or equal and at least as accurate, one strictly), by length."""
    frontier, best_accuracy = [], -math.inf
    for point in sorted(points, key=lambda p: (p.mean_length, -p.accuracy)):
        if point.accuracy > best_accuracy:
            frontier.append(point)
            best_accuracy = point.accuracy
    return frontier


def token_complexities(runs: list[dict[str, list[tuple[bool, int]]]]) -> dict[str, float]:
    """Per question, the shortest correct response length over every run (inf if none solved it).
    Each run maps question id -> [(correct, length), ...]."""
    complexity: dict[str, float] = {}
    for run in runs:
        for question, responses in run.items():
            lengths = [length for correct, length in responses if correct]
            complexity[question] = min([complexity.get(question, math.inf), *lengths])
    return complexity


def oracle_frontier(complexities: dict[str, float]) -> list[tuple[float, float]]:
    """(mean length, accuracy) after solving the j cheapest questions, j = 0 .. solvable."""
    solvable = sorted(c for c in complexities.values() if math.isfinite(c))
    total, points = 0.0, [(0.0, 0.0)]
    for j, cost in enumerate(solvable, 1):
        total += cost
        points.append((total / len(complexities), j / len(complexities)))
    return points


def oracle_length_at(frontier: list[tuple[float, float]], accuracy: float) -> float:
    """The oracle's mean length for `accuracy` (linear between its points); inf above its reach."""
    for (length0, acc0), (length1, acc1) in zip(frontier, frontier[1:]):
        if acc0 <= accuracy <= acc1:
            return length0 + (length1 - length0) * (accuracy - acc0) / (acc1 - acc0)
    return 0.0 if accuracy <= 0 else math.inf


def oracle_accuracy_at(frontier: list[tuple[float, float]], mean_length: float) -> float:
    """The oracle's accuracy at `mean_length` (linear between its points, flat past the last)."""
    for (length0, acc0), (length1, acc1) in zip(frontier, frontier[1:]):
        if length0 <= mean_length <= length1:
            return acc0 + (acc1 - acc0) * (mean_length - length0) / (length1 - length0)
    return frontier[-1][1]


def distance_from_oracle(point: Point, frontier: list[tuple[float, float]]) -> dict[str, float]:
    """How far a run is from the oracle: accuracy it leaves on the table at its mean length, and
    how many times the oracle's length it spends for its accuracy."""
    oracle_length = oracle_length_at(frontier, point.accuracy)
    return {
        "accuracy_gap": oracle_accuracy_at(frontier, point.mean_length) - point.accuracy,
        # Undefined at accuracy 0, where the oracle spends nothing.
        "length_ratio": point.mean_length / oracle_length if oracle_length > 0 else math.nan,
    }
