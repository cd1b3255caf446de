"""Checkpoint sizes by the model's own dtype (models/files.py): one model as released in float32
and as released in bf16, each trained one step by the torch learner and checkpointed.

The bf16 release is the float32 model cast to bf16 and saved (config.json `dtype: bfloat16`), as
a model published in bf16 comes. Printed per release: the model files (what eval, merge, the
engines and `export` read), the float32 masters kept beside them, the optimizer state, and the
whole checkpoint, in bytes as on disk.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/checkpoint_sizes.py lab:tiny smollm2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learner_precision import make_batch  # noqa: E402

from efficient_rl.learner.objective import ObjectiveSettings
from efficient_rl.learner.torch_learner import MASTER_WEIGHTS_FILE, OPTIMIZER_FILE, OptimSettings, TorchLearner
from efficient_rl.models.files import released_dtype
from efficient_rl.models.modeling import load_model
from efficient_rl.models.sources import model_directory

ROWS, PROMPT, RESPONSE = 4, 8, 8  # one small batch: the step only has to create the optimizer state


def bf16_release(model_dir: Path, out: Path) -> Path:
    load_model(model_dir).to(torch.bfloat16).save_pretrained(out)
    return out


def checkpoint_bytes(model_dir: Path, checkpoint: Path) -> dict[str, int]:
    """Train one step from `model_dir`, checkpoint to `checkpoint`, and measure its files."""
    learner = TorchLearner(
        load_model(model_dir), ObjectiveSettings(), OptimSettings(lr=1e-6), release_dtype=released_dtype(model_dir)
    )
    learner.update(make_batch(learner.model.config.vocab_size, ROWS, PROMPT, RESPONSE, shortest=RESPONSE))
    learner.save(checkpoint)
    masters = checkpoint / MASTER_WEIGHTS_FILE
    return {
        "model files": sum(p.stat().st_size for p in checkpoint.glob("model*.safetensors")),
        "float32 masters": masters.stat().st_size if masters.exists() else 0,
        "optimizer": (checkpoint / OPTIMIZER_FILE).stat().st_size,
        "checkpoint": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
    }


def megabytes(size: int) -> str:
    if size == 0:
        return "none"
    return f"{size / 1e6:.3f} MB" if size < 1e7 else f"{size / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model references (lab:tiny, a directory, a .gguf file, smollm2)")
    args = parser.parse_args()
    print("| model | released in | model files | float32 masters | optimizer | whole checkpoint |")
    print("|---|---|---|---|---|---|")
    for reference in args.models:
        model_dir = model_directory(reference, "model")
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            releases = {"float32": model_dir, "bfloat16": bf16_release(model_dir, scratch / "bf16-release")}
            for dtype, release in releases.items():
                assert released_dtype(release) == getattr(torch, dtype)
                sizes = checkpoint_bytes(release, scratch / f"checkpoint-{dtype}")
                print(f"| {reference} | {dtype} | " + " | ".join(megabytes(sizes[k]) for k in sizes) + " |")


if __name__ == "__main__":
    main()
