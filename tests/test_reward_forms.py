"""Rewards in the forms users bring (efficient_rl/scoring/forms.py): TRL's reward_funcs, plain and
conversational, verl's compute_score, a reward file importing a module beside it; each called
with the columns TRL and verl pass, in this process and in the spawned workers, and bad answers
refused at load in one line naming the entry and the form it was called in."""

import json
import textwrap
from pathlib import Path

import pytest

from conftest import RECIPES, run_cli
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.schema import RewardEntry
from efficient_rl.driver.loop import run_recipe
from efficient_rl.errors import ConfigError
from efficient_rl.scoring.runner import RewardRunner

# Reward files as users write them for TRL and verl, unchanged, plus a file importing its sibling.
USER_REWARDS = {
    "trl_rewards.py": '''
        def matches_solution(completions, solution, **kwargs):
            """TRL's plain form: completions are strings, columns come as lists."""
            return [float(s in c) for c, s in zip(completions, solution)]

        def names_its_columns(completions, prompts, solution, level):
            """No **kwargs: gets only the columns it names."""
            return [float(s in c) + 10 * n + len(p) / 1000 for c, p, s, n in zip(completions, prompts, solution, level)]

        def chat_turns(completions, prompts, **kwargs):
            """TRL's conversational form: a completion is [{"role": "assistant", "content": text}]."""
            return [
                float(c[0]["role"] == "assistant" and "42" in c[0]["content"]) + len(p) / 10
                for c, p in zip(completions, prompts)
            ]

        def scaled(completions, solution, scale=1.0, **kwargs):
            return [scale * float(s in c) for c, s in zip(completions, solution)]

        async def awaited(completions, solution, **kwargs):
            return [float(s in c) for c, s in zip(completions, solution)]

        def not_applicable(completions, **kwargs):
            return [None if "skip" in c else 1.0 for c in completions]

        def one_value(completions, **kwargs):
            return [1.0]

        def words(completions, **kwargs):
            return ["good" for c in completions]

        def needs_a_column(completions, difficulty, **kwargs):
            return [1.0 for c in completions]

        def needs_token_ids(completions, completion_ids, **kwargs):
            return [1.0 for c in completions]
        ''',
    "verl_rewards.py": '''
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            """verl's form: one completion, its row's data_source, ground truth and extra_info."""
            correct = float(ground_truth in solution_str)
            return {"score": correct + extra_info["bonus"], "from_lab": float(data_source == "lab")}
        ''',
    "helpers_beside.py": """
        def last_word(text):
            return text.split()[-1].strip(".")
        """,
    "sibling_reward.py": """
        from helpers_beside import last_word

        def last_word_is_answer(completion, sample):
            return float(last_word(completion) == sample["answer"])
        """,
}

SAMPLES = [
    {
        "id": f"row-{n}",
        "question": f"What is {n} x 7?",
        "answer": str(7 * n),
        "solution": str(7 * n),
        "level": n,
        "data_source": "lab",
        "extra_info": {"bonus": 0.25},
    }
    for n in (6, 3)
]
COMPLETIONS = ["So it is 42.", "It is 20."]  # the first right (6 x 7), the second wrong (3 x 7)


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory):
    """The user's reward files, in a directory of their own (not on the import path)."""
    directory = tmp_path_factory.mktemp("user_rewards")
    for name, text in USER_REWARDS.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def scores_of(entry: RewardEntry, samples: list[dict], completions: list[str], workers: int):
    runner = RewardRunner([entry], workers=workers, timeout=30.0)
    try:
        runner.check(samples[0])
        return runner.score(completions, samples)
    finally:
        runner.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_trl_rewards_get_completions_prompts_and_columns(rewards_dir, workers):
    plain = scores_of(
        RewardEntry(name=f"{rewards_dir}/trl_rewards.py:matches_solution", form="trl"), SAMPLES, COMPLETIONS, workers
    )
    assert plain.scores.tolist() == [1.0, 0.0] and plain.errors == 0
    named = scores_of(
        RewardEntry(name=f"{rewards_dir}/trl_rewards.py:names_its_columns", form="trl"), SAMPLES, COMPLETIONS, workers
    )
    assert named.errors == 0
    prompt_share = len(SAMPLES[0]["question"]) / 1000  # both questions have the same length
    assert named.scores.tolist() == pytest.approx([1 + 60 + prompt_share, 30 + prompt_share])


@pytest.mark.parametrize("workers", [0, 2])
def test_trl_conversational_rewards_get_chat_completions(rewards_dir, workers):
    turns = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": s["question"]}] for s in SAMPLES]
    chat = [{**sample, "question": question} for sample, question in zip(SAMPLES, turns)]
    result = scores_of(
        RewardEntry(name=f"{rewards_dir}/trl_rewards.py:chat_turns", form="trl"), chat, COMPLETIONS, workers
    )
    assert result.errors == 0
    assert result.scores.tolist() == pytest.approx([1.2, 0.2])  # the answer found, plus two turns / 10


@pytest.mark.parametrize("workers", [0, 2])
def test_verl_compute_score_gets_the_rows_ground_truth_and_extra_info(rewards_dir, workers):
    result = scores_of(
        RewardEntry(name=f"{rewards_dir}/verl_rewards.py:compute_score", form="verl"), SAMPLES, COMPLETIONS, workers
    )
    assert result.errors == 0
    assert result.scores.tolist() == [1.25, 0.25]
    assert result.extras["compute_score/from_lab"] == [1.0, 1.0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reward_file_imports_the_module_beside_it(rewards_dir, workers):
    result = scores_of(
        RewardEntry(name=f"{rewards_dir}/sibling_reward.py:last_word_is_answer"), SAMPLES, COMPLETIONS, workers
    )
    assert result.errors == 0 and result.scores.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_async_trl_reward_is_awaited(rewards_dir, workers):
    entry = RewardEntry(name=f"{rewards_dir}/trl_rewards.py:awaited", form="trl")
    result = scores_of(entry, SAMPLES, COMPLETIONS, workers)
    assert result.scores.tolist() == [1.0, 0.0] and result.errors == 0


def test_a_trl_entrys_params_come_as_keywords_and_may_not_shadow_a_column(rewards_dir):
    reference = f"{rewards_dir}/trl_rewards.py:scaled"
    assert scores_of(
        RewardEntry(name=reference, form="trl", params={"scale": 3.0}), SAMPLES, COMPLETIONS, 0
    ).scores.tolist() == [3.0, 0.0]
    with pytest.raises(
        ConfigError, match=r"^reward\[0\] \(.*\): the entry's params level are also columns of the data"
    ):
        scores_of(RewardEntry(name=reference, form="trl", params={"level": 3.0}), SAMPLES, COMPLETIONS, 0)


def test_a_none_from_a_trl_reward_adds_nothing_and_is_counted(rewards_dir):
    result = scores_of(
        RewardEntry(name=f"{rewards_dir}/trl_rewards.py:not_applicable", form="trl"), SAMPLES, ["skip it", "42"], 0
    )
    assert result.scores.tolist() == [0.0, 1.0] and result.skipped == 1 and result.errors == 0


@pytest.mark.parametrize(
    ("function", "form", "message"),
    [
        # Wrong number of values: the probe hands a batched form two completions.
        (
            "trl_rewards.py:one_value",
            "trl",
            r"called as TRL's fn\(completions, prompts=\.\.\., \*\*columns\).*"
            r"\(form: trl\), FormError: returned 1 values for 2 completions; .*"
            r"`form:` one of native, batched, trl, verl",
        ),
        ("trl_rewards.py:words", "trl", r"\(form: trl\), returned 'good'; expected a number"),
        # A TRL reward left in the native form: its list is refused, saying what to declare.
        (
            "trl_rewards.py:matches_solution",
            "native",
            r"\(form: native\), returned a list \(\[.*\]\) from a call with "
            r"one completion: for a batched or TRL reward declare `form: trl`",
        ),
        (
            "trl_rewards.py:needs_a_column",
            "trl",
            r"missing a required argument: 'difficulty' \(the data's columns: answer, ",
        ),
        ("trl_rewards.py:needs_token_ids", "trl", r"completion_ids.* come from TRL's trainer and are not passed here"),
        ("verl_rewards.py:compute_score", "native", r"declare `form: verl`"),
        ("verl_rewards.py:compute_score", "verll", r"unknown reward form 'verll' \(did you mean 'verl'\?\)"),
    ],
)
def test_a_reward_that_does_not_fit_its_form_is_refused_in_one_line(rewards_dir, function, form, message):
    entry = RewardEntry(name=f"{rewards_dir}/{function}", form=form)
    with pytest.raises(ConfigError) as refused:
        scores_of(entry, SAMPLES, COMPLETIONS, 0)
    text = str(refused.value)
    assert text.startswith(f"reward[0] ({entry.name}): ") and "\n" not in text
    assert __import__("re").search(message, text), text


MARKED_BATCHED = {  # TRL rewards given `batched = True`, as docs/rewards.md once advised
    "def f(completions, **kwargs):": r"too many positional arguments; its parameters look like the trl form: "
    r"declare `form: trl`",
    # This one binds the batched call and, on main, scored every row 0 without an error.
    "def f(completions, solution, **kwargs):": r"its parameter 'solution' would receive the sample dicts: "
    r"a TRL reward\? declare `form: trl`",
}


@pytest.mark.parametrize("header", MARKED_BATCHED)
def test_the_batched_attribute_on_a_trl_reward_is_refused_with_the_form_to_declare(tmp_path, header):
    (tmp_path / "marked.py").write_text(f"{header}\n    return [0.0] * len(completions)\nf.batched = True\n")
    with pytest.raises(ConfigError, match=MARKED_BATCHED[header]):
        RewardRunner([RewardEntry(name=f"{tmp_path}/marked.py:f")])


def reward_check(rewards_dir, tmp_path, reference: str, form: str):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({**sample, "completion": c}) + "\n" for sample, c in zip(SAMPLES, COMPLETIONS)))
    return run_cli("reward", "check", f"{rewards_dir}/{reference}", "--data", data, "--form", form, "--workers", "0")


def test_reward_check_takes_the_form_and_passes_when_no_row_fails(rewards_dir, tmp_path):
    checked = reward_check(rewards_dir, tmp_path, "verl_rewards.py:compute_score", "verl")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "score   mean 0.7500" in checked.stdout and "errors 0  timeouts 0" in checked.stdout


def test_reward_check_exits_1_with_the_count_when_rows_error(rewards_dir, tmp_path):
    (tmp_path / "half.py").write_text("def f(completion, sample):\n    return 1.0 if '42' in completion else 1 / 0\n")
    checked = reward_check(tmp_path, tmp_path, "half.py:f", "native")
    assert checked.returncode == 1, checked.stderr[-2000:]
    assert checked.stdout.strip().splitlines()[-1] == "FAILED: 1 of 2 samples errored or timed out"
    assert "ZeroDivisionError" in checked.stdout


# ---------------------------------------------------------------- end to end, on the tiny lab model
def arithmetic_rows(path):
    """A JSONL dataset with columns of its own names, verl's data_source and extra_info among them."""
    rows = [
        {
            "prompt_text": f"Compute {a} + {b}.",
            "target": str(a + b),
            "solution": str(a + b),
            "data_source": "arith",
            "extra_info": {"sum": str(a + b), "bonus": 0.25},
        }
        for a in range(1, 5)
        for b in range(1, 4)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


E2E_REWARDS = {
    "columns_helpers.py": """
        def same(left, right):
            return float(left == right)
        """,
    "trl_reward.py": '''
        from columns_helpers import same

        def columns_arrive(completions, prompts, solution, target, **kwargs):
            """1 when the row's own columns arrived as lists beside its prompt, plus 0.5 for a string completion."""
            return [
                same(s, t) * float(p.startswith("Compute")) + 0.5 * isinstance(c, str)
                for c, p, s, t in zip(completions, prompts, solution, target)
            ]
        ''',
    "verl_reward.py": '''
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            """1 when ground_truth is the mapped answer column (extra_info holds it too); logs the bonus."""
            right = data_source == "arith" and ground_truth == extra_info["sum"] and isinstance(solution_str, str)
            return {"score": float(right), "bonus": extra_info["bonus"]}
        ''',
}


def test_trl_and_verl_rewards_train_two_steps_and_their_scores_reach_the_metrics(tmp_path, tiny_overrides):
    data, rewards = tmp_path / "arith.jsonl", tmp_path / "user_rewards"
    arithmetic_rows(data)
    rewards.mkdir()
    for name, text in E2E_REWARDS.items():
        (rewards / name).write_text(textwrap.dedent(text))
    overrides = tiny_overrides + [
        f"data.train={data}",
        f"data.heldout={data}",
        "data.question_key=prompt_text",
        "data.answer_key=target",
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "logging.name=forms",
        f"reward=[{{name: '{rewards}/trl_reward.py:columns_arrive', form: trl}}, "
        f"{{name: '{rewards}/verl_reward.py:compute_score', form: verl, weight: 2.0}}]",
    ]
    run, summary = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert summary["steps_completed"] == 2
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["reward/errors"] == 0 and row["reward/timeouts"] == 0 and row["reward/skipped"] == 0
        # Every rollout: TRL's 1 + 0.5, and verl's 1 at weight 2: only if the columns reached both.
        assert row["score/mean"] == pytest.approx(3.5)
        assert row["reward/compute_score/bonus"] == pytest.approx(0.25)


def test_a_reward_returning_the_wrong_number_of_values_stops_train_in_one_line(tmp_path, tiny_overrides):
    (tmp_path / "short.py").write_text("def f(completions, **kwargs):\n    return [1.0]\n")
    overrides = tiny_overrides + ["logging.name=short", f"reward=[{{name: '{tmp_path}/short.py:f', form: trl}}]"]
    refused = run_cli("train", RECIPES / "quickstart.yaml", *overrides, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("efficient-rl: error: reward[0] (") and "returned 1 values for 2 completions" in line
    assert "form: trl" in line
    assert not (tmp_path / "runs").exists()  # nothing written


# ---------------------------------------------------------------- the seams with chat data and evaluation
def verl_parquet_rows(ground_truths: list) -> list[dict]:
    """verl's RL parquet layout, its ground truths as verl's preprocessing leaves them (a list of
    accepted answers, a number); extra_info.answer is the text the recipe maps as the answer."""
    return [
        {
            "data_source": "lab/tiny",
            "prompt": [{"role": "user", "content": f"Question {index}?"}],
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"index": index, "answer": "12"},
        }
        for index, truth in enumerate(ground_truths)
    ]


def test_verl_ground_truth_reaches_compute_score_as_the_row_holds_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from efficient_rl.config.schema import DataSection
    from efficient_rl.data.sources import load_split

    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(verl_parquet_rows([["12", "twelve"], ["13"]])), path)
    keys = DataSection(question_key="prompt", answer_key="extra_info.answer")
    samples = load_split(str(path), "train", keys, 0, "data.train")
    (tmp_path / "score.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    # 1 only for a list, which no text answer column could carry, holding the completion\n"
        "    return float(isinstance(ground_truth, list) and solution_str in ground_truth)\n"
    )
    entry = RewardEntry(name=f"{tmp_path}/score.py:compute_score", form="verl")
    result = scores_of(entry, samples, ["twelve", "twelve"], workers=0)
    assert result.errors == 0 and result.scores.tolist() == [1.0, 0.0]  # the second row's list lacks "twelve"


def test_verl_ground_truth_without_reward_model_is_the_mapped_answer():
    from efficient_rl.scoring.forms import verl_arguments

    function = lambda **kwargs: 0.0  # noqa: E731 (only its arguments are looked at)
    _, plain = verl_arguments(function, ["x"], [SAMPLES[0]], {})
    assert plain["ground_truth"] == SAMPLES[0]["answer"]
    numeric = {**SAMPLES[0], "reward_model": {"style": "rule", "ground_truth": 42}}
    assert verl_arguments(function, ["x"], [numeric], {})[1]["ground_truth"] == 42  # not "42": as verl passes it
    without_extra_info = {key: value for key, value in SAMPLES[0].items() if key != "extra_info"}
    assert verl_arguments(function, ["x"], [without_extra_info], {})[1]["extra_info"] == {}  # verl's default


@pytest.mark.parametrize("param", ["ground_truth", "data_source", "solution_str", "extra_info"])
def test_a_verl_param_named_like_the_calls_own_keyword_is_refused_at_load(rewards_dir, param):
    entry = RewardEntry(name=f"{rewards_dir}/verl_rewards.py:compute_score", form="verl", params={param: "x"})
    with pytest.raises(ConfigError) as refused:
        RewardRunner([entry])  # at load: before any sample or data is read
    assert str(refused.value) == (
        f"reward[0] ({entry.name}): the entry's params {param} are also verl's own arguments "
        "(data_source, solution_str, ground_truth, extra_info): rename them"
    )


def test_a_trl_param_named_like_the_calls_own_keyword_is_refused_at_load(rewards_dir):
    entry = RewardEntry(name=f"{rewards_dir}/trl_rewards.py:scaled", form="trl", params={"prompts": ["p"]})
    with pytest.raises(ConfigError, match=r"the entry's params prompts are also columns of the data or TRL's own"):
        RewardRunner([entry])


# The rows' own `question` column, and TRL's `prompt` (which TRL never passes as a column) mapped.
@pytest.mark.parametrize(("column", "flags"), [("question", []), ("prompt", ["--question-key", "prompt"])])
def test_reward_check_calls_a_trl_reward_conversationally_on_chat_turns(rewards_dir, tmp_path, column, flags):
    data = tmp_path / "chat.jsonl"
    rows = [
        {column: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": s["question"]}]}
        | {"completion": c}
        for s, c in zip(SAMPLES, COMPLETIONS)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reference = f"{rewards_dir}/trl_rewards.py:chat_turns"
    checked = run_cli("reward", "check", reference, "--data", data, "--form", "trl", "--workers", "0", *flags)
    assert checked.returncode == 0, checked.stderr[-2000:]
    # chat_turns: 1 for an assistant turn holding 42 (the first completion), plus two turns / 10
    assert "score   mean 0.7000" in checked.stdout and "errors 0  timeouts 0" in checked.stdout


CHAT_TRL_REWARD = '''
    def turns_arrive(completions, prompts, level, **kwargs):
        """1 for a completion as an assistant turn, 10 when the prompt's system turn holds "(1)",
        plus the row's level column: each term shows one piece arrived as TRL passes it."""
        scores = []
        for completion, prompt, row_level in zip(completions, prompts, level):
            turn = completion[0] if isinstance(completion, list) else {}
            chat = float(turn.get("role") == "assistant" and isinstance(turn.get("content"), str))
            system = prompt[0]["content"] if isinstance(prompt, list) and prompt[0]["role"] == "system" else ""
            scores.append(chat + 10 * float("(1)" in system) + row_level)
        return scores
    '''


def test_a_conversational_trl_reward_trains_two_steps_on_chat_turns(tmp_path, tiny_overrides):
    from efficient_rl.lab.presets import PRESETS
    from efficient_rl.lab.tasks import generate_problems

    problems = generate_problems(PRESETS["tiny"].task, "train", 4, 0)
    rows = [
        {
            "prompt": [
                {"role": "system", "content": f"Check each step ({index % 2})."},
                {"role": "user", "content": problem["question"]},
            ],
            "solution": problem["answer"],
            "level": index,
        }
        for index, problem in enumerate(problems)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "chat_reward.py").write_text(textwrap.dedent(CHAT_TRL_REWARD))
    overrides = tiny_overrides + [
        f"data.train={data}",
        f"data.heldout={data}",
        "data.question_key=prompt",
        "data.answer_key=solution",
        "rollout.prompts_per_step=4",  # the four rows: every step is one epoch, each row in it once
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "logging.name=chat-trl",
        f"reward=[{{name: '{tmp_path}/chat_reward.py:turns_arrive', form: trl}}]",
    ]
    run, summary = run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides))
    assert summary["steps_completed"] == 2
    # What every rollout of a row scores, from the data alone (each row: group_size rollouts a step).
    expected = sum(1 + 10 * ("(1)" in row["prompt"][0]["content"]) + row["level"] for row in rows) / len(rows)
    assert expected == 7.5
    logged = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for row in logged:
        assert row["reward/errors"] == 0 and row["reward/timeouts"] == 0 and row["reward/skipped"] == 0
        assert row["score/mean"] == pytest.approx(expected)


VERL_VERIFIER = '''
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        """Correct when the completion boxes the ground truth, or has an odd number of characters:
        a verdict the test recomputes from the saved generations."""
        boxed = "\\\\boxed{" + ground_truth + "}" in solution_str
        return {"score": 1.0, "accuracy": float(boxed or len(solution_str) % 2 == 1)}
    '''


def evaluate_with_verl_verifier(tmp_path, source: str) -> tuple[dict, list[dict], Path]:
    """lab:tiny evaluated (4 questions x 2 samples at 12 tokens) with the verl compute_score in
    `source` as the verifier: eval.json, the generated records, the output directory."""
    import efficient_rl

    (tmp_path / "verifier.py").write_text(textwrap.dedent(source))
    out = tmp_path / "eval"
    options = dict(data="lab:tiny", budgets=[12], samples=2, problems=4, reward=f"{tmp_path}/verifier.py:compute_score")
    saved = efficient_rl.evaluate("lab:tiny", out, reward_form="verl", **options)
    records = [json.loads(line) for line in (out / "generations" / "lab_tiny@12.jsonl").read_text().splitlines()]
    return saved, records, out


def test_eval_takes_a_verl_reward_as_its_verifier(tmp_path, tiny_model_dir):
    saved, records, out = evaluate_with_verl_verifier(tmp_path, VERL_VERIFIER)
    verdicts = [
        f"\\boxed{{{record['answer']}}}" in completion or len(completion) % 2 == 1
        for record in records
        for completion in record["completions"]
    ]
    assert len(verdicts) == 8 and 0 < sum(verdicts) < 8, verdicts  # both verdicts occur: the test can tell
    assert saved["runs"]["lab_tiny@12"]["pass@1"] == pytest.approx(sum(verdicts) / len(verdicts))
    assert saved["spec"]["reward_form"] == "verl" and "(form: verl)" in (out / "report.md").read_text()


def test_eval_refuses_an_unknown_reward_form_in_one_line(tmp_path, capsys):
    import efficient_rl
    from efficient_rl.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "lab:tiny", "--data", "lab:tiny", "--reward-form", "verll", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "efficient-rl: error: --reward-form: unknown reward form 'verll' (did you mean 'verl'?)"
    ]
    with pytest.raises(ConfigError, match=r"^--reward-form: unknown reward form 'TRL'; expected one of: batched, "):
        efficient_rl.evaluate("lab:tiny", out, data="lab:tiny", reward_form="TRL")
    assert not out.exists()


RAISING_VERIFIER = '''
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        """Scores a boxed answer; raises on an unboxed completion of odd length (a broken verifier)."""
        if "\\\\boxed{" in solution_str:
            return float("\\\\boxed{" + ground_truth + "}" in solution_str)
        if len(solution_str) % 2 == 1:
            raise ValueError("odd completion")
        return 0.0
    '''


def test_eval_counts_and_reports_the_samples_its_verifier_failed_on(tmp_path, tiny_model_dir):
    saved, records, out = evaluate_with_verl_verifier(tmp_path, RAISING_VERIFIER)
    raised = sum(
        "\\boxed{" not in completion and len(completion) % 2 == 1
        for record in records
        for completion in record["completions"]
    )
    assert raised > 0  # the tiny model's 12-token completions: some odd, none boxed
    failures = saved["runs"]["lab_tiny@12"]["reward_failures"]
    assert (failures["errors"], failures["timeouts"], failures["skipped"]) == (raised, 0, 0)
    assert "odd completion" in failures["messages"][0]
    assert f"the reward raised on {raised}, timed out on 0" in (out / "report.md").read_text()
