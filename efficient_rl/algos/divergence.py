"""Per-token teacher-student divergences and student entropy over the full vocabulary.

On-policy distillation (docs/algorithms.md#on-policy-distillation) trains the student on its own
rollouts with a per-token divergence between the student's and the teacher's next-token
distributions; TIP (docs/algorithms.md#tip-selection-rules) also ranks tokens by these divergences
and by the student's entropy.

Every function takes logits [N, V] (one row per response token) and returns [N] float32 values.
The work is done in float32 with log_softmax, `chunk_rows` rows at a time, so the [chunk, V]
probability temporaries exist for one chunk only. With autograd on, each chunk runs under
activation checkpointing: the backward pass recomputes one chunk at a time instead of keeping
every chunk's temporaries alive until the backward, which would bring back the [N, V] peak.
Logits must be finite (a -inf logit gives 0 * inf = NaN in the sums).

Divergences are differentiable with respect to the student logits only: the teacher is a fixed
target, so its logits are detached.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from efficient_rl.registry import Registry

# kind -> fn(student_logp [n, V], teacher_logp [n, V], beta) -> [n], on one chunk of float32
# log-probabilities. Only "jsd" reads beta.
DIVERGENCES: Registry = Registry("token divergence")


@DIVERGENCES.register("reverse_kl")
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(P_S || P_T) = sum_v p_S (log p_S - log p_T): the OPD loss and TIP's δ (docs/algorithms.md#tip-axes)."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


@DIVERGENCES.register("forward_kl")
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(P_T || P_S) = sum_v p_T (log p_T - log p_S): TIP's Q3 ranking (docs/algorithms.md#tip-selection-rules)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


@DIVERGENCES.register("jsd")
def generalised_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """beta·KL(P_S || M) + (1 - beta)·KL(P_T || M) with M = beta·P_S + (1 - beta)·P_T
    (docs/algorithms.md#opd-reference-code).

    Convention: beta weighs the student, both in the mixture and in the sum, so beta = 0.5 is the
    symmetric Jensen-Shannon divergence (at most ln 2) and beta = 0 or 1 gives 0. (Libraries
    differ here: TRL's generalised JSD lets beta weigh the teacher, i.e. its beta is 1 - ours.)
    log M is taken in log space with logsumexp, so no probability is formed and then logged.
    """
    # log(0) = -inf is fine: logsumexp then returns the other term exactly, and its weight is 0.
    log_weights = torch.tensor([beta, 1.0 - beta], dtype=student_logp.dtype, device=student_logp.device).log()
    log_mixture = torch.logsumexp(torch.stack([student_logp + log_weights[0], teacher_logp + log_weights[1]]), dim=0)
    kl_student = (student_logp.exp() * (student_logp - log_mixture)).sum(-1)
    kl_teacher = (teacher_logp.exp() * (teacher_logp - log_mixture)).sum(-1)
    return beta * kl_student + (1.0 - beta) * kl_teacher


# Per-token statistics token selectors rank by, by name (a selector's `needs`): name ->
# fn(student_logp [n, V], teacher_logp [n, V] or None) -> [n]. An entry that needs "teacher" gets
# the teacher's log-probabilities (on-policy distillation only). Adding a statistic is one entry
# here: the learners compute whatever a recipe's selector names, in one pass.
TOKEN_STATISTICS: Registry = Registry("token statistic")


@TOKEN_STATISTICS.register("entropy", source="H = -sum_v p log p of the policy, in nats")
def entropy_statistic(student_logp: torch.Tensor, teacher_logp: torch.Tensor | None) -> torch.Tensor:
    return -(student_logp.exp() * student_logp).sum(-1)


@TOKEN_STATISTICS.register("reverse_kl", needs=("teacher",), source="KL(P_S || P_T): TIP's divergence axis")
def reverse_kl_statistic(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return reverse_kl(student_logp, teacher_logp, 0.0)


@TOKEN_STATISTICS.register("forward_kl", needs=("teacher",), source="KL(P_T || P_S): TIP's Q3 ranking signal")
def forward_kl_statistic(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return forward_kl(student_logp, teacher_logp, 0.0)


@TOKEN_STATISTICS.register(
    "jsd", needs=("teacher",), source="symmetric JSD (beta 0.5), at most ln 2: the OPD repo's entropy_weighted_sample"
)
def jsd_statistic(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return generalised_jsd(student_logp, teacher_logp, 0.5)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    chunk_rows: int = 512,
) -> torch.Tensor:
    """[N] per-token divergence `kind` between the student's and teacher's distributions.

    kind: "reverse_kl" (the OPD default), "forward_kl" or "jsd" (see generalised_jsd for beta).
    Gradients flow to student_logits only.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of: {', '.join(DIVERGENCES.names())}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    divergence = DIVERGENCES.get(kind)

    def chunk_divergence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student_logp = torch.log_softmax(student.float(), dim=-1)
        teacher_logp = torch.log_softmax(teacher.float(), dim=-1)
        return divergence(student_logp, teacher_logp, beta)

    return map_row_chunks(chunk_divergence, [student_logits, teacher_logits.detach()], chunk_rows)


def token_entropy(logits: torch.Tensor, chunk_rows: int = 512) -> torch.Tensor:
    """[N] entropy H = -sum_v p log p in nats of softmax(logits): D3S's, TIP's and 80/20's H
    (docs/algorithms.md#d3s-token-level, #tip-axes, #high-entropy-forking-tokens).

    Works under torch.no_grad() (the usual case: entropy only ranks tokens) and is differentiable
    otherwise.
    """
    check_logits(logits, "logits")

    def chunk_entropy(chunk: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(chunk.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return map_row_chunks(chunk_entropy, [logits], chunk_rows)


def map_row_chunks(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], chunk_rows: int) -> torch.Tensor:
    """cat([fn(*(t[rows] for t in tensors)) for each block of chunk_rows rows]).

    Under autograd each block is checkpointed: only the input slices (views, no copies) are kept
    for the backward, which recomputes the block's temporaries one block at a time.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    rows = tensors[0].shape[0]
    if rows == 0:
        return torch.zeros(0, dtype=torch.float32, device=tensors[0].device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outputs = []
    for start in range(0, rows, chunk_rows):
        chunk = [t[start : start + chunk_rows] for t in tensors]
        if needs_grad:
            outputs.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            outputs.append(fn(*chunk))
    return torch.cat(outputs)


def check_logits(logits: torch.Tensor, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [N, V], got shape {tuple(logits.shape)}")
