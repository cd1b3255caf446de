"""What a cluster backend hands the driver: a learner, a rollout engine, and how to release them.

Its own module because both backends.py (the registry, the embedded backend) and ray_backend.py
build one, and backends.py is what imports ray_backend.py, not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Components:
    learner: object  # a Learner
    engine: object  # a RolloutEngine
    close: Callable[[], None]  # releases processes and clusters; called at the end or on error
    # Whether an error says processes of the backend are gone (an actor's death): after a stop
    # request that is the stop (driver/loop.py). The embedded backend has none to lose.
    lost: Callable[[BaseException], bool] = lambda err: False
    # follow_stops(requested, cut_now): how the driver's stop requests stand (driver/stopping.py),
    # for a backend that acts on them. The Ray backend restarts no actor and reports no actor's
    # death as a failure once a stop was requested, and calls cut_now() when its cluster is lost.
    follow_stops: Callable[[Callable[[], bool], Callable[[], None]], None] = lambda requested, cut_now: None
