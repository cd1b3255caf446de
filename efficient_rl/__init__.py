"""RL post-training recipes for efficient reasoning. From Python: `train` and `evaluate`
(docs/python-api.md); from a shell: the `efficient-rl` command."""

from efficient_rl.api import evaluate, train

__all__ = ["evaluate", "train"]
