"""Run directories: resolved config, metrics, summary, and atomic Hugging Face checkpoints.

runs/<name>/
  config.yaml          the resolved recipe
  metrics.jsonl        one line per step
  tensorboard/         event files
  checkpoints/step-N/  model + tokenizer (save_pretrained), learner state, trainer_state.pt
  summary.json         warm-start and final held-out figures, wall time
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from efficient_rl.config import ConfigError, Recipe

CHECKPOINT_PREFIX = "step-"


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (a crash mid-save leaves only a .tmp-)."""
    directory = run_path / "checkpoints"
    found = sorted(directory.glob(f"{CHECKPOINT_PREFIX}*")) if directory.is_dir() else []
    complete = [p for p in found if (p / "trainer_state.pt").exists()]
    return complete[-1] if complete else None


def restart_mode(recipe: Recipe) -> tuple[bool, bool]:
    """(resume, overwrite) for a run that may be a restart of itself (a requeued Slurm job):
    continue from the latest checkpoint if there is one; otherwise start over, replacing what
    an earlier attempt left before its first checkpoint."""
    path = Path(recipe.logging.output_dir) / recipe.logging.name
    if latest_checkpoint(path) is not None:
        return True, False
    return False, path.exists()


class RunDir:
    def __init__(self, recipe: Recipe, resume: bool = False, overwrite: bool = False):
        self.path = Path(recipe.logging.output_dir) / recipe.logging.name
        self.recipe = recipe
        self.resuming = resume
        if resume:
            self._check_resumable()
        elif self.path.exists() and not overwrite:
            raise ConfigError(f"{self.path}: run directory exists; pass --resume to continue it or --overwrite to replace it")
        self.overwrite = overwrite

    # ------------------------------------------------------------ creation
    def create(self) -> None:
        """Called only after every input has been validated, so bad input writes nothing."""
        if self.resuming:
            return
        if self.overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        (self.path / "config.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

    def _check_resumable(self) -> None:
        if self.latest_checkpoint() is None:
            raise ConfigError(f"{self.path}: nothing to resume (no checkpoint in {self.path / 'checkpoints'})")
        saved = yaml.safe_load((self.path / "config.yaml").read_text())
        current = self.recipe.to_dict()
        for section in current:
            if section != "steps" and saved.get(section) != current[section]:
                raise ConfigError(f"{self.path}: --resume with a different recipe ({section} differs from the run's config.yaml); only 'steps' may change")

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def save_checkpoint(self, step: int, setup, learner, stream, state: dict) -> Path:
        """Write to a temporary directory, then rename: a checkpoint is whole or absent."""
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"
        staging = self.checkpoints / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        learner.save(staging)
        setup.tokenizer.save_pretrained(staging)
        torch.save(
            {
                "state": state,
                "prompts_consumed": stream.consumed,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state()},
            },
            staging / "trainer_state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        self._prune()
        return final

    def _prune(self) -> None:
        keep = max(1, self.recipe.checkpoint.keep)
        for old in sorted(self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old)

    def restore(self, learner, stream) -> dict:
        """Optimizer, data position and RNG from the latest checkpoint (the model was loaded from it)."""
        checkpoint = self.latest_checkpoint()
        saved = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        learner.load_state(checkpoint)
        stream.consumed = saved["prompts_consumed"]
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        np.random.set_state(saved["rng"]["numpy"])
        return saved["state"]

    # ------------------------------------------------------------ results
    def write_summary(self, state: dict) -> dict:
        summary = {
            "run_dir": str(self.path),
            "steps_completed": state["step"],
            "wall_seconds": round(state.get("wall_seconds", 0.0), 1),
        }
        for stage in ("warm_start", "final"):
            if stage in state:
                figures = {
                    "accuracy": state[stage]["eval/pass@1"],
                    "mean_response_length": state[stage]["eval/length/mean"],
                    "p90_response_length": state[stage]["eval/length/p90"],
                    "truncated_ratio": state[stage]["eval/truncation_rate"],
                }
                summary[stage] = {name: round(value, 4) for name, value in figures.items()}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
