"""Math answer reward: the last \\boxed{...} of the completion (or its last number) vs the reference,
compared exactly as numbers or else with math-verify."""

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


def extract_answer(text: str, fallback_last_number: bool = True, answer_pattern: str | None = None) -> str | None:
    """The last \\boxed{...}; or, with `answer_pattern` (a regex), group 1 of its last match
    instead; then, if allowed, the last number."""
    if answer_pattern is not None:
        matches = list(re.finditer(answer_pattern, text))
        answer = (matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)) if matches else None
    else:
        answer = last_boxed(text)
    if answer is not None or not fallback_last_number:
        return answer
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    cleaned = text.strip().replace(",", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned) if NUMBER.fullmatch(cleaned) else None
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str, use_math_verify: bool = True, timeout: int = 2) -> bool:
    """Exact equality when both sides are numbers; otherwise math-verify (symbolic: fractions,
    roots, sets, intervals ...), or whitespace-insensitive string equality without it."""
    left, right = as_number(predicted), as_number(reference)
    if left is not None and right is not None:
        return left == right
    if use_math_verify:
        return math_verify_equal(predicted, reference, timeout)
    return "".join(predicted.split()) == "".join(reference.split())


def math_verify_equal(predicted: str, reference: str, timeout: int) -> bool:
    """math-verify on the two expressions. Its timeouts use signal.alarm, so this must run in a
    main thread (reward workers call rewards there). A timeout is raised as TimeoutError, so it
    is counted in reward/timeouts instead of becoming a silent 0."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout, raise_on_error=True)
        answer = parse(f"${predicted}$", parsing_timeout=timeout, raise_on_error=True)
        return bool(gold and answer and verify(gold, answer, timeout_seconds=timeout, raise_on_error=True))
    except TimeoutException:
        raise TimeoutError(f"math-verify took over {timeout} s") from None


def math_reward(completion: str, sample: dict, fallback_last_number: bool = False, use_math_verify: bool = True,
                timeout: int = 2, answer_pattern: str | None = None) -> dict:
    """1.0 if the extracted answer equals sample["answer"], else 0.0.

    The last-number fallback is off by default: with it, a response cut off mid-reasoning can be
    scored correct by accident, which would hide the truncation the length penalty relies on.
    `answer_pattern` replaces the boxed extraction, e.g. r"Answer:\\s*(\\S+)".
    """
    predicted = extract_answer(completion, fallback_last_number, answer_pattern)
    correct = predicted is not None and answers_match(predicted, str(sample["answer"]), use_math_verify, timeout)
    return {"score": float(correct), "accuracy": float(correct)}
