"""The Ray backend: actor groups that stand in for the embedded engine and learner.

RayRolloutGroup implements the rollout-engine protocol and RayLearnerGroup the learner protocol,
so the driver loop in trainer.py runs unchanged. Weights go from learner rank 0 to every rollout
worker in buckets, never one message per parameter: through Ray's object store, or broadcast in
a collective group (gloo or NCCL).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.cluster.actors import LearnerWorker, RolloutWorker, TeacherWorker
from efficient_rl.cluster.components import Components
from efficient_rl.cluster.runtime import start_ray
from efficient_rl.cluster.teacher import hosts_teacher, teacher_actor_name
from efficient_rl.config.placement import Placement
from efficient_rl.errors import ConfigError, WorkerFailure, one_line
from efficient_rl.rollout.base import SamplingSettings
from efficient_rl.rollout.vllm_engine import draw_seed, verification_prompt


def is_actor_death(err: Exception) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError)


def even_shares(count: int, parts: int) -> list[range]:
    """`count` items in `parts` contiguous shares whose sizes differ by at most one."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


# ---------------------------------------------------------------- placement
@dataclass
class PlacementGroups:
    """The plan's placement (config/placement.py) as Ray placement groups."""

    placement: Placement
    groups: dict  # group name -> Ray placement group

    def options(self, role: str, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        reserved = self.placement.actor_resources(role)
        return {
            "num_cpus": reserved["CPU"],
            "num_gpus": reserved.get("GPU", 0.0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.groups[self.placement.groups[role]], placement_group_bundle_index=index
            ),
            # One torch thread per reserved core, not one per core of the machine.
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(reserved["CPU"])))}},
        }

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            remove_placement_group(group)


def place(placement: Placement, timeout: float) -> PlacementGroups:
    """The placement groups of the plan's placement, waited on until they are ready: at most
    `timeout` seconds, then removed again and one line saying what the cluster lacks."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {
        name: placement_group([bundle] * placement.counts[name], strategy="PACK")
        for name, bundle in placement.bundles.items()
    }
    placed = PlacementGroups(placement, groups)
    try:
        ray.get([group.ready() for group in groups.values()], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        placed.remove()
        raise ConfigError(unplaceable(placement, ray.cluster_resources(), timeout)) from None
    return placed


def unplaceable(placement: Placement, cluster: dict[str, float], timeout: float) -> str:
    """What Ray could not place, and what the cluster lacks for it (a total, or a node large enough)."""
    asked = ", ".join(f"{placement.counts[name]} x {resources(bundle)}" for name, bundle in placement.bundles.items())
    totals = dict(zip(("CPU", "GPU"), placement.totals()))
    lacking = {
        name: amount - cluster.get(name, 0.0) for name, amount in totals.items() if amount > cluster.get(name, 0)
    }
    why = f"it lacks {resources(lacking)} in all" if lacking else "no node holds one whole bundle"
    return (
        f"cluster: Ray did not place the actors within cluster.placement_timeout ({timeout:g} s): the plan asks for "
        f"bundles {asked} (cluster.rollout, cluster.learner), the cluster has {resources(cluster)}; {why}"
    )


def resources(amounts: dict[str, float]) -> str:
    """CPUs and GPUs of a bundle or a cluster, as "{CPU: 4, GPU: 1}" (those it names)."""
    return "{" + ", ".join(f"{name}: {amounts[name]:g}" for name in ("CPU", "GPU") if name in amounts) + "}"


# ---------------------------------------------------------------- learner group
class RayLearnerGroup:
    """The learner protocol over data-parallel ranks; every call goes to every rank."""

    def __init__(self, workers: list):
        self.workers = workers
        self.stop_requested: Callable[[], bool] = lambda: False  # the driver's (Components.follow_stops)

    def call(self, method: str, *args) -> list:
        """Run `method` on every rank and return the results by rank.

        A rank that dies would leave the others blocked in a collective: the group is killed and
        the run stops with a message (its checkpoints are written atomically, so --resume works).
        A rank's own one-line refusal (a checkpoint with non-finite weights) reaches the caller as
        itself, not inside Ray's report with the rank's traceback.
        """
        import ray

        futures = [getattr(worker, method).remote(*args) for worker in self.workers]
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, (ConfigError, WorkerFailure)):
                    raise cause from None
                if not is_actor_death(err) or self.stop_requested():  # then the death is the stop's (loop.py)
                    raise
                rank = futures.index(done[0])
                self.kill()
                raise WorkerFailure(
                    f"learner rank {rank} died during {method} ({one_line(err, 200)}); the run "
                    f"stopped, its last checkpoint is intact: continue it with --resume"
                ) from None
        return ray.get(futures)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        import ray

        return self.call("update", ray.put(batch))[0]  # one copy in the object store for all ranks

    def token_statistics(self, batch: RolloutBatch, names: tuple[str, ...]):
        import ray

        return self.call("token_statistics", ray.put(batch), names)[0]

    def weight_buckets(self, bucket_bytes: int) -> list:
        """(object ref, size in bytes) of every weight bucket, from rank 0."""
        return self.call("weight_buckets", bucket_bytes)[0]

    def save(self, directory) -> None:
        self.call("save", str(directory))

    def load_state(self, directory) -> None:
        self.call("load_state", str(directory))

    def kill(self) -> None:
        kill_all(self.workers)


# ---------------------------------------------------------------- weight transports
class ObjectStoreTransport:
    """Rank 0 puts each bucket in Ray's object store once; each worker gets one message per bucket.

    The default, and the path on CPU (shared memory on one node, Ray's transfer across nodes)."""

    restartable = True

    def __init__(self, bucket_bytes: int, learner=None, workers=()):
        self.bucket_bytes = bucket_bytes
        self.current: list = []  # (object ref, bytes) of the last sync's buckets
        self.sent_bytes = self.sent_buckets = 0

    def send(self, learner, workers: list) -> list:
        """Start loading the learner's weights into every worker; returns their futures."""
        return self.send_snapshot(self.snapshot(learner), workers)

    def snapshot(self, learner) -> list:
        """The learner's current weights in the object store: they stay as they are while it trains on."""
        return learner.weight_buckets(self.bucket_bytes)

    def send_snapshot(self, buckets: list, workers: list) -> list:
        self.current = buckets
        self.sent_bytes, self.sent_buckets = sum(size for _, size in self.current), len(self.current)
        return [self.catch_up(worker) for worker in workers]

    def catch_up(self, worker):
        """Load the last synced weights into a (restarted) worker; returns the future of the load."""
        if not self.current:  # no sync yet: the worker started from the run's starting weights
            return worker.pid.remote()
        for ref, _ in self.current:
            worker.receive_bucket.remote(ref)  # an actor runs one caller's calls in order
        return worker.apply_weights.remote()


class BroadcastTransport:
    """Learner rank 0 broadcasts each bucket to every worker over a collective group of its own
    (cluster/broadcast.py): `gloo` on CPU, `nccl` on GPU, the same code but the communicator.

    The workers load each bucket as it arrives. A restarted worker cannot join the formed group,
    so with this transport a dead rollout worker stops the run."""

    restartable = False

    def __init__(self, communicator: str, bucket_bytes: int, learner: RayLearnerGroup, workers: list):
        import ray

        self.communicator, self.bucket_bytes = communicator, bucket_bytes
        plan = learner.call("weight_plan", bucket_bytes)[0]
        self.sent_bytes, self.sent_buckets = sum(bucket.nbytes for bucket in plan), len(plan)
        host, port = ray.get(learner.workers[0].rendezvous_address.remote())
        world_size = 1 + len(workers)
        joins = [
            worker.join_weight_broadcast.remote(communicator, host, port, 1 + index, world_size, plan)
            for index, worker in enumerate(workers)
        ]
        learner.call("join_weight_broadcast", communicator, host, port, world_size)
        ray.get(joins)

    def send(self, learner, workers: list) -> list:
        receives = [worker.receive_broadcast.remote() for worker in workers]  # they wait in the group
        learner.call("broadcast_weights", self.bucket_bytes)
        return receives

    def catch_up(self, worker):
        raise WorkerFailure(f"a rollout worker cannot rejoin a formed {self.communicator} weight-sync group")


# cluster.weight_transport -> fn(bucket bytes, learner group, rollout workers) -> transport
TRANSPORTS = {
    "object_store": ObjectStoreTransport,
    "gloo": functools.partial(BroadcastTransport, "gloo"),
    "nccl": functools.partial(BroadcastTransport, "nccl"),
}


# ---------------------------------------------------------------- rollout group
class RayRolloutGroup:
    """The rollout-engine protocol over vLLM workers; a dead worker is restarted and its share redone."""

    def __init__(self, spawn: Callable[[int], object], workers: list, max_restarts: int, transport):
        import ray

        self.spawn = spawn  # index -> a new worker actor with the run's starting weights
        self.workers = workers
        ray.get([worker.pid.remote() for worker in self.workers])  # wait until every engine is up
        self.transport = transport
        self.max_restarts = max_restarts if transport.restartable else 0
        self.restarts, self.unreported_restarts = 0, 0
        self.stop_requested: Callable[[], bool] = lambda: False  # the driver's (Components.follow_stops)

    def generate(
        self, prompts: list[list[int]], samples: list[dict], group_ids: list[int], settings: SamplingSettings
    ) -> RolloutBatch:
        shares = even_shares(len(prompts), len(self.workers))
        # Drawn here, in the driver, one per share: a resumed run, and a restarted worker redoing
        # its share, sample the same tokens.
        seeds = [draw_seed() for _ in shares]

        def submit(worker, share, seed):
            return worker.generate.remote(
                [prompts[i] for i in share], [samples[i] for i in share], [group_ids[i] for i in share], settings, seed
            )

        jobs = [
            (index, share, seed, submit(self.workers[index], share, seed))
            for index, (share, seed) in enumerate(zip(shares, seeds))
            if share
        ]
        parts = [
            self._result(index, future, lambda worker, share=share, seed=seed: submit(worker, share, seed))
            for index, share, seed, future in jobs
        ]
        return RolloutBatch.concat(parts)

    def sync_weights(self, learner) -> dict[str, float]:
        started = time.time()
        return self._sync_metrics(started, self.transport.send(learner, self.workers))

    # The overlapped pipeline (cluster/pipeline.py): a snapshot is taken after the update, loaded
    # between generation requests. Object-store transport only (check_overlapped).
    def own_weights(self) -> None:
        pass  # the workers hold weights of their own

    def snapshot(self, learner) -> list:
        return self.transport.snapshot(learner)

    def load_snapshot(self, buckets: list) -> dict[str, float]:
        started = time.time()
        return self._sync_metrics(started, self.transport.send_snapshot(buckets, self.workers))

    def _sync_metrics(self, started: float, futures: list) -> dict[str, float]:
        """Wait for every worker's load (restarting dead ones); the sync's metrics."""
        results = [self._result(index, future, self.transport.catch_up) for index, future in enumerate(futures)]
        metrics = {
            "sync/seconds": time.time() - started,  # gather + transfer + load, end to end
            "sync/load_seconds": max(result["sync/seconds"] for result in results),  # the engines' part
            "sync/bytes": float(self.transport.sent_bytes),
            "sync/buckets": float(self.transport.sent_buckets),
        }
        if all("sync/receive_peak_bytes" in result for result in results):  # collective transports
            metrics["sync/receive_peak_bytes"] = max(result["sync/receive_peak_bytes"] for result in results)
        if all("sync/verified" in result for result in results):
            metrics["sync/verified"] = 1.0
            metrics["sync/verify_logprob_gap"] = max(result["sync/verify_logprob_gap"] for result in results)
        return metrics

    def pop_metrics(self) -> dict[str, float]:
        restarts, self.unreported_restarts = self.unreported_restarts, 0
        return {"rollout/worker_restarts": float(restarts)}

    def _result(self, index: int, future, resubmit: Callable):
        """The future's value; if worker `index` died, restart it and resubmit (bounded)."""
        import ray

        while True:
            try:
                return ray.get(future)
            except Exception as err:
                # After a stop request a death is the stop's (a signal to every process of the run
                # ends the actors with it): no restart, the driver stops (loop.py)
                if not is_actor_death(err) or self.stop_requested():
                    raise
                self._restart(index, err)
                future = resubmit(self.workers[index])

    def _restart(self, index: int, err: Exception) -> None:
        import ray

        if self.restarts >= self.max_restarts:
            raise WorkerFailure(
                f"rollout worker {index} died ({one_line(err, 200)}) and cluster.max_rollout_restarts="
                f"{self.max_restarts} restarts are used up (none with weight_transport gloo or nccl)"
            ) from None
        self.restarts += 1
        self.unreported_restarts += 1
        tqdm.write(
            f"rollout worker {index} died ({one_line(err, 200)}); restart {self.restarts} of at most "
            f"{self.max_restarts}, regenerating its share"
        )
        worker = self.spawn(index)
        ray.get(self.transport.catch_up(worker))
        self.workers[index] = worker

    def kill(self) -> None:
        kill_all(self.workers)


def kill_all(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


# ---------------------------------------------------------------- assembly
def ray_components(plan, setup):
    """Start (or join) Ray, place the actors, and return the learner and engine groups."""
    import ray

    recipe = plan.recipe
    cluster = recipe.cluster
    session = start_ray(cluster.address, *plan.placement.totals())
    closers = [session.close]

    def close():
        # A lost cluster serves no call (killing an actor would wait on its GCS): its keeper ends it all
        for closer in closers[:1] if session.lost.is_set() else reversed(closers):
            closer()

    def lost(err: BaseException) -> bool:
        return session.lost.is_set() or is_actor_death(err)

    try:
        placement = place(plan.placement, cluster.placement_timeout)
        closers.append(placement.remove)
        if hosts_teacher(recipe):
            teacher = start_teacher(plan)  # before the learners, which look it up by name
            closers.append(lambda: kill_all([teacher]))
        learner = start_learners(plan, setup, placement)
        closers.append(learner.kill)
        remote_rollout = ray.remote(RolloutWorker)
        probe = verification_prompt(setup, recipe)

        def spawn(index: int):
            options = placement.options("rollout", index)
            return remote_rollout.options(max_restarts=0, **options).remote(
                recipe, setup.model_dir, probe, plan.devices.rollout
            )

        workers = [spawn(index) for index in range(cluster.rollout.workers)]
        closers.append(lambda: kill_all(workers))
        transport = TRANSPORTS[cluster.weight_transport](int(cluster.sync_bucket_mb * 2**20), learner, workers)
        engine = RayRolloutGroup(spawn, workers, cluster.max_rollout_restarts, transport)
        closers[-1] = engine.kill  # the group replaces workers that die
    except BaseException:
        close()
        raise

    def follow_stops(requested: Callable[[], bool], cut_now: Callable[[], None]) -> None:
        learner.stop_requested = engine.stop_requested = requested
        session.follow(cut_now)

    return Components(learner=learner, engine=engine, close=close, lost=lost, follow_stops=follow_stops)


def start_teacher(plan):
    """The distillation teacher as one named actor. It reserves no CPU of the placement: it works
    only while the learner ranks that call it wait for its answer."""
    import ray

    recipe = plan.recipe
    teacher = (
        ray.remote(TeacherWorker)
        .options(name=teacher_actor_name(recipe), num_cpus=0, max_restarts=0)
        .remote(recipe, plan.devices.teacher)
    )
    ray.get(teacher.vocab_size.remote())  # loaded before anyone asks
    return teacher


def start_learners(plan, setup, placement: PlacementGroups) -> RayLearnerGroup:
    import ray

    world_size = plan.recipe.cluster.learner.workers
    remote_learner = ray.remote(LearnerWorker)
    workers = [
        remote_learner.options(max_restarts=0, **placement.options("learner", rank)).remote(rank, world_size)
        for rank in range(world_size)
    ]
    group = RayLearnerGroup(workers)
    master = ray.get(workers[0].rendezvous_address.remote())
    # The plan travels pickled: each rank imports the recipe's own modules (`imports:`) before it
    # unpickles the entries they registered.
    group.call("setup", plan.recipe.imports, ray.cloudpickle.dumps(plan), setup.model_dir, setup.base_model_dir, master)
    return group
