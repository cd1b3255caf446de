"""Where each run of a study stands, read from files: the run directory says whether it finished
(summary.json) or how far it got (checkpoints), status/<run>.json says how it was last launched
and how that ended, and the launcher says whether that launch is still going."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from efficient_rl.run.checkpoint import latest_checkpoint, what_is_left, write_atomically
from efficient_rl.study.spec import LoadedStudy, PlannedRun

DONE, TRAINING, QUEUED, FAILED, PARTIAL, PENDING = "done", "training", "queued", "failed", "partial", "pending"


@dataclass
class RunState:
    state: str  # one of the names above
    detail: str = ""  # a failure's reason, a checkpoint's step, a job id


def status_path(study_dir: Path, name: str) -> Path:
    return study_dir / "status" / f"{name}.json"


def read_record(study_dir: Path, name: str) -> dict:
    path = status_path(study_dir, name)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(study_dir: Path, name: str, record: dict) -> None:
    path = status_path(study_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({**record, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def finished(item: PlannedRun) -> bool:
    """The run's summary.json says it has nothing left to do (what `train` exits 0 for)."""
    path = item.run_dir / "summary.json"
    return path.is_file() and what_is_left(item.recipe, json.loads(path.read_text())) is None


def local_active(record: dict) -> str | None:
    """TRAINING while the `train` subprocess a local launch started still runs."""
    if "exit_code" in record or record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return None  # the study that ran it was killed, and the run with it
    except PermissionError:
        pass
    return TRAINING


def slurm_active(record: dict) -> str | None:
    """QUEUED or TRAINING while the Slurm job a launch submitted is pending or running."""
    from efficient_rl.slurm.jobs import ACTIVE_STATES, slurm_state

    if "outcome" in record:
        return None
    state = slurm_state(record["job_id"]).get("JobState", "gone")
    return QUEUED if state == "PENDING" else TRAINING if state in ACTIVE_STATES else None


# launcher name (the study's `launcher:`) -> whether a launch it recorded is still going
LAUNCH_ACTIVITY = {"local": local_active, "slurm": slurm_active}


def run_state(item: PlannedRun, study_dir: Path) -> RunState:
    if finished(item):
        return RunState(DONE)
    record = read_record(study_dir, item.name)
    if record:
        active = LAUNCH_ACTIVITY[record["launcher"]](record)
        if active:
            return RunState(active, record.get("job_id", f"pid {record.get('pid')}"))
        if record.get("error"):
            return RunState(FAILED, record["error"])
    checkpoint = latest_checkpoint(item.run_dir)
    if checkpoint is not None:
        return RunState(PARTIAL, f"checkpoint {checkpoint.name}; `study run` resumes it")
    return RunState(PENDING)


def states(loaded: LoadedStudy) -> dict[str, RunState]:
    return {item.name: run_state(item, loaded.directory) for item in loaded.planned}


def status_table(loaded: LoadedStudy) -> str:
    from efficient_rl.slurm.jobs import run_progress

    lines = [
        f"study {loaded.study.name} ({loaded.directory}): {len(loaded.planned)} runs, launcher {loaded.study.launcher}",
        f"{'run':28s} {'method':20s} {'seed':>4s}  {'state':9s} {'step':>9s}  detail",
    ]
    counts: dict[str, int] = {}
    for item in loaded.planned:
        state = run_state(item, loaded.directory)
        counts[state.state] = counts.get(state.state, 0) + 1
        progress = run_progress(item.run_dir)
        step = f"{progress['step']}/{item.recipe.steps}"
        lines.append(f"{item.name:28s} {item.method:20s} {item.seed:>4d}  {state.state:9s} {step:>9s}  {state.detail}")
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    report = loaded.directory / "report.md"
    if report.is_file():
        lines.append(f"report: {report}")
    return "\n".join(lines)
