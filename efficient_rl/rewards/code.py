"""Code reward: the completion's last Python block, run against the sample's tests in the sandbox."""

from __future__ import annotations

import re

from efficient_rl.rewards.sandbox import Limits, run_python

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def run_tests(code: str, tests, limits: Limits) -> tuple[int, int, list[str], int]:
    """(passed, total, failure reasons, processes left running). `tests` is a list of {"input",
    "output"} (stdin -> expected stdout, compared without surrounding whitespace) or a string of
    assert statements."""
    if isinstance(tests, str):
        result = run_python(code + "\n\n" + tests, limits=limits)
        reasons = [] if result.reason == "ok" else [result.reason]
        return int(result.reason == "ok"), 1, reasons, result.leftover_processes
    passed, reasons, leftovers = 0, [], 0
    for case in tests:
        result = run_python(code, stdin=str(case.get("input", "")), limits=limits)
        leftovers += result.leftover_processes
        if result.reason == "ok" and result.stdout.strip() == str(case["output"]).strip():
            passed += 1
        else:
            reasons.append(result.reason if result.reason != "ok" else "wrong output")
    return passed, len(tests), reasons, leftovers


def code_reward(
    completion: str, sample: dict, timeout: float = 5.0, memory_mb: int = 512, all_or_nothing: bool = False
) -> dict:
    """Fraction of sample["tests"] passed (or 1/0 with all_or_nothing); accuracy = all passed."""
    code = extract_code(completion)
    if code is None:
        return {"score": 0.0, "accuracy": 0.0, "has_code": 0.0, "timeouts": 0.0, "leftovers": 0.0}
    limits = Limits(timeout=timeout, cpu_seconds=max(1, int(timeout)), memory_mb=memory_mb)
    passed, total, reasons, leftovers = run_tests(code, sample["tests"], limits)
    fraction = passed / total if total else 0.0
    return {
        "score": float(passed == total) if all_or_nothing else fraction,
        "accuracy": float(passed == total),
        "has_code": 1.0,
        "timeouts": float(reasons.count("timeout")),
        "leftovers": float(leftovers),
    }  # processes its runs left behind (killed): one that daemonizes


def scores_all_or_nothing(params: dict) -> bool:
    """1/0 only with all_or_nothing; else partial credit, the fraction of tests passed."""
    return bool(params.get("all_or_nothing", False))


code_reward.score_range = (0.0, 1.0)  # what it can score (efficient_rl/scoring/scale.py)
code_reward.binary_score = scores_all_or_nothing
