"""Name -> entry tables, so a recipe picks a method by name and the driver never branches.

An entry describes itself: its function, its typed parameters with their defaults (the
function's keyword-only parameters, read from its signature: the signature is the one place
for each default), the valid range of each numeric parameter, what it needs from the run
(statistics such as token entropy, a teacher, the training progress...), a one-line source, and
optional diagnostics. A recipe names an entry and sets its parameters; the recipe's validation
(driver/validate.py) checks them and binds each entry once, into the plan every component reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

# What an entry may need from the run, each with what provides it: the one vocabulary of `needs`
# (a name outside it is refused when the recipe is checked, naming the entry). Besides these: the
# name of a TOKEN_STATISTICS entry (a per-token statistic the learner computes), and
# "sample.<field>" (a number every sample carries: a data column or a prompt variable).
NEEDS = {
    "answer_end": "where each correct rollout first reaches an answer its verifier accepts, in tokens: its prefixes "
    "scored by the recipe's rewards after each round (efficient_rl/scoring/answer_reached.py)",
    "driver_model": "the policy loaded in the driver's process (the embedded cluster backend)",
    "length_cap": "the truncation length in force for each rollout",
    "length_profile": "a reference model's lengths per training prompt, joined on each sample by id from the "
    "entry's `stats` file at load (efficient-rl profile-lengths)",
    "old_logprobs": "the pre-update log-probs, computed when a batch takes several optimizer steps",
    "teacher": "a distillation teacher (distill.teacher)",
}
SAMPLE_FIELD_NEED = "sample."


@dataclass(frozen=True)
class Entry:
    kind: str  # what the registry holds, e.g. "advantage estimator": for messages
    name: str
    function: Callable
    params: type  # a dataclass of the recipe-settable parameters, with their defaults
    # What the run must provide, by name (see each registry's vocabulary); or fn(params) -> names
    # when that depends on the parameters.
    needs: tuple[str, ...] | Callable = ()
    ranges: dict[str, str] = field(default_factory=dict)  # parameter -> interval, e.g. "(0, 1]"
    source: str = ""  # one line: the paper (arXiv id, section or equation) or code it follows
    metrics: Callable | None = None  # optional diagnostics, logged every step (arguments: see the registry)
    # Checks that need more of the recipe than the entry's own parameters: fn(params, recipe) ->
    # an error message (one line, naming the parameter) or None.
    check: Callable | None = None

    def __call__(self, *args, **kwargs):
        """The function itself: an entry can be called directly with explicit parameters."""
        return self.function(*args, **kwargs)

    def bind(self, params: Any = None) -> Bound:
        """The entry with its parameters fixed: an instance of `self.params` (defaults if None)."""
        return Bound(self, params if params is not None else self.params())

    def defaults(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params())


@dataclass(frozen=True)
class Bound:
    """An entry and its parameters, bound once; calling it passes them as keywords."""

    entry: Entry
    params: Any

    def __call__(self, *args, **provided):
        return self.entry.function(*args, **provided, **self.keywords())

    def keywords(self) -> dict[str, Any]:
        return {item.name: getattr(self.params, item.name) for item in dataclasses.fields(self.params)}

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def needs(self) -> tuple[str, ...]:
        needs = self.entry.needs
        return tuple(needs(self.params)) if callable(needs) else needs

    def metrics(self, *args) -> dict[str, float]:
        """The entry's diagnostics for this call ({} without any); they get the parameters too."""
        return self.entry.metrics(*args, **self.keywords()) if self.entry.metrics else {}


class Registry:
    def __init__(self, kind: str, provided: tuple[str, ...] = ()):
        """`provided`: keyword parameters the caller passes at call time (a random generator, the
        training progress...), which are therefore not recipe parameters."""
        self.kind = kind
        self.provided = provided
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        *,
        needs: tuple[str, ...] | Callable = (),
        ranges: dict[str, str] | None = None,
        source: str = "",
        metrics: Callable | None = None,
        check: Callable | None = None,
    ) -> Callable:
        def add(function: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            params = params_of(function, name, self.provided)
            unknown = set(ranges or {}) - {item.name for item in dataclasses.fields(params)}
            if unknown:
                raise ValueError(f"{self.kind} {name!r}: ranges for unknown parameters {sorted(unknown)}")
            self._entries[name] = Entry(
                self.kind,
                name,
                function,
                params,
                needs if callable(needs) else tuple(needs),
                dict(ranges or {}),
                source,
                metrics,
                check,
            )
            return function

        return add

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def params_of(function: Callable, name: str, provided: tuple[str, ...]) -> type:
    """A dataclass of `function`'s keyword-only parameters, but those the caller provides."""
    hints = typing.get_type_hints(function)
    fields = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in provided:
            continue
        kind = hints.get(parameter.name, Any)
        if parameter.default is inspect.Parameter.empty:
            fields.append((parameter.name, kind))
        elif isinstance(parameter.default, (list, dict)):  # a mutable default: one copy per instance
            fields.append(
                (parameter.name, kind, field(default_factory=lambda value=parameter.default: type(value)(value)))
            )
        else:
            fields.append((parameter.name, kind, field(default=parameter.default)))
    class_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) + "Params"
    required_first = sorted(fields, key=lambda item: len(item) == 3)  # a dataclass wants them first
    return dataclasses.make_dataclass(class_name, required_first, frozen=True)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; expected one of: {', '.join(sorted(choices))}"
