"""Tokenizers: loading one, and how questions become prompt ids and responses target ids."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast


class TokenizerError(ValueError):
    pass


def load_tokenizer(source: str | Path):
    """The tokenizer exactly as serialized in tokenizer.json when there is one, left-padding.

    AutoTokenizer may pick a model-specific class (Qwen2Tokenizer for a qwen2 config) that
    rebuilds the pre-tokenizer and splits text differently from the saved tokenizer.
    """
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


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The chat-formatted user turn followed by the assistant header the model continues from."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids as the model generates them: the text, then the end-of-turn token."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
