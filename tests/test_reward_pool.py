"""Rewards in spawned workers: timeouts, crashes and bad values are counted; references resolve in
every form; bad rewards fail at recipe load, naming their entry."""

import os
import sys
import time

import pytest

from conftest import run_cli
from efficient_rl.config.schema import RewardEntry
from efficient_rl.errors import ConfigError
from efficient_rl.scoring.runner import RewardRunner

SAMPLE = {"question": "1 + 1 =", "answer": "2"}


def hostile_reward(completion, sample):
    """Misbehaves on command: the completion says how."""
    if completion == "hang":
        time.sleep(3600)
    if completion == "crash":
        os._exit(3)  # the worker process dies without a word
    if completion == "raise":
        raise RuntimeError("verifier crashed")
    if completion == "text":
        return "1.0"
    return {"score": len(completion) / 10, "chars": len(completion)}


def batched_reward(completions, samples):
    return [float(c == s["answer"]) for c, s in zip(completions, samples)]


batched_reward.batched = True


def two_params(completion, sample, scale):
    return scale


def test_the_pool_counts_timeouts_crashes_and_errors_and_keeps_going():
    runner = RewardRunner([RewardEntry(name=f"{__name__}:hostile_reward")], workers=2, timeout=2.0)
    try:
        completions = ["ok", "hang", "crash", "raise", "text", "abcd"] * 2
        first_workers = [worker.process for worker in runner.pool.workers]
        result = runner.score(completions, [SAMPLE] * len(completions))
        # The two hung workers were killed at their deadline and the two crashed ones found dead:
        # four replacements, and the replacements serve the next batch.
        assert runner.pool.restarts == 4
        assert all(worker.process.is_alive() for worker in runner.pool.workers)
        assert not any(
            process.is_alive()
            for process in first_workers
            if process not in [worker.process for worker in runner.pool.workers]
        )
        again = runner.score(["ok", "abcd"], [SAMPLE] * 2)
    finally:
        runner.close()
    assert result.scores.tolist() == pytest.approx([0.2, 0, 0, 0, 0, 0.4] * 2)
    assert result.timeouts == 2 and result.errors == 6  # 2 crashes, 2 exceptions, 2 strings
    assert result.extras["hostile_reward/chars"] == [2, 0, 0, 0, 0, 4] * 2
    text = " | ".join(result.error_messages)
    assert "no answer within 2 s" in text and "worker died" in text and "verifier crashed" in text
    assert again.scores.tolist() == pytest.approx([0.2, 0.4]) and again.timeouts == again.errors == 0


def test_workers_outlive_the_stop_signals_meant_for_the_driver():
    """A requeue signals every process of a Slurm job (Ctrl-C, the terminal's process group): the
    driver finishes its step with the same workers, so they must not die of it."""
    import signal

    runner = RewardRunner([RewardEntry(name="math")], workers=2, timeout=5.0)
    try:
        assert runner.score(["\\boxed{2}"], [SAMPLE]).scores.tolist() == [1.0]  # the workers are up
        pids = [worker.process.pid for worker in runner.pool.workers]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        result = runner.score(["\\boxed{2}", "3"] * 4, [SAMPLE] * 8)
        assert result.errors == 0 and result.timeouts == 0
        assert result.scores.tolist() == [1.0, 0.0] * 4
        assert [worker.process.pid for worker in runner.pool.workers] == pids  # none died, none replaced
    finally:
        runner.close()


def test_batched_rewards_get_the_whole_list():
    runner = RewardRunner(
        [RewardEntry(name=f"{__name__}:batched_reward"), RewardEntry(name="math", weight=0.5)], workers=1, timeout=5.0
    )
    try:
        result = runner.score(["2", "3", "\\boxed{2}"], [SAMPLE] * 3)
    finally:
        runner.close()
    assert result.scores.tolist() == [1.0, 0.0, 0.5]


def test_references_resolve_from_a_file_a_module_and_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def shout(completion, sample):\n    return float(completion.isupper())\n")
    plugin = tmp_path / "site"
    (plugin / "erl_plugin-1.0.dist-info").mkdir(parents=True)
    (plugin / "erl_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: erl-plugin\nVersion: 1.0\n"
    )
    (plugin / "erl_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[efficient_rl.rewards]\nquiet = erl_plugin_mod:quiet\n"
    )
    (plugin / "erl_plugin_mod.py").write_text(
        "def quiet(completion, sample):\n    return float(completion.islower())\n"
    )
    monkeypatch.syspath_prepend(str(plugin))  # spawned workers inherit sys.path
    monkeypatch.chdir(tmp_path)
    entries = [
        RewardEntry(name="my_reward.py:shout"),
        RewardEntry(name="quiet", weight=10.0),
        RewardEntry(name=f"{__name__}:two_params", weight=100.0, params={"scale": 2.0}),
    ]
    runner = RewardRunner(entries, workers=2, timeout=10.0)
    try:
        runner.check(SAMPLE)
        assert runner.score(["ABC", "abc"], [SAMPLE] * 2).scores.tolist() == [201.0, 210.0]
    finally:
        runner.close()


@pytest.mark.parametrize(
    "entry, message",
    [
        (RewardEntry(name="no_such_reward"), r"reward\[0\] \(no_such_reward\): unknown reward 'no_such_reward'"),
        (RewardEntry(name="no.such.module:fn"), r"reward\[0\] \(no.such.module:fn\): cannot import no.such.module"),
        (RewardEntry(name="missing.py:fn"), r"reward\[0\] \(missing.py:fn\): reward file missing.py not found"),
        (RewardEntry(name=f"{__name__}:nothing_here"), r"has no function 'nothing_here'"),
        (
            RewardEntry(name=f"{__name__}:two_params"),
            r"two_params cannot be called as fn\(completion, sample, \*\*params\)",
        ),
        (RewardEntry(name=f"{__name__}:two_params", params={"scale": 1, "extra": 2}), r"cannot be called as"),
    ],
)
def test_bad_rewards_fail_at_load_naming_the_entry(entry, message):
    with pytest.raises(ConfigError, match=message):
        RewardRunner([entry])


def text_reward(completion, sample):
    return "good"


def test_a_reward_returning_a_non_number_fails_the_load_probe():
    runner = RewardRunner([RewardEntry(name="math"), RewardEntry(name=f"{__name__}:text_reward")], workers=1)
    try:
        with pytest.raises(ConfigError, match=r"reward\[1\] \(test_reward_pool:text_reward\): probe call .*'good'"):
            runner.check(SAMPLE)
    finally:
        runner.close()


def test_recipe_load_rejects_a_bad_reward_in_one_line(tmp_path):

    from conftest import RECIPES, TINY_OVERRIDES

    result = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *TINY_OVERRIDES,
        f"logging.output_dir={tmp_path}",
        "reward=[{name: math}, {name: 'test_reward_pool:text_reward'}]",
        cwd=os.path.dirname(__file__),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "reward[1] (test_reward_pool:text_reward): probe call" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_training_with_a_reward_from_a_file_through_the_cli(tmp_path, tiny_overrides):
    import json

    from conftest import RECIPES, ROOT

    result = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.name=custom",
        "reward=[{name: examples/concise_math_reward.py:concise_math, params: {target_words: 12}}]",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "custom" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["reward/concise_math/words"] > 0 and row["reward/errors"] == 0 and row["reward/timeouts"] == 0
        assert row["reward/leftover_processes"] == 0  # logged every step, beside the failures


def test_a_pathological_math_answer_is_cut_off_and_counted_as_a_timeout():
    runner = RewardRunner([RewardEntry(name="math", params={"timeout": 1})], workers=1, timeout=30.0)
    try:
        result = runner.score(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{12}"], [{"answer": "12"}] * 2)
        # math-verify's own alarm cut it, not the pool's 30 s deadline: the worker answered and
        # was not replaced.
        restarts = runner.pool.restarts
    finally:
        runner.close()
    assert result.timeouts == 1 and result.errors == 0 and result.scores.tolist() == [0.0, 1.0]
    assert "math-verify took over 1 s" in result.error_messages[0]
    assert restarts == 0


def test_reward_check_reports_scores_throughput_and_failures(tmp_path):
    import json
    import subprocess

    data = tmp_path / "samples.jsonl"
    completions = ["ok", "abcd", "raise", "hang", "abcdef"]
    data.write_text("".join(json.dumps({**SAMPLE, "completion": c}) + "\n" for c in completions))
    check = [
        sys.executable,
        "-m",
        "efficient_rl.cli",
        "reward",
        "check",
        f"{__name__}:hostile_reward",
        "--timeout",
        "2",
    ]
    result = subprocess.run(
        check + ["--data", str(data)], capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=1200
    )
    # Failed rows make a failed check: exit status 1, the count on the last line.
    assert result.returncode == 1, result.stderr[-2000:]
    report = result.stdout
    assert report.strip().splitlines()[-1] == "FAILED: 2 of 5 samples errored or timed out"
    assert "on 5 samples" in report and "samples/s" in report
    assert "mean 0.2400" in report and "max 0.6000" in report  # (0.2 + 0.4 + 0 + 0 + 0.6) / 5
    assert "metric  hostile_reward/chars: mean" in report and "call    p50" in report
    assert "errors 1  timeouts 1" in report and "verifier crashed" in report and "no answer within 2 s" in report

    missing = subprocess.run(
        check + ["--data", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(__file__),
        timeout=1200,
    )
    assert (
        missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "nope.jsonl not found" in missing.stderr
    )
