"""Math answer reward: the last \\boxed{...} of the completion (or its last number) vs the reference."""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth < 0:
            return text[begin:position]
    return None  # unclosed: the response was cut off inside the answer


def extract_answer(text: str, fallback_last_number: bool = True) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None or not fallback_last_number:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    cleaned = text.strip().replace(",", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned) if NUMBER.fullmatch(cleaned) else None
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric equality when both sides are numbers, else whitespace-insensitive string equality."""
    left, right = as_number(predicted), as_number(reference)
    if left is not None and right is not None:
        return left == right
    return "".join(predicted.split()) == "".join(reference.split())


def math_reward(completion: str, sample: dict, fallback_last_number: bool = False) -> dict:
    """1.0 if the extracted answer equals sample["answer"], else 0.0.

    The last-number fallback is off by default: with it, a response cut off mid-reasoning can be
    scored correct by accident, which would hide the truncation the length penalty relies on.
    """
    predicted = extract_answer(completion, fallback_last_number)
    correct = predicted is not None and answers_match(predicted, str(sample["answer"]))
    return {"score": float(correct), "accuracy": float(correct)}
