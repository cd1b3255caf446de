"""Recipes from YAML files (optionally inheriting from a base recipe) plus dotted overrides.

A recipe file may start with `defaults: grpo.yaml` (a path relative to the file); its keys are then
merged over that base, so a method reads as a small diff against GRPO. Every key is checked against
the schema's dataclasses (config/schema.py), every number against config/rules.py; errors name the
field path and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from efficient_rl.config.plugins import import_plugins
from efficient_rl.config.rules import check_numbers
from efficient_rl.config.schema import Choice, Recipe
from efficient_rl.errors import ConfigError, PluginError, one_line
from efficient_rl.registry import did_you_mean


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    raw = read_recipe_file(path)
    for override in overrides:
        apply_override(raw, override)
    refuse_retired_keys(raw, source=str(path))
    recipe = build(Recipe, raw, "", source=str(path))
    try:
        check_numbers(recipe)
        import_plugins(recipe.imports)
    except (ConfigError, PluginError) as err:
        raise ConfigError(f"{path}: {'imports: ' if isinstance(err, PluginError) else ''}{err}") from None
    if recipe.logging.name is None:
        recipe.logging.name = path.stem
    return recipe


# Recipe keys that no longer exist (dotted path -> what to write instead). A retired key is refused
# rather than translated: a silent translation keeps the old spelling alive in every recipe that has it.
RETIRED_KEYS = {
    "logging.tensorboard": "list the trackers in logging.trackers, e.g. logging.trackers: [tensorboard] "
    "(or [] for none)",
    "algorithm.dynamic_sampling": "write algorithm.sampling: dynamic (or all)",
    "algorithm.dynamic_sampling_metric": "write algorithm.sampling: {name: dynamic, metric: ...}",
    "algorithm.max_sampling_rounds": "write algorithm.sampling: {name: dynamic, max_rounds: N}",
    "algorithm.truncation_length": "write algorithm.length_cap: {name: fixed, length: N}",
    "algorithm.difficulty_tiers": "write algorithm.length_cap: {name: difficulty_aware, min_correct: [...], "
    "truncation_lengths: [...]}",
}


def refuse_retired_keys(raw: dict, source: str = "") -> None:
    """One line naming the first retired key the raw recipe sets and what to write instead."""
    for path, instead in RETIRED_KEYS.items():
        if sets_key(raw, path.split(".")):
            raise ConfigError(f"{located(source, path)}: retired key; {instead}")


def sets_key(raw, parts: list[str]) -> bool:
    """Whether the nested mappings of `raw` hold the dotted path `parts` (a section that is not a
    mapping holds nothing; build names it)."""
    for part in parts:
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def read_recipe_file(path: Path) -> dict:
    """The recipe file's mapping merged over its `defaults:` chain."""
    return read_file_chain(path, "recipe", "recipe sections")


def read_file_chain(path: Path, kind: str, contents: str, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping (a recipe, a study) merged over its `defaults:` chain of files of the same
    kind, each path relative to the file naming it; `contents` says what the mapping holds."""
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'defaults' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({one_line(err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {contents}, got {type(raw).__name__}")
    base_name = raw.pop("defaults", None)
    if base_name is None:
        return raw
    base = read_file_chain(path.parent / base_name, kind, contents, seen + (path.resolve(),))
    return deep_merge(base, raw)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, mappings merged key by key. A Choice given by name alone in `base`
    takes the parameters `update` sets for it; one that `update` names anew starts from the new
    entry's defaults (the old entry's parameters mean nothing to it)."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, str) and "name" not in value:
            old = {"name": old}
        if isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name"):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict, override: str) -> None:
    """`a.b.c=value` sets raw[a][b][c] to the YAML-parsed value."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    value = yaml_number(value)
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        if isinstance(node.get(part), str):  # a Choice by name: its parameters are being set
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[leaf] = value


def yaml_number(value):
    """YAML 1.1 reads `2e-4` (no dot) as a string; on the command line it is meant as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def located(source: str, path: str) -> str:
    """ "recipe.yaml: algorithm.policy_loss.clip_high" (or just the path when there is no file)."""
    return f"{source}: {path}" if source else path


def build(cls, raw: Any, where: str, source: str):
    """Turn a raw mapping into dataclass `cls`, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{located(source, where or 'recipe')}: expected a mapping, got {describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{located(source, path)}: unknown key{did_you_mean(str(key), names)}")
        values[key] = convert(
            hints[key], with_default_name(cls, key, value) if hints[key] is Choice else value, path, source
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{located(source, where)}: expected {', '.join(missing)} to be set")
    return cls(**values)


def with_default_name(cls, key: str, value):
    """Parameters set for a Choice the recipe never names (`learner.lr_schedule.warmup_steps=10`)
    are the default entry's."""
    if isinstance(value, dict) and "name" not in value:
        default = next(f for f in dataclasses.fields(cls) if f.name == key)
        if default.default_factory is not dataclasses.MISSING:
            return {"name": default.default_factory().name, **value}
    return value


def convert_choice(value, path: str, source: str) -> Choice:
    if isinstance(value, str):
        return Choice(value)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return Choice(value["name"], {key: item for key, item in value.items() if key != "name"})
    raise ConfigError(
        f"{located(source, path)}: expected a name, or a mapping with 'name' and the entry's "
        f"parameters, got {describe(value)}"
    )


def convert(kind, value, path: str, source: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Choice:
        return convert_choice(value, path, source)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, path, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:
            return convert(alternatives[0], value, path, source)
        return convert_alternatives(alternatives, value, path, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{located(source, path)}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{located(source, path)}: expected a list, got {describe(value)}")
        return [convert(args[0], item, f"{path}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:  # dict[str, X]: names to values of one kind
        if not isinstance(value, dict):
            raise ConfigError(f"{located(source, path)}: expected a mapping, got {describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(f"{located(source, path)}: expected names as keys, got {describe(key)}")
        return {key: convert(args[1], item, f"{path}.{key}", source) for key, item in value.items()}
    checks = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
        str: (lambda v: isinstance(v, str), "a string"),
        dict: (lambda v: isinstance(v, dict), "a mapping"),
    }
    if kind is Any:
        return value
    check, expected = checks[origin or kind]
    if not check(value):
        raise ConfigError(f"{located(source, path)}: expected {expected}, got {describe(value)}")
    return float(value) if kind is float else value


def convert_alternatives(alternatives: list, value, path: str, source: str):
    """`value` as the first of several kinds it fits (a number or "none"); one line naming them all if none."""
    for kind in alternatives:
        try:
            return convert(kind, value, path, source)
        except ConfigError:
            continue
    expected = " or ".join(map(expectation, alternatives))
    raise ConfigError(f"{located(source, path)}: expected {expected}, got {describe(value)}")


def expectation(kind) -> str:
    """What a value of `kind` looks like, for a message: "a number", "'none'"."""
    if typing.get_origin(kind) is Literal:
        return " or ".join(map(repr, typing.get_args(kind)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def describe(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"
