"""A study's evaluation and report: every finished run's final (or every kept) checkpoint, and the
baselines, through `efficient-rl eval` with the study's settings into <study>/eval/ (its cache makes
a re-run cheap; a method with a prompt of its own into <study>/eval-<method>/), then one report over
them: the Pareto and oracle frontiers of every point, each method's mean and spread over seeds at
each budget, a table of every point, and the runs that failed or are not done."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from efficient_rl.run.checkpoint import finished_checkpoints, latest_checkpoint
from efficient_rl.study.progress import DONE, RunState
from efficient_rl.study.spec import LoadedStudy, PlannedRun, eval_spec


@dataclass(frozen=True)
class Evaluated:
    """What an evaluated model is in the study."""

    method: str
    seed: int | None  # None for a baseline
    step: int  # the checkpoint's training step (0 for a baseline)
    own_prompt: str | None = None  # the run's eval_user_template; None: the study's eval.user_template


def checkpoint_step(checkpoint: Path) -> int:
    return int(re.fullmatch(r"step-(\d+)", checkpoint.name).group(1))


# eval.checkpoints -> the checkpoints of a finished run that are evaluated
CHECKPOINT_CHOICES = {
    "final": lambda run_dir: [latest_checkpoint(run_dir)],
    "all": finished_checkpoints,
}


def models_to_evaluate(loaded: LoadedStudy, done: list[PlannedRun]) -> dict[str, Evaluated]:
    models = {baseline: Evaluated(baseline, None, 0) for baseline in loaded.study.eval.baselines}
    for item in done:
        own_prompt = loaded.study.runs[item.index].eval_user_template
        for checkpoint in CHECKPOINT_CHOICES[loaded.study.eval.checkpoints](item.run_dir):
            models[str(checkpoint)] = Evaluated(item.method, item.seed, checkpoint_step(checkpoint), own_prompt)
    return models


def evaluate(loaded: LoadedStudy, states: dict[str, RunState]) -> dict:
    """Evaluate the finished runs (and the baselines) and write the report; returns report.json's content."""
    from efficient_rl.eval.tradeoff import label

    done = [item for item in loaded.planned if states[item.name].state == DONE]
    models = models_to_evaluate(loaded, done)
    spec = eval_spec(loaded.study.eval, list(models))
    result = {"spec": spec.__dict__, "runs": {}, "pareto": [], "oracle_frontier": [(0.0, 0.0)]}
    if models:  # nothing finished and no baselines: a report of the runs' states alone
        result = evaluate_by_prompt(loaded, models)
    points = [
        point(label(reference, budget), evaluated, budget, result)
        for reference, evaluated in models.items()
        for budget in spec.budgets
    ]
    report = {
        "study": loaded.study.name,
        "eval": result["spec"],
        "runs": {
            item.name: {
                "method": item.method,
                "seed": item.seed,
                "state": states[item.name].state,
                "detail": states[item.name].detail,
                "run_dir": str(item.run_dir),
            }
            for item in loaded.planned
        },
        "methods": method_summaries(points),
        "sweeps": sweep_summaries(models, result.get("models", {})),
        "points": points,
        "pareto": result["pareto"],
        "oracle_frontier": result["oracle_frontier"],
    }
    write_report(report, loaded.directory)
    return report


def evaluate_by_prompt(loaded: LoadedStudy, models: dict[str, Evaluated]) -> dict:
    """One evaluation per prompt: the study's (and the baselines') into <study>/eval, each method
    with an eval_user_template of its own into <study>/eval-<method>; with several, their runs on
    one set of frontiers in <study>/eval."""
    from efficient_rl.eval.tradeoff import evaluate_models, summarize, write_outputs

    groups: dict[str | None, list[str]] = {}  # method with a prompt of its own (None: the study's) -> models
    for reference, evaluated in models.items():
        groups.setdefault(evaluated.method if evaluated.own_prompt else None, []).append(reference)
    results = []
    for method, references in groups.items():
        spec = eval_spec(loaded.study.eval, references)
        if method is not None:
            spec.user_template = models[references[0]].own_prompt
        out = loaded.directory / ("eval" if method is None else f"eval-{method}")
        results.append(evaluate_models(spec, out))
        write_outputs(results[-1], out)
    if len(results) == 1:
        return results[0]
    own_prompts = {models[refs[0]].method: models[refs[0]].own_prompt for method, refs in groups.items() if method}
    merged = summarize(
        {**eval_spec(loaded.study.eval, list(models)).__dict__, "run_user_templates": own_prompts},
        {name: run for result in results for name, run in result["runs"].items()},
        {name: rows for result in results for name, rows in result["per_question"].items()},
    )
    write_outputs(merged, loaded.directory / "eval")
    return merged


def point(name: str, evaluated: Evaluated, budget: int, result: dict) -> dict:
    run = result["runs"][name]
    return {
        "name": name,
        "method": evaluated.method,
        "seed": evaluated.seed,
        "step": evaluated.step,
        "budget": budget,
        "pass@1": run["pass@1"],
        "length/mean": run["length/mean"],
        "length_correct/mean": run["length_correct/mean"],  # NaN where none was correct
        "length_incorrect/mean": run["length_incorrect/mean"],
        "truncation_rate": run["truncation_rate"],
        "pareto": name in result["pareto"],
        "oracle_accuracy_gap": run["oracle"]["accuracy_gap"],
        "oracle_length_ratio": run["oracle"]["length_ratio"],
    }


def spread(values: list[float]) -> dict:
    """Mean and standard deviation over seeds (the deviation needs two of them)."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def spread_of_finite(values: list[float]) -> dict | None:
    """spread() over the seeds that have the value (a seed with no correct answer has no length of
    correct answers); None when none has it."""
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return spread(finite) if finite else None


def method_summaries(points: list[dict]) -> list[dict]:
    """Per method, checkpoint step and budget: the seeds' mean and spread."""
    groups: dict[tuple, list[dict]] = {}
    for item in points:
        groups.setdefault((item["method"], item["step"], item["budget"]), []).append(item)
    return [
        {
            "method": method,
            "step": step,
            "budget": budget,
            "seeds": len(members),
            "pass@1": spread([m["pass@1"] for m in members]),
            "length/mean": spread([m["length/mean"] for m in members]),
            "length_correct/mean": spread_of_finite([m["length_correct/mean"] for m in members]),
            "length_incorrect/mean": spread_of_finite([m["length_incorrect/mean"] for m in members]),
            "oracle_accuracy_gap": spread([m["oracle_accuracy_gap"] for m in members]),
            "on_pareto": sum(m["pareto"] for m in members),
        }
        for (method, step, budget), members in groups.items()
    ]


def sweep_summaries(models: dict[str, Evaluated], sweeps: dict[str, dict]) -> list[dict]:
    """Per method and checkpoint step: the seeds' mean and spread of the area under pass@1 against
    log2(budget) (the evaluation's `models` section, docs/evaluation.md)."""
    groups: dict[tuple, list[float]] = {}
    for reference, evaluated in models.items():
        if reference in sweeps:
            groups.setdefault((evaluated.method, evaluated.step), []).append(sweeps[reference]["auc_log_budget"])
    return [
        {"method": method, "step": step, "seeds": len(areas), "auc_log_budget": spread(areas)}
        for (method, step), areas in groups.items()
    ]


# ---------------------------------------------------------------- outputs
def write_report(report: dict, directory: Path) -> None:
    from efficient_rl.eval.tradeoff import json_safe

    (directory / "report.json").write_text(json.dumps(json_safe(report), indent=1))
    (directory / "report.md").write_text(report_markdown(report))
    plot_frontier(report, directory / "frontier.png")


def mean_sd(summary: dict | None, digits: int) -> str:
    if summary is None:
        return "-"
    sd = "" if summary["sd"] is None else f" ± {summary['sd']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}{sd}"


def sweeps_markdown(report: dict) -> list[str]:
    """Each method's one number over the budget sweep (a report from before it has none)."""
    if not report.get("sweeps"):
        return []
    lines = [
        "",
        "## Budget sweep per method (mean ± sd over seeds)",
        "",
        "Area under pass@1 against log2(budget) over the budgets above, divided by the log-range (a mean accuracy).",
        "",
        "| method | step | seeds | AUC over log budget |",
        "|---|---|---|---|",
    ]
    for row in report["sweeps"]:
        lines.append(f"| {row['method']} | {row['step']} | {row['seeds']} | {mean_sd(row['auc_log_budget'], 3)} |")
    return lines


def report_markdown(report: dict) -> str:
    spec = report["eval"]
    by_state: dict[str, list[str]] = {}
    for name, run in report["runs"].items():
        by_state.setdefault(run["state"], []).append(name)
    lines = [
        f"# Study {report['study']}",
        "",
        f"{len(report['runs'])} runs: "
        + ", ".join(f"{len(names)} {state}" for state, names in by_state.items())
        + f". Evaluation: {spec['data']}, {spec['problems']} questions, {spec['samples']} samples each at "
        f"temperature {spec['temperature']}, budgets {', '.join(map(str, spec['budgets']))} tokens.",
        "",
    ]
    unfinished = {name: run for name, run in report["runs"].items() if run["state"] != DONE}
    if unfinished:
        lines += ["Not in the report:", ""] + [
            f"- {name}: {run['state']}" + (f" ({run['detail']})" if run["detail"] else "")
            for name, run in unfinished.items()
        ]
        lines.append("")
    lines += [
        "## Per method (mean ± sd over seeds)",
        "",
        "| method | step | budget | seeds | pass@1 | mean length | correct: mean length | incorrect: mean length "
        "| oracle accuracy gap | on the Pareto frontier |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["methods"]:
        lines.append(
            f"| {row['method']} | {row['step']} | {row['budget']} | {row['seeds']} | {mean_sd(row['pass@1'], 3)} "
            f"| {mean_sd(row['length/mean'], 1)} | {mean_sd(row.get('length_correct/mean'), 1)} "
            f"| {mean_sd(row.get('length_incorrect/mean'), 1)} | {mean_sd(row['oracle_accuracy_gap'], 3)} "
            f"| {row['on_pareto']} of {row['seeds']} |"
        )
    lines += sweeps_markdown(report)
    lines += [
        "",
        "## Every evaluated checkpoint",
        "",
        "| run | method | seed | step | budget | pass@1 | mean length | truncated "
        "| vs oracle: accuracy gap, length x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for item in report["points"]:
        pareto = " (Pareto)" if item["pareto"] else ""
        seed = "-" if item["seed"] is None else item["seed"]
        lines.append(
            f"| {item['name']}{pareto} | {item['method']} | {seed} | {item['step']} | {item['budget']} "
            f"| {item['pass@1']:.3f} | {item['length/mean']:.1f} | {item['truncation_rate']:.3f} "
            f"| {item['oracle_accuracy_gap']:+.3f}, {item['oracle_length_ratio']:.2f}x |"
        )
    lines += [
        "",
        "`frontier.png`: every point (small), each method's mean over seeds with its sd (large), the Pareto "
        "frontier of all points and the oracle frontier (token complexity; docs/evaluation.md). "
        "`eval/report.html` has every metric of every point and graded completions.",
    ]
    return "\n".join(lines) + "\n"


def plot_frontier(report: dict, path: Path) -> None:
    """Every point and each method's mean over seeds, with the frontiers; beside it the same around
    the trained runs alone, which a far-off baseline would otherwise squeeze into a corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = report["points"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    budgets = sorted({p["budget"] for p in points})
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    style = {
        "colours": {m: palette[i % len(palette)] for i, m in enumerate(methods)},
        "markers": {b: "o^sDvP*X<>"[i % 10] for i, b in enumerate(budgets)},
    }
    figure, axes = plt.subplots(1, 2, figsize=(15, 6))
    draw_points(axes[0], report, points, style)
    axes[0].set_title(f"study {report['study']}: accuracy vs length (mean ± sd over seeds)")
    trained = [p for p in points if p["seed"] is not None] or points
    draw_points(axes[1], report, trained, style)
    lengths, accuracies = [p["length/mean"] for p in trained], [p["pass@1"] for p in trained]
    margin = 0.1 * (max(lengths) - min(lengths) + 1.0), 0.1 * (max(accuracies) - min(accuracies) + 0.05)
    axes[1].set_xlim(min(lengths) - margin[0], max(lengths) + margin[0])
    axes[1].set_ylim(min(accuracies) - margin[1], max(accuracies) + margin[1])
    axes[1].set_title("the trained runs only")
    handles = [Line2D([], [], color=style["colours"][m], marker="o", linestyle="none", label=m) for m in methods]
    handles += [
        Line2D([], [], color="gray", marker=style["markers"][b], linestyle="none", label=f"budget {b}") for b in budgets
    ]
    handles += [
        Line2D([], [], color="gray", linestyle="--", label="oracle frontier (token complexity)"),
        Line2D([], [], color="black", linewidth=0.8, label="Pareto frontier of all points"),
    ]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_points(axis, report: dict, points: list[dict], style: dict) -> None:
    """Each point small; each method's mean at each budget (and step) large, with its sd both ways."""
    right = 1.1 * max([p["length/mean"] for p in points] + [1.0])
    oracle = report["oracle_frontier"] + [(right, report["oracle_frontier"][-1][1])]  # flat past its reach
    axis.plot([p[0] for p in oracle], [p[1] for p in oracle], color="gray", linestyle="--")
    pareto = sorted((p for p in report["points"] if p["pareto"]), key=lambda p: p["length/mean"])
    axis.plot(
        [p["length/mean"] for p in pareto],
        [p["pass@1"] for p in pareto],
        color="black",
        linewidth=0.8,
        drawstyle="steps-post",
    )
    shown = {p["method"] for p in points}
    for row in report["methods"]:
        if row["method"] not in shown:
            continue
        colour, marker = style["colours"][row["method"]], style["markers"][row["budget"]]
        members = [
            p for p in points if (p["method"], p["step"], p["budget"]) == (row["method"], row["step"], row["budget"])
        ]
        axis.scatter(
            [p["length/mean"] for p in members],
            [p["pass@1"] for p in members],
            color=colour,
            marker=marker,
            s=14,
            alpha=0.45,
        )
        axis.errorbar(
            row["length/mean"]["mean"],
            row["pass@1"]["mean"],
            xerr=row["length/mean"]["sd"] or 0,
            yerr=row["pass@1"]["sd"] or 0,
            color=colour,
            marker=marker,
            markersize=8,
            capsize=3,
            linestyle="none",
        )
        if len({r["step"] for r in report["methods"] if r["method"] == row["method"]}) > 1:  # eval.checkpoints: all
            axis.annotate(
                f"step {row['step']}",
                (row["length/mean"]["mean"], row["pass@1"]["mean"]),
                fontsize=6,
                xytext=(4, 4),
                textcoords="offset points",
                color=colour,
            )
    axis.set_xlabel("mean response length (tokens)")
    axis.set_ylabel("pass@1")
    axis.set_ylim(-0.02, 1.05)
    axis.set_xlim(0, right if math.isfinite(right) else None)
