"""Length helpers: a shaping term for short answers and a length metric (DLER's truncation
penalty itself works on token counts in the trainer, see algorithm.length_penalty)."""

from __future__ import annotations


def length_reward(completion: str, sample: dict, max_words: int = 256) -> dict:
    """1 - words / max_words, floored at 0: add it with a small weight next to a correctness reward."""
    words = len(completion.split())
    return {"score": max(0.0, 1.0 - words / max_words), "words": float(words)}


def length_metric(completion: str, sample: dict) -> dict:
    """Scores nothing (0) and logs the word count: give it weight 0 to watch lengths."""
    return {"score": 0.0, "words": float(len(completion.split()))}


# What they can score (efficient_rl/scoring/scale.py): a shaping term in [0, 1]; the metric always 0.
length_reward.score_range = (0.0, 1.0)
length_reward.binary_score = False
length_metric.score_range = (0.0, 0.0)
length_metric.binary_score = True
