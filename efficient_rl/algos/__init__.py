"""RL algorithm pieces as pure tensor functions behind registries."""

# Importing the estimators that live outside advantages.py registers them, so every user of
# ADVANTAGES (recipe checks, the trainer) sees them whichever algos module it imports first.
from efficient_rl.algos import tempo

__all__ = ["tempo"]
