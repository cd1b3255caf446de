"""A recipe is checked before anything costs: a bad one writes nothing and starts nothing.

The bad recipes run through `efficient-rl train` in one child process in which starting a process
fails: fork, posix_spawn and the fork-exec that subprocess and multiprocessing (reward workers,
Ray, vLLM) go through are replaced by a function that records the attempt and raises, and so is
the lab's build. The lab cache is empty and the output directory does not exist. Each recipe must end with exit status 2
and one line naming its field, with no process start recorded, no output directory (so no run
lock either) and nothing in the cache (no lab build).
"""

import json
import os
import subprocess
import sys
import textwrap

from conftest import RECIPES

# Runs each argv through the CLI's main() and prints, per argv: exit code, stderr, process starts.
RUNNER = textwrap.dedent("""
    import contextlib, io, json, os, sys
    import _posixsubprocess

    started = []

    def refuse(*args, **kwargs):
        started.append(repr(args)[:200])
        raise RuntimeError("a process was started")

    _posixsubprocess.fork_exec = refuse
    os.fork = os.posix_spawn = os.posix_spawnp = refuse

    import efficient_rl.lab.build
    from efficient_rl.cli import main

    efficient_rl.lab.build.build_lab = refuse  # minutes of fine-tuning: refused and recorded like a process

    results = []
    for argv in json.loads(sys.argv[1]):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except Exception as err:  # what a refused process start ends in
                code = f"{type(err).__name__}: {err}"
        results.append({"code": code, "stderr": stderr.getvalue(), "started": list(started)})
        started.clear()
    print(json.dumps(results))
""")

NEEDY_PLUGIN = textwrap.dedent("""
    from efficient_rl.algos.advantages import ADVANTAGES

    @ADVANTAGES.register("needy", needs=("entropyy",))
    def needy(rewards, group_ids):
        return rewards
""")

# override(s) -> the start of the error line. The recipe's model is lab:quickstart, which the
# empty cache does not hold: a build would show in the cache.
BAD_RECIPES = {
    "unknown entry": (["algorithm.advantage=grpoo"], "algorithm.advantage: unknown advantage estimator 'grpoo'"),
    "number out of range": (["learner.lr=-1"], "learner.lr: expected a finite number > 0"),
    "backend mismatch": (["learner.backend=deepspeed"], "learner.backend: deepspeed runs as Ray actors"),
    "engine mismatch": (["cluster.backend=ray"], "rollout.engine: the ray backend runs vLLM rollout workers"),
    "missing teacher": (["algorithm.token_selection=tip_soft_or"], "distill.teacher: algorithm.token_selection"),
    "tracker twice": (["logging.trackers=[tensorboard, tensorboard]"], "logging.trackers[1]: tensorboard is listed"),
    "reward file": (["reward=[{name: missing_reward.py:score}]"], "reward[0] (missing_reward.py:score): "),
    "cap beyond the limit": (["algorithm.length_cap.length=100000"], "algorithm.length_cap.length: expected 1.."),
    "tiers without a cap": (
        [
            "algorithm.length_penalty=none",
            "algorithm.length_cap={name: difficulty_aware, min_correct: [0.0], truncation_lengths: [10]}",
        ],
        "algorithm.length_cap: difficulty_aware needs a length_penalty",
    ),
    "missing data": (["data.train=missing.jsonl"], "data.train"),
    "template field": (["prompt.user_template='{nope}'"], "data.train"),
    "nccl on a shared GPU": (
        ["cluster.backend=ray", "rollout.engine=vllm", "cluster.weight_transport=nccl", "cluster.placement=colocate"],
        "cluster.weight_transport: nccl cannot join learner rank 0 and rollout worker 0",
    ),
    "a GPU this machine lacks": (["model.device=cuda"], "model.device: cuda, but torch"),
    "a CPU device for GPU actors": (
        ["cluster.backend=ray", "rollout.engine=vllm", "cluster.learner.gpus=1", "model.device=cpu"],
        "model.device: cpu, but cluster.learner.gpus is 1",
    ),
    "thinking budget at the cap": (
        ["rollout.thinking_budget.tokens=48"],
        "rollout.thinking_budget.tokens: expected a budget below rollout.max_response_length 48",
    ),
    "thinking budget without a close": (
        ["rollout.thinking_budget.tokens=16", "rollout.thinking_budget.close=''"],
        "rollout.thinking_budget.close: expected the text that ends the reasoning",
    ),
    "need nothing provides": (
        ["imports=[needy.py]", "algorithm.advantage=needy"],
        "algorithm.advantage: advantage estimator 'needy' needs 'entropyy', which nothing "
        "provides (did you mean 'entropy'?)",
    ),
}


def run_recipes(tmp_path, cases: dict[str, list[str]], extra: list[str]) -> dict[str, dict]:
    """Each case's overrides through `efficient-rl train` in the runner; its result by case."""
    argvs = [
        ["train", str(RECIPES / "quickstart.yaml"), f"logging.output_dir={tmp_path / 'runs'}", *extra, *overrides]
        for overrides in cases.values()
    ]
    env = {"PATH": "/usr/bin:/bin", "EFFICIENT_RL_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    # the checkout under test, where it is not the installed one (a worktree)
    env.update({name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ})
    (tmp_path / "cache").mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(argvs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # a hang guard
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(cases, json.loads(done.stdout.splitlines()[-1])))


def assert_refused_in_one_line(results: dict[str, dict], expected: dict[str, str], tmp_path) -> None:
    assert not (tmp_path / "runs").exists(), "a bad recipe left an output directory (a run directory or its lock)"
    assert list((tmp_path / "cache").iterdir()) == [], "a bad recipe built or cached something"
    for case, start in expected.items():
        result = results[case]
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1, (case, result)
        assert lines[0].startswith("efficient-rl: error: "), (case, lines)
        assert start in lines[0], (case, lines[0])
        assert result["started"] == [], (case, result["started"])


def test_a_bad_recipe_starts_no_process_and_writes_nothing(tmp_path):
    (tmp_path / "needy.py").write_text(NEEDY_PLUGIN)
    results = run_recipes(tmp_path, {case: overrides for case, (overrides, _) in BAD_RECIPES.items()}, extra=[])
    assert_refused_in_one_line(results, {case: start for case, (_, start) in BAD_RECIPES.items()}, tmp_path)


ON_DISK = ["model.lab=null", "data.train=lab:tiny", "data.heldout=lab:tiny", "steps=1"]


def test_a_prompt_check_on_the_model_comes_before_reward_workers(tmp_path, tiny_model_dir):
    # Prompt lengths need the tokenizer: with a model on disk they are checked before the reward
    # workers start (scoring.workers 2) and before the weights load.
    results = run_recipes(
        tmp_path, {"prompt too long": ["rollout.max_prompt_length=2"]}, extra=[*ON_DISK, f"model.path={tiny_model_dir}"]
    )
    assert_refused_in_one_line(
        results, {"prompt too long": "rollout.max_prompt_length: data.train has a prompt of"}, tmp_path
    )


def test_a_thinking_budget_is_checked_on_the_tokenizer_before_reward_workers(tmp_path, tiny_model_dir):
    # The lab tokenizer has no token for an emoji, and a 12-token budget plus the 6 tokens of
    # " The answer is \\boxed{" leave no room under a 18-token cap.
    cases = {
        "close of no tokens": ["rollout.thinking_budget.tokens=12", "rollout.thinking_budget.close='🙂'"],
        "no room to answer": [
            "rollout.max_response_length=18",
            "rollout.thinking_budget.tokens=12",
            "rollout.thinking_budget.close=' The answer is'",
            "rollout.thinking_budget.answer_prompt=' \\boxed{'",
        ],
    }
    results = run_recipes(tmp_path, cases, extra=[*ON_DISK, f"model.path={tiny_model_dir}"])
    expected = {
        "close of no tokens": "rollout.thinking_budget.close: expected text the tokenizer encodes to at least one",
        "no room to answer": "rollout.thinking_budget.tokens: expected the budget plus the 6 appended tokens",
    }
    assert_refused_in_one_line(results, expected, tmp_path)


def test_the_runner_sees_a_process_start(tmp_path, tiny_model_dir):
    # The harness itself: a good recipe gets as far as its reward workers, whose start is refused.
    results = run_recipes(tmp_path, {"good": []}, extra=[*ON_DISK, f"model.path={tiny_model_dir}"])
    assert results["good"]["started"] != [] and "a process was started" in str(results["good"]["code"])
