"""`efficient-rl jobs [--runs DIR] [--follow JOB]`: the submitted runs, their Slurm state, last
step and last metrics; --follow prints a job's log as it grows until the job ends.

Submissions are read from DIR/slurm/*/submissions.jsonl (written by `efficient-rl submit`); the
state comes from `scontrol show job`, which remembers a finished job for MinJobAge seconds.
Past that the state says "gone" and the run directory tells how far it got.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from efficient_rl.errors import ConfigError

ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}
SHOWN_METRICS = ("acc/mean", "response_length/mean", "eval/pass@1", "eval/length/mean")


def submissions(runs: Path) -> list[dict]:
    rows = []
    for path in sorted(runs.glob("slurm/*/submissions.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append({**json.loads(line), "job_dir": str(path.parent)})
    return rows


def slurm_state(job_id: str) -> dict[str, str]:
    """JobState, Restarts, RunTime, ... of a job the controller still knows; {} otherwise."""
    result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def run_progress(run_dir: Path) -> dict:
    """The last logged step, the recipe's step count and the last of each shown metric."""
    config = run_dir / "config.yaml"
    total = yaml.safe_load(config.read_text()).get("steps") if config.is_file() else None
    progress = {"step": 0, "steps": total, "metrics": {}}
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            progress["step"] = row.get("step", progress["step"])
            progress["metrics"].update({k: row[k] for k in SHOWN_METRICS if k in row})
    return progress


def job_line(submission: dict) -> str:
    state = slurm_state(submission["job_id"])
    if submission.get("placement_only"):  # a probe trains nothing: the run's own progress is not its
        progress, step = {"metrics": {}}, "placement"
    else:
        progress = run_progress(Path(submission["run_dir"]))
        step = f"{progress['step']}/{progress['steps'] if progress['steps'] is not None else '?'}"
    metrics = " ".join(f"{k}={v:.3g}" for k, v in progress["metrics"].items())
    return (
        f"{submission['job_id']:>8s}  {Path(submission['run_dir']).name:20s} "
        f"{state.get('JobState', 'gone'):11s} {state.get('Restarts', '-'):>8s} {step:>9s}  {metrics}"
    )


def follow(job_id: str, log: Path, poll_seconds: float = 1.0, out=sys.stdout) -> str:
    """Print the log as it grows until the job leaves the active states; returns the final state."""
    position = 0
    while True:
        state = slurm_state(job_id).get("JobState", "gone")
        if log.is_file():
            with open(log) as handle:
                handle.seek(position)
                out.write(handle.read())
                position = handle.tell()
            out.flush()
        if state not in ACTIVE_STATES:
            return state
        time.sleep(poll_seconds)


def cmd_jobs(args) -> int:
    runs = Path(args.runs)
    rows = submissions(runs)
    if args.follow:
        matching = [row for row in rows if row["job_id"] == args.follow]
        if not matching:
            raise ConfigError(f"--follow {args.follow}: no submission with that job id under {runs / 'slurm'}")
        state = follow(args.follow, Path(matching[-1]["job_dir"]) / f"{args.follow}.out")
        print(f"[efficient-rl] job {args.follow}: {state}")
        return 0
    if not rows:
        print(f"no submitted runs under {runs / 'slurm'}")
        return 0
    print(f"{'job':>8s}  {'run':20s} {'state':11s} {'restarts':>8s} {'step':>9s}  last metrics")
    for row in rows:
        print(job_line(row))
    return 0


def add_parser(commands) -> None:
    jobs = commands.add_parser("jobs", help="submitted Slurm runs: state, last step, last metrics; --follow a log")
    jobs.add_argument("--runs", default="runs", help="the output directory the runs were submitted with")
    jobs.add_argument("--follow", metavar="JOB", help="print this job's log as it grows, until the job ends")
    jobs.set_defaults(handler=cmd_jobs)
