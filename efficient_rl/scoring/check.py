"""`efficient-rl reward check SPEC --data samples.jsonl`: run a reward over saved completions.

Each JSONL row is a data sample (question, answer, ...) plus the completion to score. The
report shows the score distribution, throughput, and every kind of failure with examples, so a
reward can be debugged before it meets a training run. The command exits 1 when a call failed
(errored or timed out), its last line giving the count; bad input exits 2 (ConfigError).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from efficient_rl.config.schema import RewardEntry
from efficient_rl.data.sources import column_value, json_rows, question_value
from efficient_rl.errors import ConfigError
from efficient_rl.scoring.runner import RewardRunner


def read_rows(path: Path, completion_key: str, question_key: str | None = None) -> list[dict]:
    """The samples as JSONL rows; with a question key, its column (text or chat turns, as training maps
    data.question_key) becomes the sample's `question`: TRL's saved rows hold their turns in `prompt`."""
    rows = []
    for number, row in json_rows(path, "--data"):
        if not isinstance(row.get(completion_key), str):
            raise ConfigError(f"{path}:{number}: expected a string {completion_key!r} (set --completion-key)")
        if question_key is not None:
            where = f"{path}:{number}"
            row = {
                **row,
                "question": question_value(column_value(row, question_key, where, "question"), question_key, where),
            }
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def parse_params(text: str) -> dict:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--params: not valid JSON ({err.msg})") from None
    if not isinstance(params, dict):
        raise ConfigError("--params: expected a JSON object")
    return params


@dataclass
class CheckReport:
    text: str
    failed: int  # calls that errored or timed out


def check_reward(
    spec: str,
    data: Path,
    completion_key: str = "completion",
    params: str = "{}",
    workers: int = 2,
    timeout: float = 10.0,
    form: str = RewardEntry.form,
    question_key: str | None = None,
) -> CheckReport:
    if workers < 0 or not timeout > 0:
        raise ConfigError("expected --workers >= 0 and --timeout > 0")
    rows = read_rows(data, completion_key, question_key)
    runner = RewardRunner([RewardEntry(name=spec, params=parse_params(params), form=form)], workers, timeout)
    try:
        started = time.perf_counter()
        result = runner.score([row[completion_key] for row in rows], rows)
        seconds = time.perf_counter() - started
    finally:
        runner.close()
    return CheckReport(format_report(spec, rows, result, seconds), result.errors + result.timeouts)


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def format_report(spec: str, rows: list[dict], result, seconds: float) -> str:
    scores, calls = sorted(result.scores.tolist()), sorted(result.call_seconds)
    lines = [
        f"reward {spec} on {len(rows)} samples: {seconds:.2f} s, {len(rows) / seconds:.0f} samples/s",
        f"score   mean {statistics.fmean(scores):.4f}  min {scores[0]:.4f}  p50 {quantile(scores, 0.5):.4f}  "
        f"p90 {quantile(scores, 0.9):.4f}  max {scores[-1]:.4f}",
        f"call    p50 {quantile(calls, 0.5) * 1e3:.2f} ms  p90 {quantile(calls, 0.9) * 1e3:.2f} ms  "
        f"max {calls[-1] * 1e3:.2f} ms  (time inside the reward; calls cut off at the timeout count 0)",
        "values  " + "  ".join(f"{value:g}: {count}" for value, count in Counter(scores).most_common(8)),
    ]
    if result.accuracy is not None:
        lines.append(f"accuracy {float(result.accuracy.mean()):.4f}")
    lines += [metric_line(name, result, len(rows)) for name in sorted(result.extras)]
    lines.append(
        f"errors {result.errors}  timeouts {result.timeouts}  (each scored 0)  skipped {result.skipped} (None)"
    )
    lines += [f"  {message}" for message in result.error_messages]
    failed = result.errors + result.timeouts
    if failed:
        lines.append(f"FAILED: {failed} of {len(rows)} samples errored or timed out")
    return "\n".join(lines)


def metric_line(name: str, result, rows: int) -> str:
    """A reward's own metric, averaged over the rows whose call reported it (a failed row has none)."""
    reported = len(result.reported[name])
    failed = f" over {reported} of {rows} samples ({rows - reported} failed)" if reported < rows else ""
    return f"metric  {name}: mean {result.metric_mean(name):.4f}{failed}"
