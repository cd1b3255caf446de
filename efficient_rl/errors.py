"""Errors that end a run with a one-line message (kept free of heavy imports: the CLI loads it first)."""


class WorkerFailure(RuntimeError):
    """A worker died and the run cannot go on (its last checkpoint stays intact)."""
