"""Length profiles: a reference model's lengths on each training prompt, kept beside the data.

A profile is a JSON-lines file, one row per prompt: {"id", "passing_count", "mean", "std"}, the
mean and (population) standard deviation of the lengths of the reference's passing answers (null
without any). `profile_row` computes a row from sampled lengths; `join_length_profile` puts each
row on its training sample by id when the run loads its data, so a length penalty reads it as
sample fields (the reference-profiled threshold, algos/length_controllers.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from efficient_rl.algos.length_controllers import PROFILE_MEAN, PROFILE_PASSING, PROFILE_STD
from efficient_rl.errors import ConfigError

PROFILE_KEYS = ("id", "passing_count", "mean", "std")


def profile_row(prompt_id: str, lengths: list[int], passed: list[bool]) -> dict:
    """The profile of one prompt from the reference's sampled answers: their lengths, and which passed."""
    passing = [length for length, ok in zip(lengths, passed) if ok]
    if not passing:
        return {"id": prompt_id, "passing_count": 0, "mean": None, "std": None}
    mean = sum(passing) / len(passing)
    std = math.sqrt(sum((length - mean) ** 2 for length in passing) / len(passing))
    return {"id": prompt_id, "passing_count": len(passing), "mean": mean, "std": std}


def read_length_profile(path: Path, field_name: str) -> dict[str, dict]:
    """Prompt id -> its row; a missing file or a malformed row is one line naming it."""
    check_profile_file(path, field_name)
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        problem = row_problem(line)
        if problem:
            raise ConfigError(f"{field_name}: {path} line {number}: {problem}")
        row = json.loads(line)
        rows[str(row["id"])] = row
    return rows


def check_profile_file(path: Path, field_name: str) -> None:
    """The profile exists (validation asks before anything is built; `study check` with it)."""
    if not path.is_file():
        raise ConfigError(f"{field_name}: {path} is no file; write it with efficient-rl profile-lengths")


def row_problem(line: str) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg})"
    if not isinstance(row, dict) or set(PROFILE_KEYS) - set(row):
        return f"expected an object with {', '.join(PROFILE_KEYS)}"
    count = row["passing_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"passing_count: expected a count, got {count!r}"
    for key in ("mean", "std"):
        value = row[key]
        if count and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            return f"{key}: expected a length of at least 0 for a prompt with passing answers, got {value!r}"
    return None


def join_length_profile(samples: list[dict], path: Path, field_name: str) -> list[dict]:
    """Each sample with its prompt's profile as the fields the penalty reads; a sample whose id
    the profile lacks is one line naming the id and the file (mean and std are NaN without any
    passing answer: no threshold then, the passing count decides)."""
    rows = read_length_profile(path, field_name)
    joined = []
    for sample in samples:
        row = rows.get(str(sample.get("id")))
        if row is None:
            raise ConfigError(
                f"{field_name}: {path} has no row for the training prompt id {sample.get('id')!r}; "
                "profile every training prompt (efficient-rl profile-lengths)"
            )
        known = row["passing_count"] > 0
        joined.append(
            {
                **sample,
                PROFILE_PASSING: row["passing_count"],
                PROFILE_MEAN: float(row["mean"]) if known else math.nan,
                PROFILE_STD: float(row["std"]) if known else math.nan,
            }
        )
    return joined
