import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"

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
    "algorithm.dynamic_sampling=false",  # the tiny model never answers right: no spread to keep
]


@pytest.fixture(scope="session")
def tiny_model_dir():
    from efficient_rl.lab.build import lab_model_dir

    return lab_model_dir("tiny")


@pytest.fixture
def tiny_overrides(tmp_path, tiny_model_dir):
    return TINY_OVERRIDES + [f"logging.output_dir={tmp_path / 'runs'}"]


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
