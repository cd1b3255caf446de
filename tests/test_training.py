"""Training end to end on the tiny lab model: CLI smoke run, resume exactly once, run directory."""

import json
import os
import subprocess
import sys

import pytest

from conftest import RECIPES, run_cli
from efficient_rl.config.loading import load_recipe
from efficient_rl.driver.loop import run_recipe
from efficient_rl.run.checkpoint import RunDir

TIMING_KEYS = ("step_time", "tokens_per_second", "timing/")
EVAL_COMMAND_METRICS = (
    "pass@1",
    "pass@1/ci_low",
    "pass@1/ci_high",
    "pass@2",
    "maj@2",
    "short-1@2",
    "length/mean",
    "length/median",
    "length_correct/p90",
    "length_incorrect/max",
    "truncation_rate",
    "tokens_per_correct",
    "accuracy_per_1k_tokens",
)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def deterministic(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)}


def test_cli_two_training_steps(tmp_path, tiny_overrides):
    result = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "steps=2",
        "logging.name=smoke",
        "eval.every=2",
        "eval.samples_per_problem=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "smoke"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in [
        "reward/mean",
        "acc/mean",
        "response_length/mean",
        "response_length/median",
        "response_length/p90",
        "response_length/max",
        "response_length/clip_ratio",
        "frac_reward_zero_std",
        "clip_ratio/low",
        "clip_ratio/high",
        "entropy",
        "grad_norm",
        "tokens_per_second",
        "step_time",
    ]:
        assert key in rows[0], key
    assert rows[0]["response_length/max"] <= 24
    # Eval during training: the names `efficient-rl eval` writes to eval.json, with an eval/ prefix.
    for name in EVAL_COMMAND_METRICS:
        assert f"eval/{name}" in rows[1], name
    assert "eval/pass@1" not in rows[0] and rows[1]["eval/length/max"] <= 32
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in ("warm_start", "final"):
        assert 0.0 <= summary[stage]["accuracy"] <= 1.0
        assert summary[stage]["mean_response_length"] > 0
    assert "wall_seconds" in summary  # recorded; its value is the machine's, so nothing is asserted of it
    assert (run_dir / "config.yaml").exists() and (run_dir / "training_curves.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()
    assert "Held-out split, before and after training" in result.stdout


def train(overrides, resume=False, stop_after_step=None):
    return run_recipe(
        load_recipe(RECIPES / "quickstart.yaml", overrides), resume=resume, stop_after_step=stop_after_step
    )


def test_resume_runs_every_step_exactly_once(tmp_path, tiny_overrides):
    common = tiny_overrides + [
        "steps=4",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "algorithm.kl_coef=0.05",
    ]  # the KL reference must survive a resume
    straight, _ = train(common + ["logging.name=straight"])
    interrupted, summary = train(common + ["logging.name=interrupted"], stop_after_step=2)
    assert summary["steps_completed"] == 2
    assert [r["step"] for r in read_metrics(interrupted.path)] == [1, 2]
    resumed, summary = train(common + ["logging.name=interrupted"], resume=True)
    assert summary["steps_completed"] == 4
    expected, got = read_metrics(straight.path), read_metrics(resumed.path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # Same prompts, same samples, same updates: every deterministic metric matches bit for bit.
    assert [deterministic(r) for r in got] == [deterministic(r) for r in expected]


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_overrides):
    import pytest

    from efficient_rl.errors import ConfigError

    common = tiny_overrides + [
        "steps=1",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "logging.name=r",
    ]
    run, _ = train(common)
    with pytest.raises(ConfigError, match="algorithm differs"):
        RunDir(load_recipe(RECIPES / "quickstart.yaml", common + ["algorithm.policy_loss.clip_high=0.5"]), resume=True)
    run.close()
    # A run saved before a field existed resumes: the field takes its default on both sides.
    import yaml

    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    del saved["imports"], saved["logging"]["completions_every"]
    (run.path / "config.yaml").write_text(yaml.safe_dump(saved))
    RunDir(load_recipe(RECIPES / "quickstart.yaml", common), resume=True).close()
    saved["algorithm"]["clip_hihg"] = 0.3  # a field since renamed: one line naming it
    (run.path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="recipe no longer loads: .*algorithm.clip_hihg: unknown key"):
        RunDir(load_recipe(RECIPES / "quickstart.yaml", common), resume=True)


def parity_reward(completion, sample):
    """A reward with spread even for an untrained model: 1 for an even number of characters."""
    return float(len(completion) % 2 == 0)


def test_dynamic_sampling_kl_and_ppo_mini_batches(tmp_path, tiny_overrides):
    overrides = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "reward=[{name: 'test_training:parity_reward'}]",
        "algorithm.sampling={name: dynamic, max_rounds: 3}",
        "algorithm.kl_coef=0.01",
        "learner.mini_batch_prompts=2",
        "logging.name=ds",
    ]
    run, summary = train(overrides)
    assert summary["steps_completed"] == 2
    rows = read_metrics(run.path)
    consumed = 0
    for row in rows:
        rounds = row["dynamic_sampling/rounds"]
        assert 1 <= rounds <= 3 and row["dynamic_sampling/kept_groups"] <= 4
        consumed += 4 * rounds
        assert row["data/consumed_prompts"] == consumed
        kept = row["dynamic_sampling/kept_groups"]
        assert row["optimizer_steps"] == -(-kept // 2)  # two prompts per PPO mini-batch
        assert row["kl"] >= 0.0


def flaky_reward(completion, sample):
    if len(completion) % 3 == 0:
        raise ValueError("verifier failed on this one")
    return {"score": 1.0, "one": 1.0}


def test_reward_errors_are_counted_in_step_metrics(tmp_path, tiny_overrides):
    overrides = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "reward=[{name: 'test_training:flaky_reward'}]",
        "logging.name=flaky",
    ]
    run, summary = train(overrides)
    assert summary["steps_completed"] == 2  # training goes on
    rows = read_metrics(run.path)
    assert sum(row["reward/errors"] for row in rows) > 0
    for row in rows:
        # Every failed call is counted; scored 0, so the mean score is the share of clean calls.
        assert row["reward/errors"] == round(16 * (1 - row["score/mean"]))
        # The reward's own metric is averaged over the calls that returned it, failed ones left out.
        assert row["reward/flaky_reward/one"] == 1.0


def test_model_directory_and_local_jsonl_with_column_mapping(tmp_path, tiny_overrides, tiny_model_dir):
    """The path real models and datasets take: a Hugging Face directory and a local JSONL file."""
    data = tmp_path / "problems.jsonl"
    rows = [{"prompt_text": f"Compute {a} + {b}.", "target": str(a + b)} for a in range(1, 5) for b in range(1, 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tiny_overrides + [
        "model.lab=null",
        f"model.path={tiny_model_dir}",
        f"data.train={data}",
        f"data.heldout={data}",
        "data.question_key=prompt_text",
        "data.answer_key=target",
        "steps=1",
        "eval.num_problems=4",
        "logging.trackers=[]",
        "logging.name=jsonl",
    ]
    run, summary = train(overrides)
    assert summary["steps_completed"] == 1 and "final" in summary
    assert read_metrics(run.path)[0]["data/consumed_prompts"] == 4


def test_a_stop_file_written_before_the_start_stops_the_run_after_its_first_step(tmp_path, tiny_overrides):
    """A launcher's stop request that came before the driver could receive signals (a Slurm
    warning at the job's first second) is read from $EFFICIENT_RL_STOP_FILE and acted on."""
    stop_file = tmp_path / "stop-request"
    stop_file.touch()
    result = run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "steps=50",
        "eval.before_training=false",
        "logging.trackers=[]",
        "logging.name=early",
        cwd=tmp_path,
        env={**os.environ, "EFFICIENT_RL_STOP_FILE": str(stop_file)},
    )
    assert result.returncode == 75, result.stderr[-2000:]
    assert "a stop was requested" in result.stderr and "stopped after step 1 of 50" in result.stderr
    run_dir = tmp_path / "runs" / "early"
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "step-00000001" / "trainer_state.pt").exists()


def test_sigterm_finishes_the_step_and_leaves_a_resumable_checkpoint(tmp_path, tiny_overrides):
    import signal
    import time

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "efficient_rl.cli",
            "train",
            str(RECIPES / "quickstart.yaml"),
            *tiny_overrides,
            "steps=500",
            "eval.before_training=false",
            "logging.trackers=[]",
            "logging.name=term",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "runs" / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=1200)
    assert process.returncode == 75, stderr[-2000:]  # stopped early, resumable
    assert "stopped after step" in stderr and "--resume" in stderr
    summary = json.loads((tmp_path / "runs" / "term" / "summary.json").read_text())
    done = summary["steps_completed"]
    assert 1 <= done < 500 and "final" not in summary
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "term")] == list(range(1, done + 1))
    assert (tmp_path / "runs" / "term" / "checkpoints" / f"step-{done:08d}" / "trainer_state.pt").exists()


def test_token_selection_recipes_train_on_the_kept_share(tmp_path, tiny_overrides):
    """D3S and high-entropy recipes end to end: the learner trains on a selected share of tokens."""
    common = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
    ]
    d3s, _ = train(
        common
        + [
            "logging.name=d3s",
            "algorithm.sample_selection={name: d3s, rollouts: [2, 4]}",
            "algorithm.token_selection={name: d3s_tokens, token_fraction: [0.2, 0.6]}",
        ]
    )
    rows = read_metrics(d3s.path)
    # Step 1 keeps 2 of 4 rollouts per prompt on average and 20% of their tokens; step 2 (the end) 4 and 60%.
    assert [r["selection/kept_rollouts"] for r in rows] == [8.0, 16.0]
    assert [r["d3s/token_fraction"] for r in rows] == pytest.approx([0.2, 0.6])
    assert rows[0]["tokens/kept_fraction"] < 0.2 and 0.5 < rows[1]["tokens/kept_fraction"] <= 0.6
    high, _ = train(
        common
        + [
            "logging.name=high",
            "algorithm.token_selection={name: high_entropy, top_fraction: 0.25}",
            "algorithm.loss_denominator=all",
        ]
    )
    for row in read_metrics(high.path):
        assert 0.2 <= row["tokens/kept_fraction"] <= 0.35  # top 25% by entropy (ties at the threshold kept)


def test_a_thinking_budget_keeps_the_appended_tokens_out_of_the_loss(tmp_path, tiny_overrides):
    """The tiny model never writes " The answer is" within 8 tokens and rarely stops, so nearly every
    rollout gets the 3 tokens of the marker appended: they count as generated, not as trained, and
    the engine's log-probs (0 there, nothing was sampled) would otherwise be far from the learner's."""
    run, _ = train(
        tiny_overrides
        + [
            "steps=1",
            "eval.before_training=false",
            "eval.after_training=false",
            "logging.trackers=[]",
            "logging.name=budget",
            "rollout.thinking_budget={tokens: 8, close: ' The answer is', answer_tokens: 4}",
        ]
    )
    (row,) = read_metrics(run.path)
    rollouts = 4 * 4
    assert row["rollout/forced_tokens"] % 3 == 0 and rollouts * 3 / 2 <= row["rollout/forced_tokens"] <= rollouts * 3
    trained = row["rollout/tokens"] - row["rollout/forced_tokens"]
    assert row["tokens/kept_fraction"] == pytest.approx(trained / row["rollout/tokens"])
    assert row["response_length/max"] <= 8 + 3 + 4
    assert row["rollout/logprob_diff"] < 1e-3


def test_on_policy_distillation_with_tip_selection_end_to_end(tmp_path, tiny_overrides):
    """lab:tiny teaches lab:tiny_student (same tokenizer): full-token OPD, then TIP Soft-OR at 50%."""
    common = tiny_overrides + [
        "model.lab=tiny_student",
        "distill.teacher=lab:tiny",
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "rollout.max_response_length=24",
        "eval.max_new_tokens=32",
    ]
    full, _ = run_recipe(load_recipe(RECIPES / "opd.yaml", common + ["logging.name=opd"]))
    for row in read_metrics(full.path):
        assert row["distill/divergence"] > 0 and row["tokens/kept_fraction"] == 1.0
    tip, _ = run_recipe(load_recipe(RECIPES / "tip_opd.yaml", common + ["logging.name=tip"]))
    for row in read_metrics(tip.path):
        assert 0.3 < row["tokens/kept_fraction"] <= 0.5  # floor(0.5 x length) per response
        shares = [row[f"tip/q{i}_share"] for i in range(1, 5)]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)


def test_distillation_teacher_must_share_the_vocabulary(tmp_path, tiny_overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from efficient_rl.errors import ConfigError

    other = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
        )
    )
    other.save_pretrained(tmp_path / "other_teacher")
    recipe = load_recipe(
        RECIPES / "opd.yaml",
        tiny_overrides + ["model.lab=tiny_student", f"distill.teacher={tmp_path / 'other_teacher'}"],
    )
    with pytest.raises(ConfigError, match=r"distill.teacher: a vocabulary of 1000 tokens, the student's has \d+"):
        run_recipe(recipe)
    assert not (tmp_path / "runs" / "opd").exists()
