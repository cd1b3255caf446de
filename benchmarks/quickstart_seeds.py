"""The quickstart's claim over seeds and fresh lab builds: shorter at the same accuracy.

For each seed s: an empty cache directory, a fresh build of the `quickstart` lab preset with its
seed set to s (a different initialisation and data order: a far larger change than the float
rounding that makes one machine's build differ from another's), then `efficient_rl/recipes/quickstart.yaml`
with `seed=s` on that model. Each run is a subprocess, one after the other. Reported per seed:
the build's warm-start check, held-out accuracy and mean length before and after DLER; then the
mean and range over seeds.

    .venv/bin/python benchmarks/quickstart_seeds.py [--seeds 0 1 2] [--out /tmp/erl/qs-seeds]

Run again with the same --out after an interruption, it reuses the builds that finished.

`--lab-seed 0` builds the shipped preset (seed 0) every time instead: what `make quickstart`
builds, so the seeds then vary only the RL run and the held-out draw.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["logging.progress=false", "--overwrite"]


def build(lab_seed: int, cache: Path) -> Path:
    """Build the quickstart preset with `lab_seed` in `cache`; returns the model directory.

    A finished build already in `cache` (an earlier, interrupted run of this script with the same
    --out) is used as it is: a build is complete once its lab.json is written."""
    finished = [model for model in cache.glob(f"quickstart-seed{lab_seed}-*") if (model / "lab.json").exists()]
    if finished:
        return finished[0]
    code = (
        "import dataclasses, sys; from pathlib import Path\n"
        "from efficient_rl.lab.build import build_lab\nfrom efficient_rl.lab.presets import PRESETS\n"
        f"preset = dataclasses.replace(PRESETS['quickstart'], seed={lab_seed})\n"
        f"target = Path({str(cache)!r}) / f'quickstart-seed{lab_seed}-{{preset.cache_key()}}'\n"
        "build_lab(preset, target)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "EFFICIENT_RL_CACHE": str(cache)})
    return next(cache.glob(f"quickstart-seed{lab_seed}-*"))


def run_seed(seed: int, lab_seed: int, out: Path) -> dict:
    cache = out / f"cache-{seed}"
    started = time.time()
    model = build(lab_seed, cache)
    built = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "efficient_rl.cli",
            "train",
            str(ROOT / "efficient_rl" / "recipes" / "quickstart.yaml"),
            f"seed={seed}",
            "model.lab=null",
            f"model.path={model}",
            f"logging.output_dir={out}",
            f"logging.name=seed-{seed}",
            *QUIET,
        ],
        check=True,
        env={**os.environ, "EFFICIENT_RL_CACHE": str(cache)},
    )
    summary = json.loads((out / f"seed-{seed}" / "summary.json").read_text())
    lab = json.loads((model / "lab.json").read_text())
    return {
        "seed": seed,
        "lab_seed": lab_seed,
        "check": lab.get("warm_start_check"),
        "build_seconds": round(built - started),
        "train_seconds": round(time.time() - built),
        "warm_start": summary["warm_start"],
        "final": summary["final"],
    }


def row_figures(row: dict) -> dict:
    before, after = row["warm_start"], row["final"]
    return {
        "warm_accuracy": 100 * before["accuracy"],
        "final_accuracy": 100 * after["accuracy"],
        "accuracy_change": 100 * (after["accuracy"] - before["accuracy"]),
        "warm_length": before["mean_response_length"],
        "final_length": after["mean_response_length"],
        "length_change": 100 * (after["mean_response_length"] / before["mean_response_length"] - 1),
    }


def report(rows: list[dict]) -> str:
    lines = [
        "| seed | lab seed | SFT steps | build check | warm-start acc | final acc | change | warm-start len "
        "| final len | change |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    figures = [row_figures(row) for row in rows]
    for row, f in zip(rows, figures):
        check = row["check"] or {}
        lines.append(
            f"| {row['seed']} | {row['lab_seed']} | {check.get('sft_steps', '?')} | "
            f"{100 * check.get('accuracy', float('nan')):.1f}% | {f['warm_accuracy']:.1f}% | "
            f"{f['final_accuracy']:.1f}% | {f['accuracy_change']:+.1f} pts | {f['warm_length']:.1f} | "
            f"{f['final_length']:.1f} | {f['length_change']:+.1f}% |"
        )
    for name, unit in (("accuracy_change", " pts"), ("length_change", "%"), ("final_accuracy", "%")):
        values = [f[name] for f in figures]
        lines.append(
            f"\n{name}: mean {sum(values) / len(values):+.1f}{unit}, range "
            f"{min(values):+.1f} .. {max(values):+.1f}{unit}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lab-seed", type=int, help="one lab build seed for every run (default: the run's seed)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/erl/quickstart-seeds"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, seed if args.lab_seed is None else args.lab_seed, args.out))
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    text = report(rows)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
