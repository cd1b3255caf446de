"""The budget-sweep protocol: area under pass@1 against log2(budget) per model, bootstrap intervals,
paired differences in `eval compare`, and the split length table; hand-built evaluations, no model."""

import json
import subprocess
import sys

import pytest

from efficient_rl.eval.metrics import Sample, evaluation_metrics
from efficient_rl.eval.protocol import area_under_log_budget, differences_from_baseline, model_summaries
from efficient_rl.eval.tradeoff import (
    compare,
    report_html,
    report_markdown,
    thinking_markdown,
    thinking_of,
    write_outputs,
)


def test_the_area_is_trapezoids_over_log2_budget_divided_by_the_log_range():
    # log2 4, 8, 16 = 2, 3, 4: (0.2 + 0.6) / 2 * 1 + (0.6 + 0.8) / 2 * 1 = 1.1 over a range of 2.
    assert area_under_log_budget([4, 8, 16], [0.2, 0.6, 0.8]) == pytest.approx(0.55)
    assert area_under_log_budget([16, 4, 8], [0.8, 0.2, 0.6]) == pytest.approx(0.55)  # any order
    # Uneven steps: log2 2, 8, 16 = 1, 3, 4: (0 + 0.5) / 2 * 2 + (0.5 + 1) / 2 * 1 = 1.25 over 3.
    assert area_under_log_budget([2, 8, 16], [0.0, 0.5, 1.0]) == pytest.approx(1.25 / 3)
    assert area_under_log_budget([32], [0.7]) == 0.7  # one budget: its pass@1
    assert area_under_log_budget([8, 64], [0.4, 0.4]) == pytest.approx(0.4)  # flat: the accuracy


def table(rows):
    """{budget: [[correct per sample] per question]} -> the per-question record summarize keeps."""
    return {budget: {f"q{i}": [(bool(c), 5) for c in samples] for i, samples in enumerate(qs)} for budget, qs in rows}


def runs_of(model, by_budget):
    runs, per_question = {}, {}
    for budget, questions in by_budget.items():
        name = f"{model}@{budget}"
        runs[name] = {"model": model, "budget": budget}
        per_question[name] = questions
    return runs, per_question


def test_a_models_area_and_its_interval_from_a_hand_made_sweep():
    # 4 questions x 2 samples. pass@1: @4 (1 + 0 + 0 + 0.5) / 4 = 0.375, @8 (1 + 1 + 0 + 0.5) / 4
    # = 0.625, @16 (1 + 1 + 0.5 + 1) / 4 = 0.875; area (0.375 + 0.625) / 2 + (0.625 + 0.875) / 2
    # = 1.25, over a log-range of 2: 0.625.
    sweep = table(
        [
            (16, [[1, 1], [1, 1], [1, 0], [1, 1]]),
            (4, [[1, 1], [0, 0], [0, 0], [0, 1]]),
            (8, [[1, 1], [1, 1], [0, 0], [1, 0]]),
        ]
    )
    summary = model_summaries(*runs_of("m", sweep))["m"]
    assert summary["budgets"] == [4, 8, 16]
    assert summary["pass@1"] == pytest.approx([0.375, 0.625, 0.875])
    assert summary["auc_log_budget"] == pytest.approx(0.625)
    assert summary["ci_low"] < 0.625 < summary["ci_high"]
    assert 0 <= summary["ci_low"] and summary["ci_high"] <= 1
    assert model_summaries(*runs_of("m", sweep))["m"] == summary  # seeded: eval.json is reproducible

    # Every question alike: no resample can move the area, so the interval is the point.
    alike = table([(4, [[1, 0]] * 5), (16, [[1, 1]] * 5)])
    alike_summary = model_summaries(*runs_of("m", alike))["m"]
    assert alike_summary["auc_log_budget"] == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert alike_summary["ci_low"] == alike_summary["ci_high"] == pytest.approx(0.75)


def test_differences_from_the_baseline_are_paired_over_shared_budgets_and_questions():
    # The baseline's questions are spread (0, 0.5, 1 correct): alone its interval is wide. The other
    # model is 0.5 better on every question at 8 and equal at 4, so every paired resample gives the
    # same difference: pass@1 +0 at 4, +0.5 at 8, and an area of (0 + 0.5) / 2 = +0.25.
    base = table([(4, [[0, 0], [1, 0], [1, 1], [0, 0]]), (8, [[0, 0], [1, 0], [0, 0], [1, 0]])])
    better = table([(4, [[0, 0], [1, 0], [1, 1], [0, 0]]), (8, [[1, 0], [1, 1], [1, 0], [1, 1]]), (32, [[1, 1]] * 4)])
    runs, per_question = runs_of("base", base)
    other_runs, other_questions = runs_of("better", better)
    differences = differences_from_baseline({**runs, **other_runs}, {**per_question, **other_questions})
    assert set(differences) == {"better"}
    difference = differences["better"]
    assert difference["baseline"] == "base" and difference["budgets"] == [4, 8] and difference["questions"] == 4
    assert difference["auc_log_budget"] == pytest.approx({"difference": 0.25, "ci_low": 0.25, "ci_high": 0.25})
    assert difference["pass@1"]["4"] == pytest.approx({"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0})
    assert difference["pass@1"]["8"] == pytest.approx({"difference": 0.5, "ci_low": 0.5, "ci_high": 0.5})
    alone = model_summaries(runs, per_question)["base"]
    assert alone["ci_high"] - alone["ci_low"] > 0.2  # unpaired, the same questions spread widely


def samples(correct, lengths):
    return [Sample("1" if c else "2", bool(c), n) for c, n in zip(correct, lengths)]


def write_evaluation(directory, model, sweep):
    """An eval.json as `efficient-rl eval` writes it, from {budget: [(correct..., lengths...)]}."""
    runs, per_question = {}, {}
    for budget, questions in sweep.items():
        scored = [samples(correct, lengths) for correct, lengths in questions]
        name = f"{model}@{budget}"
        runs[name] = {
            "model": model,
            "budget": budget,
            "samples": 2,
            **evaluation_metrics(scored),
            "graded": [],
            "lengths": {
                kind: [s.length for q in scored for s in q if s.correct == want]
                for kind, want in (("correct", True), ("incorrect", False))
            },
        }
        per_question[name] = {f"q{i}": [(s.correct, s.length) for s in q] for i, q in enumerate(scored)}
    spec = {"data": "lab:tiny", "problems": 3, "samples": 2, "temperature": 0.6, "top_p": 0.95, "reward": "math"}
    directory.mkdir()
    saved = {"spec": spec, "runs": runs, "per_question": per_question}
    (directory / "eval.json").write_text(json.dumps(saved))
    return directory


def test_eval_compare_writes_the_areas_the_differences_and_the_split_lengths(tmp_path):
    # Baseline: @4 pass@1 (0 + 0.5 + 0) / 3 = 1/6, @16 (1 + 0.5 + 0.5) / 3 = 2/3: area (1/6 + 2/3) / 2
    # = 5/12. Trained: @4 (1 + 1 + 0) / 3 = 2/3, @16 the same: area 2/3. Difference +1/4; at 4
    # +1/2, at 16 +0. Lengths of the trained model @4: correct 3, 5, 7, 9 (mean 6, p50 6, p90 9),
    # incorrect 20, 30 (mean 25, p50 25, p90 30).
    base = write_evaluation(
        tmp_path / "base",
        "lab:warm",
        {
            4: [((0, 0), (4, 4)), ((1, 0), (2, 4)), ((0, 0), (4, 4))],
            16: [((1, 1), (8, 9)), ((0, 1), (16, 6)), ((1, 0), (5, 16))],
        },
    )
    trained = write_evaluation(
        tmp_path / "trained",
        "run/step-50",
        {
            4: [((1, 1), (3, 5)), ((1, 1), (7, 9)), ((0, 0), (20, 30))],
            16: [((1, 1), (3, 5)), ((1, 1), (7, 9)), ((0, 0), (20, 30))],
        },
    )
    result = compare([base, trained])
    assert result["models"]["lab:warm"]["auc_log_budget"] == pytest.approx(5 / 12)
    assert result["models"]["run/step-50"]["auc_log_budget"] == pytest.approx(2 / 3)
    difference = result["differences"]["run/step-50"]
    assert difference["auc_log_budget"]["difference"] == pytest.approx(1 / 4)
    assert difference["pass@1"]["4"]["difference"] == pytest.approx(1 / 2)
    assert difference["pass@1"]["16"]["difference"] == pytest.approx(0)
    assert difference["auc_log_budget"]["ci_low"] <= 1 / 4 <= difference["auc_log_budget"]["ci_high"]

    report = report_markdown(result)
    assert "| lab:warm | 0.417 (" in report and "| 4 16 | 0.167 0.667 |" in report
    assert "## Differences from lab:warm" in report and "| run/step-50 | 3 | +0.250 (" in report
    assert "| run/step-50@4 | 4 | 6.0 | 6.0 | 9.0 | 2 | 25.0 | 25.0 | 30.0 |" in report
    write_outputs(result, tmp_path / "out")
    assert report_html(result, tmp_path / "out").count("<tr>") == 5  # the runs' table only
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["models"]["run/step-50"]["budgets"] == [4, 16]
    assert saved["differences"]["run/step-50"]["pass@1"]["4"]["difference"] == pytest.approx(1 / 2)


def test_a_model_in_two_compared_evaluations_makes_two_sweeps(tmp_path):
    first = write_evaluation(tmp_path / "a", "lab:warm", {4: [((1, 0), (3, 4))] * 3})
    second = write_evaluation(tmp_path / "b", "lab:warm", {4: [((1, 1), (3, 4))] * 3})
    result = compare([first, second])
    assert set(result["models"]) == {"a/lab:warm", "b/lab:warm"}
    assert result["differences"]["b/lab:warm"]["pass@1"]["4"]["difference"] == pytest.approx(0.5)


@pytest.mark.parametrize("budgets", [["8", "0"], ["-4"]])
def test_a_sweep_with_a_non_positive_budget_is_one_line_exit_2_and_writes_nothing(tmp_path, budgets):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "efficient_rl.cli", "eval", "lab:tiny", "--budgets", *budgets, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.count("\n") == 1 and "--budgets[" in result.stderr and "expected an integer >= 1" in result.stderr
    )
    assert not out.exists() and result.stdout == ""


def word_tokenizer():
    """One token per word or punctuation run, and <think> / </think> as added tokens: counts a
    reader can do by hand."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "a", "b", "c", "d", "e", "x", "y", "the", "answer", "is", "4", "7", "plain"]
    inner = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def test_thinking_and_answer_tokens_are_counted_apart_with_the_models_tokenizer():
    tokenizer = word_tokenizer()
    completions = [
        "<think> a b c</think> the answer is 4",  # 9 tokens: 5 thinking (both tags), 4 answer
        "x y</think> 7",  # the prompt opened the span: 3 thinking, 1 answer
        "<think> a b c d e",  # cut at the budget while thinking: all 6 thinking
        "plain answer 4",  # no span: not counted
    ]
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in completions]
    assert lengths == [9, 4, 6, 3]
    records = [
        {"completions": completions[:2], "lengths": lengths[:2]},
        {"completions": completions[2:], "lengths": lengths[2:]},
    ]
    split = thinking_of(records, tokenizer)
    assert split == pytest.approx({"responses": 3, "thinking_length/mean": 14 / 3, "answer_length/mean": 5 / 3})
    assert thinking_of([{"completions": ["plain answer 4"], "lengths": [3]}], tokenizer) is None

    runs = {"m@8": {"thinking": split}, "n@8": {}}
    lines = thinking_markdown({"runs": runs})
    assert "| m@8 | 3 | 4.7 | 1.7 |" in lines and not any(line.startswith("| n@8") for line in lines)
    assert thinking_markdown({"runs": {"n@8": {}}}) == []  # a model that does not think: no section


def test_a_study_reports_each_methods_sweep_area_over_seeds():
    from efficient_rl.study.report import Evaluated, sweep_summaries, sweeps_markdown

    models = {
        "lab:warm": Evaluated("lab:warm", None, 0),
        "runs/dler-s0/checkpoints/step-00000004": Evaluated("dler", 0, 4),
        "runs/dler-s1/checkpoints/step-00000004": Evaluated("dler", 1, 4),
        "runs/grpo-s0/checkpoints/step-00000004": Evaluated("grpo", 0, 4),  # not evaluated: no row
    }
    sweeps = {
        "lab:warm": {"auc_log_budget": 0.5},
        "runs/dler-s0/checkpoints/step-00000004": {"auc_log_budget": 0.6},
        "runs/dler-s1/checkpoints/step-00000004": {"auc_log_budget": 0.8},
    }
    rows = {(row["method"], row["step"]): row for row in sweep_summaries(models, sweeps)}
    assert set(rows) == {("lab:warm", 0), ("dler", 4)}
    dler = rows[("dler", 4)]
    # mean (0.6 + 0.8) / 2 = 0.7; sample sd sqrt((0.1^2 + 0.1^2) / 1) = 0.1414
    assert dler["seeds"] == 2 and dler["auc_log_budget"]["mean"] == pytest.approx(0.7)
    assert dler["auc_log_budget"]["sd"] == pytest.approx(0.02**0.5)
    assert rows[("lab:warm", 0)]["auc_log_budget"]["sd"] is None  # one seed: no deviation
    lines = sweeps_markdown({"sweeps": list(rows.values())})
    assert "| dler | 4 | 2 | 0.700 ± 0.141 |" in lines and "| lab:warm | 0 | 1 | 0.500 |" in lines
    assert sweeps_markdown({"sweeps": []}) == []


def test_a_study_reports_each_methods_lengths_of_correct_and_incorrect_answers_over_seeds():
    from efficient_rl.study.report import method_summaries

    def point(seed, correct, incorrect):
        return {
            "method": "dler",
            "step": 4,
            "budget": 48,
            "pass@1": 0.5,
            "length/mean": 20.0,
            "pareto": False,
            "oracle_accuracy_gap": 0.1,
            "length_correct/mean": correct,
            "length_incorrect/mean": incorrect,
        }

    # seed 2 answered nothing right: it has no length of correct answers, and is left out of that mean
    (row,) = method_summaries([point(0, 10.0, 30.0), point(1, 14.0, 40.0), point(2, float("nan"), 44.0)])
    assert row["length_correct/mean"]["mean"] == pytest.approx(12.0)  # (10 + 14) / 2
    assert row["length_correct/mean"]["sd"] == pytest.approx(8**0.5)  # sqrt((2^2 + 2^2) / 1)
    assert row["length_incorrect/mean"]["mean"] == pytest.approx(38.0)  # (30 + 40 + 44) / 3
    (none_right,) = method_summaries([point(0, float("nan"), 30.0)])
    assert none_right["length_correct/mean"] is None
