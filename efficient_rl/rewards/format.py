"""Format reward: the completion has the required tags, in order, and a boxed answer."""

from __future__ import annotations

from efficient_rl.data.answers import last_boxed


def tags_in_order(completion: str, tags: list[str]) -> bool:
    """Each tag opens (<tag>) and then closes (</tag>), one tag after the other."""
    position = 0
    for tag in tags:
        opened = completion.find(f"<{tag}>", position)
        closed = completion.find(f"</{tag}>", opened + 1) if opened >= 0 else -1
        if closed < 0:
            return False
        position = closed + len(tag) + 3
    return True


def format_reward(completion: str, sample: dict, tags: list[str] = (), require_boxed: bool = True) -> dict:
    """1.0 if every tag of `tags` is present in order (e.g. ["think"]) and, with require_boxed,
    a closed \\boxed{...} answer comes after the last tag; else 0.0."""
    tags_ok = tags_in_order(completion, list(tags))
    tail = completion[completion.rfind(f"</{tags[-1]}>") :] if tags and tags_ok else completion
    boxed = last_boxed(tail) is not None
    return {"score": float(tags_ok and (boxed or not require_boxed)), "tags_ok": float(tags_ok), "boxed": float(boxed)}


format_reward.score_range = (0.0, 1.0)  # what it can score (efficient_rl/scoring/scale.py)
format_reward.binary_score = True
