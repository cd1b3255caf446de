"""What an evaluation measures: models x token budgets on a data source. Kept apart from the
evaluation itself (tradeoff.py), which imports torch, so that reading a study file stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from efficient_rl.config.schema import EvalSection, RewardEntry, ThinkingBudgetSection
from efficient_rl.errors import ConfigError

# The fields an evaluation's user template may show: the question, and the token budget of the
# generation, so that a method trained with a target length in its prompt (L1) is asked for the
# budget it is evaluated at: "{question} Think for {budget} tokens."
PROMPT_FIELDS = ("question", "budget")
# Where each number of an evaluation may lie (config/rules.py's notation), checked before anything
# runs: as `eval` flags, and as a study's eval section.
EVAL_NUMBER_RULES = {
    "budgets": "[1, inf)",
    "samples": "[1, inf)",
    "problems": "[1, inf)",
    "temperature": ("[0, inf)", "0 is greedy"),
    "top_p": "(0, 1]",
    "seed": "[0, inf)",
    "force_answer_tokens": "[1, inf)",
}


@dataclass
class EvalSpec:
    """`efficient-rl eval`'s settings and their defaults (its flags and a study's `eval:` section
    read them from here). Sampling defaults are the recipe's held-out evaluation's."""

    models: list[str] = field(default_factory=list)  # model directories (checkpoints too) or "lab:<preset>"
    data: str = "lab:quickstart"  # "lab:<preset>" (its held-out split), "gsm8k:test100", a JSONL/Parquet file or hf:...
    split: str = "test"  # hf: datasets only
    engine: str = "transformers"  # transformers | vllm
    budgets: list[int] = field(default_factory=lambda: [256])  # response token caps
    samples: int = 4  # per question: pass@1 over 4 samples, where a training run's evaluation draws 1
    problems: int = EvalSection.num_problems
    temperature: float = EvalSection.temperature
    top_p: float = EvalSection.top_p
    reward: str = "math"  # the verifier: any reward reference, as a recipe's reward entry names it
    reward_form: str = RewardEntry.form  # how it is called, as the entry's `form:` (trl, verl, ...)
    question_key: str = "question"
    answer_key: str = "answer"
    seed: int = 0
    chat_template: str = "auto"  # as the recipe's prompt section: auto | always | never
    system_prompt: str | None = None
    user_template: str = "{question}"  # the user turn; may show {budget} (PROMPT_FIELDS)
    # Budget forcing besides the cut: at each budget, also generate with the reasoning closed there
    # (force_close + force_answer_prompt appended to a response that has not closed it) and up to
    # force_answer_tokens to answer in, as rollout.thinking_budget does: pass@1/forced, length/forced.
    force_answer: bool = False
    force_close: str = ThinkingBudgetSection.close
    force_answer_prompt: str = ThinkingBudgetSection.answer_prompt
    force_answer_tokens: int = ThinkingBudgetSection.answer_tokens

    def prompt(self):
        from efficient_rl.config.schema import PromptSection

        return PromptSection(self.chat_template, self.system_prompt, self.user_template)


def check_user_template(template: str, where: str) -> None:
    from efficient_rl.data.variables import template_fields

    unknown = [name for name in template_fields(template) if name not in PROMPT_FIELDS]
    if unknown:
        raise ConfigError(
            f"{where}: {{{unknown[0]}}} is not a field an evaluation knows; its user template may show "
            f"{{question}} and {{budget}}"
        )


def check_reward_form(form: str, where: str) -> None:
    """Before any model loads: the form names one of scoring/forms.py's (no torch there)."""
    from efficient_rl.scoring.forms import FormError, check_form_name

    try:
        check_form_name(form)
    except FormError as err:
        raise ConfigError(f"{where}: {err}") from None
