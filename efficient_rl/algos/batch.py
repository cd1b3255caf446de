"""The one batch type that every stage of the driver loop reads and writes.

Rows are rollouts. Rollouts of the same prompt share a `group_id`. Prompts are left-padded to a
common width and responses right-padded, so `cat([prompts, responses], 1)` is the model input and
response position t of every row sits at the same column.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class RolloutBatch:
    # Filled by the rollout engine.
    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 on prompt tokens
    response_ids: torch.Tensor  # [B, R] long, right-padded
    response_mask: torch.Tensor  # [B, R] float, 1 on response tokens (EOS included)
    rollout_logprobs: torch.Tensor  # [B, R] float, engine log-probs of the sampled tokens
    truncated: torch.Tensor  # [B] bool, stopped by the length cap rather than by EOS
    group_ids: torch.Tensor  # [B] long, rollouts of one prompt share an id
    samples: list[dict]  # [B] the data sample each rollout answers (question, answer, ...)
    completions: list[str]  # [B] decoded response text
    # Filled by later stages.
    length_cap: torch.Tensor | None = None  # [B] long, the truncation length in force per rollout
    scores: torch.Tensor | None = None  # [B] verifier score before length shaping
    accuracy: torch.Tensor | None = None  # [B] 1.0 if the answer is correct
    rewards: torch.Tensor | None = None  # [B] reward after length shaping
    advantages: torch.Tensor | None = None  # [B, R]
    loss_mask: torch.Tensor | None = None  # [B, R] tokens that enter the loss (token selection)
    old_logprobs: torch.Tensor | None = None  # [B, R] learner log-probs before the update
    ref_logprobs: torch.Tensor | None = None  # [B, R] reference-model log-probs (KL)
    policy_versions: torch.Tensor | None = None  # [B] long, training steps behind the weights that sampled it
    # [B, R] float, 1 on tokens the engine wrote rather than sampled (budget forcing's close marker and
    # answer prompt): in response_mask, since later tokens attend to them, but never in the loss
    forced_mask: torch.Tensor | None = None
    # [B] long, response tokens up to where the verifier first accepts the answer (DeCS's necessary
    # prefix, scoring/answer_reached.py); the full length for a wrong rollout. Only when a stage needs it.
    answer_end: torch.Tensor | None = None
    reward_metrics: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1).long()

    @property
    def sampled_mask(self) -> torch.Tensor:
        """[B, R] the response tokens the policy sampled: those the loss may train on."""
        if self.forced_mask is None:
            return self.response_mask
        return self.response_mask * (1.0 - self.forced_mask)

    def correctness(self) -> torch.Tensor:
        """[B] 1.0 for a correct answer (the batch must be scored)."""
        return correctness(self.scores, self.accuracy)

    def select(self, rows: torch.Tensor | list[int]) -> "RolloutBatch":
        """A new batch with only `rows` (indices into this batch), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.response_ids.device)
        index = rows.tolist()
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                values[f.name] = value[rows]
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in index]
            elif isinstance(value, dict):
                values[f.name] = {k: [v[i] for i in index] for k, v in value.items()}
            else:
                values[f.name] = value
        return RolloutBatch(**values).trim_padding()

    def to(self, device) -> "RolloutBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in values.items()})

    def trim_padding(self) -> "RolloutBatch":
        """Drop all-padding columns on the left of prompts and on the right of responses."""
        prompt_start = int((self.prompt_mask.sum(0) == 0).long().cumprod(0).sum())
        response_end = int(self.response_mask.sum(-1).max()) if len(self) else 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                is_prompt = f.name.startswith("prompt")
                setattr(self, f.name, value[:, prompt_start:] if is_prompt else value[:, :response_end])
        return self

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Stack batches row-wise, re-padding prompts (left) and responses (right) to one width."""
        values = {}
        for f in fields(RolloutBatch):
            parts = [getattr(b, f.name) for b in batches]
            if parts[0] is None:
                values[f.name] = None
            elif isinstance(parts[0], torch.Tensor) and parts[0].dim() == 2:
                values[f.name] = _pad_cat(parts, left=f.name.startswith("prompt"))
            elif isinstance(parts[0], torch.Tensor):
                values[f.name] = torch.cat(parts)
            elif isinstance(parts[0], dict):
                values[f.name] = {k: sum((p[k] for p in parts), []) for k in parts[0]}
            else:
                values[f.name] = sum(parts, [])
        return RolloutBatch(**values)


def correctness(scores: torch.Tensor, accuracy: torch.Tensor | None) -> torch.Tensor:
    """[B] 1.0 for a correct answer: the verifier's accuracy, or a positive score without one."""
    return accuracy if accuracy is not None else (scores > 0).float()


def _pad_cat(tensors: list[torch.Tensor], left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
        padded.append(torch.nn.functional.pad(t, pad, value=0))
    return torch.cat(padded)
