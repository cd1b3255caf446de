"""Reading the final answer out of a text: a response's last \\boxed{...}, a GSM8K `#### N` line,
or its last number, and those answers as exact numbers.

The core needs this as much as the rewards do: data loading reads GSM8K's reference numbers and
evaluation votes by answer (maj@k). It lives here, not in the math reward plugin, so the core
never imports a plugin; the built-in rewards take it from here (docs/extending.md#layers).
"""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
# GSM8K's final-answer marker: "#### 72", "#### 1,200", "#### -3" (a "$" before the number is allowed,
# since models imitating the format write money that way).
HASH_ANSWER = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


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


def hash_answer(text: str) -> str | None:
    """The number after the last `####` marker followed by one; None if there is none."""
    matches = HASH_ANSWER.findall(text)
    return matches[-1] if matches else None


def extract_answer(text: str, fallback_last_number: bool = True, answer_pattern: str | None = None) -> str | None:
    """The last \\boxed{...}, else the number of a `#### N` line; or, with `answer_pattern` (a
    regex), group 1 of its last match instead; then, if allowed, the last number."""
    if answer_pattern is not None:
        matches = list(re.finditer(answer_pattern, text))
        answer = (matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)) if matches else None
    else:
        answer = last_boxed(text)
        if answer is None:
            answer = hash_answer(text)
    if answer is not None or not fallback_last_number:
        return answer
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    """The exact value of a plain number ("1,200", "-3.5", "3/4"), or None for anything else."""
    cleaned = text.strip().replace(",", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned) if NUMBER.fullmatch(cleaned) else None
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> str | None:
    """The answer a text stands for: a GSM8K solution ("... #### 72") stands for its number (None
    when no number follows the marker); anything else for itself."""
    return hash_answer(text) if "####" in text else text


def shorten(text: str, limit: int = 60) -> str:
    """The end of a long text (a solution's end holds its answer), for one-line messages."""
    return text if len(text) <= limit else "..." + text[-limit:]
