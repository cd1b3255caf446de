"""Scoring rollouts with the recipe's weighted reward functions.

Every reward is resolved, its signature checked and a probe call made at recipe load, so a bad
reward fails before any work, naming its entry. At run time calls go to a pool of spawned
workers (efficient_rl/scoring/pool.py) under a wall-clock timeout. A call that raises, times out,
crashes its worker or returns a non-number scores 0 *and* is counted (`reward/errors`,
`reward/timeouts`), with the first messages kept for the log: an error is never silently a zero.
A None from a form whose contract allows it (TRL's "does not apply to this sample") adds nothing
to the sample's score and is counted too (`reward/skipped`). Processes a call started and left
running are killed and counted (`reward/leftover_processes`; pool.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from efficient_rl.config.schema import RewardEntry
from efficient_rl.errors import ConfigError, WorkerFailure
from efficient_rl.scoring.forms import REWARD_FORMS, FormError, RewardForm, check_signature, form_of, shortened
from efficient_rl.scoring.plugins import RewardLoadError, load_reward
from efficient_rl.scoring.pool import LoadedReward, Outcome, RewardCall, RewardPool, RewardReference, outcome_of

MAX_KEPT_ERRORS = 5
DECLARE_ANOTHER_FORM = (
    f"if the function follows another contract, declare it in its entry: `form:` one of {', '.join(REWARD_FORMS)}"
)
# RewardResult's counters, logged as reward/<name> each step (eval: eval/reward_<name>).
REWARD_FAILURES = ("errors", "timeouts", "skipped", "leftover_processes")


@dataclass
class RewardResult:
    scores: torch.Tensor  # [B] weighted sum of the reward functions
    accuracy: torch.Tensor | None  # [B] from rewards that report "accuracy"
    extras: dict[str, list[float]] = field(default_factory=dict)  # other per-sample metrics (0 where not reported)
    reported: dict[str, list[int]] = field(default_factory=dict)  # extras key -> the rows that reported it
    errors: int = 0  # calls that raised, crashed their worker or returned a non-number
    timeouts: int = 0  # calls cut off at the timeout
    skipped: int = 0  # None returned where the form allows it (TRL's "not applicable"): adds nothing, counted
    leftover_processes: int = 0  # processes the calls left running (in a worker), killed after them
    error_messages: list[str] = field(default_factory=list)
    call_seconds: list[float] = field(default_factory=list)  # time inside the reward, per call

    def count(self, kind: str, message: str) -> None:
        if kind == "timeout":
            self.timeouts += 1
        else:
            self.errors += 1
        if len(self.error_messages) < MAX_KEPT_ERRORS:
            self.error_messages.append(message)

    def reported_extras(self) -> dict[str, list[float]]:
        """extras with NaN in the rows that did not report the metric (a failed call)."""
        gapped = {}
        for name, values in self.extras.items():
            reported = set(self.reported[name])
            gapped[name] = [value if row in reported else math.nan for row, value in enumerate(values)]
        return gapped

    def metric_mean(self, name: str) -> float:
        """The mean of extras[name] over the rows that reported it: a failed call is no zero metric."""
        rows = self.reported[name]
        return sum(self.extras[name][row] for row in rows) / len(rows)


def as_numbers(value) -> dict[str, float]:
    """A reward's return value as {"score": ..., other metrics}; ValueError if it is not numeric."""
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"returned a dict without 'score': {value!r}")
        items = value.items()
    else:
        items = [("score", value)]
    numbers = {}
    for key, number in items:
        try:
            if isinstance(number, (str, bytes)):  # float("1") works, but a string is a bug
                raise TypeError
            numbers[key] = float(number)
        except (TypeError, ValueError):
            raise ValueError(f"returned {value!r}; expected a number or a dict of numbers with 'score'") from None
        if not math.isfinite(numbers[key]):
            raise ValueError(f"returned a non-finite value {value!r}")
    return numbers


def resolve_rewards(entries: list[RewardEntry]) -> list[LoadedReward]:
    """The rewards, each imported and its signature checked against its form's call with the
    entry's parameters (ConfigError in one line naming the entry). Starts nothing: the recipe's
    validation calls it."""
    if not entries:
        raise ConfigError("reward: expected at least one reward entry")
    rewards = []
    for index, entry in enumerate(entries):
        try:
            function = load_reward(entry.name)
            form = form_of(entry.form, function)
            check_signature(form, function, entry.params)
        except (RewardLoadError, FormError) as err:
            raise ConfigError(f"reward[{index}] ({entry.name}): {err}") from None
        rewards.append(LoadedReward(function, form, entry.params))
    return rewards


def probe_failure(form: RewardForm, outcome: Outcome) -> str | None:
    """Why the probe call's outcome does not fit the form (one line), or None when it does."""
    if outcome.status != "ok":
        return f"{outcome.message}; {DECLARE_ANOTHER_FORM}"
    for value in outcome.values:
        if value is None and form.allows_none:
            continue
        try:
            as_numbers(value)
        except ValueError as err:
            if not form.batched and isinstance(value, (list, tuple)):  # the old trap: a list-returning reward
                return (
                    f"returned a list ({shortened(value)}) from a call with one completion: for a batched or TRL "
                    "reward declare `form: trl` (TRL's fn(completions, **columns)) or `form: batched` in its entry"
                )
            return f"{err}; {DECLARE_ANOTHER_FORM}"
    return None


class RewardRunner:
    def __init__(self, entries: list[RewardEntry], workers: int = 0, timeout: float = 10.0):
        self.entries = entries
        self.rewards = resolve_rewards(entries)
        references = [RewardReference(entry.name, entry.params, entry.form) for entry in entries]
        # workers=0 calls rewards in this process: no timeout can be enforced there.
        self.pool = RewardPool(references, workers, timeout) if workers > 0 else None

    def check(self, sample: dict) -> None:
        """Probe every reward once on a real sample: its signature must take the sample's columns,
        and it must answer in its form's contract, with numbers. A batched form gets two
        completions, so a reward answering with one value per call is caught."""
        completions = [f"The answer is \\boxed{{{sample.get('answer', '')}}}.", "No answer."]
        for index, (entry, reward) in enumerate(zip(self.entries, self.rewards)):
            try:
                check_signature(reward.form, reward.function, entry.params, sample)
            except FormError as err:
                columns = ", ".join(sorted(sample))
                raise ConfigError(f"reward[{index}] ({entry.name}): {err} (the data's columns: {columns})") from None
        probes = []
        for index, reward in enumerate(self.rewards):
            count = 2 if reward.form.batched else 1
            probes.append(RewardCall(index, completions[:count], [sample] * count))
        try:
            outcomes = self._run(probes)
        except WorkerFailure as err:  # a reward that kills or hangs its worker at import
            raise ConfigError(f"reward: {err}") from None
        for index, (entry, reward, outcome) in enumerate(zip(self.entries, self.rewards, outcomes)):
            why = probe_failure(reward.form, outcome)
            if why:
                raise ConfigError(
                    f"reward[{index}] ({entry.name}): probe call on a training sample failed: called as "
                    f"{reward.form.contract} (form: {reward.form.name}), {why}"
                )

    def score(self, completions: list[str], samples: list[dict]) -> RewardResult:
        planned = self._plan(completions, samples)
        result = RewardResult(scores=torch.zeros(len(completions)), accuracy=None)
        for (first_row, call), outcome in zip(planned, self._run([call for _, call in planned])):
            result.call_seconds.append(outcome.seconds)
            result.leftover_processes += outcome.leftover_processes
            for offset in range(len(call.completions)):
                self._add(result, call.entry, first_row + offset, len(completions), outcome, offset)
        return result

    def _plan(self, completions: list[str], samples: list[dict]) -> list[tuple[int, RewardCall]]:
        """(first batch row, call): a call per sample, or one per batch for a batched reward."""
        planned = []
        for index, reward in enumerate(self.rewards):
            if reward.form.batched:
                planned.append((0, RewardCall(index, completions, samples)))
            else:
                planned += [
                    (row, RewardCall(index, [completion], [sample]))
                    for row, (completion, sample) in enumerate(zip(completions, samples))
                ]
        return planned

    def _add(self, result: RewardResult, index: int, row: int, rows: int, outcome: Outcome, offset: int) -> None:
        entry = self.entries[index]
        if outcome.status != "ok":
            result.count(outcome.status, f"{entry.name}: {outcome.message}")
            return
        if outcome.values[offset] is None and self.rewards[index].form.allows_none:
            result.skipped += 1  # the reward does not apply here: nothing added, and counted
            return
        try:
            value = as_numbers(outcome.values[offset])
        except ValueError as err:
            result.count("error", f"{entry.name}: {err}")
            return
        result.scores[row] += entry.weight * value.pop("score")
        if "accuracy" in value:  # a row is correct if a reward reporting accuracy says so
            if result.accuracy is None:
                result.accuracy = torch.zeros(rows)
            result.accuracy[row] = max(float(result.accuracy[row]), value.pop("accuracy"))
        for key, metric in value.items():  # logged as reward/<function name>/<key>
            name = f"{entry.name.rsplit(':', 1)[-1]}/{key}"
            result.extras.setdefault(name, [0.0] * rows)[row] = metric
            result.reported.setdefault(name, []).append(row)

    def _run(self, calls: list[RewardCall]) -> list[Outcome]:
        if self.pool is not None:
            return self.pool.run(calls)
        return [outcome_of(self.rewards[call.entry], call) for call in calls]

    def close(self) -> int:
        """Stop the workers; how many processes left in their sessions had to be killed."""
        return self.pool.close() if self.pool is not None else 0
