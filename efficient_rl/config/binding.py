"""A registry entry the recipe picks, bound to its checked parameters."""

from __future__ import annotations

from efficient_rl.config.loading import build
from efficient_rl.config.rules import Interval, check_number
from efficient_rl.config.schema import Choice
from efficient_rl.errors import ConfigError
from efficient_rl.registry import Bound, Registry, did_you_mean


def bind(picked: Choice, registry: Registry, where: str) -> Bound:
    """The entry `picked` names, with its parameters checked: name, keys, types and ranges, each
    error one line naming the field. The driver binds each entry once, with this."""
    if picked.name not in registry:
        raise ConfigError(
            f"{where}: unknown {registry.kind} {picked.name!r}{did_you_mean(picked.name, registry.names())}"
        )
    entry = registry.get(picked.name)
    params = build(entry.params, picked.params, where, source="")
    for name, rule in entry.ranges.items():
        value = getattr(params, name)
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if item is not None:
                path = f"{where}.{name}" + (f"[{index}]" if isinstance(value, list) else "")
                check_number(path, item, Interval.parse(rule))
    return entry.bind(params)
