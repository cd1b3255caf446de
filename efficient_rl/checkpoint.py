"""Run directories: resolved config, metrics, summary, and atomic Hugging Face checkpoints.

<output_dir>/
  .<name>.lock           held (flock) by the run's driver while it runs; names its pid and host
  <name>/
    config.yaml          the resolved recipe
    metrics.jsonl        one line per step
    tensorboard/         event files
    checkpoints/step-N/  model + tokenizer (save_pretrained), learner state, trainer_state.pt
    summary.json         warm-start and final held-out figures, wall time
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import shutil
import socket
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import yaml

from efficient_rl.config import ConfigError, Recipe

CHECKPOINT_PREFIX = "step-"
MAX_NAME_BYTES = 200  # a file name is at most 255 bytes; the lock and trash names add to it


def notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- run names

def check_run_name(name) -> None:
    """A run name is one ordinary path component: it can only ever name its own directory.

    An empty name, '.' or '..' would make the run directory the output directory or its parent
    (and --overwrite would delete every sibling run); '/' or an absolute path would leave it.
    Names starting with '.' are refused too: the run's lock and trash files are hidden names.
    """
    expected = "a directory name (not empty, not starting with '.', no '/')"
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ConfigError(f"logging.name: expected {expected}, got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"logging.name: expected at most {MAX_NAME_BYTES} bytes, got {len(name.encode())}")


def run_path(recipe: Recipe) -> Path:
    check_run_name(recipe.logging.name)
    return Path(recipe.logging.output_dir) / recipe.logging.name


def lock_path(path: Path) -> Path:
    """Beside the run directory, not in it: it must exist before --overwrite deletes the directory."""
    return path.parent / f".{path.name}.lock"


# ---------------------------------------------------------------- the run lock

@dataclasses.dataclass
class RunLock:
    """This process's hold on a run's lock file; RunDirs of the same run in one process share it
    (a notebook or test that resumes a run after a failure still holds the failed RunDir)."""

    path: Path
    key: str  # the resolved path, computed once: the registry's key
    fd: int
    owner_pid: int  # a forked child inherits the object, not the lock: it must not release it
    created_parent: bool  # the output directory was made for the lock: removed again if left empty
    users: int = 1


_HELD: dict[str, RunLock] = {}  # resolved lock path -> this process's hold


def acquire_run_lock(path: Path, run: Path) -> RunLock:
    """An exclusive flock on `path`, or a one-line ConfigError naming the process that holds it.

    The kernel drops a flock when its holder dies, however it dies: a lock file left by a killed
    run blocks nothing, and no pid has to be checked for liveness (nor could it, across hosts).
    """
    key = str(path.resolve())
    held = _HELD.get(key)
    if held is not None and held.owner_pid == os.getpid():
        held.users += 1
        return held
    created_parent = make_output_dir(path.parent)
    fd = open_and_lock(path, run)
    write_holder(fd)
    lock = RunLock(path=path, key=key, fd=fd, owner_pid=os.getpid(), created_parent=created_parent)
    _HELD[key] = lock
    return lock


def make_output_dir(directory: Path) -> bool:
    """Create the output directory if needed; True when this call created it."""
    if directory.is_dir():
        return False
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise ConfigError(f"logging.output_dir: {directory} exists and is not a directory") from None
        return False  # another run made it just now
    except OSError as err:
        raise ConfigError(f"logging.output_dir: cannot create {directory} ({err.strerror})") from None
    return True


def open_and_lock(path: Path, run: Path) -> int:
    for _ in range(20):
        try:
            # O_NOFOLLOW: a planted symlink must not redirect the holder's record onto another file.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # an empty output directory was just removed by a run giving up
            make_output_dir(path.parent)
            continue
        except OSError as err:
            raise ConfigError(f"{path}: cannot open the run's lock file ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise ConfigError(f"{run}: in use by {holder}; wait for it or stop it") from None
        except OSError as err:  # e.g. Lustre mounted without -o flock: training must still be possible
            notice(f"{path}: the file system does not support locks ({err.strerror}); "
                   "running without the run lock, so start this run only once")
            return fd
        if same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
    raise ConfigError(f"{path}: the run's lock file keeps being replaced; is another program removing it?")


def same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def write_holder(fd: int) -> None:
    """Who holds the lock, for the refusal a second run prints (the flock itself is the lock)."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, the refusal just cannot name the holder


def read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 65536, 0))
        return f"pid {record['pid']} on {record['host']} (started {record['started']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has locked but not yet written
        return "another process"


def release_run_lock(lock: RunLock) -> None:
    """Drop one user; the last removes the file, then unlocks (in that order: see open_and_lock)."""
    if lock.owner_pid != os.getpid():
        return
    lock.users -= 1
    if lock.users > 0:
        return
    _HELD.pop(lock.key, None)
    if same_file(lock.fd, lock.path):  # never remove a file some other process has put there
        lock.path.unlink(missing_ok=True)
    os.close(lock.fd)
    if lock.created_parent:
        try:
            lock.path.parent.rmdir()  # bad input writes nothing: not even an empty output directory
        except OSError:
            pass  # not empty: a run directory is in it


def forget_inherited_locks() -> None:
    """A forked child closes its copies of the lock fds: the parent keeps its locks, the child never unlocks them."""
    for lock in list(_HELD.values()):
        try:
            os.close(lock.fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=forget_inherited_locks)


# ---------------------------------------------------------------- which checkpoint

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
    path = run_path(recipe)
    if latest_checkpoint(path) is not None:
        return True, False
    return False, os.path.lexists(path)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


# ---------------------------------------------------------------- the run directory

class RunDir:
    """A run directory, held under the run lock from construction to close().

    The lock is the driver's: Ray learner actors write into a checkpoint's staging directory
    for it, and the driver alone renames it into place.
    """

    def __init__(self, recipe: Recipe, resume: bool = False, overwrite: bool = False):
        self.path = run_path(recipe)
        self.recipe = recipe
        self.resuming = resume
        self.overwrite = overwrite
        # Before any check reads the directory and long before create() may delete it.
        self._lock = acquire_run_lock(lock_path(self.path), self.path)
        self._release = weakref.finalize(self, release_run_lock, self._lock)
        try:
            self._check_mode()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run lock: idempotent; garbage collection and exit release it too."""
        self._release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_mode(self) -> None:
        if self.resuming:
            self._check_resumable()
        elif os.path.lexists(self.path):
            if not self.overwrite:
                raise ConfigError(f"{self.path}: run directory exists; pass --resume to continue it or "
                                  "--overwrite to replace it")
            check_replaceable(self.path)

    # ------------------------------------------------------------ creation
    def create(self) -> None:
        """Called only after every input has been validated, so bad input writes nothing."""
        if self.resuming:
            return
        if self.overwrite and os.path.lexists(self.path):
            self._remove_run_dir()
        self.path.mkdir(parents=True)
        (self.path / "config.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

    def _remove_run_dir(self) -> None:
        """Renamed aside, then deleted: a kill mid-delete leaves a hidden remainder, not half a run."""
        trash = self.path.parent / f".{self.path.name}.deleting"
        if os.path.lexists(trash):
            remove_tree(trash)  # what an overwrite killed mid-delete left
        os.rename(self.path, trash)
        remove_tree(trash)

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


def check_replaceable(path: Path) -> None:
    """--overwrite deletes a run directory and nothing else: not a link's target, not a file,
    not a directory that never was a run (no config.yaml; an empty one is a killed start)."""
    if path.is_symlink():
        raise ConfigError(f"{path}: is a symbolic link; --overwrite replaces only a run directory, "
                          "remove the link yourself")
    if not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a directory; --overwrite replaces only a run directory")
    if not (path / "config.yaml").is_file() and any(path.iterdir()):
        raise ConfigError(f"{path}: not a run directory (no config.yaml); --overwrite replaces only a run "
                          "directory, remove it yourself")
