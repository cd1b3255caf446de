"""Synthetic reasoning tasks with verifiable answers.

The lab task is multi-step arithmetic: "Compute 7 + 5 - 3 + 8." The worked solution rewrites the
expression one operation at a time ("7 + 5 - 3 + 8 = 12 - 3 + 8 = 9 + 8 = 17.") and ends with "\\boxed{17}".
Warm-start traces add a random number of redundant re-checks of the result before the
answer, so a model fine-tuned on them is accurate but wordy: exactly the starting point the DLER
length penalty is meant to fix.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


@dataclass(frozen=True)
class ArithmeticTask:
    """Parameters of the arithmetic task family (part of the lab's cache key)."""

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 9
    max_value: int = 30
    max_rechecks: int = 14  # re-checks per warm-start trace, uniform in 0..max_rechecks
    heldout_every: int = 10  # one expression in `heldout_every` belongs to the held-out split

    def sample_expression(self, rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
        """Draw a start value and a list of (op, operand) keeping every value in [0, max_value]."""
        value = rng.randint(1, self.max_operand)
        start, steps = value, []
        for _ in range(rng.randint(self.min_ops, self.max_ops)):
            op, operand = self._next_step(rng, value)
            value = OPERATIONS[op](value, operand)
            steps.append((op, operand))
        return start, steps

    def _next_step(self, rng: random.Random, value: int) -> tuple[str, int]:
        while True:
            op, operand = rng.choice(sorted(OPERATIONS)), rng.randint(1, self.max_operand)
            if 0 <= OPERATIONS[op](value, operand) <= self.max_value:
                return op, operand


def question_text(start: int, steps: list[tuple[str, int]]) -> str:
    expression = " ".join([str(start)] + [f"{op} {operand}" for op, operand in steps])
    return f"Compute {expression}."


def solution_steps(start: int, steps: list[tuple[str, int]]) -> tuple[str, int]:
    """The shortest worked solution and the final value.

    Each rewrite evaluates the leftmost operation and copies the rest of the expression:
    "7 + 5 - 3 = 12 - 3 = 9." A tiny model then only ever adds two adjacent numbers and copies
    text, instead of having to find the k-th operand of the question from far away.
    """
    value, rest, terms = start, list(steps), []
    while rest:
        terms.append(" ".join([str(value)] + [f"{op} {operand}" for op, operand in rest]))
        op, operand = rest.pop(0)
        value = OPERATIONS[op](value, operand)
    return " = ".join(terms + [str(value)]) + ".", value


def final_answer_text(answer: int | str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


BOXED_NUMBER = re.compile(r"\\boxed\{(-?\d+)\}")


def boxed_answer(response: str) -> str | None:
    """The last boxed integer of a lab response (the lab's own answer format), or None."""
    found = BOXED_NUMBER.findall(response)
    return found[-1] if found else None


def shortest_solution(start: int, steps: list[tuple[str, int]]) -> str:
    chain, answer = solution_steps(start, steps)
    return f"{chain} {final_answer_text(answer)}"


def wordy_solution(start: int, steps: list[tuple[str, int]], rechecks: int) -> str:
    """A correct solution padded with `rechecks` redundant re-statements of the result.

    A re-check only repeats the value just computed, so it costs tokens but never changes the
    answer: the ideal length penalty removes all of them and keeps every answer right.
    """
    chain, answer = solution_steps(start, steps)
    parts = [chain] + [f"Let me check again: the result is {answer}." for _ in range(rechecks)]
    return " ".join(parts + [final_answer_text(answer)])


def is_heldout(question: str, every: int) -> bool:
    """Split membership is a pure function of the question text, so splits never overlap."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "little") % every == 0


# Draws in a row without a new problem before a split counts as exhausted. Finding the last of N
# distinct problems takes ~N draws, so this is generous for every lab task.
MAX_MISSES = 100_000


def generate_problems(task: ArithmeticTask, split: str, count: int, seed: int | str) -> list[dict]:
    """`count` distinct problems of one split ("train" or "heldout"), reproducible from `seed`.

    Each problem is a sample dict: id, question, answer (a string), num_ops, and the shortest
    correct solution for reference.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    want_heldout = split == "heldout"
    problems, seen = [], set()
    misses = 0  # draws since the last new problem: a task with fewer distinct problems runs dry
    while len(problems) < count and misses < MAX_MISSES:
        start, steps = task.sample_expression(rng)
        question = question_text(start, steps)
        if question in seen or is_heldout(question, task.heldout_every) != want_heldout:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        _, answer = solution_steps(start, steps)
        problems.append(
            {
                "id": f"{split}-{len(problems)}",
                "question": question,
                "answer": str(answer),
                "num_ops": len(steps),
                "start": start,
                "steps": steps,
                "shortest_solution": shortest_solution(start, steps),
            }
        )
    if len(problems) < count:
        raise ValueError(f"the task has only {len(problems)} distinct {split} problems, {count} requested")
    return problems


def warm_start_traces(task: ArithmeticTask, problems: list[dict], seed: int) -> list[dict]:
    """(question, response) pairs for supervised warm start: correct, with 0..max_rechecks re-checks."""
    rng = random.Random(f"{seed}-traces")
    return [
        {
            "question": p["question"],
            "response": wordy_solution(p["start"], p["steps"], rng.randint(0, task.max_rechecks)),
        }
        for p in problems
    ]
