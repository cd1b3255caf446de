"""Single-process torch learner: AdamW, gradient clipping, micro-batches, PPO mini-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.losses import LossDenominators
from efficient_rl.learner.base import LEARNERS
from efficient_rl.learner.objective import ObjectiveSettings, policy_objective, response_logprobs


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    mini_batch_size: int = 0  # rollouts per optimizer step; 0 = the whole batch
    micro_batch_size: int = 32  # rollouts per forward/backward pass
    epochs: int = 1  # passes over each rollout batch


class TokenStats:
    """Sums of per-token statistics over micro-batches, reported as means per token."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, stats: dict[str, torch.Tensor], tokens: float) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        return {name: total / max(self.tokens, 1.0) for name, total in self.sums.items()}


@LEARNERS.register("torch")
class TorchLearner:
    def __init__(self, model, objective: ObjectiveSettings, optim: OptimSettings, reference=None):
        self.model = model
        self.reference = reference  # frozen copy of the initial policy, only when KL is on
        self.objective = objective
        self.optim = optim
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        mini_size = self.optim.mini_batch_size or len(batch)
        steps_per_batch = self.optim.epochs * -(-len(batch) // mini_size)
        self.model.train()
        if steps_per_batch > 1:
            batch.old_logprobs = self.logprobs(batch, self.model)
        if self.objective.kl_coef > 0:
            batch.ref_logprobs = self.logprobs(batch, self.reference)
        token_stats, losses, grad_norms = TokenStats(), [], []
        for _ in range(self.optim.epochs):
            for start in range(0, len(batch), mini_size):
                mini = batch.select(range(start, min(start + mini_size, len(batch))))
                loss, grad_norm = self._optimizer_step(mini, token_stats)
                losses.append(loss)
                grad_norms.append(grad_norm)
        return {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "optimizer_steps": float(len(losses)),
            **token_stats.means(),
        }

    def _optimizer_step(self, mini: RolloutBatch, token_stats: TokenStats) -> tuple[float, float]:
        mask = mini.loss_mask if mini.loss_mask is not None else mini.response_mask
        den = LossDenominators.of(mask, self.objective.norm_length)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for start in range(0, len(mini), self.optim.micro_batch_size):
            rows = mini.select(range(start, min(start + self.optim.micro_batch_size, len(mini))))
            logprobs, entropy = response_logprobs(self.model, rows, self.objective.temperature)
            loss, stats = policy_objective(logprobs, rows, self.objective, den)
            loss.backward()
            total_loss += loss.item()
            response = rows.response_mask
            stats["entropy"] = (entropy.detach() * response).sum()
            stats["rollout/logprob_diff"] = ((logprobs.detach() - rows.rollout_logprobs).abs() * response).sum()
            token_stats.add(stats, float(response.sum()))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        return total_loss, float(grad_norm)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, model) -> torch.Tensor:
        parts = []
        for start in range(0, len(batch), self.optim.micro_batch_size):
            rows = batch.select(range(start, min(start + self.optim.micro_batch_size, len(batch))))
            logprobs, _ = response_logprobs(model, rows, self.objective.temperature, with_entropy=False)
            parts.append(torch.nn.functional.pad(logprobs, (0, batch.response_ids.shape[1] - logprobs.shape[1])))
        return torch.cat(parts) * batch.response_mask

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
