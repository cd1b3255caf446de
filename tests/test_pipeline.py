"""cluster.pipeline: overlapped rollouts and learning on the tiny lab model, for real."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from conftest import RECIPES
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.loop import run_recipe
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError

OVERLAPPED = ["cluster.pipeline.name=overlapped", "algorithm.rollout_correction=tis"]
# Rewards in the driver's process: reward workers would cost start-up time for nothing here.
QUIET = ["eval.before_training=false", "eval.after_training=false", "logging.trackers=[]", "scoring.workers=0"]
# Ahead of every prompt, so that every prompt's first KV block (128 tokens on vLLM-CPU) is one
# shared prefix: the prefix cache serves it to every later request, across weight updates too
# unless they reset it.
SHARED_PREFIX = "Add the numbers and reply with the sum only. " * 4


def parity_reward(completion, sample):
    """A reward with spread even for an untrained model, so the weights really move."""
    return float(len(completion) % 2 == 0)


def train(overrides, resume=False):
    return run_recipe(load_recipe(RECIPES / "quickstart.yaml", overrides), resume=resume)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def deterministic(row):
    """Everything but wall times; NaN as a string so that rows compare equal."""
    return {
        key: "nan" if isinstance(value, float) and math.isnan(value) else value
        for key, value in row.items()
        if not key.startswith(("timing/", "step_time", "tokens_per_second", "sync/"))
    }


def assert_every_prompt_trained_once(rows, prompts_per_step):
    """The steps' prompt ranges tile the data stream: none skipped, none twice."""
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    position = 0
    for row in rows:
        assert row["data/first_prompt"] == position
        position = row["data/consumed_prompts"]
    assert position == prompts_per_step * len(rows)


def test_max_staleness_0_reproduces_sync_exactly(tmp_path, tiny_overrides):
    """Dynamic sampling's refill rounds and a periodic evaluation included."""
    common = (
        tiny_overrides
        + QUIET
        + [
            "steps=4",
            "eval.every=2",
            "reward=[{name: 'test_pipeline:parity_reward'}]",
            "algorithm.sampling={name: dynamic, max_rounds: 3}",
            "algorithm.rollout_correction=tis",
        ]
    )
    sync, _ = train(common + ["logging.name=sync"])
    overlapped, _ = train(common + OVERLAPPED + ["cluster.pipeline.max_staleness=0", "logging.name=overlapped"])
    expected, got = read_metrics(sync.path), read_metrics(overlapped.path)
    assert [deterministic(row) for row in got] == [deterministic(row) for row in expected]
    assert any(row["dynamic_sampling/rounds"] > 1 for row in got) and "eval/pass@1" in got[1]
    assert all(row["pipeline/staleness/max"] == 0.0 for row in got)
    assert got[-1]["loss"] != got[0]["loss"]  # the weights moved: the comparison is not of a frozen model


def test_max_staleness_1_trains_no_rollout_older_than_one_version(tmp_path, tiny_overrides):
    run, _ = train(
        tiny_overrides
        + QUIET
        + OVERLAPPED
        + [
            "steps=5",
            "cluster.pipeline.max_staleness=1",
            "reward=[{name: 'test_pipeline:parity_reward'}]",
            "logging.trackers=[tensorboard]",
            "logging.name=stale",
        ]
    )
    rows = read_metrics(run.path)
    assert_every_prompt_trained_once(rows, 4)
    assert all(0.0 <= row["pipeline/staleness/mean"] <= row["pipeline/staleness/max"] <= 1.0 for row in rows)
    for row in rows:  # the counts per lag: every trained rollout (16 a step) once, and they give the mean
        counts = [row["pipeline/staleness/count/0"], row["pipeline/staleness/count/1"]]
        assert sum(counts) == 16 and counts[1] / 16 == pytest.approx(row["pipeline/staleness/mean"])
    assert_staleness_histograms(run.path / "tensorboard", rows)
    assert rows[0]["pipeline/staleness/max"] == 0.0  # nothing older than the starting weights exists
    # The producer ran ahead: some batch came from the previous policy, and its behaviour
    # log-probs are that policy's, not the learner's (the TIS weights of the loss see the gap).
    stale = [row for row in rows if row["pipeline/staleness/max"] == 1.0]
    assert stale and all(row["rollout/logprob_diff"] > 1e-3 for row in stale)
    fresh = [row for row in rows if row["pipeline/staleness/max"] == 0.0]
    assert all(row["rollout/logprob_diff"] < 1e-4 for row in fresh)
    for row in rows:
        assert 0.0 <= row["timing/rollout_utilisation"] <= 1.0 and 0.0 <= row["timing/learner_utilisation"] <= 1.0


def assert_staleness_histograms(event_dir, rows):
    """TensorBoard holds a histogram per step with a bucket per lag, as the logged counts say."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir), size_guidance={"histograms": 0})
    events.Reload()
    histograms = {event.step: event.histogram_value for event in events.Histograms("pipeline/staleness")}
    assert sorted(histograms) == [row["step"] for row in rows]
    for row in rows:
        histogram = histograms[row["step"]]
        assert list(histogram.bucket) == [row["pipeline/staleness/count/0"], row["pipeline/staleness/count/1"]]
        assert list(histogram.bucket_limit) == [0.5, 1.5]
        assert histogram.num == 16 and histogram.max == row["pipeline/staleness/max"]


def test_a_driver_killed_mid_run_resumes_with_every_prompt_trained_once(tmp_path, tiny_overrides):
    """kill -9 while batches are in flight; the checkpoint holds them, the resume trains them."""
    steps = 8
    command = [
        sys.executable,
        "-m",
        "efficient_rl.cli",
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        *QUIET,
        *OVERLAPPED,
        "cluster.pipeline.max_staleness=2",
        f"steps={steps}",
        "checkpoint.every=1",
        "logging.name=killed",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    deadline = time.time() + 1200  # a hang guard only
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=1200)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]  # it was killed, not finished
    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_every_prompt_trained_once(read_metrics(tmp_path / "runs" / "killed"), 4)


def test_every_weight_update_resets_the_vllm_prefix_cache(tmp_path, tiny_overrides):
    """Overlapped on the in-process vLLM engine with verify_sync: after every load the probe (the
    first held-out question behind the shared prefix, generated at every earlier load too) must
    give the learner's log-probs. Prefix-cached KV of older weights would fail the check (it does,
    with the reset taken out: a gap of about a nat at the first load). A large learning rate makes
    every version differ from the last."""
    run, _ = train(
        tiny_overrides
        + QUIET
        + OVERLAPPED
        + [
            "steps=4",
            "learner.lr=0.01",
            "rollout.engine=vllm",
            "rollout.verify_sync=true",
            "rollout.max_prompt_length=192",
            "cluster.pipeline.max_staleness=1",
            f"prompt.user_template='{SHARED_PREFIX}{{question}}'",
            "reward=[{name: 'test_pipeline:parity_reward'}]",
            "logging.name=prefix",
        ]
    )
    rows = read_metrics(run.path)
    loads = [row for row in rows if "sync/verified" in row]
    assert len(loads) >= 2 and all(row["sync/verified"] == 1.0 for row in loads)
    assert all(row["pipeline/staleness/max"] <= 1.0 for row in rows)
    assert any(row["rollout/logprob_diff"] > 1e-2 for row in rows)  # the versions really differ


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.pipeline.max_staleness=-1", "cluster.pipeline.max_staleness: expected"),
        ("cluster.pipeline.name=overlaped", "cluster.pipeline: unknown pipeline 'overlaped'"),
        ("algorithm.rollout_correction=none", "cluster.pipeline.max_staleness: 1 trains on rollouts of older"),
    ],
)
def test_bad_pipeline_settings_are_one_line_at_load(tiny_overrides, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_recipe(RECIPES / "quickstart.yaml", tiny_overrides + OVERLAPPED + [override]))
