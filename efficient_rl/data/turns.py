"""Chat turns as a question: a data column holding [{"role": ..., "content": ...}, ...] (verl's
`prompt`, TRL's conversational `prompt`, a `messages` column).

A sample's `question` is either a string or such a list of turns, kept exactly as the data gave
them (a reward reads them as they are). The turns end with a user turn: the one the model
answers. The user template applies to that last turn, with {question} standing for its content,
so "{question} Think for {budget} tokens." asks the same of a chat prompt as of a plain one.
"""

from __future__ import annotations

import json
from typing import Any

Turns = list[dict[str, Any]]


def is_turns(question: Any) -> bool:
    return isinstance(question, list)


def turns_problem(turns: list) -> str | None:
    """Why a list is no chat prompt, or None: each turn a mapping of a string role and a string
    content, and the last one the user's (an assistant turn at the end is an answer, not a prompt)."""
    if not turns:
        return "an empty list of turns"
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return f"turn {number} is a {type(turn).__name__}, not a {{role, content}} mapping"
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                return f"turn {number} has no string {key!r} (it has {turn.get(key)!r})"
    if turns[-1]["role"] != "user":
        return f"the last turn is the {turns[-1]['role']!r} turn; a prompt ends with the user turn the model answers"
    return None


def with_user_text(turns: Turns, text: str) -> Turns:
    """The turns with the last (user) turn's content replaced by `text` (new dicts; the sample's own
    turns are left alone)."""
    return [*turns[:-1], {**turns[-1], "content": text}]


def has_system_turn(turns: Turns) -> bool:
    return any(turn["role"] == "system" for turn in turns)


def question_key(question: str | Turns) -> str:
    """A string that stands for a question in dicts and JSON keys (prompt caches, per-question
    results): a plain question itself, chat turns as their JSON text."""
    return json.dumps(question, ensure_ascii=False, sort_keys=True) if is_turns(question) else question


def question_text(question: str | Turns) -> str:
    """A question as a person reads it in a report: chat turns as "role: content" lines."""
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in question) if is_turns(question) else question
