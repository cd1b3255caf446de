"""Tokenizers: loading one, and how questions become prompt ids and responses target ids."""

from __future__ import annotations

import json
from pathlib import Path

from efficient_rl.config.schema import PromptSection
from efficient_rl.data.turns import Turns, has_system_turn, is_turns, with_user_text
from efficient_rl.data.variables import render
from efficient_rl.errors import ConfigError

DEFAULT_PROMPT = PromptSection()


class TokenizerError(ValueError):
    pass


def load_tokenizer(source: str | Path):
    """The tokenizer exactly as serialized in tokenizer.json when there is one, left-padding.

    AutoTokenizer may pick a model-specific class (Qwen2Tokenizer for a qwen2 config) that
    rebuilds the pre-tokenizer and splits text differently from the saved tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # here: slow to import, and no CLI check needs it

    source = Path(source)
    loader = PreTrainedTokenizerFast if (source / "tokenizer.json").is_file() else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot load a tokenizer from {source} ({err})") from None
    tokenizer.padding_side = "left"  # not saved with the files; generation needs left padding
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, question: str | Turns, prompt: PromptSection = DEFAULT_PROMPT) -> list[int]:
    """The prompt ids of a bare question (a template that names other fields needs encode_sample)."""
    try:
        user = render_prompt(prompt.user_template, {"question": question})
    except KeyError as err:
        raise ConfigError(
            f"user template: {{{err.args[0]}}} names a sample field, but only {{question}} is known here"
        ) from None
    return encode_user(tokenizer, user, prompt)


def encode_sample(tokenizer, sample: dict, prompt: PromptSection = DEFAULT_PROMPT) -> list[int]:
    """The prompt ids of a sample: the user template filled with its fields (variables.render)."""
    return encode_user(tokenizer, render_prompt(prompt.user_template, sample), prompt)


def render_prompt(template: str, sample: dict) -> str | Turns:
    """What a sample asks: the user template filled with its fields. For a question of chat turns,
    the turns with the last (user) one's content filled in, {question} standing for that content."""
    question = sample["question"]
    if not is_turns(question):
        return render(template, sample)
    return with_user_text(question, render(template, {**sample, "question": question[-1]["content"]}))


def encode_user(tokenizer, user: str | Turns, prompt: PromptSection = DEFAULT_PROMPT) -> list[int]:
    """The prompt ids the model continues from. With a chat template: an optional system turn,
    the user turn and the assistant header; without one: the user text itself. Chat turns (a
    rendered prompt of turns) go through the template as they are; prompt.system_prompt comes
    first only when they hold no system turn of their own."""
    if is_turns(user):
        return encode_turns(tokenizer, user, prompt)
    if uses_chat_template(tokenizer, prompt):
        messages = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
        messages.append({"role": "user", "content": user})
        return apply_template(tokenizer, messages)
    return tokenizer(user)["input_ids"]


def encode_turns(tokenizer, turns: Turns, prompt: PromptSection) -> list[int]:
    if not uses_chat_template(tokenizer, prompt):
        why = "chat_template is never" if prompt.chat_template == "never" else "it has none"
        raise TokenizerError(
            f"the data holds chat turns, which need the chat template of {tokenizer.name_or_path}, but {why} "
            f"(map a plain-text question column instead)"
        )
    if prompt.system_prompt and not has_system_turn(turns):
        turns = [{"role": "system", "content": prompt.system_prompt}, *turns]
    return apply_template(tokenizer, turns)


def apply_template(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template placed them


def uses_chat_template(tokenizer, prompt: PromptSection) -> bool:
    if prompt.chat_template == "always" and not has_chat_template(tokenizer):
        raise TokenizerError(
            f"prompt.chat_template: always, but the tokenizer of {tokenizer.name_or_path} has no "
            f"chat template (set prompt.chat_template: auto or never)"
        )
    return prompt.chat_template != "never" and has_chat_template(tokenizer)


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a response: the tokenizer's eos and the eos ids of the model's
    generation_config.json. Chat models often list several (Llama 3: end of text and end of turn)."""
    ids = {tokenizer.eos_token_id}
    config = Path(tokenizer.name_or_path) / "generation_config.json"
    if config.is_file():
        listed = json.loads(config.read_text()).get("eos_token_id")
        ids.update(listed if isinstance(listed, list) else [] if listed is None else [listed])
    return sorted(ids)


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids as the model generates them: the text, then the end-of-turn token."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
