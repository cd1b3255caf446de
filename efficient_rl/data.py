"""Prompt datasets (the lab's splits or local JSONL files) and the resumable prompt stream."""

from __future__ import annotations

import json
import random
from pathlib import Path

from efficient_rl.config import ConfigError, DataSection
from efficient_rl.lab.build import PRESETS
from efficient_rl.lab.tasks import generate_problems


def load_split(spec: str, split: str, data: DataSection, seed: int, field_name: str) -> list[dict]:
    """Samples with at least `question` and `answer` (strings) from "lab:<preset>" or a JSONL file."""
    if spec.startswith("lab:"):
        preset = spec.removeprefix("lab:")
        if preset not in PRESETS:
            raise ConfigError(f"{field_name}: unknown lab preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        size = data.train_size if split == "train" else data.heldout_size
        samples = generate_problems(PRESETS[preset].task, split, size, seed)
    else:
        samples = read_jsonl(Path(spec), data.question_key, data.answer_key, field_name)
    if not samples:
        raise ConfigError(f"{field_name}: {spec} holds no samples")
    return samples


def json_rows(path: Path, field_name: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; errors name the file and the line."""
    if not path.is_file():
        raise ConfigError(f"{field_name}: data file {path} not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: not a JSON object")
        rows.append((number, row))
    return rows


def read_jsonl(path: Path, question_key: str, answer_key: str, field_name: str) -> list[dict]:
    samples = []
    for number, row in json_rows(path, field_name):
        missing = [k for k in (question_key, answer_key) if k not in row]
        if missing:
            raise ConfigError(f"{path}:{number}: missing column {missing[0]!r} (set data.question_key / data.answer_key)")
        samples.append({**row, "id": row.get("id", f"{path.stem}-{number}"),
                        "question": str(row[question_key]), "answer": str(row[answer_key])})
    return samples


class PromptStream:
    """Endless epochs over the training samples, reshuffled per epoch from (seed, epoch).

    Its whole state is `consumed` (prompts handed out so far), so a checkpoint stores one number
    and a resumed run continues with exactly the prompts the uninterrupted run would have seen.
    """

    def __init__(self, samples: list[dict], seed: int, shuffle: bool = True):
        self.samples = samples
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0
        self._order_epoch, self._order = -1, []

    def take(self, count: int) -> list[tuple[int, dict]]:
        """The next `count` prompts as (stream position, sample); positions are unique ids."""
        taken = []
        for position in range(self.consumed, self.consumed + count):
            epoch, index = divmod(position, len(self.samples))
            taken.append((position, self.samples[self._epoch_order(epoch)[index]]))
        self.consumed += count
        return taken

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = list(range(len(self.samples)))
            if self.shuffle:
                random.Random(f"{self.seed}-epoch-{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order
