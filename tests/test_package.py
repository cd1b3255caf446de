"""The package's front doors besides `efficient-rl train FILE`: shipped recipes and studies by name,
`recipes copy`, `--version`, `python -m efficient_rl`, and the Python API (efficient_rl.train,
efficient_rl.evaluate), which runs the code the commands run."""

import json
import subprocess
import sys
import tomllib

import pytest

from conftest import RECIPES, ROOT
from efficient_rl.config.loading import load_recipe
from efficient_rl.config.shipped import (
    STUDIES_DIR,
    resolve_recipe,
    resolve_study,
    shipped_name,
    shipped_recipes,
)
from efficient_rl.errors import ConfigError


def cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "efficient_rl", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


# ---------------------------------------------------------------- shipped recipes by name
def test_a_shipped_recipe_is_found_by_name_with_or_without_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of these names here
    assert resolve_recipe("quickstart") == RECIPES / "quickstart.yaml"
    assert resolve_recipe("dler.yaml") == RECIPES / "dler.yaml"
    assert resolve_recipe("ablation/dler_ablation_0_truncation") == RECIPES / "ablation/dler_ablation_0_truncation.yaml"
    assert resolve_study("tiny") == STUDIES_DIR / "tiny.yaml"


def test_a_file_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dler.yaml").write_text(f"defaults: {RECIPES / 'grpo.yaml'}\nsteps: 3\n")
    assert load_recipe(resolve_recipe("dler.yaml")).steps == 3  # the working directory's own
    assert resolve_recipe("dler") == RECIPES / "dler.yaml"  # no file named `dler`: the shipped one


def test_an_unknown_recipe_name_is_one_line_with_the_closest_names_exit_2(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^quickstrt: recipe file not found, nor a shipped recipe of that name \(did you mean"
    ):
        resolve_recipe("quickstrt")
    result = cli("train", "quickstrt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "efficient-rl: error: quickstrt: recipe file not found, nor a shipped recipe of that name "
        "(did you mean quickstart?)"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written, no run directory


def test_plan_and_study_take_shipped_names(tmp_path):
    plan = cli("plan", "dler_r1_1p5b", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "DeepSeek-R1-Distill-Qwen-1.5B" in plan.stdout
    study = cli("study", "check", "tiny", cwd=tmp_path)
    assert study.returncode == 0, study.stderr
    assert study.stdout.startswith("study tiny: 2 runs x 1 seeds")
    assert list(tmp_path.iterdir()) == []  # check writes nothing


# ---------------------------------------------------------------- recipes copy
def test_every_copied_recipe_loads_elsewhere_as_the_shipped_one(tmp_path):
    """A copy stands alone: a recipe built on others (`defaults:`, a path beside it) is written
    with its chain merged in, and loads to the very recipe the shipped file does."""
    from efficient_rl.config.shipped import copy_recipe

    for path in shipped_recipes():
        name = shipped_name(path)
        copied = copy_recipe(name, tmp_path / (path.stem + ".yaml"))
        assert not any(line.startswith("defaults:") for line in copied.read_text().splitlines()), name
        assert load_recipe(copied) == load_recipe(path), name  # the same stem: the same run name too


def test_recipes_copy_writes_the_file_and_refuses_to_overwrite_it(tmp_path):
    copied = cli("recipes", "copy", "quickstart", "mine.yaml", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    written = (tmp_path / "mine.yaml").read_text()
    mine = load_recipe(tmp_path / "mine.yaml")
    assert mine.steps == load_recipe(RECIPES / "quickstart.yaml").steps and mine.logging.name == "mine"

    (tmp_path / "mine.yaml").write_text(written + "steps: 7\n")
    again = cli("recipes", "copy", "dler", "mine.yaml", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        "efficient-rl: error: mine.yaml: already exists; pick another name, or pass --force to replace it"
    )
    assert load_recipe(tmp_path / "mine.yaml").steps == 7  # untouched
    forced = cli("recipes", "copy", "dler", "mine.yaml", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert load_recipe(tmp_path / "mine.yaml").steps == load_recipe(RECIPES / "dler.yaml").steps

    into_a_directory = cli("recipes", "copy", "dler", ".", "--force", cwd=tmp_path)
    assert into_a_directory.returncode == 2
    assert (
        into_a_directory.stderr.strip() == "efficient-rl: error: .: a directory; name the file to write, e.g. dler.yaml"
    )
    unknown = cli("recipes", "copy", "dlr", "other.yaml", cwd=tmp_path)
    assert unknown.returncode == 2 and "did you mean dler?" in unknown.stderr
    assert not (tmp_path / "other.yaml").exists()


# ---------------------------------------------------------------- --version, python -m
def test_version_is_the_projects_and_python_m_runs_the_command(tmp_path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    shown = cli("--version", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.strip() == f"efficient-rl {version}", shown.stderr
    helped = cli("--help", cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: efficient-rl")


# ---------------------------------------------------------------- the Python API
def test_the_package_imports_without_torch():
    """Reward worker processes import the package (efficient_rl.scoring): the API stays lazy."""
    code = "import sys, efficient_rl; print(callable(efficient_rl.train), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "False"], result.stderr


def test_train_from_python_runs_a_recipe_and_returns_its_summary(tmp_path, tiny_overrides):
    import efficient_rl

    overrides = tiny_overrides + ["steps=1", "eval.before_training=false", "logging.trackers=[]", "logging.name=api"]
    summary = efficient_rl.train("quickstart", overrides)
    run_dir = tmp_path / "runs" / "api"
    assert summary["steps_completed"] == 1 and "final" in summary
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (run_dir / "checkpoints" / "step-00000001" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="run directory exists"):  # as `train` without --overwrite
        efficient_rl.train("quickstart", overrides)


def test_a_bad_override_raises_config_error_naming_the_field(tmp_path):
    import efficient_rl

    with pytest.raises(ConfigError, match=r"learner\.lr"):
        efficient_rl.train("quickstart", {"learner.lr": "fast", "logging.output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"rollout\.group_sise"):
        efficient_rl.train("quickstart", [f"logging.output_dir={tmp_path}", "rollout.group_sise=4"])
    assert list(tmp_path.iterdir()) == []


def test_evaluate_from_python_writes_the_evaluation(tmp_path, tiny_model_dir):
    import efficient_rl

    result = efficient_rl.evaluate("lab:tiny", tmp_path / "eval", data="lab:tiny", budgets=[8], samples=1, problems=3)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(saved["runs"]) == set(result["runs"]) == {"lab_tiny@8"}
    assert saved["runs"]["lab_tiny@8"]["length/max"] <= 8
    with pytest.raises(ConfigError, match=r"^evaluate: budget: unknown option \(did you mean 'budgets'\?\)"):
        efficient_rl.evaluate("lab:tiny", tmp_path / "bad", budget=[8])
    with pytest.raises(ConfigError, match="samples"):
        efficient_rl.evaluate("lab:tiny", tmp_path / "bad", samples=0)
    assert not (tmp_path / "bad").exists()
