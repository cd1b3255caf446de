"""Finding reward functions by reference.

How a function is called (its form: native, batched, TRL's, verl's) is efficient_rl/scoring/forms.py.

References, tried in this order:
  "math"                        a built-in name
  "path/to/file.py:function"    a Python file (relative to the working directory)
  "package.module:function"     an importable module
  "name"                        an installed plugin: entry point `name` in group efficient_rl.rewards
No torch import here: reward workers load this module.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from efficient_rl.config import plugins

BUILTIN_REWARDS = {
    "math": "efficient_rl.rewards.math:math_reward",
    "format": "efficient_rl.rewards.format:format_reward",
    "choice": "efficient_rl.rewards.multiple_choice:choice_reward",
    "code": "efficient_rl.rewards.code:code_reward",
    "length": "efficient_rl.rewards.length:length_reward",
    "length_metric": "efficient_rl.rewards.length:length_metric",
}
ENTRY_POINT_GROUP = "efficient_rl.rewards"


class RewardLoadError(ValueError):
    pass


def load_reward(reference: str):
    """The function a reference names; RewardLoadError says why not."""
    reference = BUILTIN_REWARDS.get(reference, reference)
    if ":" not in reference:
        return from_entry_point(reference)
    location, function_name = reference.rsplit(":", 1)
    module = load_file(Path(location)) if location.endswith(".py") else import_module(location)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardLoadError(f"{location} has no function {function_name!r}")
    return function


def from_entry_point(name: str):
    found = [point for point in entry_points(group=ENTRY_POINT_GROUP) if point.name == name]
    if not found:
        installed = sorted(point.name for point in entry_points(group=ENTRY_POINT_GROUP))
        raise RewardLoadError(
            f"unknown reward {name!r}; built-in: {', '.join(sorted(BUILTIN_REWARDS))}"
            f"{'; installed: ' + ', '.join(installed) if installed else ''}; "
            "or give path/to/file.py:function or package.module:function"
        )
    return found[0].load()


def load_file(path: Path):
    if not path.is_file():
        raise RewardLoadError(f"reward file {path} not found")
    try:
        return plugins.import_file(path, prefix="efficient_rl_reward")
    except plugins.PluginError as err:
        raise RewardLoadError(str(err)) from None


def import_module(name: str):
    try:
        return plugins.import_module(name)
    except plugins.PluginError as err:
        raise RewardLoadError(str(err)) from None
