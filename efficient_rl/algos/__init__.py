"""RL algorithm pieces as pure tensor functions behind registries."""

# Importing the entries that live outside their registry's module registers them, so every user
# of ADVANTAGES and LENGTH_SHAPERS (recipe checks, the trainer) sees them whichever algos module
# it imports first.
from efficient_rl.algos import decs, group_length, length_controllers, length_rewards, tempo

__all__ = ["decs", "group_length", "length_controllers", "length_rewards", "tempo"]
