"""benchmarks/gpu_check.py, the script a GPU machine's first session runs, rehearsed on the CPU
at its tiny scale so that it cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_every_phase_on_the_cpu():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--scale", "tiny", "--device", "cpu"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    phases = {line["phase"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert list(phases) == ["environment", "learner", "head", "buckets", "greedy"]
    assert all(phase["ok"] for phase in phases.values())
    assert phases["environment"]["torch"].startswith("2.")
    for layout in ("packed", "padded"):
        assert phases["learner"][layout]["tokens_per_second"] > 0 and phases["learner"][layout]["loss_finite"]
    # the planner's head term is what the head holds (its buffers were measured so)
    for point in ("64", "128", "256"):
        assert 0.8 < phases["head"][point]["ratio"] < 1.25, phases["head"]
    assert phases["buckets"]["equal"] and phases["greedy"]["equal"] and phases["greedy"]["tokens"] > 0


def test_a_failing_phase_is_reported_and_fails_the_run():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--scale", "tiny", "--device", "cuda", "--phases", "buckets"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    [line] = map(json.loads, done.stdout.splitlines())
    assert done.returncode == 1 and line["phase"] == "buckets" and not line["ok"]
    assert "\n" not in line["error"] and line["error"]
