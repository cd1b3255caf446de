"""A BPE tokenizer trained locally on the lab corpus and saved as Hugging Face tokenizer files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # annotations only: transformers is slow to import
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen-style chat markup: the prompt ends with the assistant header, the response ends with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-pair-encoding tokenizer on `corpus` and save it under `out_dir`."""
    from transformers import PreTrainedTokenizerFast  # here: slow to import, and no CLI check needs it

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    # Pieces are a number, a word or a symbol, each with its leading space: " 16", " check", ".".
    # The lab's numbers are frequent enough to become single tokens, so one step of arithmetic
    # is one lookup for a tiny model rather than carrying across digit tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(r" ?[0-9]+| ?[A-Za-z]+| ?[^A-Za-z0-9\s]|\s+"), behavior="isolated"
    )
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=list("0123456789+-*=.{}\\ \n"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)
    wrapped.padding_side = "left"
    return wrapped
