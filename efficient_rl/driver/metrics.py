"""Per-step records: metrics.jsonl, completions.jsonl, the experiment trackers and a progress bar."""

from __future__ import annotations

import json
import os
import random
import sys

from tqdm import tqdm

from efficient_rl.data.turns import question_text
from efficient_rl.driver.trackers import Trackers

PROGRESS_KEYS = {"reward/mean": "reward", "acc/mean": "acc", "response_length/mean": "len"}


class MetricsLogger:
    """Every step's metrics to metrics.jsonl and to the recipe's trackers (logging.trackers); on
    the steps logging.completions_every picks, sampled completions to completions.jsonl and to the
    trackers as a table. A context manager: leaving it closes the trackers, as failed on an error."""

    def __init__(self, run, plan, first_step: int):
        recipe = plan.recipe
        self.path = run.path / "metrics.jsonl"
        self.completions_path = run.path / "completions.jsonl"
        # A resumed run drops lines of steps after its checkpoint: each step is logged once.
        keep_steps_before(self.path, first_step)
        if self.completions_path.exists():
            keep_steps_before(self.completions_path, first_step)
        self.trackers = Trackers(run.path, plan, first_step)  # first: what they print at start precedes the bar
        self.progress = tqdm(
            total=recipe.steps,
            initial=first_step - 1,
            desc=recipe.logging.name,
            unit="step",
            disable=not recipe.logging.progress,
            dynamic_ncols=True,
        )

    def log(self, step: int, metrics: dict[str, float], completions: list[dict] = ()) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        if completions:
            with self.completions_path.open("a") as out:
                out.write("".join(json.dumps(row) + "\n" for row in completions))
        # a tracker's table holds text: chat turns as their "role: content" lines
        self.trackers.log(step, metrics, [{**row, "question": question_text(row["question"])} for row in completions])
        self.progress.set_postfix(
            {short: f"{metrics[key]:.3g}" for key, short in PROGRESS_KEYS.items() if key in metrics}
        )
        self.progress.update(1)

    def close(self, failed: bool = False) -> None:
        self.progress.close()
        self.trackers.close(failed)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


def completions_due(step: int, logging) -> bool:
    return bool(logging.completions_every) and step % logging.completions_every == 0


def completion_sample(batch, step: int, count: int, seed: int, tokenizer) -> list[dict]:
    """`count` rollouts of a step's generated batch (all its sampling rounds), picked by the seed
    and the step alone (a resumed run picks the same), one record each. A record holds the
    question and answer, so `efficient-rl reward check SPEC --data completions.jsonl` rescores it."""
    rows = sorted(random.Random(seed * 1_000_003 + step).sample(range(len(batch)), min(count, len(batch))))
    lengths, caps = batch.response_lengths.tolist(), batch.length_cap.tolist()
    records = []
    for row in rows:
        sample = batch.samples[row]
        records.append(
            {
                "step": step,
                "group": int(batch.group_ids[row]),
                "question": sample.get("question", ""),  # a string, or chat turns as the data gave them
                "prompt": tokenizer.decode(batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()),
                "completion": batch.completions[row],
                "answer": str(sample.get("answer", "")),
                "score": float(batch.scores[row]),
                "reward": float(batch.rewards[row]),  # after length shaping
                "correct": bool(batch.accuracy[row]) if batch.accuracy is not None else None,
                "length": lengths[row],
                "truncated": bool(batch.truncated[row]),  # stopped by the generation cap, not by EOS
                "length_cap": caps[row],  # the truncation length in force for the length penalty
            }
        )
    return records


def keep_steps_before(path, first_step: int) -> None:
    kept = [line for line in read_lines(path) if line_step(line) < first_step]
    rewrite(path, "".join(line + "\n" for line in kept))


def read_lines(path) -> list[str]:
    """The lines of metrics.jsonl (or completions.jsonl) that are a step's record. A line cut short (a kill mid-write,
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
            print(
                f"{path}: dropped {where}, not a whole step record (cut short by a kill?): {line[:60]!r}",
                file=sys.stderr,
                flush=True,
            )
            continue
        kept.append(line)
    return kept


def line_step(line: str) -> int | None:
    """The step of a record line, or None when the line is not a whole JSON record with one."""
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
