"""Data in TRL's and verl's forms: chat turns as the question (through the chat template as they
are), nested keys (verl's reward_model.ground_truth), `save_to_disk` directories; end to end,
a verl parquet and a messages JSONL train and evaluate on the tiny lab model."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import RECIPES, TINY_OVERRIDES
from efficient_rl.config.schema import DataSection, PromptSection
from efficient_rl.data.prompts import TokenizerError, encode_sample, load_tokenizer
from efficient_rl.data.sources import load_split
from efficient_rl.errors import ConfigError
from efficient_rl.lab.presets import PRESETS
from efficient_rl.lab.tasks import generate_problems

SYSTEM = "Check each step."  # words the lab tokenizer spells out whole
VERL_KEYS = DataSection(question_key="prompt", answer_key="reward_model.ground_truth")


def lab_problems(count: int) -> list[dict]:
    return generate_problems(PRESETS["tiny"].task, "train", count, 0)


def verl_rows(problems: list[dict]) -> list[dict]:
    """verl's RL parquet layout (its examples/data_preprocess scripts write these columns)."""
    return [
        {
            "data_source": "lab/tiny",
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p["question"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p["answer"]},
            "extra_info": {"split": "train", "index": index},
        }
        for index, p in enumerate(problems)
    ]


def messages_rows(problems: list[dict]) -> list[dict]:
    """A messages column with a system turn of each row's own, and the answer as a JSON number."""
    return [
        {
            "messages": [
                {"role": "system", "content": f"Check each step ({index % 2})."},
                {"role": "user", "content": p["question"]},
            ],
            "solution": int(p["answer"]),
            "level": index % 3,
        }
        for index, p in enumerate(problems)
    ]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The ids transformers' own chat templating gives the turns."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- mapping


def test_verl_parquet_keeps_the_turns_and_reads_the_nested_answer(tmp_path):
    problems = lab_problems(3)
    path = write_parquet(tmp_path / "verl.parquet", verl_rows(problems))
    samples = load_split(str(path), "train", VERL_KEYS, 0, "data.train")
    for index, (sample, problem) in enumerate(zip(samples, problems)):
        assert sample["question"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": problem["question"]},
        ]
        assert sample["answer"] == problem["answer"]
        # every column rides along unchanged, for the rewards
        assert sample["reward_model"] == {"style": "rule", "ground_truth": problem["answer"]}
        assert sample["extra_info"] == {"split": "train", "index": index}
        assert sample["data_source"] == "lab/tiny" and sample["ability"] == "math"


def test_a_dotted_key_walks_nested_values_after_a_column_of_that_name(tmp_path):
    path = write_jsonl(tmp_path / "dots.jsonl", [{"q": "1+1", "a.b": "2", "a": {"b": {"c": 4}}}])
    literal = load_split(str(path), "train", DataSection(question_key="q", answer_key="a.b"), 0, "data.train")
    nested = load_split(str(path), "train", DataSection(question_key="q", answer_key="a.b.c"), 0, "data.train")
    assert literal[0]["answer"] == "2"  # the column named "a.b" comes first
    assert nested[0]["answer"] == "4" and nested[0]["a"] == {"b": {"c": 4}}


def test_numbers_as_answers_are_their_plain_text(tmp_path):
    rows = [{"q": "a", "n": 42}, {"q": "b", "n": 42.0}, {"q": "c", "n": 0.5}, {"q": "d", "n": -3}]
    path = write_jsonl(tmp_path / "numbers.jsonl", rows)
    samples = load_split(str(path), "train", DataSection(question_key="q", answer_key="n"), 0, "data.train")
    assert [s["answer"] for s in samples] == ["42", "42", "0.5", "-3"]


@pytest.mark.parametrize(
    "rows, keys, message",
    [
        (  # row 2 lacks the nested key: the row, the full key and the missing part are named
            [
                {"prompt": "1+1", "reward_model": {"ground_truth": "2"}},
                {"prompt": "2+2", "reward_model": {"style": "rule"}},
            ],
            ("prompt", "reward_model.ground_truth"),
            r"^\S+data.jsonl:2: the answer key 'reward_model.ground_truth': 'reward_model' has no 'ground_truth' "
            r"\(it has 'style'\)$",
        ),
        (
            [{"prompt": "1+1", "reward_model": "2"}],
            ("prompt", "reward_model.ground_truth"),
            r"data.jsonl:1: the answer key 'reward_model.ground_truth': 'reward_model' holds a str \('2'\), not a "
            r"mapping with 'ground_truth'$",
        ),
        (
            [{"prompt": "1+1", "answer": "2"}, {"prompt": "1+2", "answer": "3"}, {"answer": "4"}],
            ("extra_info.question", "answer"),
            r"data.jsonl:1: missing column 'extra_info' of the question key 'extra_info.question' \(map yours with "
            r"data.question_key / data.answer_key; this row has 'prompt', 'answer'\)$",
        ),
        (  # a dict answer is refused, never stringified, with the nested key to use
            [{"prompt": "1+1", "reward_model": {"style": "rule", "ground_truth": "2"}}],
            ("prompt", "reward_model"),
            r"data.jsonl:1: the answer column 'reward_model' holds a dict \(keys 'style', 'ground_truth'\); "
            r"expected a string or a number; a dotted key reads a value inside it \(reward_model.<its key>\)$",
        ),
        (
            [{"prompt": "1+1", "answer": True}],
            ("prompt", "answer"),
            r"data.jsonl:1: the answer column 'answer' holds a bool \(True\); expected a string or a number",
        ),
        (
            [{"prompt": "1+1", "answer": "2"}, {"prompt": None, "answer": "2"}],
            ("prompt", "answer"),
            r"data.jsonl:2: the question column 'prompt' holds null; expected a string or a list of "
            r"\{role, content\} chat turns$",
        ),
        (
            [{"prompt": {"role": "user", "content": "1+1"}, "answer": "2"}],
            ("prompt", "answer"),
            r"data.jsonl:1: the question column 'prompt' holds a dict \(keys 'role', 'content'\)",
        ),
        (  # TRL's messages with the assistant's answer last: no prompt to answer
            [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}], "a": "2"}],
            ("messages", "a"),
            r"data.jsonl:1: the question column 'messages' holds chat turns, but the last turn is the 'assistant' "
            r"turn; a prompt ends with the user turn the model answers$",
        ),
        (
            [{"messages": [{"role": "user", "text": "1+1"}], "a": "2"}],
            ("messages", "a"),
            r"data.jsonl:1: the question column 'messages' holds chat turns, but turn 1 has no string 'content'",
        ),
    ],
)
def test_unsupported_values_are_one_line_errors_naming_the_row(tmp_path, rows, keys, message):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    question_key, answer_key = keys
    with pytest.raises(ConfigError, match=message) as caught:
        load_split(str(path), "train", DataSection(question_key=question_key, answer_key=answer_key), 0, "data.train")
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- save_to_disk


def test_save_to_disk_directories_of_either_kind(tmp_path):
    import datasets

    rows = [{"problem": f"{i} + {i}", "solution": str(2 * i)} for i in range(5)]
    keys = DataSection(question_key="problem", answer_key="solution")
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    # a single Dataset has no splits: it is used whole, whichever split is asked for
    assert [s["answer"] for s in load_split(f"hf:{single}", "heldout", keys, 0, "data.heldout")] == [
        "0",
        "2",
        "4",
        "6",
        "8",
    ]
    split = tmp_path / "split"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "validation": datasets.Dataset.from_list(rows[3:])}
    ).save_to_disk(str(split))
    assert [s["answer"] for s in load_split(f"hf:{split}", "train", keys, 0, "data.train")] == ["0", "2", "4"]
    with_validation = DataSection(question_key="problem", answer_key="solution", heldout_split="validation")
    assert [s["answer"] for s in load_split(f"hf:{split}", "heldout", with_validation, 0, "data.heldout")] == [
        "6",
        "8",
    ]
    with pytest.raises(
        ConfigError, match=r"^data.heldout: hf:\S+split has no split 'test'; its splits: train, validation$"
    ):
        load_split(f"hf:{split}", "heldout", keys, 0, "data.heldout")


# ---------------------------------------------------------------- prompts


def test_turns_go_through_the_chat_template_with_their_system_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "3+4*2"}]
    # the template fills the last user turn; the row's system turn wins over prompt.system_prompt
    prompt = PromptSection(system_prompt="Unused.", user_template="{question} Think for {budget} tokens.")
    ids = encode_sample(tokenizer, {"question": turns, "budget": 64}, prompt)
    filled = [turns[0], {"role": "user", "content": "3+4*2 Think for 64 tokens."}]
    assert ids == expected_prompt(tokenizer, filled)
    written_out = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n3+4*2 Think for 64 tokens.<|im_end|>\n"
    assert ids == tokenizer(written_out + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert turns[1]["content"] == "3+4*2"  # the sample's own turns are left alone
    # without a system turn of their own, prompt.system_prompt comes first
    user_only = [{"role": "user", "content": "3+4*2"}]
    assert encode_sample(tokenizer, {"question": user_only}, PromptSection(system_prompt="Be brief.")) == (
        expected_prompt(tokenizer, [{"role": "system", "content": "Be brief."}, *user_only])
    )
    with pytest.raises(TokenizerError, match=r"the data holds chat turns, which need the chat template of .*never"):
        encode_sample(tokenizer, {"question": turns}, PromptSection(chat_template="never"))


# ---------------------------------------------------------------- end to end


def train(tmp_path, name: str, *overrides: str) -> int:
    from efficient_rl.cli import main

    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("data.train=", "data.heldout="))]
    return main(
        [
            "train",
            str(RECIPES / "quickstart.yaml"),
            *tiny,
            "steps=2",
            "eval.before_training=false",
            "eval.after_training=false",
            "logging.completions_every=1",
            "logging.completions_samples=6",
            f"logging.output_dir={tmp_path / 'runs'}",
            f"logging.name={name}",
            *overrides,
        ]
    )


def completions(tmp_path, name: str) -> list[dict]:
    lines = (tmp_path / "runs" / name / "completions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_verl_parquet_trains_and_evaluates_with_two_keys(tmp_path, tiny_model_dir):
    from efficient_rl.cli import main

    problems = lab_problems(24)
    path = write_parquet(tmp_path / "verl.parquet", verl_rows(problems))
    keys = ["data.question_key=prompt", "data.answer_key=reward_model.ground_truth"]
    assert train(tmp_path, "verl", f"data.train={path}", f"data.heldout={path}", *keys) == 0

    tokenizer = load_tokenizer(tiny_model_dir)
    answers = {p["question"]: p["answer"] for p in problems}
    rows = completions(tmp_path, "verl")
    assert {row["step"] for row in rows} == {1, 2}
    for row in rows:
        system, user = row["question"]  # the turns as the data holds them
        assert system == {"role": "system", "content": SYSTEM} and user["role"] == "user"
        # the rollout's prompt ids are the chat template of those turns, the system turn included
        assert row["prompt"] == tokenizer.decode(expected_prompt(tokenizer, row["question"]))
        assert row["answer"] == answers[user["content"]]  # what the reward scored against

    out = tmp_path / "eval"
    flags = ["--question-key", "prompt", "--answer-key", "reward_model.ground_truth"]
    code = main(
        ["eval", "lab:tiny", "--data", str(path), *flags, "--budgets", "8", "--samples", "1"]
        + [
            "--problems",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    graded = result["runs"]["lab_tiny@8"]["graded"]
    assert [g["answer"] for g in graded] == [p["answer"] for p in problems[: len(graded)]]
    assert [g["question"][1]["content"] for g in graded] == [p["question"] for p in problems[: len(graded)]]
    generated = [json.loads(line) for line in (out / "generations" / "lab_tiny@8.jsonl").read_text().splitlines()]
    assert [g["question"] for g in generated] == [row["prompt"] for row in verl_rows(problems[:4])]
    assert f"system: {SYSTEM}" in (out / "report.md").read_text()


def test_a_messages_jsonl_with_system_turns_trains_and_evaluates_with_budgets(tmp_path, tiny_model_dir):
    from efficient_rl.eval.tradeoff import EvalSpec, ModelUnderTest, load_questions

    problems = lab_problems(24)
    path = write_jsonl(tmp_path / "chat.jsonl", messages_rows(problems))
    overrides = [
        f"data.train={path}",
        f"data.heldout={path}",
        "data.question_key=messages",
        "data.answer_key=solution",
        "prompt.user_template={question} (level {level})",
        "prompt.system_prompt=Never shown, every row has its own.",
    ]
    assert train(tmp_path, "chat", *overrides) == 0

    tokenizer = load_tokenizer(tiny_model_dir)
    by_question = {p["question"]: (index, p) for index, p in enumerate(problems)}
    for row in completions(tmp_path, "chat"):
        index, problem = by_question[row["question"][1]["content"]]
        filled = [
            {"role": "system", "content": f"Check each step ({index % 2})."},
            {"role": "user", "content": f"{problem['question']} (level {index % 3})"},
        ]
        assert row["prompt"] == tokenizer.decode(expected_prompt(tokenizer, filled))
        assert row["answer"] == problem["answer"]

    # the evaluation's budget reaches the last user turn; the row's system turn stays
    spec = EvalSpec(
        models=["lab:tiny"],
        data=str(path),
        question_key="messages",
        answer_key="solution",
        budgets=[8, 16],
        samples=1,
        problems=3,
        user_template="{question} Think for {budget} tokens.",
    )
    questions = load_questions(spec)
    model = ModelUnderTest("lab:tiny", tiny_model_dir, questions, spec)
    for budget in spec.budgets:
        for index, question in enumerate(questions):
            filled = [
                {"role": "system", "content": f"Check each step ({index % 2})."},
                {"role": "user", "content": f"{problems[index]['question']} Think for {budget} tokens."},
            ]
            assert list(model.prompts[budget].values())[index] == expected_prompt(tokenizer, filled)


def test_bad_chat_data_stops_a_run_in_one_line_before_anything_is_written(tmp_path, capsys):
    from efficient_rl.cli import main

    rows = verl_rows(lab_problems(4))
    del rows[2]["reward_model"]["ground_truth"]
    path = write_jsonl(tmp_path / "verl.jsonl", rows)
    keys = ["data.question_key=prompt", "data.answer_key=reward_model.ground_truth"]
    assert train(tmp_path, "bad", f"data.train={path}", f"data.heldout={path}", *keys) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"efficient-rl: error: {path}:3: the answer key 'reward_model.ground_truth': 'reward_model' has no "
        f"'ground_truth' (it has 'style')"
    ]
    assert not (tmp_path / "runs").exists()

    # a question column of another type, in an evaluation: nothing in --out
    out = tmp_path / "eval"
    flags = ["--question-key", "reward_model", "--answer-key", "extra_info.index", "--budgets", "8"]
    assert main(["eval", "lab:tiny", "--data", str(path), *flags, "--out", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"efficient-rl: error: {path}:1: the question column 'reward_model' holds a dict (keys 'style', "
        f"'ground_truth'); expected a string or a list of {{role, content}} chat turns"
    ]
    assert not out.exists()

    # chat turns with the chat template turned off
    chat = write_jsonl(tmp_path / "chat.jsonl", messages_rows(lab_problems(4)))
    overrides = ["data.question_key=messages", "data.answer_key=solution", "prompt.chat_template=never"]
    assert train(tmp_path, "never", f"data.train={chat}", f"data.heldout={chat}", *overrides) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("efficient-rl: error: model: the data holds chat turns, which need the chat template")
    assert error.endswith("but chat_template is never (map a plain-text question column instead)")
    assert not (tmp_path / "runs").exists()
