"""How questions become prompt token ids and responses become target ids, for every model."""

from __future__ import annotations


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The chat-formatted user turn followed by the assistant header the model continues from."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids as the model generates them: the text, then the end-of-turn token."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
