"""One RL step of the quickstart setup: efficient-rl vs TRL's GRPOTrainer, side by side.

Same lab model, prompts, group size, length cap, loss (PPO-clip 0.2/0.28, token-mean, no KL), one
optimizer step per batch, no vLLM. Each framework runs in its own subprocess (so peak memory is
its own), alternating, `--rounds` times; the figure is the ratio of median step times.

    .venv/bin/python benchmarks/step_vs_trl.py [--steps 8] [--rounds 2]

Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS, GROUP, CAP, LR = 16, 8, 48, 1e-4


def run_ours(steps: int) -> list[float]:
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import run_recipe

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            ROOT / "recipes" / "grpo.yaml",
            [
                f"steps={steps}",
                f"rollout.prompts_per_step={PROMPTS}",
                f"rollout.group_size={GROUP}",
                f"rollout.max_response_length={CAP}",
                "algorithm.policy_loss.clip_high=0.28",
                f"learner.lr={LR}",
                f"learner.micro_batch_size={PROMPTS * GROUP}",
                "eval.before_training=false",
                "eval.after_training=false",
                "logging.trackers=[]",
                "logging.progress=false",
                f"logging.output_dir={out}",
            ],
        )
        run, _ = run_recipe(recipe)
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        return [row["step_time"] for row in rows], [row["timing/rollout"] for row in rows]


def run_trl(steps: int) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from efficient_rl.data.prompts import load_tokenizer
    from efficient_rl.lab.build import lab_model_dir
    from efficient_rl.lab.presets import PRESETS
    from efficient_rl.lab.tasks import generate_problems
    from efficient_rl.rewards.math import math_reward

    model_dir = lab_model_dir("quickstart")
    tokenizer = load_tokenizer(model_dir)
    problems = generate_problems(PRESETS["quickstart"].task, "train", PROMPTS * steps, seed=0)
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]} for p in problems]
    )

    def reward(prompts, completions, answer, **kwargs):
        return [math_reward(c[0]["content"], {"answer": a})["score"] for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=PROMPTS * GROUP,
            num_generations=GROUP,
            max_completion_length=CAP,
            learning_rate=LR,
            lr_scheduler_type="constant",
            beta=0.0,
            epsilon=0.2,
            epsilon_high=0.28,
            loss_type="dapo",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            weight_decay=0.01,
            max_grad_norm=1.0,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            gradient_checkpointing=False,
            seed=0,
            shuffle_dataset=False,
            disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        generate_times = []
        plain_generate = model.generate

        def timed_generate(*args, **kwargs):  # where TRL's step time goes: generation vs the rest
            started = time.perf_counter()
            result = plain_generate(*args, **kwargs)
            generate_times.append(time.perf_counter() - started)
            return result

        model.generate = timed_generate
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    return timer.times, generate_times


def child(framework: str, steps: int) -> None:
    times, generate_times = {"ours": run_ours, "trl": run_trl}[framework](steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"framework": framework, "step_times": times, "generate_times": generate_times, "peak_rss_mb": peak_mb}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "trl"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    results = {f: {"times": [], "generate": [], "peak": []} for f in ("ours", "trl")}
    for _ in range(args.rounds):
        for framework in ("ours", "trl"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", framework, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            results[framework]["times"] += record["step_times"][1:]  # the first step warms up
            results[framework]["generate"] += record["generate_times"][1:]
            results[framework]["peak"].append(record["peak_rss_mb"])
    ours, trl = (statistics.median(results[f]["times"]) for f in ("ours", "trl"))
    print(f"setup: {PROMPTS} prompts x {GROUP} samples, cap {CAP} tokens, lab quickstart model, 2 CPU cores")
    for name, label in (("ours", "efficient-rl"), ("trl", "TRL GRPOTrainer")):
        r = results[name]
        step, generate = statistics.median(r["times"]), statistics.median(r["generate"])
        print(
            f"{label:16s} median step {step:.3f} s over {len(r['times'])} steps (generation {generate:.3f} s, "
            f"everything else {step - generate:.3f} s), peak RSS {max(r['peak']):.0f} MB"
        )
    print(f"ratio TRL / efficient-rl median step time: {trl / ours:.2f}x")


if __name__ == "__main__":
    main()
