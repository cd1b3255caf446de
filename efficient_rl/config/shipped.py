"""The recipes and studies that ship inside the package, found by name as well as by path.

A reference is a path to a YAML file or a shipped name: `quickstart`, `dler.yaml`,
`ablation/dler_ablation_0_truncation`. A file that exists wins, so a recipe of one's own in the
working directory is never shadowed by a shipped one. `copy_recipe` writes a shipped recipe out as a
file that loads from anywhere, to start one's own from.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from efficient_rl.errors import ConfigError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "recipes"
STUDIES_DIR = SHIPPED_DIR / "studies"  # study files (`efficient-rl study`), not recipes


def shipped_recipes() -> list[Path]:
    """Every shipped recipe, subfolders too (ablation/, length_penalties/), but not the studies."""
    return sorted(path for path in SHIPPED_DIR.rglob("*.yaml") if STUDIES_DIR not in path.parents)


def shipped_studies() -> list[Path]:
    return sorted(STUDIES_DIR.rglob("*.yaml"))


def shipped_name(path: Path, folder: Path = SHIPPED_DIR) -> str:
    """The name a shipped file is asked for by: its path under `folder`, without `.yaml`."""
    return path.relative_to(folder).with_suffix("").as_posix()


def recipes_by_name() -> dict[str, Path]:
    return {shipped_name(path): path for path in shipped_recipes()}


def resolve_recipe(reference: str | Path) -> Path:
    """The recipe file `reference` names: an existing file, else a shipped recipe's name."""
    path = Path(reference)
    return path if path.is_file() else find_shipped(reference, "recipe", recipes_by_name())


def resolve_study(reference: str | Path) -> Path:
    """The study file `reference` names: an existing file, else a shipped study's name (`tiny`)."""
    path = Path(reference)
    by_name = {shipped_name(study, STUDIES_DIR): study for study in shipped_studies()}
    return path if path.is_file() else find_shipped(reference, "study", by_name)


def find_shipped(reference: str | Path, kind: str, by_name: dict[str, Path]) -> Path:
    """The shipped file named `reference` (with or without `.yaml`); else one line with the closest names."""
    path = Path(reference)
    if path.is_absolute():  # meant as a file: no shipped name to suggest
        raise ConfigError(f"{reference}: {kind} file not found")
    name = path.as_posix().removesuffix(".yaml")
    if name in by_name:
        return by_name[name]
    close = difflib.get_close_matches(name, list(by_name), n=3)
    known = f"did you mean {', '.join(close)}?" if close else f"shipped ones: {', '.join(sorted(by_name))}"
    raise ConfigError(f"{reference}: {kind} file not found, nor a shipped {kind} of that name ({known})")


def copy_recipe(name: str, destination: Path, force: bool = False) -> Path:
    """Write shipped recipe `name` to `destination`. A recipe that builds on others (`defaults:`,
    a path beside it) is written with its chain merged in: the copy stands alone, wherever it goes."""
    from efficient_rl.config.loading import read_recipe_file

    source = find_shipped(name, "recipe", recipes_by_name())
    if destination.is_dir():
        raise ConfigError(f"{destination}: a directory; name the file to write, e.g. {destination / source.name}")
    if destination.exists() and not force:
        raise ConfigError(f"{destination}: already exists; pick another name, or pass --force to replace it")
    if not destination.parent.is_dir():
        raise ConfigError(f"{destination}: no directory {destination.parent}; create it first")
    text = source.read_text()
    raw = yaml.safe_load(text) or {}
    if "defaults" in raw:  # a path relative to the shipped file, which means nothing beside the copy
        merged = yaml.safe_dump(read_recipe_file(source), sort_keys=False, default_flow_style=False)
        origin = f"# The shipped `{shipped_name(source)}`, its `defaults:` chain merged in (recipes copy).\n"
        text = leading_comments(text) + origin + merged
    destination.write_text(text)
    return destination


def leading_comments(text: str) -> str:
    """The comment block a recipe file starts with (what it is, where its numbers come from)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)
