"""Which packages install (everything else is in pyproject.toml).

Every package under efficient_rl/ is found, so a new folder needs no list kept by hand; the reward
plugins in rewards/ install as efficient_rl.rewards, a mapping pyproject.toml's automatic
discovery cannot express.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["efficient_rl", "efficient_rl.*"]), "efficient_rl.rewards"],
    package_dir={"efficient_rl.rewards": "rewards"},
)
