"""The math reward's answer comparison (docs/rewards.md#how-math-compares-answers) on answer pairs a
grader meets, each verdict decided by hand from what the answer means, not read off either
implementation; and the plain-number reader on hand-computed values."""

from fractions import Fraction

import pytest

from efficient_rl.data.answers import as_number, number_text
from efficient_rl.rewards.math import answers_match, math_reward

THIN, NARROW_NO_BREAK, MINUS = "\u2009", "\u202f", "\u2212"


def boxed(answer: str) -> str:
    return f"Working it through step by step gives the result. \\boxed{{{answer}}}"


# (the completion, the reference, whether the answer is right)
PAIRS = [
    # integers and signs
    (boxed("72"), "72", True),
    (boxed("72"), "27", False),
    (boxed("-3"), "-3", True),
    (boxed("3"), "-3", False),
    (boxed(f"{MINUS}3"), "-3", True),
    (boxed("-3"), f"{MINUS}3", True),
    (boxed(f"{MINUS}\\frac{{1}}{{2}}"), "-0.5", True),
    (boxed("+5"), "5", True),
    (boxed("72."), "72", True),
    # decimals and fractions
    (boxed("0.5"), "\\frac{1}{2}", True),
    (boxed("\\frac{1}{2}"), "0.5", True),
    (boxed("\\dfrac{3}{4}"), "0.75", True),
    (boxed("\\tfrac{3}{4}"), "\\frac34", True),
    (boxed("3/4"), "0.75", True),
    (boxed("\\frac{3}{4}"), "\\frac{4}{3}", False),
    (boxed("0.33"), "\\frac{1}{3}", False),
    (boxed("1.50"), "1.5", True),
    (boxed("3.0"), "3", True),
    (boxed("1.0001"), "1", False),
    (boxed(".5"), "0.5", True),
    # thousands separators, only in their pattern
    (boxed("1,000"), "1000", True),
    (boxed("1000"), "1,000", True),
    (boxed("1,000,000"), "1000000", True),
    (boxed("1\\,000\\,000"), "1000000", True),
    (boxed("1\\,000\\,000"), "10^{6}", True),
    (boxed("1{,}000"), "1000", True),
    (boxed("1\\;000"), "1000", True),
    (boxed("1 000"), "1000", True),
    (boxed(f"1{THIN}000"), "1000", True),
    (boxed(f"1{NARROW_NO_BREAK}000{NARROW_NO_BREAK}000"), "1000000", True),
    (boxed("1,000.5"), "1000.5", True),
    (boxed("-1,234"), "-1234", True),
    (boxed("1000001"), "1,000,000", False),
    (boxed("1,00"), "100", False),
    (boxed("1,5"), "1.5", False),  # a comma is never a decimal point
    # commas and spaces between digits that are not thousands: lists, never one number
    (boxed("12"), "1, 2", False),
    (boxed("1,2"), "12", False),
    (boxed("23"), "2, 3", False),
    (boxed("1,2,3,4"), "1234", False),
    (boxed("1 2"), "12", False),
    (boxed("1, 000"), "1000", False),
    (boxed("1,2"), "#### 12", False),
    # answer lists (unordered, as math graders take "list all solutions"), tuples, sets, intervals
    (boxed("2, 1"), "1, 2", True),
    (boxed("1, 2"), "1, 2", True),
    (boxed("1, 2"), "1, 2, 3", False),
    (boxed("(1, 2)"), "(1, 2)", True),
    (boxed("(2, 1)"), "(1, 2)", False),
    (boxed("(1, 2, 3)"), "(1, 2, 3)", True),
    (boxed("(1, 3, 2)"), "(1, 2, 3)", False),
    (boxed("\\{1, 2\\}"), "\\{2, 1\\}", True),
    (boxed("\\{1, 2\\}"), "1, 2", True),
    (boxed("[1, 2)"), "[1, 2)", True),
    (boxed("[1, 2]"), "[1, 2)", False),
    (boxed("(1, 2)"), "[1, 2]", False),
    (boxed("(-\\infty, 3)"), "(-\\infty, 3]", False),
    (boxed("x \\in [2, 5]"), "[2, 5]", True),
    # scientific notation
    (boxed("1e3"), "1000", True),
    (boxed("1E3"), "1000", True),
    (boxed("1.2e-3"), "0.0012", True),
    (boxed("1.5\\times10^{3}"), "1500", True),
    (boxed("1.5 \\times 10^3"), "1,500", True),
    (boxed("2\\cdot 10^{-2}"), "\\frac{1}{50}", True),
    (boxed("1e3"), "10^{3}", True),
    (boxed("10^{3}"), "1000", True),
    (boxed("1e4"), "1000", False),
    (boxed("1.5\\times10^{3}"), "150", False),
    # roots, pi, percentages
    (boxed("2\\sqrt{2}"), "\\sqrt{8}", True),
    (boxed("\\frac{\\sqrt{3}}{3}"), "\\frac{1}{\\sqrt{3}}", True),
    (boxed("\\sqrt{2}"), "2", False),
    (boxed("3.14"), "\\pi", False),
    (boxed("2\\pi"), "\\pi \\cdot 2", True),
    (boxed("50\\%"), "50", True),
    (boxed("40\\%"), "50", False),
    # letters, equations, symbols, expressions
    (boxed("\\text{(A)}"), "A", True),
    (boxed("A"), "B", False),
    (boxed("x=3"), "3", True),
    (boxed("\\emptyset"), "\\varnothing", True),
    (boxed("\\infty"), "\\infty", True),
    (boxed("x + 1"), "1+x", True),
    (boxed("x^2"), "x^3", False),
    # which answer is read: the last box; a GSM8K line without one
    ("First \\boxed{5}, no wait: \\boxed{6}", "6", True),
    ("First \\boxed{5}, no wait: \\boxed{6}", "5", False),
    ("1000 + 200 pens.\n#### 1,200", "1200", True),
    (boxed("\\$1,200"), "#### 1,200", True),
]


def pair_id(pair: tuple) -> str:
    completion, reference, right = pair
    opening = boxed("")[:-1]  # up to and with "\\boxed{"
    answer = completion[len(opening) : -1] if completion.startswith(opening) else completion
    return f"{answer} vs {reference}: {'right' if right else 'wrong'}"


@pytest.mark.parametrize(("completion", "reference", "right"), PAIRS, ids=[pair_id(pair) for pair in PAIRS])
def test_each_answer_gets_the_verdict_a_grader_gives(completion, reference, right):
    assert math_reward(completion, {"answer": reference})["score"] == float(right)


def test_the_table_covers_what_a_grader_meets():
    assert len(PAIRS) >= 60
    assert sum(right for *_, right in PAIRS) >= 20 and sum(not right for *_, right in PAIRS) >= 20


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234.5", Fraction(2469, 2)),
        (f"{MINUS}7", Fraction(-7)),
        ("12 345", Fraction(12345)),
        ("1.5\\times10^{3}", Fraction(1500)),
        ("3\u00d710^5", Fraction(300000)),
        ("2e-3", Fraction(1, 500)),
        ("-3/4", Fraction(-3, 4)),
        (".25", Fraction(1, 4)),
    ],
)
def test_plain_numbers_are_read_exactly(text, value):
    assert as_number(text) == value


@pytest.mark.parametrize(
    "text",
    ["1,2", "2, 3", "1,2,3,4", "1 2", "1,000\\,000", "12,34", "1/0", "e3", "1e3\\times10^{2}", "1e999999999", "x"],
)
def test_what_is_not_one_plain_number_is_left_to_math_verify(text):
    assert as_number(text) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(Fraction(1000), "1000"), (Fraction(-1, 8), "-0.125"), (Fraction(1, 3), "1/3"), (Fraction(3, 250), "0.012")],
)
def test_a_number_is_handed_on_in_its_plainest_exact_form(value, text):
    assert number_text(value) == text


@pytest.mark.parametrize(
    ("predicted", "reference", "right"),
    [
        ("1\\,000", "1000", True),
        ("1,2", "12", False),
        ("12", "1, 2", False),
        ("1e3", "1000", True),
        ("(1,2)", "(1,2)", True),
    ],
)
def test_without_math_verify_the_same_number_rules_hold(predicted, reference, right):
    assert answers_match(predicted, reference, use_math_verify=False) is right
