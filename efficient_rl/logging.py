"""Per-step metrics: metrics.jsonl, TensorBoard event files and a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys

from tqdm import tqdm

PROGRESS_KEYS = {"reward/mean": "reward", "acc/mean": "acc", "response_length/mean": "len"}


class MetricsLogger:
    def __init__(self, run, recipe, first_step: int):
        self.path = run.path / "metrics.jsonl"
        # A resumed run drops lines of steps after its checkpoint: each step is logged once.
        kept = [line for line in read_lines(self.path) if line_step(line) < first_step]
        rewrite(self.path, "".join(line + "\n" for line in kept))
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
    """The lines of metrics.jsonl that are a step's record. A line cut short (a kill mid-write,
    normally the last) is dropped with a one-line notice instead of stopping the resume."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()  # a cut can split a character too
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line_step(line) is None:
            where = "its last line" if number == len(lines) else f"line {number}"
            print(f"{path}: dropped {where}, not a whole step record (cut short by a kill?): {line[:60]!r}",
                  file=sys.stderr, flush=True)
            continue
        kept.append(line)
    return kept


def line_step(line: str) -> int | None:
    """The step of a metrics line, or None when the line is not a whole JSON record with one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def rewrite(path, text: str) -> None:
    """Replace the file whole: a kill mid-rewrite must not lose the steps already logged."""
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text(text)
    os.replace(staging, path)
