"""Supervised warm start of a lab model on (prompt, response) token pairs.

A plain torch loop rather than TRL's SFTTrainer: the lab model is tiny, the loop is twenty lines,
and it keeps the base install free of TRL.
"""

from __future__ import annotations

import math
import random

import torch


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad prompt+response ids; labels are -100 on the prompt and on padding."""
    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        ids = prompt + response
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(response)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask


def length_bucketed_batches(examples, batch_size: int, rng: random.Random, pool_batches: int = 16):
    """Endless random batches of similar length: draw a pool, sort it by length, cut it up.

    Padding is most of the compute when response lengths vary 8x, as the wordy traces do.
    """
    while True:
        pool = sorted(rng.sample(examples, batch_size * pool_batches), key=lambda e: len(e[0]) + len(e[1]))
        chunks = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def supervised_finetune(
    model,
    examples: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup: int = 50,
    log_every: int = 100,
    log=print,
) -> list[float]:
    """Train `model` in place on the response tokens of (prompt, response) pairs; returns losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    batches = length_bucketed_batches(examples, batch_size, rng)
    model.train()
    losses = []
    for step in range(steps):
        input_ids, labels, attention_mask = pad_examples(next(batches), pad_id)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"sft step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    return losses
