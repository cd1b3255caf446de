"""Peak RSS of the driver process during a short Ray run (cluster.backend: ray), by model size.

Each run is `efficient-rl train` in a subprocess of its own, one step, no evaluation; its peak
RSS (VmHWM of that process: the driver only, Ray's workers and actors are other processes)
is printed as it exits. `--tree DIR` runs the code and recipes of another checkout (e.g. a git
worktree of an earlier commit) for a before/after comparison.

    .venv/bin/python benchmarks/driver_memory.py [--tree /tmp/before]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RAY = [
    "cluster.backend=ray",
    "rollout.engine=vllm",
    "steps=1",
    "eval.before_training=false",
    "eval.after_training=false",
    "logging.progress=false",
    "checkpoint.every=0",
    "scoring.workers=0",
]
SMALL = ["rollout.prompts_per_step=2", "algorithm.sampling=all"]
RUNS = {  # name -> (recipe, overrides)
    "lab quickstart (0.6M parameters)": ("quickstart.yaml", ["rollout.prompts_per_step=4", "algorithm.sampling=all"]),
    "SmolLM2-135M": ("smollm2_dler_cpu.yaml", SMALL),
    # The builtin SmolLM2 is stored in float32, so a float32 load can map the file's pages without
    # touching them all. Released 1.5B-8B checkpoints are bf16: a float32 load converts every
    # weight into new memory. The same model saved in bf16 shows what such a load costs.
    "SmolLM2-135M stored in bf16": ("smollm2_dler_cpu.yaml", [*SMALL, "model.path={bf16_copy}"]),
}


# The peak is VmHWM, which starts afresh at exec. ru_maxrss would not do: Linux keeps it across
# execve, so it would count this script's own memory (the bf16 copy was made here) at the fork.
PEAK = (
    "import re, sys\nfrom pathlib import Path\nfrom efficient_rl.cli import main\ncode = main(sys.argv[1:])\n"
    "peak = re.search(r'VmHWM:\\s*(\\d+) kB', Path('/proc/self/status').read_text()).group(1)\n"
    "print('DRIVER_PEAK_RSS_KB', peak, flush=True)\nsys.exit(code)\n"
)


def save_bf16_copy(directory: Path) -> None:
    """The builtin SmolLM2 with its weights saved in bf16 (tokenizer, template and generation
    config copied as they are)."""
    from efficient_rl.models.modeling import load_model
    from efficient_rl.models.sources import model_directory

    source = model_directory("smollm2", "model")
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, directory / path.name)
    load_model(source, torch.bfloat16).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose code runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="erl-bf16-") as bf16_copy:
        save_bf16_copy(Path(bf16_copy))
        for name, (recipe, overrides) in RUNS.items():
            measure(name, recipes_of(args.tree) / recipe, [o.format(bf16_copy=bf16_copy) for o in overrides], args.tree)


def recipes_of(tree: Path) -> Path:
    """The checkout's recipe folder: inside the package, or at the top of a checkout from before it moved."""
    packaged = tree / "efficient_rl" / "recipes"
    return packaged if packaged.is_dir() else tree / "recipes"


def measure(name: str, recipe: Path, overrides: list[str], tree: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="erl-driver-") as out:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK,
                "train",
                str(recipe),
                *RAY,
                *overrides,
                f"logging.output_dir={out}",
                "--overwrite",
            ],
            cwd=tree,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
    peak = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("DRIVER_PEAK_RSS_KB")]
    if result.returncode != 0 or not peak:
        print(f"{name}: failed ({result.returncode}): {result.stderr[-800:]}")
        return
    print(f"{name}: driver peak RSS {int(peak[0]) / 2**20:.2f} GiB ({tree})", flush=True)


if __name__ == "__main__":
    main()
