"""Math rewards per second: the spawned worker pool vs sequential calls in one process.

1,000 lab problems, scored by the built-in math reward in four settings, each sequentially
(`scoring.workers: 0`, the trainer's main thread) and with the pool (`scoring.workers: 2`):

  numeric     the lab's own solutions ("... The answer is \\boxed{12}."): exact numeric check
  latex       the same answers written as LaTeX fractions (\\boxed{\\frac{24}{2}}): math-verify
  + 1% bad    10 of the 1,000 replaced by pathological answers: nested powers 9^{9^{9^{9}}}
              and a 20,000-character LaTeX expression. Each must be cut off (math-verify's own
              alarm, math reward timeout 1 s) and counted, never silently scored.

    .venv/bin/python benchmarks/reward_throughput.py
"""

from __future__ import annotations

import time

from efficient_rl.config.schema import RewardEntry
from efficient_rl.lab.tasks import ArithmeticTask, generate_problems
from efficient_rl.scoring.runner import RewardRunner

COUNT = 1000
PATHOLOGICAL = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{" + "+".join(["\\frac{x^{2}}{y^{3}}"] * 1200) + "}"]


def completion_sets(problems: list[dict]) -> dict[str, list[str]]:
    numeric = [f"{p['shortest_solution']}" for p in problems]
    latex = [f"The answer is \\boxed{{\\frac{{{2 * int(p['answer'])}}}{{2}}}}." for p in problems]
    sets = {"numeric": numeric, "latex": latex}
    for name, completions in list(sets.items()):
        spoiled = list(completions)
        for k, position in enumerate(range(0, COUNT, COUNT // 10)):  # 10 of 1,000
            spoiled[position] = PATHOLOGICAL[k % 2]
        sets[f"{name} + 1% bad"] = spoiled
    return sets


def main() -> None:
    problems = generate_problems(ArithmeticTask(), "train", COUNT, seed=0)
    entries = [RewardEntry(name="math", params={"timeout": 1})]
    print(
        f"{'completions':18s} {'mode':12s} {'rewards/s':>10s} {'seconds':>8s} {'correct':>8s} "
        f"{'timeouts':>8s} {'errors':>7s}"
    )
    for name, completions in completion_sets(problems).items():
        for mode, workers in (("sequential", 0), ("pool of 2", 2)):
            runner = RewardRunner(entries, workers=workers, timeout=30.0)
            try:
                runner.score(completions[:4], problems[:4])  # start-up and imports, not timed
                started = time.perf_counter()
                result = runner.score(completions, problems)
                seconds = time.perf_counter() - started
            finally:
                runner.close()
            print(
                f"{name:18s} {mode:12s} {COUNT / seconds:10.0f} {seconds:8.2f} {int(result.scores.sum()):8d} "
                f"{result.timeouts:8d} {result.errors:7d}"
            )


if __name__ == "__main__":
    main()
