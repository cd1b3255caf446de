"""A new method is one entry: this module registers a leave-one-out advantage estimator when it is
imported, and a run selects it by recipe keys alone (`imports` and `algorithm.advantage`), in a
fresh process that knows nothing of it otherwise. docs/extending.md shows the same diff."""

import json
from pathlib import Path

import torch

from efficient_rl.algos.advantages import ADVANTAGES, group_stats


def baseline_metrics(batch, *, scale: float) -> dict[str, float]:
    return {"leave_one_out/scale": scale}


@ADVANTAGES.register(
    "leave_one_out",
    ranges={"scale": "(0, inf)"},
    metrics=baseline_metrics,
    source="RLOO (Ahmadian et al. 2024, arXiv 2402.14740): the other rollouts' mean as baseline",
)
def leave_one_out(batch, *, scale: float = 1.0) -> torch.Tensor:
    """A_i = scale * (r_i - mean of the group's other rewards); 0 for a group of one."""
    mean, _, size = group_stats(batch.rewards, batch.group_ids)
    others = (mean * size - batch.rewards) / (size - 1).clamp(min=1)
    advantage = torch.where(size > 1, batch.rewards - others, torch.zeros_like(mean)) * scale
    return advantage[:, None] * batch.response_mask


def test_the_estimator_against_a_loop():
    from test_algorithms import make_batch

    rewards, groups = [1.0, 0.0, 0.5, 2.0, 3.0], [0, 0, 0, 1, 2]
    batch = make_batch(rewards, groups, [2, 3, 1, 2, 2])
    expected = []
    for i, reward in enumerate(rewards):
        others = [r for j, r in enumerate(rewards) if groups[j] == groups[i] and j != i]
        expected.append(2.0 * (reward - sum(others) / len(others)) if others else 0.0)
    assert torch.allclose(leave_one_out(batch, scale=2.0)[:, 0], torch.tensor(expected))


def train(tmp_path, tiny_overrides, *keys):
    from conftest import RECIPES, ROOT, run_cli

    return run_cli(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides,
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "logging.name=plugin",
        *keys,
        cwd=ROOT,
    )


def test_a_run_selects_a_method_registered_by_its_own_module(tmp_path, tiny_overrides):
    result = train(
        tmp_path, tiny_overrides, f"imports=[{Path(__file__)}]", "algorithm.advantage={name: leave_one_out, scale: 2.0}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "plugin" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["leave_one_out/scale"] == 2.0 for row in rows)  # the entry's own diagnostics: it ran


def test_without_its_module_the_name_is_one_line_of_error(tmp_path, tiny_overrides):
    result = train(tmp_path, tiny_overrides, "algorithm.advantage=leave_one_out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "efficient-rl: error: algorithm.advantage: unknown advantage estimator 'leave_one_out'; "
        "expected one of: dler, grpo, tempo"
    ]
    missing = train(tmp_path, tiny_overrides, "imports=[no_such_module_here]")
    assert missing.returncode == 2 and "imports: cannot import no_such_module_here" in missing.stderr


def test_the_guides_examples_train_together_selected_by_recipe_keys(tmp_path, tiny_overrides):
    """docs/extending.md's code blocks, as written, in one module: a loss, a length penalty, a
    selector and the statistic it needs, all picked by recipe keys (a statistic is one function:
    the learner computes it because the selector names it)."""
    import re

    from conftest import ROOT

    guide = (ROOT / "docs" / "extending.md").read_text()
    module = tmp_path / "guide_methods.py"
    module.write_text("import torch\n\n" + "\n\n".join(re.findall(r"```python\n(.*?)```", guide, re.S)))
    result = train(
        tmp_path,
        tiny_overrides,
        f"imports=[{module}]",
        "algorithm.policy_loss=reinforce",
        "algorithm.length_penalty={name: linear, alpha: 0.5}",
        "algorithm.token_selection={name: unsure, fraction: 0.5}",
        "algorithm.advantage=leave_one_out",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "plugin" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert 0.4 < row["tokens/kept_fraction"] <= 0.5  # int(0.5 x valid tokens) of them
        assert row["reward/mean"] < row["score/mean"]  # the linear length cost was charged
