"""Where a Ray run's actors go, resolved from the recipe's cluster section when the recipe is
validated (driver/validate.py puts it in the plan): the placement groups' bundles, and the share
of a bundle each actor takes. cluster/ray_backend.py creates exactly these groups, a local Ray
cluster is started with their totals, and `submit` sizes a job by them. No Ray here: the
arithmetic is checked on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from efficient_rl.config.schema import ClusterSection

ROLES = ("rollout", "learner")


@dataclass(frozen=True)
class Placement:
    bundles: dict[str, dict[str, float]]  # group -> the resources of each of its bundles ({"CPU": c, "GPU": g})
    counts: dict[str, int]  # group -> its number of bundles
    groups: dict[str, str]  # role -> the group its actors go in (colocated roles share one)
    share: float  # the fraction of a bundle one actor takes: 0.5 where two roles share each bundle

    def actor_resources(self, role: str) -> dict[str, float]:
        """What one actor of `role` reserves: its share of one bundle of its group."""
        return {name: amount * self.share for name, amount in self.bundles[self.groups[role]].items()}

    def totals(self) -> tuple[float, float]:
        """(CPUs, GPUs) of every bundle together: what the cluster must have."""
        return tuple(
            sum(self.counts[group] * bundle.get(name, 0.0) for group, bundle in self.bundles.items())
            for name in ("CPU", "GPU")
        )

    def largest_bundle(self) -> tuple[float, float]:
        """(CPUs, GPUs) of the largest bundle: what one node must hold."""
        return tuple(max(bundle.get(name, 0.0) for bundle in self.bundles.values()) for name in ("CPU", "GPU"))


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def resolve_placement(cluster: ClusterSection) -> Placement:
    """split: a placement group per role, a bundle per actor. colocate: rollout worker i and learner
    rank i share bundle i of one group, each taking half of it (as GPU time-sharing does)."""
    rollout, learner = cluster.rollout, cluster.learner
    if cluster.placement == "colocate":
        shared = bundle(max(rollout.cpus, learner.cpus), max(rollout.gpus, learner.gpus))
        count = max(rollout.workers, learner.workers)
        return Placement({"shared": shared}, {"shared": count}, dict.fromkeys(ROLES, "shared"), share=0.5)
    return Placement(
        {"rollout": bundle(rollout.cpus, rollout.gpus), "learner": bundle(learner.cpus, learner.gpus)},
        {"rollout": rollout.workers, "learner": learner.workers},
        {role: role for role in ROLES},
        share=1.0,
    )
