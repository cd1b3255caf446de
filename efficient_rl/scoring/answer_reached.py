"""Where a correct response first reaches its answer: DeCS's necessary reasoning prefix
(docs/algorithms.md#decs), found with the recipe's own verifier instead of the paper's detector model.

The prefix end of a correct rollout is the fewest response tokens k whose decoded text the verifier
already accepts. Scanning every k costs one reward call per token. The verifier reads an answer
span ("\\boxed{17}", "#### 17", a last number), and what it reads changes only where such a span
ends, in a digit or a closing brace, or where an opening brace starts an unclosed "\\boxed{" that
hides the boxed answers before it (the math reward then reads the last number). So only prefixes
whose text ends in one of those can be the first accepted one; they are scored in one batched call,
and the earliest accepted wins. The cut is exact for any verifier whose verdict changes only as
such a character is written: the math reward's boxed, `####` and last-number readings. A custom
`answer_pattern` whose match can end elsewhere gets the first accepted candidate, which may come
later than the true first prefix. tests/test_decs.py checks it against the full scan.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from efficient_rl.algos.batch import RolloutBatch, correctness

# The characters after which the verifier's reading of a prefix can change (see the module docstring).
ANSWER_SPAN_ENDS = frozenset("0123456789{}")


def prefix_text_ends(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """[T] the length of the decoded text of the first k + 1 tokens, for each k.

    Tokens decoded one at a time are joined when that gives the whole text back (a tokenizer with
    no merges across tokens: one decode per token); otherwise each prefix is decoded on its own, the
    slow exact way (byte-level pieces of one character, a decoder that strips a leading space)."""
    pieces = [decode([token]) for token in token_ids]
    if "".join(pieces) == decode(list(token_ids)):
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)
        return ends
    return [len(decode(list(token_ids[: k + 1]))) for k in range(len(token_ids))]


def candidate_cuts(text: str, ends: list[int]) -> list[int]:
    """Token counts k (ascending) whose prefix text, text[:ends[k - 1]], ends an answer span; the
    first k of a run of tokens that add no text (an EOS the decoder drops) stands for all of them."""
    cuts, previous = [], 0
    for k, end in enumerate(ends, start=1):
        if end > previous and text[end - 1] in ANSWER_SPAN_ENDS:
            cuts.append(k)
        previous = end
    return cuts


def answer_ends(
    responses: list[Sequence[int]],
    samples: list[dict],
    correct: Sequence[bool],
    decode: Callable[[list[int]], str],
    accepts: Callable[[list[str], list[dict]], list[bool]],
) -> list[int]:
    """[B] the prefix end, in tokens, of each response: the first candidate cut whose text `accepts`
    passes, for a correct response; its full length otherwise (a wrong response, or a correct one
    no prefix of which is accepted: nothing of it is called redundant).

    `accepts(texts, samples)` scores many prefixes at once (the driver passes the reward runner)."""
    ends = [len(ids) for ids in responses]
    queries: list[tuple[int, int, str]] = []  # (row, cut, prefix text)
    for row, ids in enumerate(responses):
        if not correct[row]:
            continue
        text_ends = prefix_text_ends(ids, decode)
        text = decode(list(ids))
        queries.extend((row, k, text[: text_ends[k - 1]]) for k in candidate_cuts(text, text_ends))
    verdicts = accepts([text for _, _, text in queries], [samples[row] for row, _, _ in queries]) if queries else []
    for (row, cut, _), accepted in zip(queries, verdicts):
        if accepted and cut < ends[row]:
            ends[row] = cut
    return ends


def batch_answer_ends(batch: RolloutBatch, rewards, tokenizer) -> torch.Tensor:
    """[B] long: `answer_ends` of a scored batch, its prefixes scored by the recipe's `rewards` (the
    reward runner: weights, workers and timeouts as for whole responses) and decoded as the engines
    decode completions. A prefix call that fails counts as not accepted: the cut then falls later,
    which calls fewer tokens redundant, never more."""
    responses = [ids[:length].tolist() for ids, length in zip(batch.response_ids, batch.response_lengths.tolist())]

    def accepts(texts: list[str], samples: list[dict]) -> list[bool]:
        result = rewards.score(texts, samples)
        return (correctness(result.scores, result.accuracy) > 0).tolist()

    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    ends = answer_ends(responses, batch.samples, (batch.correctness() > 0).tolist(), decode, accepts)
    return torch.tensor(ends, dtype=torch.long)


def no_answer_ends(batch: RolloutBatch, rewards, tokenizer) -> None:
    """For a recipe no stage of which reads answer_end: nothing is decoded or scored."""
    return None
