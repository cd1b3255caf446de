"""The end of a training run: a before/after table and a plot of length and accuracy over steps."""

from __future__ import annotations

import json
from pathlib import Path


def before_after_table(summary: dict) -> str:
    rows = [("model", "held-out accuracy", "mean length", "p90 length")]
    for stage, label in (("warm_start", "warm start"), ("final", "final")):
        if stage in summary:
            s = summary[stage]
            rows.append(
                (
                    label,
                    f"{100 * s['accuracy']:.1f}%",
                    f"{s['mean_response_length']:.1f}",
                    f"{s['p90_response_length']:.1f}",
                )
            )
    if "warm_start" in summary and "final" in summary:
        before, after = summary["warm_start"], summary["final"]
        change = after["mean_response_length"] / max(before["mean_response_length"], 1e-9) - 1
        rows.append(
            ("change", f"{100 * (after['accuracy'] - before['accuracy']):+.1f} pts", f"{100 * change:+.1f}%", "")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_training_curves(metrics_path: Path, summary: dict, out_path: Path) -> None:
    """Training-rollout length and accuracy per step, with the held-out evaluations as markers."""
    import matplotlib  # here: importing it may start a font-cache process, which no bad recipe should

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [row["step"] for row in rows]
    during = [
        (row["step"], {"accuracy": row["eval/pass@1"], "mean_response_length": row["eval/length/mean"]})
        for row in rows
        if "eval/pass@1" in row
    ]
    heldout = (
        ([(0, summary["warm_start"])] if "warm_start" in summary else [])
        + during
        + ([(summary["steps_completed"], summary["final"])] if "final" in summary else [])
    )
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    panels = [
        (top, "response_length/mean", "mean_response_length", "mean response length (tokens)", "tab:blue"),
        (bottom, "acc/mean", "accuracy", "accuracy (fraction correct)", "tab:green"),
    ]
    for axis, metric, summary_key, label, color in panels:
        axis.plot(
            steps,
            [row[metric] for row in rows],
            color=color,
            marker="o",
            markersize=3,
            label="training rollouts (under the truncation cap)",
        )
        if heldout:
            axis.plot(
                [s for s, _ in heldout],
                [h[summary_key] for _, h in heldout],
                color="black",
                marker="D",
                linestyle="--",
                label="held-out evaluation (eval.every)",
            )
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("step")
    top.set_title("Length and accuracy over training")
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)


def write_report(run_path: Path, summary: dict, show=print) -> None:
    if "warm_start" in summary or "final" in summary:
        show("\nHeld-out split, before and after training:\n" + before_after_table(summary))
    metrics = run_path / "metrics.jsonl"
    if metrics.exists() and metrics.read_text().strip():
        plot = run_path / "training_curves.png"
        plot_training_curves(metrics, summary, plot)
        show(f"\nplot:    {plot}")
    show(f"summary: {run_path / 'summary.json'}\nmetrics: {metrics}")
