"""The one driver loop. Every method is a registry entry chosen once from the recipe."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from efficient_rl.algos.advantages import group_stats
from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.shaping import GatedPenalty, ScoresOutsidePromise, ShapingInputs, over_cap
from efficient_rl.config.plan import Plan
from efficient_rl.config.schema import Recipe
from efficient_rl.data.sources import PromptStream
from efficient_rl.data.variables import eval_variants
from efficient_rl.driver import stopping
from efficient_rl.driver.build import Setup, build_setup
from efficient_rl.driver.metrics import MetricsLogger, completion_sample, completions_due
from efficient_rl.driver.pipeline import Produced
from efficient_rl.driver.selection import Selection
from efficient_rl.driver.validate import validate
from efficient_rl.errors import ConfigError, WorkerFailure
from efficient_rl.eval.heldout import evaluate
from efficient_rl.eval.metrics import length_summary
from efficient_rl.registry import Bound
from efficient_rl.rollout.base import SamplingSettings, rollout_sampling
from efficient_rl.run.checkpoint import RunDir
from efficient_rl.scoring.answer_reached import batch_answer_ends, no_answer_ends
from efficient_rl.scoring.runner import REWARD_FAILURES, RewardResult

# What a stop request during the final evaluation says (it ends the evaluation at once, see train).
FINAL_EVALUATION_STOP = "every step is done and checkpointed; stopping the final evaluation (--resume runs it)"
# What one during the evaluation before training says: it ends that at once too, before any step.
WARM_START_STOP = "stopping the evaluation before training; nothing of it is recorded"
# The trainer state's key for what the length penalty carries across steps (Leash's multiplier).
PENALTY_STATE = "length_penalty_state"


@dataclass
class Stage:
    """The recipe's choices, resolved once: functions of the batch (the sampler: an object of them)."""

    length_caps: Callable  # (correct, group_ids) -> [B] truncation length in force per rollout
    length_metrics: Callable  # (correct, group_ids, lengths, over cap) -> the LENGTH_CAPS entry's metrics
    shape_rewards: GatedPenalty  # a LENGTH_SHAPERS entry behind the length gate
    advantages: Bound  # an ADVANTAGES entry; its metrics are its diagnostics
    token_shaping: Bound  # a TOKEN_SHAPERS entry: the advantages, reshaped per token (DeCS)
    answer_ends: Callable  # (batch, rewards, tokenizer) -> [B] answer_end, or None where nothing reads it
    sampler: Any  # a GROUP_SAMPLERS entry, constructed: keep(batch), max_rounds, metrics(rounds, kept, generated)


def resolve_stages(plan: Plan) -> Stage:
    caps = plan["algorithm.length_cap"]
    return Stage(
        length_caps=functools.partial(caps, max_response_length=plan.recipe.rollout.max_response_length),
        length_metrics=caps.metrics,
        shape_rewards=plan.length_penalty,
        advantages=plan["algorithm.advantage"],
        token_shaping=plan["algorithm.token_shaping"],
        answer_ends=batch_answer_ends if "answer_end" in plan.needs else no_answer_ends,
        sampler=plan["algorithm.sampling"](),
    )


def run_recipe(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, stop_after_step: int | None = None
) -> tuple[RunDir, dict]:
    """What `efficient-rl train` does: validate, take the run directory, build, train.

    Whatever it started is closed on every way out, an exception anywhere included, newest first:
    the cluster components (Ray actors, vLLM engines, a teacher, a Ray cluster started for the
    run), then the reward workers. Each is registered the moment it exists; ExitStack runs the
    rest of them even when one of them raises. The run directory's lock goes last, once no
    process of the run is left: on an error here, or by the caller, who gets the run back still
    locked to write its report into (RunDir.close; the exit of the process releases it too).
    """
    plan = validate(recipe)  # before anything is locked, started or written
    with contextlib.ExitStack() as on_error:
        run = RunDir(recipe, resume=resume, overwrite=overwrite)
        on_error.callback(run.close)
        with contextlib.ExitStack() as started:
            setup = build_setup(plan, model_dir=run.resume_from)  # the checkpoint restore() reads, or None
            started.callback(setup.rewards.close)
            trainer = Trainer(plan, setup, run)
            started.callback(trainer.close)  # its components; the rewards again, a no-op
            run.create()  # once every component has started: a cluster that cannot place them writes nothing
            summary = trainer.train(stop_after_step=stop_after_step)
        on_error.pop_all()  # it went well: the lock stays the caller's
    return run, summary


class Trainer:
    def __init__(self, plan: Plan, setup: Setup, run: RunDir):
        recipe = plan.recipe
        self.plan, self.recipe, self.setup, self.run = plan, recipe, setup, run
        self.stages = resolve_stages(plan)
        self.selection = Selection(plan, vocab_size=setup.vocab_size)
        self.components = plan["cluster.backend"](plan, setup)
        self.components.follow_stops(stopping.requested, stopping.cut_now)
        self.learner, self.engine = self.components.learner, self.components.engine
        self.stream = PromptStream(setup.train_samples, recipe.seed, recipe.data.shuffle)
        self.sampling = rollout_sampling(recipe.rollout, recipe.rollout.group_size)
        # Who makes each step's batch, and when: now (sync) or while the learner trains (overlapped).
        self.pipeline = plan["cluster.pipeline"](self.collect_rollouts, self.engine, recipe.steps)
        self.timings: dict[str, float] = {}  # seconds per stage of the current step, on the driver's side
        self.completions: list[dict] = []  # the step's sampled completions (logging.completions_every)
        # What the length penalty carries across steps ({} for most): advanced once a step by the
        # step's rollouts in collect_rollouts, which runs steps in order even when overlapped.
        self.penalty_state = self.stages.shape_rewards.initial_state()
        self.backend_lost = False  # set when a stop came with the loss of the backend's processes

    def close(self) -> None:
        """Release the processes: Ray actors (and a cluster started for the run), reward workers."""
        # First: its producer thread uses the engine and the rewards. Not waited for once the
        # backend's processes are lost: its request would wait on them until Ray ends the process.
        self.pipeline.close(wait=not self.backend_lost)
        self.components.close()
        self.setup.rewards.close()

    # ------------------------------------------------------------ the loop
    def train(self, stop_after_step: int | None = None) -> dict:
        """Train to the recipe's last step (or a stop request) and evaluate; returns the summary.

        A stop request (stopping.py) ends the loop after its step, checkpointed, and then skips the
        final evaluation: the summary lacks "final", and --resume evaluates. One during the final
        evaluation cuts it short the same way; nothing is lost, the checkpoint is written already.
        One during the evaluation before training ends it (and the run) at once with Stopped,
        recording nothing of it: the restart evaluates again.
        """
        started = time.time()
        state, in_flight = self.run.restore(self.learner, self.stream) if self.run.resuming else ({"step": 0}, [])
        if self.run.resuming:
            self.pipeline.take_restored_weights(self.learner)
        earlier_seconds = state.get("wall_seconds", 0.0)  # time spent before a resume
        if not self.run.resuming:
            torch.manual_seed(self.recipe.seed)
        self.penalty_state = state.get(PENALTY_STATE, self.penalty_state)  # as it stood after the saved batches
        if "warm_start" not in state and self.recipe.eval.before_training:
            # No step to finish first: waiting would save nothing (a time-limit warning waits for step 1)
            with stopping.cut_short(WARM_START_STOP, for_warnings=False):
                state["warm_start"] = self.evaluate()
        self.pipeline.start(state["step"] + 1, in_flight)  # after the restore: the stream and RNG are set
        metrics = {}
        # An exception ends the progress bar (instead of drawing it through the message) and closes
        # the trackers, their runs marked failed.
        with MetricsLogger(self.run, self.plan, first_step=state["step"] + 1) as logger, stopping.handled():
            for step in range(state["step"] + 1, self.recipe.steps + 1):
                with self.stop_if_lost(step):
                    metrics = self.step(step)
                    if self.recipe.eval.every and step % self.recipe.eval.every == 0:
                        metrics.update(self.evaluate())
                    logger.log(step, metrics, self.completions)
                    state["step"] = step
                    state["wall_seconds"] = earlier_seconds + time.time() - started
                    last = step == self.recipe.steps or step == stop_after_step or stopping.requested()
                    if last or (self.recipe.checkpoint.every and step % self.recipe.checkpoint.every == 0):
                        # paused: the stream, RNG and penalty state stand right after the saved batches
                        with self.pipeline.paused():
                            state[PENALTY_STATE] = self.penalty_state
                            self.run.save_checkpoint(
                                step, self.setup, self.learner, self.stream, state, in_flight=self.pipeline.saved()
                            )
                if last:
                    break
            stop_requested = stopping.requested()  # read before handled() forgets it
        if state["step"] == self.recipe.steps and self.recipe.eval.after_training:
            final = self.final_evaluation(metrics, stop_requested)
            if final is not None:
                state["final"] = final
        state["wall_seconds"] = earlier_seconds + time.time() - started
        return self.run.write_summary(state)

    @contextlib.contextmanager
    def stop_if_lost(self, step: int):
        """A stop request that comes with the loss of the backend's processes (components.lost:
        a signal to every process of the run ends the Ray cluster's with the driver's request) is
        the stop, not a failure: the step cannot finish, and the last checkpoint stands. Ray's get
        raises KeyboardInterrupt where the cluster's loss interrupts it (stopping.cut_now)."""
        try:
            yield
        except (Exception, KeyboardInterrupt) as err:
            if stopping.requested() and self.components.lost(err):
                self.backend_lost = True
                raise stopping.StoppedMidStep(step) from None
            raise

    def final_evaluation(self, last_metrics: dict[str, float], stop_requested: bool) -> dict[str, float] | None:
        """The held-out figures after the last step; None when a stop request skips or cuts them short."""
        if "eval/pass@1" in last_metrics:  # the last step's periodic evaluation already is the final one
            return last_metrics
        if stop_requested:
            return None
        try:
            with stopping.handled(), stopping.cut_short(FINAL_EVALUATION_STOP):
                return self.evaluate()
        except stopping.Stopped:
            return None

    def step(self, number: int) -> dict[str, float]:
        started = time.time()
        self.timings = dict.fromkeys(("select", "learn", "sync"), 0.0)
        produced = self.pipeline.batch(number)  # generated, scored, shaped, filtered: collect_rollouts
        batch = produced.batch
        self.completions = self.sample_completions(number, produced)  # the rollouts go before the update
        produced.generated = None
        if len(batch) == 0:  # every group was filtered out: nothing carries a learning signal
            learner_metrics, sync_metrics, advantage_metrics = {"update_skipped": 1.0}, {}, {}
        else:
            batch.advantages = self.stages.advantages(batch)
            advantage_metrics = self.stages.advantages.metrics(batch)
            batch.advantages = self.stages.token_shaping(batch)
            advantage_metrics.update(self.stages.token_shaping.metrics(batch))
            with timed(self.timings, "select"):  # sample and token selection (sets batch.loss_mask)
                batch, selection_metrics = self.selection(batch, self.learner, number)
            advantage_metrics.update(selection_metrics)
            advantage_metrics.update(staleness_metrics(batch, number, self.pipeline.max_staleness))
            with timed(self.timings, "learn"):
                learner_metrics = {"update_skipped": 0.0, **self.learner.update(batch)}
            check_skipped_steps(number, learner_metrics, self.recipe.learner.max_skipped_steps)
            with timed(self.timings, "sync"):
                sync_metrics = self.pipeline.publish(self.learner, number)
        elapsed = time.time() - started
        return {
            **produced.metrics,
            **advantage_metrics,
            **learner_metrics,
            **sync_metrics,
            **self.engine.pop_metrics(),
            **self.pipeline.report(),
            **{f"timing/{stage}": seconds for stage, seconds in self.timings.items()},
            "step_time": elapsed,
            "tokens_per_second": produced.metrics["rollout/tokens"] / elapsed,
            "data/first_prompt": float(produced.stream_start),
            "data/consumed_prompts": float(produced.stream_end),
        }

    def sample_completions(self, step: int, produced: Produced) -> list[dict]:
        if not completions_due(step, self.recipe.logging):
            return []
        return completion_sample(
            produced.generated, step, self.recipe.logging.completions_samples, self.recipe.seed, self.setup.tokenizer
        )

    # ------------------------------------------------------------ stages
    def collect_rollouts(self, step: int, generate: Callable) -> Produced:
        """The batch of `step`: generate and score rounds of prompts until enough groups are kept.

        The sampler (algorithm.sampling) says which rows of a round to keep and how many rounds a
        step may take: all of one round, or (dynamic sampling) the groups with spread, over up to
        max_rounds rounds. The pipeline calls this (on its producer thread when overlapped) and
        passes the `generate` that stamps each rollout with its policy version.
        """
        progress = (step - 1) / max(self.recipe.steps - 1, 1)  # p in [0, 1], as the selection's
        carried = self.penalty_state  # every round of the step is shaped with the step's state
        wanted = self.recipe.rollout.prompts_per_step
        sampler = self.stages.sampler
        generated, kept, rounds, failures = [], [], 0, dict.fromkeys(REWARD_FAILURES, 0)
        timings = {"generate": 0.0, "reward": 0.0}
        started, stream_start = time.time(), self.stream.consumed
        while True:
            rounds += 1
            batch, result = self.generate_and_score(self.stream.take(wanted), progress, generate, timings, carried)
            for kind in REWARD_FAILURES:
                failures[kind] += getattr(result, kind)
            generated.append(batch)
            kept.append(batch.select(sampler.keep(batch).nonzero()[:, 0]))
            enough = sum(b.group_ids.unique().numel() for b in kept) >= wanted
            if enough or rounds == sampler.max_rounds:  # max_rounds 0: no limit
                break
        everything = RolloutBatch.concat(generated)
        train_batch = first_groups(RolloutBatch.concat(kept), wanted)
        metrics = rollout_metrics(everything)
        shaped = shaping_inputs(everything, progress, carried)
        metrics.update(self.stages.shape_rewards.metrics(shaped))
        self.penalty_state = self.stages.shape_rewards.advance_state(carried, shaped)  # by every rollout generated
        metrics.update(
            self.stages.length_metrics(
                correctness(everything),
                everything.group_ids,
                everything.response_lengths,
                over_cap(everything.response_lengths, everything.truncated, everything.length_cap),
            )
        )
        # Failed reward calls: each scored 0 and counted, never silently a zero; skipped: a None (TRL's
        # "not applicable") added nothing to its sample's score; leftover_processes: what the calls left
        # running, killed.
        metrics.update({f"reward/{kind}": float(count) for kind, count in failures.items()})
        metrics["timing/rollout"] = time.time() - started  # generate + reward + filtering, all rounds
        metrics.update({f"timing/{stage}": seconds for stage, seconds in timings.items()})
        metrics.update(sampler.metrics(rounds, train_batch, everything))
        # The completions log samples from every round (sample_completions).
        return Produced(
            batch=train_batch,
            metrics=metrics,
            generated=everything,
            stream_start=stream_start,
            stream_end=self.stream.consumed,
        )

    def generate_and_score(
        self,
        prompts: list[tuple[int, dict]],
        progress: float,
        generate: Callable,
        timings: dict[str, float],
        penalty_state: dict,
    ) -> tuple[RolloutBatch, RewardResult]:
        """Rollouts for `prompts` with scores, rewards after length shaping, and the reward result.

        The one order of composition (docs/algorithms.md#what-a-length-penalty-promises): the score
        is the weighted sum of the reward entries; correctness is their largest accuracy (else a
        positive score); the length cap reads the correctness; the length penalty reads the weighted
        score, the correctness and the caps, and gives the reward the advantage is computed from.
        Weights never apply after shaping; what scores the penalty keeps its promises for is checked
        at load (scoring/scale.py) and on every round (algos/shaping.py `promises`)."""
        with timed(timings, "generate"):
            batch = generate(
                [self.setup.encode(sample) for _, sample in prompts],
                [sample for _, sample in prompts],
                [position for position, _ in prompts],
                self.sampling,
            )
        with timed(timings, "reward"):
            result = self.setup.rewards.score(batch.completions, batch.samples)
        batch.scores, batch.accuracy = result.scores, result.accuracy
        batch.reward_metrics = result.reported_extras()  # NaN where a call failed: no zero in the mean
        for message in result.error_messages:
            tqdm.write(f"reward error: {message}")  # above the progress bar, not through it
        batch.length_cap = self.stages.length_caps(correctness(batch), batch.group_ids)
        with timed(timings, "answer_end"):  # DeCS: where each correct rollout first reached its answer
            batch.answer_end = self.stages.answer_ends(batch, self.setup.rewards, self.setup.tokenizer)
        try:
            batch.rewards = self.stages.shape_rewards(shaping_inputs(batch, progress, penalty_state))
        except ScoresOutsidePromise as err:  # bad input, found only now: one line, exit 2
            raise ConfigError(str(err)) from None
        return batch, result

    def evaluate(self) -> dict[str, float]:
        with self.pipeline.exclusive() as engine:  # the newest weights, nothing else generating
            return self.evaluate_with(engine)

    def evaluate_with(self, engine) -> dict[str, float]:
        ev = self.recipe.eval
        settings = SamplingSettings(
            n=ev.samples_per_problem, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_p=ev.top_p
        )
        samples = self.setup.heldout_samples[: ev.num_problems]
        if not ev.variables:
            return evaluate(engine, self.setup.encode, self.setup.rewards, samples, settings, seed=self.recipe.seed)
        # Once per value of eval.variables (L1's target lengths), in one generation call.
        variants = eval_variants(samples, ev.variables)
        metrics = evaluate(
            engine,
            self.setup.encode,
            self.setup.rewards,
            [s for _, variant in variants for s in variant],
            settings,
            seed=self.recipe.seed,
            labels=[label for label, variant in variants for _ in variant],
        )
        return {**metrics, **target_length_errors(metrics, ev.variables)}


def target_length_errors(metrics: dict[str, float], variables: dict[str, list]) -> dict[str, float]:
    """L1's length error at each target of a single numeric eval variable: (mean length - target) /
    target, as eval/<name>=<value>/length_error (nothing for several variables or non-numbers)."""
    if len(variables) != 1:
        return {}
    ((name, values),) = variables.items()
    return {
        f"eval/{name}={value}/length_error": (metrics[f"eval/{name}={value}/length/mean"] - value) / value
        for value in values
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    }


def check_skipped_steps(step: int, learner_metrics: dict[str, float], limit: int) -> None:
    """Print the step's skipped optimizer steps (a non-finite loss or gradient norm: the learner
    left the weights as they were), and stop the run once `limit` were skipped in a row: the
    weights then never move again, and every checkpoint already written holds finite ones."""
    skipped = int(learner_metrics.get("learner/skipped_steps", 0))
    if skipped:
        tqdm.write(f"step {step}: {skipped} optimizer step(s) skipped: non-finite loss or gradient norm")
    in_a_row = int(learner_metrics.get("learner/consecutive_skipped_steps", 0))
    if in_a_row >= limit:
        raise WorkerFailure(
            f"step {step}: {in_a_row} optimizer steps in a row skipped for a non-finite loss or gradient norm "
            f"(learner.max_skipped_steps: {limit}); the run stopped before checkpointing this step, whose weights "
            "are still finite: look at the rewards and the objective, or lower learner.lr, then --resume"
        )


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str):
    """Add the block's wall time to timings[stage] (a stage may run several times per step)."""
    started = time.time()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.time() - started


def staleness_metrics(batch: RolloutBatch, step: int, max_staleness: int) -> dict[str, float]:
    """How many policy versions the trained rollouts lag (step t trains with version t - 1): mean,
    max, and how many rollouts lag by each k in 0..max_staleness (a histogram in TensorBoard)."""
    staleness = step - 1 - batch.policy_versions
    counts = torch.bincount(staleness, minlength=max_staleness + 1).tolist()
    return {
        "pipeline/staleness/mean": float(staleness.float().mean()),
        "pipeline/staleness/max": float(staleness.max()),
        **{f"pipeline/staleness/count/{lag}": float(count) for lag, count in enumerate(counts)},
    }


def first_groups(batch: RolloutBatch, groups: int) -> RolloutBatch:
    """The rows of the first `groups` distinct groups, in order."""
    _, first_seen = torch.unique_consecutive(batch.group_ids, return_inverse=True)
    return batch.select((first_seen < groups).nonzero()[:, 0])


def shaping_inputs(batch: RolloutBatch, progress: float, state: dict) -> ShapingInputs:
    """What the length penalty reads of a scored batch whose caps are set, with what it carries."""
    return ShapingInputs(
        scores=batch.scores,
        lengths=batch.response_lengths,
        truncated=batch.truncated,
        length_cap=batch.length_cap,
        correct=correctness(batch),
        group_ids=batch.group_ids,
        samples=batch.samples,
        progress=progress,
        state=state,
    )


def correctness(batch: RolloutBatch) -> torch.Tensor:
    """[B] 1.0 for a correct answer: the verifier's accuracy, or a positive score without one."""
    return batch.correctness()


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    _, reward_std, _ = group_stats(batch.rewards, batch.group_ids)
    metrics = {
        "rollout/tokens": float(batch.response_mask.sum()),
        # tokens budget forcing appended (rollout.thinking_budget): in rollout/tokens, never in the loss
        "rollout/forced_tokens": float(batch.response_mask.sum() - batch.sampled_mask.sum()),
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
        "score/mean": float(batch.scores.mean()),
        "acc/mean": float(batch.accuracy.mean()) if batch.accuracy is not None else float("nan"),
        **length_summary(batch.response_lengths.tolist(), "response_length"),
        "response_length/clip_ratio": float(
            over_cap(batch.response_lengths, batch.truncated, batch.length_cap).float().mean()
        ),
        "frac_reward_zero_std": float((reward_std == 0).float().mean()),
    }
    for name, values in batch.reward_metrics.items():
        reported = [value for value in values if not math.isnan(value)]
        metrics[f"reward/{name}"] = sum(reported) / len(reported) if reported else math.nan
    return metrics
