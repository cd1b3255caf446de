"""The quickstart in float32 and in bf16, over seeds: held-out accuracy and length after training.

bf16 is learner.precision=bf16 (autocast on float32 master weights) with model.dtype=bfloat16
(the transformers engine generates under bf16 autocast). Each run is a subprocess, one after the
other, on the cached lab model (built on first use). Prints one line per run and the means.

    .venv/bin/python benchmarks/quickstart_precision.py [--seeds 0 1 2] [--out /tmp/erl/qs-precision]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = {"float32": [], "bf16": ["learner.precision=bf16", "model.dtype=bfloat16"]}


def run(seed: int, precision: str, out: Path) -> dict:
    name = f"qs-{precision}-seed{seed}"
    started = time.time()
    subprocess.run([sys.executable, "-m", "efficient_rl.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
                    f"seed={seed}", f"logging.output_dir={out}", f"logging.name={name}", "logging.progress=false",
                    "--overwrite", *PRECISIONS[precision]], check=True, capture_output=True)
    summary = json.loads((out / name / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    diffs = sorted(step["rollout/logprob_diff"] for step in steps)
    return {"seed": seed, "precision": precision, "wall": time.time() - started,
            "before": summary["warm_start"], "after": summary["final"], "logprob_diff": diffs[len(diffs) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/erl/qs-precision"))
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        for precision in PRECISIONS:
            result = run(seed, precision, args.out)
            results.append(result)
            print(f"seed {seed} {precision:8s} accuracy {result['before']['accuracy']:.3f} -> "
                  f"{result['after']['accuracy']:.3f}, mean length {result['before']['mean_response_length']:.1f} -> "
                  f"{result['after']['mean_response_length']:.1f}, median logprob_diff {result['logprob_diff']:.2e}, "
                  f"{result['wall']:.0f} s", flush=True)
    for precision in PRECISIONS:
        mine = [r for r in results if r["precision"] == precision]
        accuracy = [r["after"]["accuracy"] for r in mine]
        length = [r["after"]["mean_response_length"] for r in mine]
        print(f"{precision:8s} after: accuracy mean {sum(accuracy) / len(mine):.4f} (range {min(accuracy):.3f}-"
              f"{max(accuracy):.3f}), length mean {sum(length) / len(mine):.1f} (range {min(length):.1f}-{max(length):.1f})")


if __name__ == "__main__":
    main()
