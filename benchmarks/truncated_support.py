"""The learner/engine importance ratio on-policy, at top_p 1.0 and 0.8 on both engines: the
learner's log-probs over the whole vocabulary (as before rollout.top_p reached the learner) and
over the support the engine sampled from (as now), against the engine's log-probs (over the
support on both engines now; before, the transformers engine reported whole-vocabulary ones).

For each engine and top_p: the quickstart lab model's rollouts of 32 held-out prompts x 4
samples at temperature 1.0, then the learner's log-probs of the same tokens on the same weights.
Printed per case: `rollout/logprob_diff` (mean |log pi_learner - log pi_engine| per token) and
the ratio's p1 / p50 / p99 and share outside [0.8, 1.2], both ways.

    .venv/bin/python benchmarks/truncated_support.py
"""

from __future__ import annotations

import torch


def ratio_figures(learner: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> str:
    log_ratio = (learner - engine)[mask > 0].double()
    ratio = log_ratio.exp()
    quantiles = torch.quantile(ratio, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    outside = float(((ratio < 0.8) | (ratio > 1.2)).double().mean())
    return (
        f"diff {float(log_ratio.abs().mean()):.2e}  p1 {quantiles[0]:.4f}  p50 {quantiles[1]:.4f}  "
        f"p99 {quantiles[2]:.4f}  outside {outside:.1%}"
    )


def main() -> None:
    from transformers import AutoModelForCausalLM

    from efficient_rl.data.prompts import encode_prompt, load_tokenizer
    from efficient_rl.lab.build import lab_model_dir
    from efficient_rl.lab.tasks import ArithmeticTask, generate_problems
    from efficient_rl.models.modeling import response_logprobs
    from efficient_rl.rollout.base import SamplingSettings
    from efficient_rl.rollout.hf import TransformersEngine
    from efficient_rl.rollout.vllm_engine import VLLMEngine

    model_dir = lab_model_dir("quickstart")
    tokenizer = load_tokenizer(model_dir)
    problems = generate_problems(ArithmeticTask(), "heldout", 32, seed=1)
    prompts = [encode_prompt(tokenizer, problem["question"]) for problem in problems]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    engines = {
        "transformers": TransformersEngine(model, tokenizer),
        "vllm": VLLMEngine(model_dir, tokenizer, max_model_len=512, seed=0),
    }
    print("on-policy ratio pi_learner / pi_engine over the sampled tokens (quickstart lab model, temperature 1.0)")
    for name, engine in engines.items():
        for top_p in (1.0, 0.8):
            settings = SamplingSettings(n=4, max_new_tokens=128, temperature=1.0, top_p=top_p)
            torch.manual_seed(0)
            batch = engine.generate(prompts, problems, list(range(len(prompts))), settings)
            with torch.no_grad():
                whole, _ = response_logprobs(model, batch, 1.0, with_entropy=False)
                support, _ = response_logprobs(model, batch, 1.0, with_entropy=False, support=settings.support)
            tokens = int(batch.response_mask.sum())
            print(f"{name:>12s} top_p {top_p}: {tokens} tokens")
            for label, learner in (("over the whole vocabulary", whole), ("over the support", support)):
                figures = ratio_figures(learner, batch.rollout_logprobs, batch.response_mask)
                print(f"{'':>14s}learner {label:<26s} {figures}")


if __name__ == "__main__":
    main()
