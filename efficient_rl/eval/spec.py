"""What an evaluation measures: models x token budgets on a data source. Kept apart from the
evaluation itself (tradeoff.py), which imports torch, so that reading a study file stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from efficient_rl.errors import ConfigError

# The fields an evaluation's user template may show: the question, and the token budget of the
# generation, so that a method trained with a target length in its prompt (L1) is asked for the
# budget it is evaluated at: "{question} Think for {budget} tokens."
PROMPT_FIELDS = ("question", "budget")


@dataclass
class EvalSpec:
    models: list[str] = field(default_factory=list)  # model directories (checkpoints too) or "lab:<preset>"
    data: str = "lab:quickstart"  # "lab:<preset>" (its held-out split), "gsm8k:test100", a JSONL/Parquet file or hf:...
    split: str = "test"  # hf: datasets only
    engine: str = "transformers"  # transformers | vllm
    budgets: list[int] = field(default_factory=lambda: [256])  # response token caps
    samples: int = 4  # per question
    problems: int = 200
    temperature: float = 0.6
    top_p: float = 0.95
    reward: str = "math"
    question_key: str = "question"
    answer_key: str = "answer"
    seed: int = 0
    chat_template: str = "auto"  # as the recipe's prompt section: auto | always | never
    system_prompt: str | None = None
    user_template: str = "{question}"  # the user turn; may show {budget} (PROMPT_FIELDS)

    def prompt(self):
        from efficient_rl.config.schema import PromptSection

        return PromptSection(self.chat_template, self.system_prompt, self.user_template)


def check_user_template(template: str, where: str) -> None:
    from efficient_rl.data.variables import template_fields

    unknown = [name for name in template_fields(template) if name not in PROMPT_FIELDS]
    if unknown:
        raise ConfigError(f"{where}: {{{unknown[0]}}} is not a field an evaluation knows; its user template may show "
                          f"{{question}} and {{budget}}")
