"""The package as a wheel installs it: built from the checkout, installed (not editable) into a
fresh virtual environment whose only other packages are the dependencies, and run from a
directory that holds no project files.

Packages are found automatically (pyproject.toml): the wheel must hold every package of the source
tree, and every command, and every module, must load from the installed copy.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARD = 600  # seconds: a hang guard for a build or an install, never a duration bound


def run(*command, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=GUARD)


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
