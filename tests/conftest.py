import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "efficient_rl" / "recipes"

# Tests build their lab models in a cache of their own, never the user's.
os.environ.setdefault("EFFICIENT_RL_CACHE", str(ROOT / ".pytest_cache" / "efficient_rl"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every Ray cluster of the tests is local. start_ray sets these before it imports Ray, but an
# in-process vLLM engine (the eval tests) imports Ray earlier, and Ray reads them on import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# A small, fast run on the tiny lab model (real model, real generation, real updates).
TINY_OVERRIDES = [
    "model.lab=tiny",
    "data.train=lab:tiny",
    "data.heldout=lab:tiny",
    "data.train_size=200",
    "data.heldout_size=16",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_response_length=24",
    "eval.num_problems=8",
    "eval.max_new_tokens=32",
    "logging.progress=false",
    "algorithm.sampling=all",  # the tiny model never answers right: no spread to keep
]


# `make test` runs the suite on two pytest-xdist workers: most tests wait on processes they start
# (engines, Ray actors, Slurm jobs), so one worker leaves a core idle. The tests that bring up a
# cluster form one unit of work, run one at a time on one worker: Ray's resources and the local
# Slurm cluster (one per worker otherwise, on the same ports) are sized for one run. Every other
# test is a unit of its own. xdist queues the largest unit first, so the cluster tests, the
# longest chain of the suite, start at once. (A scheduler of our own rather than `xdist_group`
# markers: xdist 3.8 renames grouped tests' node ids, which pytest 9 no longer lets it do.)
CLUSTER_TEST_FILES = ("test_ray_cluster.py", "test_ray_address.py", "test_real_model.py", "test_slurm.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ClusterTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if nodeid.split("::")[0].rsplit("/", 1)[-1] in CLUSTER_TEST_FILES else nodeid

    return ClusterTestsTogether(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from efficient_rl.lab.build import lab_model_dir

    return lab_model_dir("tiny")


@pytest.fixture
def tiny_overrides(tmp_path, tiny_model_dir):
    return TINY_OVERRIDES + [f"logging.output_dir={tmp_path / 'runs'}"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model_dir):
    """A one-step training checkpoint of the tiny lab model (from the command line, as users make one)."""
    out = tmp_path_factory.mktemp("runs")
    done = run_cli(
        "train",
        RECIPES / "quickstart.yaml",
        *TINY_OVERRIDES,
        "steps=1",
        "eval.before_training=false",
        "eval.after_training=false",
        f"logging.output_dir={out}",
        "logging.name=tiny",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "tiny" / "checkpoints" / "step-00000001"


def run_cli(*arguments: str, cwd=None, timeout: float = 1200, **options) -> subprocess.CompletedProcess:
    """`efficient-rl ARGUMENTS` in a process of its own (its exit code and stderr are what a user
    sees), with text output; `timeout` only turns a hang into an error. `options` go to
    subprocess.run (env, preexec_fn)."""
    command = [sys.executable, "-m", "efficient_rl.cli", *map(str, arguments)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, **options)


def wait_for(ready, process, why_it_ended, guard: float = 1200, pause: float = 0.2) -> None:
    """Poll until ready() while `process` runs; fail with why_it_ended() (its output) if it ends
    first. `guard` only turns a hang into an error (TimeoutError), whatever the machine's speed."""
    give_up = time.monotonic() + guard
    while not ready():
        if process.poll() is not None:
            pytest.fail(why_it_ended())
        if time.monotonic() > give_up:
            raise TimeoutError(f"still not ready after {guard} s: a hang")
        time.sleep(pause)
