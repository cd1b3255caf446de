"""An example reward plugin: the built-in math check plus a small bonus for short answers.

Use it from a recipe or the command line, no installation needed:

    efficient-rl train quickstart \
        "reward=[{name: examples/concise_math_reward.py:concise_math, params: {target_words: 12}}]"
"""

from efficient_rl.rewards.math import math_reward


def concise_math(completion: str, sample: dict, target_words: int = 20, bonus: float = 0.1) -> dict:
    """1 for a correct boxed answer, plus `bonus` if the answer is correct and at most
    `target_words` words long. Extra keys are logged as reward/<name>/<key>."""
    correct = math_reward(completion, sample)["score"]
    words = len(completion.split())
    short = float(correct > 0 and words <= target_words)
    return {"score": correct + bonus * short, "accuracy": correct, "words": words}
