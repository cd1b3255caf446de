"""Run directories: resolved config, metrics, summary, and atomic Hugging Face checkpoints.

<output_dir>/
  .<name>.lock           held (flock) by the run's driver while it runs; names its pid and host
  <name>/
    config.yaml          the resolved recipe
    metrics.jsonl        one line per step
    completions.jsonl    sampled rollouts of every logging.completions_every-th step, one line each
    trackers.json        each experiment tracker's run id and last step (a resume continues them)
    tensorboard/         event files (the tensorboard tracker); wandb/: the wandb tracker's files
    checkpoints/step-N/  model + tokenizer (save_pretrained, the model in its own dtype), learner
                         state (float32: optimizer.pt, master_weights/ where the model's dtype
                         rounds the weights, adapter/, deepspeed/), trainer_state.pt,
                         in_flight.pt (an overlapped pipeline's batches generated but not yet
                         trained), checkpoint_manifest.json (every file's size, written last)
    summary.json         warm-start and final held-out figures, wall time
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import re
import shutil
import socket
import struct
import sys
import time
import weakref
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml

from efficient_rl.config.loading import build, refuse_retired_keys
from efficient_rl.config.schema import Recipe
from efficient_rl.errors import ConfigError, one_line

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d+")
STAGING_PREFIX = ".tmp-"
MANIFEST_FILE = "checkpoint_manifest.json"
TRAINER_STATE_FILE = "trainer_state.pt"
IN_FLIGHT_FILE = "in_flight.pt"  # only when there are such batches
RECIPE_FILE = "config.yaml"  # what makes a directory a run directory: the resolved recipe
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
            notice(
                f"{path}: the file system does not support locks ({err.strerror}); "
                "running without the run lock, so start this run only once"
            )
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
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
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


# ---------------------------------------------------------------- checkpoint validation


@dataclasses.dataclass(frozen=True)
class Problem:
    file: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def checkpoint_problem(checkpoint: Path) -> Problem | None:
    """Why `checkpoint` cannot be resumed from, naming the first bad file; None when it can.

    Cheap at any model size: sizes against the manifest, safetensors headers against the file
    sizes, and torch.load(mmap=True) of the .pt files, which reads the zip directory and the
    pickles (optimizer and RNG structure) without reading tensor data. A file cut short loses the
    zip directory at its end, so truncation is always caught; flipped bits inside tensor data are
    not (that needs a full read of every byte, as large as the checkpoint).
    """
    manifest, problem = read_manifest(checkpoint)
    if problem is not None:
        return problem
    problem = missing_required(checkpoint)
    if problem is not None:
        return problem
    names = (
        sorted(manifest)
        if manifest is not None
        else [str(p.relative_to(checkpoint)) for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    )
    for name in names:
        problem = file_problem(checkpoint / name, manifest.get(name) if manifest is not None else None)
        if problem is not None:
            return problem
    return None


def read_manifest(checkpoint: Path) -> tuple[dict[str, int] | None, Problem | None]:
    """The manifest's {relative path: size}; (None, None) for a checkpoint written before manifests."""
    path = checkpoint / MANIFEST_FILE
    if not path.exists():
        return None, None
    try:
        files = json.loads(path.read_text())["files"]
        return {str(name): int(size) for name, size in files.items()}, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, Problem(path, f"unreadable manifest ({one_line(err, 200)})")


def missing_required(checkpoint: Path) -> Problem | None:
    """What every checkpoint needs: trainer state, model config and weights, tokenizer, learner state."""
    for name in (TRAINER_STATE_FILE, "config.json", "tokenizer_config.json"):
        if not (checkpoint / name).is_file():
            return Problem(checkpoint / name, "missing")
    if not (checkpoint / "model.safetensors").is_file() and not (checkpoint / "model.safetensors.index.json").is_file():
        return Problem(checkpoint / "model.safetensors", "missing (and no model.safetensors.index.json)")
    if not (checkpoint / "optimizer.pt").is_file() and not (checkpoint / "deepspeed").is_dir():
        return Problem(checkpoint / "optimizer.pt", "missing (the torch learner's state; nor a deepspeed/ state)")
    return None


def file_problem(path: Path, expected_size: int | None) -> Problem | None:
    try:
        size = path.stat().st_size
    except OSError as err:
        return Problem(path, "missing" if isinstance(err, FileNotFoundError) else err.strerror)
    if expected_size is not None and size != expected_size:
        return Problem(path, f"{size} bytes, {expected_size} were written (cut short or changed since)")
    if path.name.endswith(".safetensors"):
        return safetensors_problem(path, size)
    if path.suffix == ".pt":
        return torch_file_problem(path)
    if path.suffix == ".json":
        return json_problem(path)
    return None


def safetensors_problem(path: Path, size: int) -> Problem | None:
    """The 8-byte header length, the JSON header, and the end of the last tensor = the file's size."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            header_length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if header_length is None or not 0 < header_length <= size - 8:
                return Problem(path, f"not a safetensors file: no header in its {size} bytes")
            header = json.loads(f.read(header_length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return Problem(path, f"unreadable safetensors header ({one_line(err, 200)})")
    expected = 8 + header_length + max(ends, default=0)
    if expected != size:
        return Problem(path, f"{size} bytes, its header describes {expected}")
    return None


def torch_file_problem(path: Path) -> Problem | None:
    try:
        # Zip-format files (every torch.save since 1.6) are mapped, not read: cheap for big states.
        torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # any unpickling or zip error means the file cannot be resumed from
        return Problem(path, f"torch.load fails ({one_line(err, 200)})")
    return None


def json_problem(path: Path) -> Problem | None:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return Problem(path, f"not valid JSON ({one_line(err, 200)})")
    return None


# ---------------------------------------------------------------- which checkpoint


def finished_checkpoints(path: Path) -> list[Path]:
    """Every renamed (so fully written, then maybe damaged) checkpoint, oldest first."""
    directory = path / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir())


def latest_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint a resume can use (a crash mid-save leaves only a .tmp-; a damaged one is skipped)."""
    for checkpoint in reversed(finished_checkpoints(path)):
        if checkpoint_problem(checkpoint) is None:
            return checkpoint
    return None


def resume_checkpoint(path: Path, notify=notice) -> Path:
    """The checkpoint to resume from, decided once: the newest usable one, with a one-line notice
    for each newer one skipped; a one-line ConfigError naming the bad files when none is usable."""
    found = finished_checkpoints(path)
    if not found:
        raise ConfigError(f"{path}: nothing to resume (no checkpoint in {path / 'checkpoints'})")
    problems = []
    for checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for skipped in problems:
                notify(
                    f"{skipped}; resuming from the earlier {checkpoint.name} instead "
                    "(the damaged checkpoint is removed, its steps run again)"
                )
            return checkpoint
        problems.append(problem)
    raise ConfigError(
        f"{path}: no checkpoint can be resumed: {'; '.join(map(str, problems))}; start the run over with --overwrite"
    )


def restart_mode(recipe: Recipe) -> tuple[bool, bool]:
    """(resume, overwrite) for a run that may be a restart of itself (a requeued Slurm job):
    continue from the latest checkpoint if there is one; otherwise start over, replacing what
    an earlier attempt left before its first checkpoint.

    Any finished checkpoint means resume, even a damaged one: the resume then falls back to an
    earlier checkpoint or stops with the damaged file's name, where overwriting would destroy it.
    """
    path = run_path(recipe)
    if finished_checkpoints(path):
        return True, False
    return False, os.path.lexists(path)


# ---------------------------------------------------------------- writing


def file_modes() -> tuple[int, int]:
    """(file, directory) modes for everything a checkpoint holds: what the umask gives new files,
    like the rest of the run directory (some writers use 0o600 temporary files, others not)."""
    mask = current_umask()
    return 0o666 & ~mask, 0o777 & ~mask


def current_umask() -> int:
    try:  # Linux reports it without changing it; os.umask must set it to read it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def seal_checkpoint(staging: Path) -> None:
    """Before the rename: one mode for every file (whichever process wrote it: learner actors
    too), each file on disk, and the manifest of sizes that resume checks the files against."""
    file_mode, dir_mode = file_modes()
    entries = [p for p in sorted(staging.rglob("*")) if not p.is_symlink()]
    sizes = {}
    for path in (p for p in entries if p.is_file()):
        os.chmod(path, file_mode)
        fsync_path(path)
        sizes[str(path.relative_to(staging))] = path.stat().st_size
    manifest = staging / MANIFEST_FILE
    manifest.write_text(json.dumps({"files": sizes}, indent=1))
    os.chmod(manifest, file_mode)
    fsync_path(manifest)
    for directory in [staging, *(p for p in entries if p.is_dir())]:
        os.chmod(directory, dir_mode)
        fsync_path(directory)  # the names in it


def fsync_path(path: Path) -> None:
    """A rename is durable only after the data it publishes: otherwise a power loss can leave
    a renamed checkpoint of empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Whole or the previous version: a kill mid-write never leaves half a file."""
    staging = path.with_name(f"{STAGING_PREFIX}{path.name}")
    staging.write_text(text)
    os.replace(staging, path)


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
        self.resume_from: Path | None = None  # the checkpoint a resume restores, decided once here
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
        enclosing = enclosing_run(self.path)
        if enclosing is not None:
            raise ConfigError(
                f"logging.output_dir: {self.path.parent} lies inside the run directory {enclosing}, whose "
                "--overwrite would delete this run; put the run elsewhere"
            )
        if self.resuming:
            self._check_resumable()
        elif os.path.lexists(self.path):
            if not self.overwrite:
                raise ConfigError(
                    f"{self.path}: run directory exists; pass --resume to continue it or --overwrite to replace it"
                )
            check_replaceable(self.path)

    # ------------------------------------------------------------ creation
    def create(self) -> None:
        """Called only after every input has been validated, so bad input writes nothing."""
        if self.resuming:
            self._discard_unused_checkpoints()
            return
        if self.overwrite and os.path.lexists(self.path):
            self._remove_run_dir()
        self.path.mkdir(parents=True)
        write_atomically(self.path / RECIPE_FILE, yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

    def _remove_run_dir(self) -> None:
        """Renamed aside, then deleted: a kill mid-delete leaves a hidden remainder, not half a run."""
        trash = self.path.parent / f".{self.path.name}.deleting"
        if os.path.lexists(trash):
            remove_tree(trash)  # what an overwrite killed mid-delete left
        os.rename(self.path, trash)
        remove_tree(trash)

    def _discard_unused_checkpoints(self) -> None:
        """The damaged checkpoints newer than the resumed one, and staging left by a killed save.

        Those steps run again (their metrics lines are dropped likewise); left in place, a damaged
        newest checkpoint would outrank the new ones and `keep` pruning could delete the good ones.
        """
        for checkpoint in finished_checkpoints(self.path):
            if checkpoint.name > self.resume_from.name:
                shutil.rmtree(checkpoint)
        for staging in self.checkpoints.glob(f"{STAGING_PREFIX}*"):
            remove_tree(staging)

    def _check_resumable(self) -> None:
        self.resume_from = resume_checkpoint(self.path)
        section = changed_section(self.path, self.recipe)
        if section is not None:
            raise ConfigError(
                f"{self.path}: --resume with a different recipe ({section} differs from the run's config.yaml); "
                "only 'steps' may change"
            )

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def save_checkpoint(self, step: int, setup, learner, stream, state: dict, in_flight: list = ()) -> Path:
        """Write to a temporary directory, then rename: a checkpoint is whole or absent.

        `in_flight`: the batches of the next steps that were generated already (their prompts
        are counted in stream.consumed); a resume trains them instead of generating them again."""
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"
        staging = self.checkpoints / f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}{step:08d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        learner.save(staging)
        setup.tokenizer.save_pretrained(staging)
        torch.save(
            {
                "state": state,
                "prompts_consumed": stream.consumed,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            },
            staging / TRAINER_STATE_FILE,
        )
        if in_flight:
            torch.save(list(in_flight), staging / IN_FLIGHT_FILE)
        seal_checkpoint(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        fsync_path(self.checkpoints)  # the rename itself
        self._prune()
        return final

    def _prune(self) -> None:
        keep = max(1, self.recipe.checkpoint.keep)
        for old in finished_checkpoints(self.path)[:-keep]:
            shutil.rmtree(old)

    def restore(self, learner, stream) -> tuple[dict, list]:
        """Optimizer, data position and RNG from the resumed checkpoint (the model was loaded from
        it); returns the trainer state and the batches that were in flight (save_checkpoint)."""
        checkpoint = self.resume_from or resume_checkpoint(self.path)
        saved = torch.load(checkpoint / TRAINER_STATE_FILE, weights_only=False)
        learner.load_state(checkpoint)
        stream.consumed = saved["prompts_consumed"]
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        np.random.set_state(saved["rng"]["numpy"])
        in_flight = checkpoint / IN_FLIGHT_FILE
        return saved["state"], torch.load(in_flight, weights_only=False) if in_flight.exists() else []

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
        write_atomically(self.path / "summary.json", json.dumps(summary, indent=2))
        return summary


def changed_section(path: Path, recipe: Recipe) -> str | None:
    """The first section of `recipe` that differs from the run's config.yaml ('steps' may differ:
    a resume can train further), or None."""
    saved = saved_recipe(path / RECIPE_FILE)
    current = recipe.to_dict()
    return next((section for section in current if section != "steps" and saved.get(section) != current[section]), None)


def check_replaceable(path: Path) -> None:
    """--overwrite deletes a run directory and nothing else: not a link's target, not a file,
    not a directory that never was a run (no config.yaml; an empty one is a killed start)."""
    if path.is_symlink():
        raise ConfigError(
            f"{path}: is a symbolic link; --overwrite replaces only a run directory, remove the link yourself"
        )
    if not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a directory; --overwrite replaces only a run directory")
    if not (path / RECIPE_FILE).is_file() and any(path.iterdir()):
        raise ConfigError(
            f"{path}: not a run directory (no config.yaml); --overwrite replaces only a run "
            "directory, remove it yourself"
        )
    other = run_inside(path)
    if other is not None:
        raise ConfigError(
            f"{path}: holds another run ({other}); --overwrite would delete it with this one: move it out first"
        )


def run_inside(path: Path) -> Path | None:
    """Another run's directory, or a run lock held now, inside the tree of `path`, found without
    following links (as deleting the tree would not); None when it holds none."""
    for directory, _, files in os.walk(path):
        here = Path(directory)
        if here != path and is_run_directory(here):
            return here
        held = next((here / name for name in files if name.endswith(".lock") and lock_is_held(here / name)), None)
        if held is not None:
            return held
    return None


def lock_is_held(path: Path) -> bool:
    """Whether a run (of any process, this one included) holds the lock file at `path` now; a lock
    file a killed run left is held by nobody."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: nothing can be told, so nothing is refused
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


def enclosing_run(path: Path) -> Path | None:
    """The run directory `path` would lie inside (links resolved): an --overwrite of that run
    would delete this one with it."""
    return next((parent for parent in path.resolve().parents if is_run_directory(parent)), None)


def is_run_directory(path: Path) -> bool:
    """A run's recipe, with its metrics, checkpoints or lock beside it (a config.yaml alone may be
    anybody's)."""
    return (path / RECIPE_FILE).is_file() and (
        (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir() or lock_path(path).exists()
    )


def saved_recipe(path: Path) -> dict:
    """The run's config.yaml as a full recipe: fields added to recipes since the run started take
    their defaults, so a newer library can still resume it (a field since removed or renamed is a
    one-line error naming it)."""
    try:
        saved = read_saved_recipe(path)
        refuse_retired_keys(saved, str(path))
        return build(Recipe, saved, "", source=str(path)).to_dict()
    except ConfigError as err:
        raise ConfigError(f"--resume: the run's recipe no longer loads: {err}") from None


def read_saved_recipe(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{path}: unreadable ({one_line(err, 200)}); it is the recipe a resume is checked against"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected the run's recipe, a mapping; got {type(saved).__name__}")
    return saved


def what_is_left(recipe, summary: dict) -> str | None:
    """What a run's summary.json says is still to do, or None for a finished run (a study reads it too)."""
    done, steps = summary["steps_completed"], recipe.steps
    if done < steps:
        return f"stopped after step {done} of {steps}; continue with --resume"
    if recipe.eval.after_training and "final" not in summary:
        return f"stopped after the last step ({steps}) without the final evaluation; --resume runs it"
    return None
