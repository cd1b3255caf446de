"""Per-step metrics: metrics.jsonl, TensorBoard event files and a progress bar."""

from __future__ import annotations

import json
import math

from tqdm import tqdm

PROGRESS_KEYS = {"reward/mean": "reward", "acc/mean": "acc", "response_length/mean": "len"}


class MetricsLogger:
    def __init__(self, run, recipe, first_step: int):
        self.path = run.path / "metrics.jsonl"
        # A resumed run drops lines of steps after its checkpoint: each step is logged once.
        kept = [line for line in read_lines(self.path) if json.loads(line)["step"] < first_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.path / "tensorboard"), purge_step=first_step)
        self.progress = tqdm(total=recipe.steps, initial=first_step - 1, desc=recipe.logging.name,
                             unit="step", disable=not recipe.logging.progress, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if not math.isnan(value):
                    self.writer.add_scalar(name, value, step)
        self.progress.set_postfix({short: f"{metrics[key]:.3g}" for key, short in PROGRESS_KEYS.items()
                                   if key in metrics})
        self.progress.update(1)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def read_lines(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
