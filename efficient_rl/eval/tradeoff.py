"""`efficient-rl eval`: models x token budgets on a benchmark, with length/accuracy trade-offs.

Generations are cached per (model, budget) as JSONL, a chunk of questions at a time, each chunk
from its own seed: a killed evaluation resumes where it stopped, and a re-run with new metrics
reuses every generation. Scores come from the same reward plugins training uses.

out/
  generations/<model>@<budget>.jsonl   one line per question: its completions, lengths, truncation
  eval.json                            every metric per (model, budget), frontiers, distances, and a
                                       few graded completions per run
  report.md, tradeoff.png, lengths.png, report.html (self-contained; both show the graded completions)
`efficient-rl eval compare DIR...` puts the runs of several evaluations on one set of frontiers.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import html
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch

from efficient_rl.config.schema import DataSection, RewardEntry
from efficient_rl.data.answers import shorten  # a long GSM8K reference cut to its end, the answer
from efficient_rl.data.turns import question_key, question_text
from efficient_rl.errors import ConfigError
from efficient_rl.eval.frontier import Point, distance_from_oracle, oracle_frontier, pareto_frontier, token_complexities
from efficient_rl.eval.metrics import Sample, evaluation_metrics, sample_of
from efficient_rl.eval.protocol import differences_from_baseline, model_summaries, thinking_summary
from efficient_rl.eval.spec import EvalSpec, check_reward_form, check_user_template
from efficient_rl.models.sources import model_directory
from efficient_rl.rollout.base import SamplingSettings, ThinkingBudget
from efficient_rl.scoring.runner import RewardRunner

CHUNK = 16  # questions generated (and cached) together
REPORT_SAMPLES = 3  # graded completions per run in the report: the first sample of the first questions
REPORT_CHARACTERS = 600  # of each completion shown there (generations/<run>.jsonl holds them whole)


def label(reference: str, budget: int) -> str:
    """Short and file-name safe: lab_quickstart@256, a directory's name, a checkpoint as run/step-N."""
    if reference.startswith("lab:"):
        name = "lab_" + reference.removeprefix("lab:")
    else:
        parts = Path(reference).resolve().parts
        name = f"{parts[-3]}_{parts[-1]}" if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + f"@{budget}"


def load_questions(spec: EvalSpec, field_name: str = "--data") -> list[dict]:
    from efficient_rl.data.sources import load_split

    data = DataSection(
        heldout_size=spec.problems, question_key=spec.question_key, answer_key=spec.answer_key, heldout_split=spec.split
    )
    return load_split(spec.data, "heldout", data, spec.seed, field_name)[: spec.problems]


def check_answers(questions: list[dict], rewards: RewardRunner, spec: EvalSpec) -> None:
    """Every reference answer, given back as a boxed answer, must be scored correct by the
    verifier: otherwise it cannot parse the answer column and every score would be a silent 0."""
    completions = [f"The answer is \\boxed{{{q['answer']}}}." for q in questions]
    result = rewards.score(completions, questions)
    correct = (result.accuracy if result.accuracy is not None else result.scores > 0).tolist()
    for row, (question, completion, ok) in enumerate(zip(questions, completions, correct), 1):
        if not ok:
            raise ConfigError(
                f"--data {spec.data}: the reward `{spec.reward}` does not accept the reference answer "
                f"{shorten(question['answer'], limit=80)!r} of question {question['id']!r} (row {row}) as "
                f"correct{reward_complaint(rewards, completion, question)}; is --answer-key "
                f"{spec.answer_key!r} the answer column, in a form it can parse?"
            )


def reward_complaint(rewards: RewardRunner, completion: str, question: dict) -> str:
    """Why the reward rejected a reference, when it raised (e.g. the math reward on prose): the
    one question is scored again alone, since a batch keeps only its first few messages."""
    messages = rewards.score([completion], [question]).error_messages
    return f" ({messages[0]})" if messages else ""


GENERATION_SETTINGS = (
    "data",
    "split",
    "engine",
    "samples",
    "temperature",
    "top_p",
    "seed",
    "question_key",
    "answer_key",
    "chat_template",
    "system_prompt",
    "user_template",
)


def check_cache(spec: EvalSpec, out: Path) -> None:
    """Cached generations are reused only under the settings that made them."""
    saved_path, current = out / "generation_settings.json", {k: getattr(spec, k) for k in GENERATION_SETTINGS}
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        changed = [k for k in GENERATION_SETTINGS if saved.get(k) != current[k]]
        if changed:
            raise ConfigError(
                f"--out {out}: its cached generations used {changed[0]}={saved.get(changed[0])!r}, "
                f"not {current[changed[0]]!r}; choose another --out"
            )
    else:
        saved_path.write_text(json.dumps(current, indent=1))


def cached_generations(path: Path, weights: str) -> dict[str, dict]:
    """The cached records of the model's present `weights` (weights_fingerprint); a line cut short
    by a kill is dropped, and so is a record of other weights (a run retrained into the same
    checkpoint path): both are removed from the file. A record from before fingerprints is kept."""
    if not path.is_file():
        return {}
    records, lines, kept = {}, path.read_text().splitlines(keepends=True), []
    for line in lines:
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if record is None:
            break
        if record.get("weights", weights) == weights:
            records[question_key(record["question"])] = record
            kept.append(line)
    if len(kept) < len(lines):
        path.write_text("".join(kept))
    return records


def weights_fingerprint(directory: Path) -> str:
    """Which weights a model directory holds now: its weight files' names, sizes and modification
    times (cheap; a checkpoint written again at the same path changes them)."""
    digest = hashlib.sha256()
    for file in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        stat = file.stat()
        digest.update(f"{file.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def transformers_engine(model_dir: Path, tokenizer, max_model_len: int, seed: int):
    from transformers import AutoModelForCausalLM

    from efficient_rl.rollout.hf import TransformersEngine

    return TransformersEngine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer)


def vllm_engine(model_dir: Path, tokenizer, max_model_len: int, seed: int):
    from efficient_rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, tokenizer, max_model_len, seed)


EVAL_ENGINES = {"transformers": transformers_engine, "vllm": vllm_engine}


class ModelUnderTest:
    """One model's prompts and (started on first use, since a fully cached model needs none) engine."""

    def __init__(self, reference: str, directory: Path, questions: list[dict], spec: EvalSpec):
        from transformers import AutoConfig

        from efficient_rl.data.prompts import TokenizerError, encode_sample, load_tokenizer

        self.directory, self.spec, self.engine = directory, spec, None
        self.weights = weights_fingerprint(directory)  # what its cached generations were made with
        self.tokenizer = load_tokenizer(directory)
        self.forced_room = forced_room(self.tokenizer, spec, reference)
        try:  # per budget: the template may show it
            self.prompts = {
                budget: {
                    question_key(q["question"]): encode_sample(
                        self.tokenizer, {"question": q["question"], "budget": budget}, spec.prompt()
                    )
                    for q in questions
                }
                for budget in spec.budgets
            }
        except TokenizerError as err:
            raise ConfigError(f"{reference}: {err}") from None
        context = AutoConfig.from_pretrained(directory).max_position_embeddings
        longest = max(len(ids) for prompts in self.prompts.values() for ids in prompts.values())
        if longest + max(spec.budgets) + self.forced_room > context:
            raise ConfigError(
                f"--budgets {max(spec.budgets)}: a prompt of {longest} tokens plus the budget "
                f"{'and the forced answer ' if self.forced_room else ''}exceeds the context of {reference} "
                f"({context} tokens)"
            )
        self.max_model_len = longest + max(spec.budgets) + self.forced_room

    def generate(self, chunk: list[dict], budget: int, seed: int, forced: bool = False):
        """Cut at `budget`; `forced`: the reasoning closed at `budget` and the answer let run (--force-answer)."""
        if self.engine is None:
            self.engine = EVAL_ENGINES[self.spec.engine](
                self.directory, self.tokenizer, self.max_model_len, self.spec.seed
            )
        settings = SamplingSettings(
            n=self.spec.samples,
            max_new_tokens=budget + (self.forced_room if forced else 0),
            temperature=self.spec.temperature,
            top_p=self.spec.top_p,
            thinking_budget=forced_at(self.spec, budget) if forced else None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # a chunk's own stream, for both engines (vLLM's request seeds too)
            return self.engine.generate(
                [self.prompts[budget][question_key(q["question"])] for q in chunk],
                chunk,
                list(range(len(chunk))),
                settings,
            )

    def close(self) -> None:
        self.engine = None  # an in-process vLLM engine frees its memory when collected
        gc.collect()


def generate(model: ModelUnderTest, questions: list[dict], budget: int, path: Path, forced: bool = False) -> list[dict]:
    """Every question's generations, from the cache where present; missing chunks are generated
    and appended one chunk at a time."""
    done, spec = cached_generations(path, model.weights), model.spec
    for start in range(0, len(questions), CHUNK):
        chunk = questions[start : start + CHUNK]
        if all(question_key(q["question"]) in done for q in chunk):
            continue
        batch = model.generate(chunk, budget, seed=spec.seed * 1_000_003 + budget * 1009 + start, forced=forced)
        lengths, truncated = batch.response_lengths.tolist(), batch.truncated.tolist()
        with path.open("a") as cache:
            for i, question in enumerate(chunk):
                rows = range(i * spec.samples, (i + 1) * spec.samples)
                record = {
                    "weights": model.weights,
                    "question": question["question"],
                    "answer": question["answer"],
                    "completions": [batch.completions[r] for r in rows],
                    "lengths": [lengths[r] for r in rows],
                    "truncated": [truncated[r] for r in rows],
                }
                cache.write(json.dumps(record) + "\n")
                done[question_key(question["question"])] = record
    return [done[question_key(q["question"])] for q in questions]


def score(records: list[dict], questions: list[dict], rewards: RewardRunner) -> tuple[list[list[Sample]], dict]:
    """Each question's completions scored against the question's sample: all of its columns, as
    training's rewards see them (a cached record holds the question and answer only); and the
    verifier's failures (reward_failures), which count as incorrect but never silently."""
    completions = [c for r in records for c in r["completions"]]
    samples = [question for r, question in zip(records, questions) for _ in r["completions"]]
    result = rewards.score(completions, samples)
    correct = (result.accuracy if result.accuracy is not None else result.scores > 0).tolist()
    flat = [
        sample_of(*scored)
        for scored in zip(
            completions,
            correct,
            [n for r in records for n in r["lengths"]],
            [t for r in records for t in r["truncated"]],
        )
    ]
    size = len(records[0]["completions"])
    return [flat[i : i + size] for i in range(0, len(flat), size)], reward_failures(result)


def reward_failures(result) -> dict:
    """What the verifier could not score: calls that raised or timed out (scored incorrect) and
    None answers of a TRL reward (no verdict), with the first messages; and the processes the calls
    left running (killed)."""
    return {
        "errors": result.errors,
        "timeouts": result.timeouts,
        "skipped": result.skipped,
        "leftover_processes": result.leftover_processes,
        "messages": list(result.error_messages),
    }


def evaluate_models(spec: EvalSpec, out: Path) -> dict:
    """Every check runs before the first generation and before anything is written to `out`."""
    for budget in spec.budgets:
        if budget < 1:
            raise ConfigError(f"--budgets: expected positive token caps, got {budget}")
    if spec.engine not in EVAL_ENGINES:
        raise ConfigError(f"--engine: expected one of {', '.join(EVAL_ENGINES)}, got {spec.engine!r}")
    check_user_template(spec.user_template, "--user-template")
    check_reward_form(spec.reward_form, "--reward-form")
    directories = {reference: model_directory(reference, "model") for reference in spec.models}
    questions = load_questions(spec)
    models = {
        reference: ModelUnderTest(reference, directory, questions, spec) for reference, directory in directories.items()
    }
    rewards = RewardRunner([RewardEntry(name=spec.reward, form=spec.reward_form)], workers=2, timeout=10.0)
    runs, per_question = {}, {}
    try:
        check_answers(questions, rewards, spec)
        (out / "generations").mkdir(parents=True, exist_ok=True)
        check_cache(spec, out)
        for reference, model in models.items():
            for budget in spec.budgets:
                name = label(reference, budget)
                records = generate(model, questions, budget, out / "generations" / f"{name}.jsonl")
                scored, failures = score(records, questions, rewards)
                runs[name] = {
                    "model": reference,
                    "budget": budget,
                    "samples": spec.samples,
                    "reward_failures": failures,
                    **evaluation_metrics(scored),
                    "graded": graded_samples(records, scored),
                    "lengths": {
                        kind: [s.length for q in scored for s in q if s.correct == want]
                        for kind, want in (("correct", True), ("incorrect", False))
                    },
                    **forced_answers(model, questions, budget, out / "generations", name, rewards),
                }
                per_question[name] = {
                    question_key(r["question"]): [(s.correct, s.length) for s in q] for r, q in zip(records, scored)
                }
                thinking = thinking_of(records, model.tokenizer)
                if thinking is not None:  # only a model that thinks has the section
                    runs[name]["thinking"] = thinking
            model.close()
    finally:
        rewards.close()
    return summarize(asdict(spec), runs, per_question)


def thinking_of(records: list[dict], tokenizer) -> dict | None:
    """Reasoning and answer tokens apart, over the responses with a <think> span (protocol.py)."""
    return thinking_summary(
        [c for r in records for c in r["completions"]],
        [n for r in records for n in r["lengths"]],
        lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
    )


# ---------------------------------------------------------------- budget forcing (--force-answer)
def forced_at(spec: EvalSpec, budget: int) -> ThinkingBudget:
    return ThinkingBudget(budget, spec.force_close, spec.force_answer_prompt, spec.force_answer_tokens)


def forced_room(tokenizer, spec: EvalSpec, reference: str) -> int:
    """Tokens a forced answer may add after the budget: the appended text and the answer (0 without
    --force-answer). A close marker of no tokens would force nothing: refused before anything runs."""
    if not spec.force_answer:
        return 0
    from efficient_rl.rollout.budget import forced_suffix

    if not tokenizer.encode(spec.force_close, add_special_tokens=False):
        raise ConfigError(
            f"--force-close: expected text the tokenizer of {reference} encodes to at least one token, "
            f"got {spec.force_close!r}"
        )
    return len(forced_suffix(tokenizer, spec.force_close, spec.force_answer_prompt)) + spec.force_answer_tokens


def forced_answers(
    model: ModelUnderTest, questions: list[dict], budget: int, generations: Path, name: str, rewards
) -> dict:
    """With --force-answer, the run's accuracy and mean length with the answer forced at its budget,
    beside the cut-at-budget ones. Cached apart, under a name that carries the forcing settings."""
    spec = model.spec
    if not spec.force_answer:
        return {}
    forcing = json.dumps([spec.force_close, spec.force_answer_prompt, spec.force_answer_tokens])
    path = generations / f"{name}.forced-{hashlib.sha256(forcing.encode()).hexdigest()[:8]}.jsonl"
    scored, failures = score(generate(model, questions, budget, path, forced=True), questions, rewards)
    metrics = evaluation_metrics(scored)
    return {
        "pass@1/forced": metrics["pass@1"],
        "length/forced": metrics["length/mean"],
        "reward_failures/forced": failures,
    }


def forced_markdown(result: dict) -> list[str]:
    """Cut at the budget against the answer forced there, per run (an evaluation without --force-answer has none)."""
    lines = [
        f"- **{name}**: pass@1 {run['pass@1']:.3f} cut at {run['budget']} tokens, {run['pass@1/forced']:.3f} with "
        f"the answer forced there; mean length {run['length/mean']:.1f} and {run['length/forced']:.1f} tokens"
        for name, run in result["runs"].items()
        if "pass@1/forced" in run
    ]
    if not lines:
        return []
    close = result["spec"].get("force_close")
    note = (
        f"A response still reasoning at the budget gets {close!r} and the answer prompt appended and up to "
        f"{result['spec'].get('force_answer_tokens')} tokens to answer in (--force-answer)."
    )
    return ["", "## Budget forcing", "", note, "", *lines]


def graded_samples(records: list[dict], scored: list[list[Sample]]) -> list[dict]:
    """The first sample of each of the first REPORT_SAMPLES questions, graded: the same questions
    for every run of an evaluation, so the report sets their answers side by side."""
    return [
        {
            "question": record["question"],
            "answer": record["answer"],
            "completion": record["completions"][0],
            "correct": samples[0].correct,
            "length": samples[0].length,
            "truncated": samples[0].truncated,
        }
        for record, samples in zip(records[:REPORT_SAMPLES], scored[:REPORT_SAMPLES])
    ]


def summarize(spec: dict, runs: dict[str, dict], per_question: dict[str, dict]) -> dict:
    """Frontiers over the runs, and per model its area under pass@1 against log budget (and, with
    several models, each one's difference from the first). `per_question` maps run -> question ->
    [(correct, length)]."""
    points = [Point(name, run["length/mean"], run["pass@1"]) for name, run in runs.items()]
    oracle = oracle_frontier(token_complexities(list(per_question.values())))
    for point in points:
        runs[point.name]["oracle"] = distance_from_oracle(point, oracle)
    return {
        "spec": spec,
        "runs": runs,
        "pareto": [p.name for p in pareto_frontier(points)],
        "oracle_frontier": oracle,
        "models": model_summaries(runs, per_question),
        "differences": differences_from_baseline(runs, per_question),
        "per_question": per_question,
    }


def compare(directories: list[Path]) -> dict:
    """Runs of several evaluations (their eval.json) on one set of frontiers; a run name that
    appears twice is prefixed with its directory's name, and so is a model evaluated in more than
    one of them (each evaluation's budgets of it make a sweep of their own). The first
    evaluation's first model is the baseline the others are compared with."""
    runs, per_question, specs, saved_evaluations = {}, {}, [], []
    for directory in directories:
        path = Path(directory) / "eval.json"
        if not path.is_file():
            raise ConfigError(f"eval compare: {path} not found (run efficient-rl eval --out {directory} first)")
        saved_evaluations.append(json.loads(path.read_text()))
    repeated = repeated_models(saved_evaluations)
    for directory, saved in zip(directories, saved_evaluations):
        specs.append(saved["spec"])
        for name, run in saved["runs"].items():
            key = f"{Path(directory).name}/{name}" if name in runs else name
            # JSON stored inf / NaN as null; the oracle distances are recomputed on the merged frontier.
            runs[key] = {k: math.nan if v is None else v for k, v in run.items() if k != "oracle"}
            if run["model"] in repeated:
                runs[key]["model"] = f"{Path(directory).name}/{run['model']}"
            per_question[key] = saved["per_question"][name]
    if len({(s["data"], s["problems"]) for s in specs}) > 1:
        raise ConfigError("eval compare: the evaluations used different data or question counts")
    return summarize({**specs[0], "compared": [str(d) for d in directories]}, runs, per_question)


def repeated_models(evaluations: list[dict]) -> set[str]:
    """The models that more than one of the evaluations holds."""
    seen = [{run["model"] for run in saved["runs"].values()} for saved in evaluations]
    return {model for models in seen for model in models if sum(model in other for other in seen) > 1}


# ---------------------------------------------------------------- outputs
def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(json_safe(result), indent=1))
    (out / "report.md").write_text(report_markdown(result))
    plot_tradeoff(result, out / "tradeoff.png")
    plot_lengths(out, result, out / "lengths.png")
    (out / "report.html").write_text(report_html(result, out))


def json_safe(value):
    """Non-finite floats as null (JSON has no inf or NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def report_html(result: dict, out: Path) -> str:
    """One self-contained page: the runs' table and both plots embedded."""
    rows = first_table(report_markdown(result))
    cells = [[html.escape(cell.strip()) for cell in row.strip("|").split("|")] for row in rows]
    table = (
        "<tr>"
        + "".join(f"<th>{c}</th>" for c in cells[0])
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[2:])
    )
    images = "".join(
        f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}">'
        for title, name in (
            ("Accuracy vs response length", "tradeoff.png"),
            ("Response lengths, correct vs incorrect", "lengths.png"),
        )
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
        "pre{white-space:pre-wrap;background:#f7f7f7;padding:6px}"
    )
    header = html.escape(report_markdown(result).splitlines()[2])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>efficient-rl eval</title>"
        f"<style>{style}</style></head><body><h1>Length / accuracy trade-off on {html.escape(result['spec']['data'])}"
        f"</h1><p>{header}</p><table>{table}</table>{images}{graded_html(result)}</body></html>\n"
    )


def first_table(markdown: str) -> list[str]:
    """The lines of the first table (the runs'); the tables after it stay in report.md."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def graded_html(result: dict) -> str:
    runs = {name: run["graded"] for name, run in result["runs"].items() if run.get("graded")}
    if not runs:
        return ""
    parts = [f"<h2>Graded completions</h2><p>{html.escape(GRADED_NOTE)}</p>"]
    for name, graded in runs.items():
        parts.append(f"<details><summary>{html.escape(name)}</summary>")
        for item in graded:
            parts.append(
                f"<p><b>{html.escape(grade(item))}</b>: {html.escape(question_text(item['question']))} "
                f"(reference: {html.escape(str(item['answer']))})</p>"
                f"<pre>{html.escape(shown(item['completion']))}</pre>"
            )
        parts.append("</details>")
    return "".join(parts)


GRADED_NOTE = (
    f"The first sample of each of the first {REPORT_SAMPLES} questions, for every run (cut at "
    f"{REPORT_CHARACTERS} characters; generations/<run>.jsonl holds every completion whole)."
)


def grade(item: dict) -> str:
    return f"{'correct' if item['correct'] else 'wrong'}, {item['length']} tokens" + (
        ", truncated" if item["truncated"] else ""
    )


def shown(completion: str) -> str:
    return completion if len(completion) <= REPORT_CHARACTERS else completion[:REPORT_CHARACTERS] + " [...]"


def graded_markdown(result: dict) -> list[str]:
    """The graded completions of every run; each completion as an indented block, so that no line
    of it reads as a row of the table above (report_html reads that table back from the lines)."""
    runs = {name: run["graded"] for name, run in result["runs"].items() if run.get("graded")}
    if not runs:
        return []
    lines = ["", "## Graded completions", "", GRADED_NOTE]
    for name, graded in runs.items():
        lines += ["", f"### {name}"]
        for item in graded:
            lines += [
                "",
                f"**{grade(item)}**: {' '.join(question_text(item['question']).split())} (reference: {item['answer']})",
                "",
            ]
            lines += ["    " + line for line in shown(item["completion"]).splitlines() or [""]]
    return lines


def form_note(spec: dict) -> str:
    """The verifier's form when it is not the default (an eval.json from before forms has none)."""
    form = spec.get("reward_form", RewardEntry.form)
    return "" if form == RewardEntry.form else f" (form: {form})"


def report_markdown(result: dict) -> str:
    spec = result["spec"]
    questions = len(next(iter(result["per_question"].values())))  # --problems caps it; the data may hold fewer
    lines = [
        f"# Length / accuracy trade-off on {spec['data']}",
        "",
        f"{questions} questions, {spec['samples']} samples each at temperature {spec['temperature']}, "
        f"top-p {spec['top_p']}; reward `{spec['reward']}`{form_note(spec)}. Lengths in tokens.",
        "",
        "| run | pass@1 (95% CI) | pass@n | maj@n | short-1@n | short-3@n | mean length | p90 | truncated "
        "| tokens / correct | acc / 1k tokens | vs oracle: accuracy gap, length x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        n = run["samples"]
        pareto = " (Pareto)" if name in result["pareto"] else ""
        lines.append(
            f"| {name}{pareto} | {run['pass@1']:.3f} ({run['pass@1/ci_low']:.3f}-{run['pass@1/ci_high']:.3f}) "
            f"| {run[f'pass@{n}']:.3f} | {run[f'maj@{n}']:.3f} | {run[f'short-1@{n}']:.3f} "
            f"| {optional(run.get(f'short-3@{n}'))} | {run['length/mean']:.1f} | {run['length/p90']:.0f} "
            f"| {run['truncation_rate']:.3f} | {run['tokens_per_correct']:.1f} | {run['accuracy_per_1k_tokens']:.2f} "
            f"| {run['oracle']['accuracy_gap']:+.3f}, {run['oracle']['length_ratio']:.2f}x |"
        )
    lines += [
        "",
        f"n = {spec['samples']} samples per question; pass@k, maj@k and short-m@k for every k = 1, 2, 4 ... n "
        "are in eval.json. short-m@k votes among the first m of k samples to finish (shortest first).",
        "",
        "The oracle frontier is the best accuracy reachable at each mean length with the shortest correct "
        "response any run produced per question (token complexity); see `tradeoff.png`.",
    ]
    lines += sweep_markdown(result)
    lines += differences_markdown(result)
    lines += split_lengths_markdown(result)
    lines += thinking_markdown(result)
    lines += forced_markdown(result)
    lines += failures_markdown(result)
    lines += graded_markdown(result)
    return "\n".join(lines) + "\n"


def interval(value: float, low: float, high: float, sign: str = "") -> str:
    return f"{value:{sign}.3f} ({low:{sign}.3f} to {high:{sign}.3f})"


def sweep_markdown(result: dict) -> list[str]:
    """One number per model: the area under pass@1 against log2(budget) (protocol.py)."""
    lines = [
        "",
        "## Budget sweep",
        "",
        "Per model, the area under pass@1 against log2(budget), divided by the log-range (a mean accuracy; "
        "with one budget, its pass@1), with a 95% bootstrap interval over questions.",
        "",
        "| model | AUC over log budget (95% CI) | budgets | pass@1 at each |",
        "|---|---|---|---|",
    ]
    for model, summary in result["models"].items():
        lines.append(
            f"| {model} | {interval(summary['auc_log_budget'], summary['ci_low'], summary['ci_high'])} "
            f"| {' '.join(map(str, summary['budgets']))} | {' '.join(f'{a:.3f}' for a in summary['pass@1'])} |"
        )
    return lines


def differences_markdown(result: dict) -> list[str]:
    """Each model minus the first, on the budgets and questions both have, paired intervals."""
    if not result["differences"]:
        return []
    baseline = next(iter(result["differences"].values()))["baseline"]
    lines = [
        "",
        f"## Differences from {baseline}",
        "",
        "Model minus baseline over the budgets both were evaluated at and the questions both answered; "
        "95% paired bootstrap intervals (the same resampled questions for both).",
        "",
        "| model | questions | AUC over log budget | pass@1 at each budget |",
        "|---|---|---|---|",
    ]
    for model, difference in result["differences"].items():
        auc = difference["auc_log_budget"]
        per_budget = "; ".join(
            f"@{budget}: {interval(d['difference'], d['ci_low'], d['ci_high'], '+')}"
            for budget, d in difference["pass@1"].items()
        )
        lines.append(
            f"| {model} | {difference['questions']} "
            f"| {interval(auc['difference'], auc['ci_low'], auc['ci_high'], '+')} | {per_budget} |"
        )
    return lines


def split_lengths_markdown(result: dict) -> list[str]:
    """Lengths of correct and incorrect responses apart: a low-budget evaluation hides a model
    whose wrong answers run to the cap (`lengths.png` has their histograms)."""
    lines = [
        "",
        "## Lengths, correct vs incorrect",
        "",
        "| run | correct: responses | mean | p50 | p90 | incorrect: responses | mean | p50 | p90 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        cells = []
        for kind, prefix in (("correct", "length_correct"), ("incorrect", "length_incorrect")):
            cells += [str(len(run["lengths"][kind]))]
            cells += [length_cell(run[f"{prefix}/{stat}"]) for stat in ("mean", "median", "p90")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def thinking_markdown(result: dict) -> list[str]:
    """Reasoning and answer tokens apart, for the runs whose responses hold a <think> span."""
    thinking = {name: run["thinking"] for name, run in result["runs"].items() if run.get("thinking")}
    if not thinking:
        return []
    lines = [
        "",
        "## Thinking vs answer",
        "",
        "Over the responses with a think span: tokens up to and including the first </think> (all of them "
        "when the budget cut the reasoning), and the tokens after it.",
        "",
        "| run | responses with a think span | thinking tokens (mean) | answer tokens (mean) |",
        "|---|---|---|---|",
    ]
    for name, split in thinking.items():
        lines.append(
            f"| {name} | {split['responses']} | {split['thinking_length/mean']:.1f} "
            f"| {split['answer_length/mean']:.1f} |"
        )
    return lines


def length_cell(value: float | None) -> str:
    """A length summary; none (NaN, or null in a saved eval.json) when no response is of the kind."""
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def failures_markdown(result: dict) -> list[str]:
    """A warning per run whose verifier failed on some samples (an evaluation from before this
    count was kept has none)."""
    lines = []
    for name, run in result["runs"].items():
        failed = run.get("reward_failures")
        if failed and (failed["errors"] or failed["timeouts"] or failed["skipped"]):
            lines.append(
                f"- **{name}**: the reward raised on {failed['errors']}, timed out on {failed['timeouts']} and "
                f"gave no verdict on {failed['skipped']} samples (counted incorrect)"
                + "".join(f"; {message}" for message in failed["messages"][:2])
            )
    return ["", "## Reward failures", "", *lines] if lines else []


def optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot_tradeoff(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    runs = result["runs"]
    right = 1.1 * max(run["length/mean"] for run in runs.values())
    oracle = result["oracle_frontier"] + [(right, result["oracle_frontier"][-1][1])]  # flat past its reach
    axis.plot(
        [p[0] for p in oracle],
        [p[1] for p in oracle],
        color="gray",
        linestyle="--",
        label="oracle frontier (token complexity)",
    )
    pareto = [runs[name] for name in result["pareto"]]
    axis.plot(
        [r["length/mean"] for r in pareto],
        [r["pass@1"] for r in pareto],
        color="black",
        linewidth=0.8,
        drawstyle="steps-post",
        marker="s",
        markersize=12,
        markerfacecolor="none",
        label="Pareto frontier of the runs",
    )
    # Runs are told apart by colour and marker in the legend, not by text next to the points:
    # checkpoints of one run often sit too close together for labels to stay readable.
    colours, markers = plt.get_cmap("tab10").colors, "o^vDPX*<>h"
    for index, (name, run) in enumerate(runs.items()):
        axis.errorbar(
            run["length/mean"],
            run["pass@1"],
            yerr=[[run["pass@1"] - run["pass@1/ci_low"]], [run["pass@1/ci_high"] - run["pass@1"]]],
            color=colours[index % 10],
            marker=markers[index // 10 % len(markers)],
            capsize=3,
            linestyle="none",
            label=name,
        )
    axis.set_xlabel("mean response length (tokens)")
    axis.set_ylabel("pass@1 (95% bootstrap CI)")
    axis.set_ylim(-0.02, 1.05)
    axis.set_xlim(left=0)
    axis.set_title("accuracy vs response length")
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_lengths(out: Path, result: dict, path: Path) -> None:
    """Histograms of response lengths, correct vs incorrect, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    figure, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        lengths = result["runs"][name]["lengths"]
        axis.hist(
            [lengths["correct"], lengths["incorrect"]],
            bins=30,
            stacked=True,
            color=["tab:green", "tab:red"],
            label=["correct", "incorrect"],
        )
        axis.set_title(name, fontsize=9)
        axis.set_ylabel("responses")
        axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("response length (tokens)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(spec: EvalSpec, out: Path) -> dict:
    result = evaluate_models(spec, out)
    write_outputs(result, out)
    return result
