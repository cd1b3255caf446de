"""Math answer reward: the last \\boxed{...} of the completion (else a GSM8K-style `#### N` line, or
its last number) vs the reference, compared exactly as numbers or else with math-verify; the rules
are in docs/rewards.md#how-math-compares-answers.

A reference may be a full GSM8K solution ending in `#### N`: its answer is N."""

from __future__ import annotations

import re

# Answer extraction is the core's (data and evaluation read answers too); the names stay
# importable from here for plugins written against this module.
from efficient_rl.data.answers import (  # noqa: F401
    as_number,
    extract_answer,
    final_answer,
    hash_answer,
    last_boxed,
    number_text,
    respell,
    shorten,
)

# Two plain words in a row ("see above"): prose, which math-verify would read as a product of
# one-letter symbols (s*e*e*a*b*o*v*e) that matches only itself, so every response would score 0.
PROSE = re.compile(r"\b[A-Za-z]{2,}\s+[A-Za-z]{2,}\b")
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+(?:\{[^{}]*\})?")  # \frac, \sqrt, \text{no solution}


def reference_answer(reference: str) -> str:
    """The reference to compare against; ValueError, naming it, for one no verifier can read."""
    answer = final_answer(reference)
    if answer is None:
        raise ValueError(f"reference answer {shorten(reference)!r} has no number after its last '####'")
    if not answer.strip():
        raise ValueError("reference answer is empty")
    if PROSE.search(LATEX_COMMAND.sub(" ", answer)):
        raise ValueError(f"reference answer {shorten(answer)!r} is prose, not a math answer")
    return answer


def answers_match(predicted: str, reference: str, use_math_verify: bool = True, timeout: int = 2) -> bool:
    """Exact equality when both sides are plain numbers; otherwise math-verify (symbolic: fractions,
    roots, tuples, sets, intervals ...), or whitespace-insensitive string equality without it. A
    side that is a plain number goes on in its plain form ("1\\,000" as 1000, "1e3" as 1000), so
    a number spelled in a way only the shortcut reads still compares with `10^{3}`."""
    left, right = as_number(predicted), as_number(reference)
    if left is not None and right is not None:
        return left == right
    predicted = respell(predicted) if left is None else number_text(left)
    reference = respell(reference) if right is None else number_text(right)
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


def math_reward(
    completion: str,
    sample: dict,
    fallback_last_number: bool = False,
    use_math_verify: bool = True,
    timeout: int = 2,
    answer_pattern: str | None = None,
) -> dict:
    """1.0 if the extracted answer equals sample["answer"], else 0.0.

    The last-number fallback is off by default: with it, a response cut off mid-reasoning can be
    scored correct by accident, which would hide the truncation the length penalty relies on.
    `answer_pattern` replaces the boxed extraction, e.g. r"Answer:\\s*(\\S+)".
    """
    reference = reference_answer(str(sample["answer"]))
    predicted = extract_answer(completion, fallback_last_number, answer_pattern)
    # A boxed GSM8K solution (a reference given back whole) stands for its final number.
    predicted = final_answer(predicted) if predicted is not None else None
    correct = predicted is not None and answers_match(predicted, reference, use_math_verify, timeout)
    return {"score": float(correct), "accuracy": float(correct)}


# What it can score, for the length penalties that need to know (efficient_rl/scoring/scale.py).
math_reward.score_range = (0.0, 1.0)
math_reward.binary_score = True
