"""The package as a wheel installs it: built from the checkout, installed (not editable) into a
fresh virtual environment whose only other packages are the dependencies, and run from a
directory that holds no project files.

Packages are found automatically (pyproject.toml): the wheel must hold every package of the source
tree and every data file (recipes, the Slurm template), every command and every module must load
from the installed copy, and a shipped recipe must train and its checkpoint evaluate from there.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, TINY_OVERRIDES
from efficient_rl.config.shipped import shipped_name, shipped_recipes

GUARD = 600  # seconds: a hang guard for a build, an install or a command, never a duration bound
# A checkout on the module path would shadow the installed copy (a worktree runs its tests that way).
INSTALLED_ONLY = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def run(*command, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=INSTALLED_ONLY, capture_output=True, text=True, timeout=GUARD)


def source_packages() -> set[str]:
    """efficient_rl's packages by dotted name, from the directories that hold an __init__.py."""
    return {
        ".".join(("efficient_rl", *init.parent.relative_to(ROOT / "efficient_rl").parts))
        for init in (ROOT / "efficient_rl").rglob("__init__.py")
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel installed; the dependencies come from the project's environment by a
    path entry (not a site directory: its editable-install hook is not read)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"  # a copy: a build in the checkout would reuse its stale build/ directory
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "efficient_rl", source / "efficient_rl", ignore=shutil.ignore_patterns("__pycache__"))
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(base / "dist"),
        str(source),
        cwd=base,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("efficient_rl-*.whl")
    venv = base / "venv"
    assert run(sys.executable, "-m", "venv", str(venv), cwd=base).returncode == 0
    python = venv / "bin" / "python"
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base)
    (Path(site.stdout.strip()) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel), cwd=base)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def test_the_wheel_holds_every_package_and_loads_from_its_install(installed, tmp_path):
    listed = run(
        str(installed / "bin" / "python"),
        "-c",
        """
import importlib, pkgutil, efficient_rl
print(efficient_rl.__file__)
for info in pkgutil.walk_packages(efficient_rl.__path__, "efficient_rl."):
    module = importlib.import_module(info.name)
    print(info.name, int(info.ispkg), module.__file__)
""",
        cwd=tmp_path,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    first, *rows = listed.stdout.splitlines()
    assert first.startswith(str(installed)), f"efficient_rl loaded from {first}, not the installed wheel"
    modules = [row.split() for row in rows]
    assert all(path.startswith(str(installed)) for _, _, path in modules)
    assert {name for name, is_package, _ in modules if is_package == "1"} >= source_packages() - {"efficient_rl"}


def test_every_command_runs_from_the_installed_wheel(installed, tmp_path):
    cli = str(installed / "bin" / "efficient-rl")
    overview = run(cli, "--help", cwd=tmp_path)
    assert overview.returncode == 0, overview.stderr
    commands = overview.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert {"train", "eval", "submit", "study", "methods"} <= set(commands)
    for command in commands:
        shown = run(cli, command, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and "usage: efficient-rl" in shown.stdout, (command, shown.stderr[-2000:])
    methods = run(cli, "methods", cwd=tmp_path)
    assert methods.returncode == 0 and "algorithm.sampling (group sampler)" in methods.stdout, methods.stderr


def test_the_wheel_holds_every_data_file_of_the_package(installed):
    """Recipes, studies, the Slurm template and site profiles: what the package reads at run time."""
    (package,) = installed.glob("lib/python*/site-packages/efficient_rl")
    data = [
        path.relative_to(ROOT / "efficient_rl")
        for path in (ROOT / "efficient_rl").rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    ]
    assert {"recipes/quickstart.yaml", "recipes/studies/tiny.yaml", "slurm/job.sbatch"} <= {p.as_posix() for p in data}
    assert [path for path in data if not (package / path).is_file()] == []


def test_the_installed_command_trains_a_shipped_recipe_by_name_and_evaluates_it(installed, tmp_path, tiny_model_dir):
    """From an empty directory: --version, python -m, the recipes and a copy of one, one training
    step of the packaged quickstart (the tiny lab model, built by the tests' cache), an evaluation."""
    cli, python = str(installed / "bin" / "efficient-rl"), str(installed / "bin" / "python")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    shown = run(cli, "--version", cwd=tmp_path)
    assert shown.stdout.strip() == f"efficient-rl {version}", shown.stderr[-2000:]
    as_module = run(python, "-m", "efficient_rl", "--help", cwd=tmp_path)
    assert as_module.returncode == 0 and as_module.stdout.startswith("usage: efficient-rl"), as_module.stderr[-2000:]

    listed = run(cli, "recipes", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [shipped_name(p) for p in shipped_recipes()]
    copied = run(cli, "recipes", "copy", "dler", "my_dler.yaml", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr[-2000:]
    loads = (
        "from efficient_rl.config.loading import load_recipe; r = load_recipe('my_dler.yaml'); print(r.logging.name)"
    )
    assert run(python, "-c", loads, cwd=tmp_path).stdout.strip() == "my_dler"

    # What the package reads beside the recipes: a study's recipes by relative path, the job template.
    study = run(cli, "study", "check", "tiny", "output_dir=studies", cwd=tmp_path)
    assert study.returncode == 0 and study.stdout.startswith("study tiny: 2 runs"), study.stderr[-2000:]
    script = run(cli, "submit", "quickstart", "--dry-run", cwd=tmp_path)
    assert script.returncode == 0 and script.stdout.startswith("#!/bin/bash"), script.stderr[-2000:]
    assert f"TRAIN_ARGS=({installed}" in script.stdout  # the installed recipe, by name

    runs = tmp_path / "runs"
    quiet = ["steps=1", "eval.before_training=false", "eval.after_training=false", "logging.trackers=[]"]
    trained = run(cli, "train", "quickstart", *TINY_OVERRIDES, *quiet, f"logging.output_dir={runs}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((runs / "quickstart" / "summary.json").read_text())["steps_completed"] == 1
    checkpoint = runs / "quickstart" / "checkpoints" / "step-00000001"
    assert (checkpoint / "model.safetensors").is_file()

    flags = ["--data", "lab:tiny", "--budgets", "8", "--samples", "1", "--problems", "3", "--out", "evaluation"]
    evaluated = run(cli, "eval", "lab:tiny", str(checkpoint), *flags, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    saved = json.loads((tmp_path / "evaluation" / "eval.json").read_text())
    assert set(saved["runs"]) == {"lab_tiny@8", "quickstart_step-00000001@8"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evaluation", "my_dler.yaml", "runs"]
