"""Multiple-choice reward: the chosen letter against the sample's answer."""

from __future__ import annotations

import re

from efficient_rl.data.answers import last_boxed


def answer_patterns(letters: str) -> list[re.Pattern]:
    """Most explicit first: a boxed letter, "answer is (B)" / "Answer: B", a final lone letter.
    Letters match in their case only, so the article "a" is never choice A."""
    choice = f"[{re.escape(letters)}]"
    return [
        re.compile(rf"^\s*\(?({choice})\)?\s*$"),  # applied to the boxed content
        re.compile(rf"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*\(?({choice})\)?(?![A-Za-z])"),
        re.compile(rf"(?<![A-Za-z])\(?({choice})\)?[.\s]*$"),
    ]


def extract_choice(completion: str, letters: str = "ABCD") -> str | None:
    boxed_pattern, stated, final = answer_patterns(letters)
    boxed = last_boxed(completion)
    if boxed is not None:
        match = boxed_pattern.match(boxed)
        return match.group(1) if match else None
    found = stated.findall(completion)
    if found:
        return found[-1]
    match = final.search(completion)
    return match.group(1) if match else None


def reference_letter(sample: dict, letters: str) -> str:
    """sample["answer"] is a letter, or the text of one of sample["choices"]."""
    answer = str(sample["answer"]).strip()
    if len(answer) == 1 and answer in letters:
        return answer
    choices = [str(choice).strip() for choice in sample.get("choices", [])]
    if answer in choices and choices.index(answer) < len(letters):
        return letters[choices.index(answer)]
    raise ValueError(f"answer {answer!r} is neither a letter of {letters} nor one of the sample's choices")


def choice_reward(completion: str, sample: dict, letters: str = "ABCD") -> dict:
    predicted = extract_choice(completion, letters)
    correct = predicted is not None and predicted == reference_letter(sample, letters)
    return {"score": float(correct), "accuracy": float(correct), "answered": float(predicted is not None)}


choice_reward.score_range = (0.0, 1.0)  # what it can score (efficient_rl/scoring/scale.py)
choice_reward.binary_score = True
