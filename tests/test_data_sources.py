"""Datasets: JSONL, Parquet and Hugging Face datasets (a local dataset directory, through
`datasets.load_dataset`) with a column mapping; bad input names the file, row and column."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from efficient_rl.config.schema import DataSection
from efficient_rl.data.sources import load_split
from efficient_rl.errors import ConfigError

ROWS = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3} for i in range(5)]
MAPPING = DataSection(question_key="problem", answer_key="solution")


def expected(prefix: str) -> list[dict]:
    return [
        {**row, "id": f"{prefix}-{i}", "question": row["problem"], "answer": row["solution"]}
        for i, row in enumerate(ROWS, 1)
    ]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_and_jsonl_with_a_column_mapping_keep_the_metadata(tmp_path):
    write_parquet(tmp_path / "math.parquet", ROWS)
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert load_split(str(tmp_path / "math.parquet"), "train", MAPPING, 0, "data.train") == expected("math")
    assert load_split(str(tmp_path / "math.jsonl"), "train", MAPPING, 0, "data.train") == expected("math")


def test_hugging_face_dataset_directory_picks_the_split(tmp_path):
    dataset = tmp_path / "tiny_math"
    dataset.mkdir()
    write_parquet(dataset / "train.parquet", ROWS[:3])
    write_parquet(dataset / "test.parquet", ROWS[3:])
    train = load_split(f"hf:{dataset}", "train", MAPPING, 0, "data.train")
    heldout = load_split(f"hf:{dataset}", "heldout", MAPPING, 0, "data.heldout")
    assert [s["answer"] for s in train] == ["0", "2", "4"] and [s["answer"] for s in heldout] == ["6", "8"]
    assert heldout[0]["level"] == 0 and heldout[0]["id"] == "tiny_math-1"
    with pytest.raises(ConfigError, match=r"data.heldout: hf:.*tiny_math split 'validation' could not be loaded"):
        load_split(
            f"hf:{dataset}",
            "heldout",
            DataSection(**{**MAPPING.__dict__, "heldout_split": "validation"}),
            0,
            "data.heldout",
        )


def test_missing_columns_and_unknown_files_are_one_line_errors(tmp_path):
    write_parquet(tmp_path / "math.parquet", ROWS)
    with pytest.raises(ConfigError, match=r"math.parquet row 1: missing column 'question' .*'problem', 'solution'"):
        load_split(str(tmp_path / "math.parquet"), "train", DataSection(), 0, "data.train")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"data.train: .*broken.parquet is not a readable Parquet file"):
        load_split(str(tmp_path / "broken.parquet"), "train", DataSection(), 0, "data.train")
    with pytest.raises(ConfigError, match=r"data.train: .*math.csv: expected lab:<preset>, hf:<dataset>, or a file"):
        load_split(str(tmp_path / "math.csv"), "train", DataSection(), 0, "data.train")
    with pytest.raises(ConfigError, match=r"data.train: data file .*absent.parquet not found"):
        load_split(str(tmp_path / "absent.parquet"), "train", DataSection(), 0, "data.train")


def test_a_lab_split_larger_than_its_task_is_a_one_line_error():
    with pytest.raises(
        ConfigError, match=r"^data.train_size 5000: lab:easy the task has only 1816 distinct train problems"
    ):
        load_split("lab:easy", "train", DataSection(train_size=5000), 0, "data.train")
    assert len(load_split("lab:easy", "train", DataSection(train_size=1816), 0, "data.train")) == 1816  # all of them
