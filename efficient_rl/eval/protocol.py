"""The budget-sweep summary of an evaluation ("The Art of Efficient Reasoning", arXiv 2602.20945):
one number per model, the area under pass@1 against log2(budget), with a bootstrap interval over
questions; and, for `eval compare`, each model's difference from the first one with a paired
interval (the same resampled questions for both models).

A model's runs are its (model, budget) runs; `per_question` maps run -> question -> [(correct,
length)] as tradeoff.summarize keeps it. Pure Python: no torch, so a study report can read it.
"""

from __future__ import annotations

import math

from efficient_rl.eval.metrics import bootstrap_interval


def area_under_log_budget(budgets: list[int], accuracies: list[float]) -> float:
    """Trapezoids of pass@1 over log2(budget), divided by the log-range, so the area is a mean
    accuracy in [0, 1] whatever the budgets span: doubling the budget weighs the same at 2K as at
    16K, as in the paper's 2K-32K sweeps. One budget has no range: its pass@1 is the area."""
    points = sorted(zip(budgets, accuracies))
    if len(points) == 1:
        return points[0][1]
    area = sum(
        (math.log2(right) - math.log2(left)) * (low + high) / 2
        for (left, low), (right, high) in zip(points, points[1:])
    )
    return area / (math.log2(points[-1][0]) - math.log2(points[0][0]))


def runs_by_model(runs: dict[str, dict]) -> dict[str, dict[int, str]]:
    """model -> budget -> run name, in the order the runs were evaluated."""
    models: dict[str, dict[int, str]] = {}
    for name, run in runs.items():
        models.setdefault(run["model"], {})[run["budget"]] = name
    return models


def accuracy_rows(per_question: dict[str, dict], names: list[str], questions: list[str]) -> list[tuple[float, ...]]:
    """Per question, its pass@1 (fraction of its samples correct) in each of the runs `names`:
    the unit the bootstrap resamples, so every budget sees the same resampled questions."""
    return [
        tuple(sum(correct for correct, _ in per_question[name][q]) / len(per_question[name][q]) for name in names)
        for q in questions
    ]


def shared_questions(per_question: dict[str, dict], names: list[str]) -> list[str]:
    """The questions every one of the runs answered, in the first run's order."""
    first = per_question[names[0]]
    return [q for q in first if all(q in per_question[name] for name in names)]


def column_means(rows: list[tuple[float, ...]]) -> list[float]:
    return [sum(column) / len(rows) for column in zip(*rows)]


def model_summaries(runs: dict[str, dict], per_question: dict[str, dict]) -> dict[str, dict]:
    """Per model: its budgets (ascending), pass@1 at each, and the area under pass@1 against
    log2(budget) with a 95% percentile bootstrap interval over questions (seeded)."""
    summaries = {}
    for model, by_budget in runs_by_model(runs).items():
        budgets = sorted(by_budget)
        names = [by_budget[budget] for budget in budgets]
        rows = accuracy_rows(per_question, names, shared_questions(per_question, names))
        low, high = bootstrap_interval(rows, lambda sample: area_under_log_budget(budgets, column_means(sample)))
        summaries[model] = {
            "budgets": budgets,
            "pass@1": column_means(rows),
            "auc_log_budget": area_under_log_budget(budgets, column_means(rows)),
            "ci_low": low,
            "ci_high": high,
        }
    return summaries


def paired_difference(rows: list[tuple[float, ...]], statistic) -> dict[str, float]:
    """statistic(rows) with a paired bootstrap interval: `rows` hold both models' numbers per
    question, so a resample draws the same questions for both."""
    low, high = bootstrap_interval(rows, statistic)
    return {"difference": statistic(rows), "ci_low": low, "ci_high": high}


def differences_from_baseline(runs: dict[str, dict], per_question: dict[str, dict]) -> dict[str, dict]:
    """Each model against the first (the baseline), over the budgets both were evaluated at and the
    questions both answered: the difference in area under pass@1 against log2(budget), and in
    pass@1 at each shared budget, each with a paired 95% bootstrap interval. A model that shares
    no budget with the baseline has no entry."""
    models = runs_by_model(runs)
    baseline, *others = models
    differences = {}
    for model in others:
        budgets = sorted(set(models[model]) & set(models[baseline]))
        if not budgets:
            continue
        names = [models[model][b] for b in budgets] + [models[baseline][b] for b in budgets]
        rows = accuracy_rows(per_question, names, shared_questions(per_question, names))
        width = len(budgets)

        def auc_difference(sample, width=width, budgets=budgets):
            means = column_means(sample)
            return area_under_log_budget(budgets, means[:width]) - area_under_log_budget(budgets, means[width:])

        differences[model] = {
            "baseline": baseline,
            "budgets": budgets,
            "questions": len(rows),
            "auc_log_budget": paired_difference(rows, auc_difference),
            "pass@1": {  # keyed as eval.json keeps them: JSON object keys are text
                str(budget): paired_difference(
                    rows, lambda sample, i=i: column_means(sample)[i] - column_means(sample)[i + width]
                )
                for i, budget in enumerate(budgets)
            },
        }
    return differences


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def thinking_tokens(completion: str, length: int, count_tokens) -> int | None:
    """How many of a response's `length` tokens are its reasoning: up to and including the first
    </think> (the opening tag is often in the prompt, as the DeepSeek-R1 distills' chat template
    puts it there, so it is not required); all of them when <think> opens and the budget cut the
    response before it closed; None when the response has no think span. The span's text is
    tokenized again with the model's tokenizer (`count_tokens`): the cache keeps text, not ids.
    The tags are added tokens, at which a tokenizer splits text, so the prefix's count is the
    generated one whenever the model generated the tokenizer's own split of the text; capped at
    `length` in case it did not."""
    end = completion.find(THINK_CLOSE)
    if end >= 0:
        return min(length, count_tokens(completion[: end + len(THINK_CLOSE)]))
    return length if THINK_OPEN in completion else None


def thinking_summary(completions: list[str], lengths: list[int], count_tokens) -> dict[str, float] | None:
    """Mean reasoning and answer tokens over the responses with a think span; None when none has
    one (a model that does not think)."""
    split = [
        (thinking, length - thinking)
        for completion, length in zip(completions, lengths)
        if (thinking := thinking_tokens(completion, length, count_tokens)) is not None
    ]
    if not split:
        return None
    return {
        "responses": len(split),
        "thinking_length/mean": sum(thinking for thinking, _ in split) / len(split),
        "answer_length/mean": sum(answer for _, answer in split) / len(split),
    }
