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


# How a plain number may group its thousands: one separator kind per number, a first group of one
# to three digits and then groups of exactly three ("1,000", "1\\,000\\,000", "12 345"). Anything else
# with a comma in it ("1,2", "2, 3", "1,2,3,4") is a list, never a number with its commas dropped.
# (Unicode thin and non-breaking spaces arrive here as plain spaces: `respell` reads them so.)
THOUSANDS_SEPARATORS = (",", "{,}", "\\,", "\\;", "\\:", "\\!", "\\ ", " ")
# Spellings rewritten before either reader sees them: the typographic minus ("\u2212") and unicode
# spaces as their ASCII forms, and \varnothing as the \emptyset that math-verify equates with sets.
SPELLINGS = {"\u2212": "-", "\u2009": " ", "\u202f": " ", "\u00a0": " ", "\\varnothing": "\\emptyset"}
DECIMAL = re.compile(r"(?P<integer>[^.eE]*)(?:\.(?P<fraction>\d+))?(?:[eE](?P<exponent>[+-]?\d+))?")
RATIO = re.compile(r"(\d+)/(\d+)")
# "1.5\times10^{3}", "2 \cdot 10^-4", "3×10^5": the mantissa is read as a plain number before it.
TIMES_POWER_OF_TEN = re.compile(r"\s*(?:\\times|\\cdot|\u00d7)\s*10\s*\^\s*(?:\{\s*([+-]?\d+)\s*\}|([+-]?\d))$")
# 10**MAX_EXPONENT is as large a power as a number answer is read with: "1e999999999" expanded
# exactly would be a billion digits, so beyond it the text is not a plain number (math-verify gets it).
MAX_EXPONENT = 400


def respell(text: str) -> str:
    """`text` with its unicode minus, non-breaking and thin spaces, and \\varnothing in the spelling
    both number readers understand."""
    for spelling, replacement in SPELLINGS.items():
        text = text.replace(spelling, replacement)
    return text


def ungroup(integer: str) -> str | None:
    """The digits of an integer written plainly or with thousands separators in their pattern; None
    for anything else (a list like "1,2", mixed separators, a space after a comma)."""
    if integer.isdigit() or not integer:
        return integer
    for separator in THOUSANDS_SEPARATORS:
        head, *groups = integer.split(separator)
        if groups and 1 <= len(head) <= 3 and head.isdigit() and all(len(g) == 3 and g.isdigit() for g in groups):
            return head + "".join(groups)
    return None


def decimal_value(match: re.Match, exponent: int) -> Fraction | None:
    """The value of a DECIMAL match (its integer part perhaps grouped) times 10**exponent; None
    when the integer part is not digits in their pattern, there are no digits, or the power is
    beyond MAX_EXPONENT."""
    integer, fraction = ungroup(match["integer"]), match["fraction"] or ""
    if integer is None or not (integer or fraction) or abs(exponent) > MAX_EXPONENT:
        return None
    digits = Fraction(int(integer + fraction or "0"), 10 ** len(fraction))
    return digits * Fraction(10) ** exponent


def as_number(text: str) -> Fraction | None:
    """The exact value of a plain number, or None for anything else: integers and decimals with
    thousands separators only in their pattern ("1,200", "1\\,000\\,000"), a unicode or ASCII
    minus, scientific notation ("1e3", "1.5\\times10^{3}") and ratios of integers ("3/4")."""
    cleaned = respell(text).strip().rstrip(".").strip()
    sign = -1 if cleaned.startswith("-") else 1
    cleaned = cleaned[1:] if cleaned[:1] in "+-" else cleaned
    power = TIMES_POWER_OF_TEN.search(cleaned)
    mantissa, exponent = (cleaned[: power.start()], int(power[1] or power[2])) if power else (cleaned, 0)
    ratio, decimal = RATIO.fullmatch(mantissa), DECIMAL.fullmatch(mantissa)
    try:
        if ratio and not power:
            return sign * Fraction(int(ratio[1]), int(ratio[2]))
        if decimal is None or (power and decimal["exponent"]):  # two exponents: "1e3\\times10^{2}"
            return None
        value = decimal_value(decimal, exponent + int(decimal["exponent"] or 0))
    except (ValueError, ZeroDivisionError):  # "1/0", or more digits than Python converts
        return None
    return None if value is None else sign * value


def number_text(value: Fraction) -> str:
    """A number in the plainest form math-verify reads exactly: an integer, a terminating decimal,
    else a ratio "n/d" (so a decimal answer keeps math-verify's tolerance against a fraction)."""
    if value.denominator == 1:
        return str(value.numerator)
    # A fraction terminates in decimal when its denominator is 2**a * 5**b, after max(a, b) places.
    rest, places = value.denominator, 0
    while rest % 10 == 0 or rest % 2 == 0 or rest % 5 == 0:
        rest //= 10 if rest % 10 == 0 else 2 if rest % 2 == 0 else 5
        places += 1
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


def final_answer(text: str) -> str | None:
    """The answer a text stands for: a GSM8K solution ("... #### 72") stands for its number (None
    when no number follows the marker); anything else for itself."""
    return hash_answer(text) if "####" in text else text


def shorten(text: str, limit: int = 60) -> str:
    """The end of a long text (a solution's end holds its answer), for one-line messages."""
    return text if len(text) <= limit else "..." + text[-limit:]
