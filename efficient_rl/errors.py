"""The errors that end a command with a one-line message, and that line's form.

Kept free of heavy imports: the CLI, the recipe loader and reward workers load it first.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad recipe or input; the CLI prints it as one line and exits with status 2."""


class PluginError(ValueError):
    """A module a recipe imports cannot be found or fails to import; the message names it."""


class WorkerFailure(RuntimeError):
    """A worker died and the run cannot go on (its last checkpoint stays intact)."""


class OutputFailure(RuntimeError):
    """An output could not be written whole (a full disk, a read-only directory); nothing
    half-written is left behind. The CLI prints it as one line and exits with status 1."""


def one_line(err: BaseException, limit: int | None = None) -> str:
    """The error's message on one line (its type's name when it has none), cut at `limit` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."
