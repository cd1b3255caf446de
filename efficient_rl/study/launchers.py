"""How a study's runs are trained: LAUNCHERS maps the study's `launcher:` to one.

Each launcher can check its runs before anything is written (`check`), train the runs that are
not done (`train`: every run resumes from its checkpoint if it has one), and say whether a run it
launched earlier is still going (`active`, from the run's status record).
"""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from efficient_rl.errors import ConfigError
from efficient_rl.study.progress import finished, local_active, read_record, run_state, slurm_active, write_record
from efficient_rl.study.spec import LoadedStudy, PlannedRun

POLL_SECONDS = 2.0  # how often a study waiting on Slurm jobs asks for their state


def say(message: str) -> None:
    print(f"[study] {message}", flush=True)


class StopRequests:
    """While a study trains, a stop signal (Ctrl-C, kill) goes on to the run in training, which
    checkpoints after its step and exits, as `train` does (a second Ctrl-C stops it at once);
    no further run starts. With no run in training there is nothing to save: the study stops at
    once (KeyboardInterrupt). A local run has a session of its own, so a terminal's Ctrl-C reaches
    it once, through here."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []

    def __enter__(self) -> StopRequests:
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame) -> None:
        if self.child is None or self.child.poll() is not None:
            raise KeyboardInterrupt
        if not self.received:
            say(
                f"{signal.Signals(signum).name}: stopping the study: the run in training checkpoints after its "
                "step; `efficient-rl study run` again resumes the study (a second Ctrl-C stops the run at once)"
            )
        self.received.append(signum)
        self.child.send_signal(signum)


def last_error(log: Path) -> str:
    """The line a failed `train` ended with: its one-line error, else the log's last line."""
    lines = (
        [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    )
    errors = [line for line in lines if line.startswith("efficient-rl: error:")]
    return (errors or lines or ["no output"])[-1]


class LocalLauncher:
    """One run after another, each `efficient-rl train RECIPE OVERRIDES --resume-if-checkpoint` in a
    subprocess (a crash or a leak stays in its run), output to logs/<run>.log."""

    active = staticmethod(local_active)

    def check(self, loaded: LoadedStudy) -> None:
        for item in loaded.planned:
            record = read_record(loaded.directory, item.name)
            if record and self.active(record):
                raise ConfigError(
                    f"{item.where}: still in training (pid {record['pid']}, another `study run`?); "
                    "wait for it or stop it first"
                )

    def train(self, todo: list[PlannedRun], loaded: LoadedStudy, stops: StopRequests) -> None:
        for item in todo:
            if stops.received:
                return
            self.train_one(item, loaded.directory, stops)

    def train_one(self, item: PlannedRun, study_dir: Path, stops: StopRequests) -> None:
        log_path = study_dir / "logs" / f"{item.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "efficient_rl.cli",
            "train",
            str(item.recipe_path),
            *item.overrides,
            "--resume-if-checkpoint",
        ]
        started = time.time()
        say(f"{item.name}: training ({run_state(item, study_dir).state}); log: {log_path}")
        with open(log_path, "a") as log:
            log.write(f"=== study attempt {time.strftime('%Y-%m-%dT%H:%M:%S')}: {shlex.join(command)}\n")
            log.flush()
            stops.child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            record = {"launcher": "local", "pid": stops.child.pid, "host": socket.gethostname(), "log": str(log_path)}
            write_record(study_dir, item.name, record)
            code = stops.child.wait()
            stops.child = None
        outcome = {**record, "exit_code": code}
        if code != 0 and not stops.received:  # a run the study stopped is resumable, not failed
            outcome["error"] = f"train exited with status {code}: {last_error(log_path)}"
        write_record(study_dir, item.name, outcome)
        ended = "done" if code == 0 else outcome.get("error", f"stopped (status {code}); resumable")
        say(f"{item.name}: {ended} ({time.time() - started:.0f} s)")


class SlurmLauncher:
    """One Slurm job per run, through `efficient-rl submit`'s checks and job script (requeues and
    time-limit checkpoints included), with the study's `slurm:` options; all submitted at once,
    then waited for. A study stopped while it waits leaves its jobs running: `study run` again
    waits for them instead of submitting them twice."""

    active = staticmethod(slurm_active)

    @staticmethod
    def submission(item: PlannedRun, loaded: LoadedStudy):
        from efficient_rl.run.checkpoint import restart_mode
        from efficient_rl.slurm.submit import prepare_submission

        resume, overwrite = restart_mode(item.recipe)  # a half-trained run resumes from its checkpoint
        mode = "--resume" if resume else "--overwrite" if overwrite else ""
        try:
            return prepare_submission(item.recipe_path, item.overrides, loaded.study.slurm, mode, recipe=item.recipe)
        except ConfigError as err:
            raise ConfigError(f"{item.where}: slurm: {err}") from None

    def waiting(self, item: PlannedRun, loaded: LoadedStudy) -> bool:
        record = read_record(loaded.directory, item.name)
        return bool(record) and self.active(record) is not None

    def check(self, loaded: LoadedStudy) -> None:
        for item in loaded.planned:
            if not finished(item) and not self.waiting(item, loaded):
                self.submission(item, loaded)

    def train(self, todo: list[PlannedRun], loaded: LoadedStudy, stops: StopRequests) -> None:
        from efficient_rl.slurm.submit import submit

        for item in todo:
            if self.waiting(item, loaded):
                say(f"{item.name}: job {read_record(loaded.directory, item.name)['job_id']} still in Slurm; waiting")
                continue
            prepared = self.submission(item, loaded)
            job_id = submit(prepared.script, prepared.job_dir, prepared.record)
            log = prepared.job_dir / f"{job_id}.out"
            write_record(loaded.directory, item.name, {"launcher": "slurm", "job_id": job_id, "log": str(log)})
            say(f"{item.name}: submitted job {job_id}; log: {log}")
        try:
            self.wait_for(todo, loaded)
        except KeyboardInterrupt:
            say("stopped waiting; the jobs keep running, and `efficient-rl study run` again waits for them")
            raise

    def wait_for(self, todo: list[PlannedRun], loaded: LoadedStudy) -> None:
        from efficient_rl.slurm.jobs import ACTIVE_STATES, slurm_state

        waiting = {item.name: item for item in todo}
        while waiting:
            for name, item in list(waiting.items()):
                record = read_record(loaded.directory, name)
                state = slurm_state(record["job_id"])
                if state.get("JobState", "gone") in ACTIVE_STATES:
                    continue
                outcome = {**record, "outcome": state.get("JobState", "gone")}
                if not finished(item):
                    outcome["error"] = (
                        f"job {record['job_id']} ended {outcome['outcome']} (exit code "
                        f"{state.get('ExitCode', '?')}) before the run finished; log: {record['log']}"
                    )
                write_record(loaded.directory, name, outcome)
                say(f"{name}: {outcome.get('error', 'done')}")
                del waiting[name]
            if waiting:
                time.sleep(POLL_SECONDS)


LAUNCHERS = {"local": LocalLauncher(), "slurm": SlurmLauncher()}
