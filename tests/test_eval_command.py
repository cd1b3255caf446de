"""`efficient-rl eval` end to end on lab models: outputs, resume, bad input."""

import json
import re

import pytest
from test_training import EVAL_COMMAND_METRICS

from conftest import run_cli
from efficient_rl.errors import ConfigError
from efficient_rl.eval.tradeoff import EvalSpec, run
from efficient_rl.rollout.hf import TransformersEngine


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_eval_writes_every_output_for_a_model_and_a_checkpoint(tmp_path, tiny_model_dir, checkpoint):
    out = tmp_path / "eval"
    result = run_cli(
        "eval", "lab:tiny", checkpoint, "--data", "lab:tiny", "--budgets", "8", "24", "--samples", "2",
        "--problems", "6", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((out / "eval.json").read_text())
    names = {"lab_tiny@8", "lab_tiny@24", "tiny_step-00000001@8", "tiny_step-00000001@24"}
    assert set(saved["runs"]) == names and set(saved["pareto"]) <= names
    for run_metrics in saved["runs"].values():
        for key in EVAL_COMMAND_METRICS + ("maj@1",):
            assert key in run_metrics, key
        assert run_metrics["length/max"] <= run_metrics["budget"]
    # Two budgets: one trapezoid over log2 8..24, so the area is the mean of the two pass@1s.
    for model, prefix in (("lab:tiny", "lab_tiny"), (str(checkpoint), "tiny_step-00000001")):
        sweep = saved["models"][model]
        low, high = saved["runs"][f"{prefix}@8"]["pass@1"], saved["runs"][f"{prefix}@24"]["pass@1"]
        assert sweep["budgets"] == [8, 24] and sweep["auc_log_budget"] == pytest.approx((low + high) / 2)
        assert sweep["ci_low"] <= sweep["auc_log_budget"] <= sweep["ci_high"]
    trained = saved["differences"][str(checkpoint)]
    assert trained["baseline"] == "lab:tiny" and trained["questions"] == 6
    assert trained["pass@1"]["8"]["difference"] == pytest.approx(
        saved["runs"]["tiny_step-00000001@8"]["pass@1"] - saved["runs"]["lab_tiny@8"]["pass@1"]
    )
    report = (out / "report.md").read_text()
    assert all(f"| {name}" in report for name in names)
    assert "## Budget sweep" in report and "## Lengths, correct vs incorrect" in report
    assert "## Thinking vs answer" not in report  # the lab model does not think
    for plot in ("tradeoff.png", "lengths.png"):
        assert (out / plot).stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and page.count("<tr>") == 5  # header + 4 runs
    assert len((out / "generations" / "lab_tiny@8.jsonl").read_text().splitlines()) == 6

    # Another evaluation at a third budget, then both on one set of frontiers.
    other = tmp_path / "eval-16"
    run(EvalSpec(models=["lab:tiny"], data="lab:tiny", budgets=[16], samples=2, problems=6), other)
    merged = run_cli("eval", "compare", out, other, "--out", tmp_path / "both")
    assert merged.returncode == 0, merged.stderr[-2000:]
    both = json.loads((tmp_path / "both" / "eval.json").read_text())
    assert set(both["runs"]) == names | {"lab_tiny@16"}
    # lab:tiny is in both evaluations: a sweep of its own in each; the one at 16 shares no budget
    # with the baseline (the first evaluation's lab:tiny), so it has no difference.
    assert set(both["models"]) == {"eval/lab:tiny", "eval-16/lab:tiny", str(checkpoint)}
    assert both["models"]["eval/lab:tiny"]["auc_log_budget"] == pytest.approx(
        saved["models"]["lab:tiny"]["auc_log_budget"]
    )
    assert set(both["differences"]) == {str(checkpoint)}
    assert both["runs"]["lab_tiny@8"]["pass@1"] == saved["runs"]["lab_tiny@8"]["pass@1"]


def test_a_killed_eval_resumes_without_regenerating_finished_samples(tmp_path, tiny_model_dir, monkeypatch):
    spec = EvalSpec(models=["lab:tiny"], data="lab:tiny", budgets=[12], samples=2, problems=40)
    cache = tmp_path / "generations" / "lab_tiny@12.jsonl"
    generate = TransformersEngine.generate
    calls = []

    def killed_on_the_second_chunk(self, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the eval is killed mid-way
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(TransformersEngine, "generate", killed_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path)
    first_chunk = cache.read_text()
    assert len(first_chunk.splitlines()) == 16
    monkeypatch.setattr(
        TransformersEngine, "generate", lambda self, *a, **k: calls.append(len(a[0])) or generate(self, *a, **k)
    )
    calls.clear()
    result = run(spec, tmp_path)
    assert calls == [16, 8]  # only the two missing chunks
    assert cache.read_text().startswith(first_chunk) and len(cache.read_text().splitlines()) == 40
    calls.clear()
    again = run(spec, tmp_path)  # everything cached: metrics are recomputed from the generations
    assert calls == [] and again["runs"] == result["runs"]

    cache.write_text(cache.read_text() + '{"question": "cut sho')  # a kill in the middle of a line
    run(spec, tmp_path)
    assert calls == [] and len(cache.read_text().splitlines()) == 40
    with pytest.raises(ConfigError, match="used temperature=0.6, not 1.0; choose another --out"):
        run(EvalSpec(**{**spec.__dict__, "temperature": 1.0}), tmp_path)


def test_a_model_written_again_at_its_path_is_generated_again(tmp_path, tiny_model_dir, monkeypatch):
    """A study's run retrained into the same checkpoint path: before, the cached generations of
    the old weights were scored as the new model's."""
    import shutil

    import torch

    from efficient_rl.models.modeling import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    spec = EvalSpec(models=[str(model)], data="lab:tiny", budgets=[12], samples=2, problems=20)
    out = tmp_path / "eval"
    generate = TransformersEngine.generate
    calls = []
    monkeypatch.setattr(
        TransformersEngine, "generate", lambda self, *a, **k: calls.append(len(a[0])) or generate(self, *a, **k)
    )
    run(spec, out)
    run(spec, out)
    assert calls == [16, 4]  # the second evaluation read everything from the cache
    retrained = load_model(model)
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    retrained.save_pretrained(model)
    calls.clear()
    run(spec, out)
    assert calls == [16, 4]  # every question again, with the new weights
    cache = (out / "generations" / "model@12.jsonl").read_text().splitlines()
    assert len(cache) == 20 and len({json.loads(line)["weights"] for line in cache}) == 1


@pytest.mark.parametrize(
    "models, budgets, message",
    [
        (["/does/not/exist"], [8], "not a model directory"),
        (["lab:nope"], [8], "unknown lab preset"),
        (["lab:tiny"], [0], "expected positive token caps"),
        (["lab:tiny"], [10_000], "exceeds the context of lab:tiny"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, tiny_model_dir, models, budgets, message):
    with pytest.raises(ConfigError, match=message):
        run(EvalSpec(models=models, data="lab:tiny", budgets=budgets, samples=1, problems=2), tmp_path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_answers_the_verifier_cannot_parse_and_unmapped_columns_stop_before_generating(tmp_path, tiny_model_dir):
    rows = [{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": "\\frac{4"}]
    data = write_jsonl(tmp_path / "broken.jsonl", rows)
    spec = EvalSpec(
        models=["lab:tiny"], data=data, question_key="q", answer_key="a", budgets=[8], samples=1, problems=2
    )
    with pytest.raises(
        ConfigError,
        match=r"the reward `math` does not accept the reference answer '\\\\frac\{4' "
        r"of question 'broken-2'",
    ):
        run(spec, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"broken.jsonl:1: missing column 'answer'"):
        run(EvalSpec(**{**spec.__dict__, "answer_key": "answer"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_vllm_and_transformers_engines_generate_the_same_greedy_answers(tmp_path, tiny_model_dir):
    """The eval on either engine: greedy decoding makes the two directly comparable."""
    caches = {}
    for engine in ("transformers", "vllm"):
        spec = EvalSpec(
            models=["lab:tiny"], data="lab:tiny", engine=engine, budgets=[16], samples=1, problems=8, temperature=0.0
        )
        result = run(spec, tmp_path / engine)
        assert set(result["runs"]) == {"lab_tiny@16"}
        caches[engine] = [
            json.loads(line)
            for line in (tmp_path / engine / "generations" / "lab_tiny@16.jsonl").read_text().splitlines()
        ]
    assert len(caches["vllm"]) == 8
    for ours, theirs in zip(caches["transformers"], caches["vllm"]):
        assert (ours["completions"], ours["lengths"]) == (theirs["completions"], theirs["lengths"])


def test_the_user_template_may_show_each_budget(tiny_model_dir, tmp_path):
    """How a method trained with a target length in its prompt (L1) is asked for the budget it is
    evaluated at; any other field is one line of error before anything is generated."""
    from efficient_rl.eval.tradeoff import ModelUnderTest, evaluate_models, load_questions

    spec = EvalSpec(
        models=["lab:tiny"],
        data="lab:tiny",
        budgets=[8, 24],
        problems=3,
        chat_template="never",
        user_template="{question} Think in {budget} tokens.",
    )
    questions = load_questions(spec)
    model = ModelUnderTest("lab:tiny", tiny_model_dir, questions, spec)
    for budget in (8, 24):
        for question in questions:
            shown = model.tokenizer.decode(model.prompts[budget][question["question"]]).strip()
            assert shown == f"{question['question']} Think in {budget} tokens."
    spec.user_template = "{question} Think in {target} tokens."
    with pytest.raises(ConfigError, match=r"--user-template: \{target\} is not a field an evaluation knows"):
        evaluate_models(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_forcing_the_answer_at_the_budget_finishes_answers_the_cut_leaves_unfinished(tmp_path):
    """lab:tiny_rechecks re-checks its result many times before "The answer is \\boxed{..}": cut at
    30 tokens it has answered nothing, while closing its reasoning there with the lab's own
    " The answer is" makes it write one. Forced answers are graded like any other (whether they
    are right is the model's skill: docs/benchmarks.md measures it on the quickstart's model)."""
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "lab:tiny_rechecks",
        "--data=lab:tiny_rechecks",
        "--budgets=30",
        "--samples=1",
        "--problems=16",
        "--temperature=0",
        "--force-answer",
        "--force-close= The answer is",
        "--force-answer-tokens=12",
        f"--out={out}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_ = json.loads((out / "eval.json").read_text())["runs"]["lab_tiny_rechecks@30"]
    assert run_["pass@1"] == 0.0 and run_["truncation_rate"] == 1.0
    cut = [json.loads(line) for line in (out / "generations" / "lab_tiny_rechecks@30.jsonl").read_text().splitlines()]
    assert len(cut) == 16 and not any("\\boxed{" in row["completions"][0] for row in cut)  # none answered
    (forced_cache,) = (out / "generations").glob("lab_tiny_rechecks@30.forced-*.jsonl")
    forced = [json.loads(line) for line in forced_cache.read_text().splitlines()]
    answers = [re.search(r" The answer is \\boxed\{(\d+)\}\.$", row["completions"][0]) for row in forced]
    assert all(answers), [row["completions"][0] for row in forced]  # every one answered, in the lab's format
    right = sum(found.group(1) == row["answer"] for found, row in zip(answers, forced)) / len(forced)
    assert run_["pass@1/forced"] == pytest.approx(right)
    # every response ran to the budget; forced ones add the 3 tokens of the close marker and an answer
    assert 30 + 3 < run_["length/forced"] <= 30 + 3 + 12
    report = (out / "report.md").read_text()
    assert "## Budget forcing" in report
    assert f"{run_['pass@1']:.3f} cut at 30 tokens, {run_['pass@1/forced']:.3f} with the answer forced" in report


def test_a_close_marker_of_no_tokens_is_refused_before_generating(tmp_path, tiny_model_dir):
    spec = EvalSpec(
        models=["lab:tiny"], data="lab:tiny", budgets=[8], samples=1, problems=2, force_answer=True, force_close="🙂"
    )
    with pytest.raises(ConfigError, match=r"^--force-close: expected text the tokenizer of lab:tiny encodes"):
        run(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
