"""How rollouts and learning take turns: `cluster.pipeline` (docs/pipeline.md).

A pipeline owns "the batch of step t" and the engine's weights. The driver loop asks it for the
step's batch, trains on it, and publishes the new weights; it never knows whether the batch was
generated just now (`sync`) or while the learner trained on the previous ones (`overlapped`).

Policy versions: version v is the policy after v training steps (0: the starting weights). Every
rollout row carries the version it was generated with (`RolloutBatch.policy_versions`) and its
behaviour log-probs (`rollout_logprobs`); the batch of step t is trained by version t - 1, so its
staleness is t - 1 - version.

Both pipelines produce a step's batch with the same function (the trainer's collect_rollouts:
generate, score, shape, and dynamic sampling's refill rounds) and report the same metrics, so a
run's figures compare across them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from efficient_rl.registry import Registry


@dataclass
class Produced:
    """What producing one step's batch gives the driver."""

    batch: object  # the RolloutBatch to train on (groups kept by dynamic sampling)
    metrics: dict[str, float]  # rollout metrics of the step (every round)
    generated: object  # every rollout of every round, for the completions log
    stream_start: int = 0  # the data stream's position before the batch took its prompts
    stream_end: int = 0  # and after


@dataclass
class Utilisation:
    """Busy and waiting seconds of each side since the last report, as step metrics."""

    since: float = field(default_factory=time.time)
    rollout_busy: float = 0.0
    rollout_wait: float = 0.0  # the rollout side waiting for a policy version
    learner_wait: float = 0.0  # the driver waiting for a batch

    def report(self, now: float) -> dict[str, float]:
        wall = max(now - self.since, 1e-9)
        metrics = {
            "timing/rollout_wait": self.rollout_wait,
            "timing/learner_wait": self.learner_wait,
            "timing/rollout_utilisation": min(self.rollout_busy / wall, 1.0),
            "timing/learner_utilisation": 1.0 - min(self.learner_wait / wall, 1.0),
        }
        self.since, self.rollout_busy, self.rollout_wait, self.learner_wait = now, 0.0, 0.0, 0.0
        return metrics


# name -> factory(produce, engine, last_step, **params) returning a pipeline. `produce(step,
# generate)` collects the batch of `step` and calls `generate(prompts, samples, group_ids,
# settings)` for each generation request.
PIPELINES: Registry = Registry("pipeline")


class SyncPipeline:
    """Today's loop: the batch of step t is generated when the driver asks for it, with the
    weights of version t - 1, loaded right after the previous update."""

    max_staleness = 0  # every batch comes from the newest weights

    def __init__(self, produce: Callable, engine, last_step: int):
        self.produce, self.engine, self.last_step = produce, engine, last_step
        self.version = 0  # of the weights the engine holds
        self.pending: dict[int, Produced] = {}  # batches a checkpoint saved before they were trained
        self.clock = Utilisation()

    def start(self, step: int, pending: list[Produced] = ()) -> None:
        """Begin with the batch of `step`; the engine holds version step - 1 (a resume's checkpoint)."""
        self.version = step - 1
        self.pending = {step + index: produced for index, produced in enumerate(pending)}
        self.clock = Utilisation()

    def take_restored_weights(self, learner) -> None:
        """Before start on a resume: the engine takes the learner's restored weights. It started
        from the checkpoint's model files, which hold the model's own dtype: a bf16 model's files
        round the float32 masters the learner restored, and the run would sample its first
        resumed step from them where an uninterrupted run samples from the masters."""
        self.engine.sync_weights(learner)

    def batch(self, step: int) -> Produced:
        started = time.time()
        produced = self.pending.pop(step, None) or self.produce(step, self.generate)
        elapsed = time.time() - started
        self.clock.rollout_busy += elapsed
        self.clock.learner_wait += elapsed
        return produced

    def generate(self, prompts, samples, group_ids, settings):
        return stamped(self.engine.generate(prompts, samples, group_ids, settings), self.version)

    def publish(self, learner, version: int) -> dict[str, float]:
        """The learner's weights after step `version` reach the engine; returns sync metrics."""
        metrics = self.engine.sync_weights(learner)
        self.version = version
        return metrics

    def report(self) -> dict[str, float]:
        now = time.time()
        # In turn, the rollout side waits whenever it is not producing.
        self.clock.rollout_wait = max(now - self.clock.since - self.clock.rollout_busy, 0.0)
        return self.clock.report(now)

    def saved(self) -> list[Produced]:
        """Batches produced but not yet trained, in step order (a checkpoint keeps them)."""
        return [self.pending[step] for step in sorted(self.pending)]

    @contextlib.contextmanager
    def paused(self):
        """Nothing generates inside (the stream, the RNG and the saved batches agree)."""
        yield

    @contextlib.contextmanager
    def exclusive(self):
        """The engine to the caller alone, holding the newest weights (an evaluation)."""
        yield self.engine

    def close(self, wait: bool = True) -> None:
        pass


def stamped(batch, version: int):
    """The batch with every row marked as generated by policy `version`."""
    batch.policy_versions = torch.full((len(batch),), version, dtype=torch.long)
    return batch


@PIPELINES.register("sync", source="docs/pipeline.md")
def sync_pipeline(produce, engine, last_step) -> SyncPipeline:
    return SyncPipeline(produce, engine, last_step)


class OverlappedPipeline(SyncPipeline):
    """A producer thread generates the batches of the next steps while the driver trains.

    The batch of step t is started once version t - 1 - max_staleness is published, and before
    every generation request (dynamic sampling's refill rounds included) the engine loads the
    newest published weights: between requests, never during one. So no trained sample lags by
    more than max_staleness versions, and with 0 the batches are exactly sync's.
    """

    def __init__(self, produce: Callable, engine, last_step: int, max_staleness: int):
        super().__init__(produce, engine, last_step)
        self.max_staleness = max_staleness
        engine.own_weights()  # the learner trains while the engine generates: not on one module
        self.ready: dict[int, Produced] = {}
        self.next_step = 1  # the step the producer makes next
        self.published: tuple[int, object] = (0, None)  # the newest version and its weights
        self.busy_since: float | None = None  # the producer is producing (or loading weights)
        self.pauses = 0
        self.error: BaseException | None = None
        self.stopping = False
        self.changed = threading.Condition()
        self.load_metrics: dict[str, float] = {}  # of the loads since the last publish
        self.thread: threading.Thread | None = None

    def start(self, step: int, pending: list[Produced] = ()) -> None:
        self.version = step - 1
        self.published = (step - 1, None)  # the engine holds it already
        self.ready = {step + index: produced for index, produced in enumerate(pending)}
        self.next_step = step + len(self.ready)
        self.clock = Utilisation()
        self.thread = threading.Thread(target=self.run, name="rollout-producer", daemon=True)
        self.thread.start()

    def take_restored_weights(self, learner) -> None:
        """As SyncPipeline's, through a snapshot: the engine holds weights of its own here."""
        self.engine.load_snapshot(self.engine.snapshot(learner))

    # ------------------------------------------------------------ the producer thread
    def run(self) -> None:
        while True:
            with self.changed:
                waited = time.time()
                self.changed.wait_for(self.may_produce)
                self.clock.rollout_wait += time.time() - waited
                if self.stopping or self.next_step > self.last_step:
                    return
                step = self.next_step
                self.busy_since = time.time()
            try:
                produced = self.produce(step, self.generate)
            except BaseException as err:  # the driver raises it when it asks for the batch
                with self.changed:
                    self.error = err
                    self.end_busy()
                    self.changed.notify_all()
                return
            with self.changed:
                self.ready[step] = produced
                self.next_step += 1
                self.end_busy()
                self.changed.notify_all()

    def may_produce(self) -> bool:
        if self.stopping or self.next_step > self.last_step:
            return True
        return self.pauses == 0 and self.published[0] >= self.next_step - 1 - self.max_staleness

    def end_busy(self) -> None:
        self.clock.rollout_busy += time.time() - self.busy_since
        self.busy_since = None

    def generate(self, prompts, samples, group_ids, settings):
        self.load_newest()
        return stamped(self.engine.generate(prompts, samples, group_ids, settings), self.version)

    def load_newest(self) -> None:
        """Load the newest published weights if the engine lacks them (each load resets the
        engine's prefix cache: no KV of older weights is reused)."""
        with self.changed:
            version, weights = self.published
        if version > self.version:
            metrics = self.engine.load_snapshot(weights)
            with self.changed:
                self.version = version
                self.load_metrics.update(metrics)

    # ------------------------------------------------------------ the driver's side
    def batch(self, step: int) -> Produced:
        with self.changed:
            waited = time.time()
            self.changed.wait_for(lambda: step in self.ready or self.error is not None)
            self.clock.learner_wait += time.time() - waited
            if step not in self.ready:
                raise self.error
            return self.ready.pop(step)

    def publish(self, learner, version: int) -> dict[str, float]:
        """A copy of the learner's weights after step `version`, for the producer's next request."""
        started = time.time()
        weights = self.engine.snapshot(learner)
        with self.changed:
            self.published = (version, weights)
            loads, self.load_metrics = self.load_metrics, {}
            self.changed.notify_all()
        return {**loads, "sync/snapshot_seconds": time.time() - started}

    def report(self) -> dict[str, float]:
        with self.changed:
            now = time.time()
            if self.busy_since is not None:  # a batch in progress counts up to now
                self.clock.rollout_busy += now - self.busy_since
                self.busy_since = now
            return self.clock.report(now)

    def saved(self) -> list[Produced]:
        with self.changed:
            return [self.ready[step] for step in sorted(self.ready)]

    @contextlib.contextmanager
    def paused(self):
        with self.changed:
            self.pauses += 1
            self.changed.wait_for(lambda: self.busy_since is None)  # the batch in progress finishes
        try:
            yield
        finally:
            with self.changed:
                self.pauses -= 1
                self.changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self.paused():
            self.load_newest()
            yield self.engine

    def close(self, wait: bool = True) -> None:
        """Stop the producer; a generation request in progress finishes first, unless not `wait`:
        then the producer (a daemon thread) is left to the process's exit, for a request that can
        never finish (the engine's processes are gone)."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if wait and self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()


def check_overlapped(params, recipe) -> str | None:
    """What off-policy training needs of the rest of the recipe."""
    if params.max_staleness >= 1 and recipe.algorithm.rollout_correction.name == "none":
        return (
            f"max_staleness: {params.max_staleness} trains on rollouts of older policies; set "
            f"algorithm.rollout_correction: tis (their behaviour log-probs correct the loss) or max_staleness: 0"
        )
    if recipe.cluster.backend == "ray" and recipe.cluster.weight_transport != "object_store":
        return (
            f"name: overlapped needs cluster.weight_transport: object_store ({recipe.cluster.weight_transport} "
            f"broadcasts weights only at a sync, not from a snapshot between generation requests)"
        )
    return None


@PIPELINES.register(
    "overlapped", ranges={"max_staleness": "[0, inf)"}, check=check_overlapped, source="docs/pipeline.md"
)
def overlapped_pipeline(produce, engine, last_step, *, max_staleness: int = 1) -> OverlappedPipeline:
    """max_staleness: how many policy versions a trained rollout may lag (1: one-step off-policy)."""
    return OverlappedPipeline(produce, engine, last_step, max_staleness)
