"""Single-process torch learner: AdamW, gradient clipping, micro-batches, PPO mini-batches.

The update loop here is shared with the DeepSpeed learner, which overrides the four steps that
differ between one process and a data-parallel group: which rows of a mini-batch this process
trains on, backward, the optimizer step, and summing statistics over processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.divergence import DIVERGENCES, map_row_chunks
from efficient_rl.algos.losses import LossDenominators
from efficient_rl.learner.base import LEARNERS
from efficient_rl.learner.objective import (ObjectiveSettings, distillation_objective, head_logprobs, loss_masks,
                                           objective_settings, policy_objective)
from efficient_rl.learner.teacher import build_teacher
from efficient_rl.modeling import load_model, output_head, response_hidden_states, response_logprobs
from efficient_rl.weights import WeightBucket, plan_buckets

OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    mini_batch_size: int = 0  # rollouts per optimizer step; 0 = the whole batch
    micro_batch_size: int = 32  # rollouts per forward/backward pass
    epochs: int = 1  # passes over each rollout batch


def optim_settings(recipe) -> OptimSettings:
    lrn = recipe.learner
    return OptimSettings(
        lr=lrn.lr, weight_decay=lrn.weight_decay, betas=tuple(lrn.betas), grad_clip=lrn.grad_clip,
        mini_batch_size=lrn.mini_batch_prompts * recipe.rollout.group_size,
        micro_batch_size=lrn.micro_batch_size, epochs=lrn.epochs,
    )


def full_shape(parameter: torch.nn.Parameter) -> torch.Size:
    """The unsharded shape (ZeRO-3 keeps only a shard and records the full shape)."""
    return getattr(parameter, "ds_shape", parameter.shape)


@dataclass
class MiniBatch:
    rows: RolloutBatch  # the rows this process trains on
    den: LossDenominators  # loss denominators of the whole mini-batch, across processes


class TokenStats:
    """Sums of per-token statistics over micro-batches, reported as means per token."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, stats: dict[str, torch.Tensor], tokens: float) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.tokens += tokens

    def means(self, total) -> dict[str, float]:
        """Means per token, with sums first totalled over processes by `total`."""
        sums = total({**self.sums, "__tokens": self.tokens})
        tokens = max(sums.pop("__tokens"), 1.0)
        return {name: value / tokens for name, value in sums.items()}


class TorchLearner:
    rank, world_size = 0, 1  # rank 0 sends weights and writes files
    # Run the LM head on the selected tokens only (calls the model's body and head directly).
    selected_compute = True

    def __init__(self, model, objective: ObjectiveSettings, optim: OptimSettings, reference=None, teacher=None):
        self.model = model
        self.reference = reference  # frozen copy of the initial policy, only when KL is on
        self.teacher = teacher  # on-policy distillation only (learner/teacher.py)
        self.objective = objective
        self.optim = optim
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)

    # ------------------------------------------------------------ the update loop
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        mini_size = self.optim.mini_batch_size or len(batch)
        minis = [self._mini_batch(batch.select(range(start, min(start + mini_size, len(batch)))))
                 for start in range(0, len(batch), mini_size)]
        self.model.train()
        for mini in minis:  # both before any optimizer step: they are the pre-update policies
            if self.optim.epochs * len(minis) > 1 and not self.objective.distillation:
                mini.rows.old_logprobs = self.logprobs(mini.rows, self.policy)
            if self.objective.kl_coef > 0:
                mini.rows.ref_logprobs = self.logprobs(mini.rows, self.reference)
        token_stats, losses, grad_norms = TokenStats(), [], []
        for _ in range(self.optim.epochs):
            for mini in minis:
                loss, grad_norm = self._optimizer_step(mini, token_stats)
                losses.append(loss)
                grad_norms.append(grad_norm)
        losses = self.total({f"loss{i}": loss for i, loss in enumerate(losses)}).values()
        return {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "optimizer_steps": float(len(grad_norms)),
            **token_stats.means(self.total),
        }

    def _mini_batch(self, mini: RolloutBatch) -> MiniBatch:
        _, averaged_over = loss_masks(mini, self.objective)
        return MiniBatch(rows=self.local_rows(mini), den=LossDenominators.of(averaged_over, self.objective.norm_length))

    def _optimizer_step(self, mini: MiniBatch, token_stats: TokenStats) -> tuple[float, float]:
        total_loss = 0.0
        for start in range(0, len(mini.rows), self.optim.micro_batch_size):
            rows = mini.rows.select(range(start, min(start + self.optim.micro_batch_size, len(mini.rows))))
            loss, stats = self._micro_batch_loss(rows, mini.den)
            self.backward(loss)
            total_loss += loss.item()
            token_stats.add(stats, float(loss_masks(rows, self.objective)[0].sum()))
        return total_loss, self.apply_gradients()

    def _micro_batch_loss(self, rows: RolloutBatch, den: LossDenominators):
        """The loss and its per-token statistics (sums) over the tokens that enter the loss."""
        if self.objective.distillation:
            return distillation_objective(self.policy, rows, self.objective, den, self.teacher)
        # With a token selection, only the kept tokens reach the LM head (and the statistics).
        logprobs, entropy = response_logprobs(self.policy, rows, self.objective.temperature,
                                              selected=rows.loss_mask if self.selected_compute else None)
        loss, stats = policy_objective(logprobs, rows, self.objective, den)
        tokens, _ = loss_masks(rows, self.objective)
        stats["entropy"] = (entropy.detach() * tokens).sum()
        stats["rollout/logprob_diff"] = ((logprobs.detach() - rows.rollout_logprobs).abs() * tokens).sum()
        return loss, stats

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, model) -> torch.Tensor:
        parts = []
        for start in range(0, len(batch), self.optim.micro_batch_size):
            rows = batch.select(range(start, min(start + self.optim.micro_batch_size, len(batch))))
            logprobs, _ = response_logprobs(model, rows, self.objective.temperature, with_entropy=False,
                                            selected=rows.loss_mask if self.selected_compute else None)
            parts.append(torch.nn.functional.pad(logprobs, (0, batch.response_ids.shape[1] - logprobs.shape[1])))
        return torch.cat(parts) * batch.response_mask

    @torch.no_grad()
    def distill_stats(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """[B, R] student entropy, KL(student || teacher) and KL(teacher || student) at every
        response token (0 on padding): TIP's two axes and its Q3 ranking signal (§4.1, §4.3)."""
        head = output_head(self.policy)
        reverse_kl, forward_kl = DIVERGENCES.get("reverse_kl"), DIVERGENCES.get("forward_kl")

        def statistics(hidden: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
            student = head_logprobs(head, hidden, self.objective.temperature)
            entropy = -(student.exp() * student).sum(-1)
            return torch.stack([entropy, reverse_kl(student, teacher, 0.0), forward_kl(student, teacher, 0.0)], -1)

        def per_token(rows: RolloutBatch, valid: torch.Tensor) -> torch.Tensor:
            teacher = self.teacher.logprobs(rows, valid).to(valid.device)
            return map_row_chunks(statistics, [response_hidden_states(self.policy, rows)[valid], teacher],
                                  self.objective.chunk_rows)

        values = self._over_valid_tokens(batch, per_token, channels=3)
        return {name: values[..., i] for i, name in enumerate(("entropy", "reverse_kl", "forward_kl"))}

    @torch.no_grad()
    def token_entropy(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, R] entropy of the current policy at every response token (0 on padding), the
        statistic token selection ranks by. The head runs on chunks of valid positions, so no
        [B, R, V] logits exist here either. Every rank of a data-parallel group computes it for
        the whole batch (ZeRO-3 needs them all in the forward anyway)."""
        head = output_head(self.policy)

        def entropy_of(hidden: torch.Tensor) -> torch.Tensor:
            logp = head_logprobs(head, hidden, self.objective.temperature)
            return -(logp.exp() * logp).sum(-1)

        def per_token(rows: RolloutBatch, valid: torch.Tensor) -> torch.Tensor:
            return map_row_chunks(entropy_of, [response_hidden_states(self.policy, rows)[valid]],
                                  self.objective.chunk_rows)[:, None]

        return self._over_valid_tokens(batch, per_token, channels=1)[..., 0]

    def _over_valid_tokens(self, batch: RolloutBatch, per_token, channels: int) -> torch.Tensor:
        """[B, R, channels] from per_token(micro-batch rows, valid mask) -> [valid tokens, channels],
        micro-batch by micro-batch; 0 on padding."""
        parts = []
        for start in range(0, len(batch), self.optim.micro_batch_size):
            rows = batch.select(range(start, min(start + self.optim.micro_batch_size, len(batch))))
            valid = rows.response_mask.bool()
            values = torch.zeros(*valid.shape, channels)
            values[valid] = per_token(rows, valid).cpu()
            parts.append(torch.nn.functional.pad(values, (0, 0, 0, batch.response_ids.shape[1] - valid.shape[1])))
        return torch.cat(parts)

    # ------------------------------------------------------------ what a data-parallel learner changes
    @property
    def policy(self):
        """What the forward pass calls."""
        return self.model

    def local_rows(self, mini: RolloutBatch) -> RolloutBatch:
        return mini

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def apply_gradients(self) -> float:
        """Clip, step, clear; returns the gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def total(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over the processes of the group: one process here."""
        return dict(values)

    def gathered(self, params: list[torch.nn.Parameter]):
        """A context in which `params` hold their full values (ZeRO-3 shards them)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------ weights and checkpoints

    def named_weights(self):
        """(name, tensor) of every parameter, tied ones once."""
        return list(self.model.named_parameters())

    def weight_buckets(self, bucket_bytes: int) -> Iterator[WeightBucket]:
        """The full weights in buckets, on rank 0; every rank must run this (ZeRO-3 gathers)."""
        named = list(self.model.named_parameters())
        for indices in plan_buckets([(full_shape(p).numel(), p.dtype) for _, p in named], bucket_bytes):
            with self.gathered([named[i][1] for i in indices]):
                if self.rank == 0:
                    yield WeightBucket.pack([named[i] for i in indices])

    def weight_plan(self, bucket_bytes: int) -> list[WeightBucket]:
        """Names, shapes and dtype of every bucket weight_buckets makes, without their data."""
        named = list(self.model.named_parameters())
        plans = plan_buckets([(full_shape(p).numel(), p.dtype) for _, p in named], bucket_bytes)
        return [WeightBucket([named[i][0] for i in indices], [tuple(full_shape(named[i][1])) for i in indices],
                             named[indices[0]][1].dtype, payload=None) for indices in plans]

    def save(self, directory: Path) -> None:
        """Weights in Hugging Face format plus the optimizer state."""
        self.model.save_pretrained(directory)
        torch.save(self.optimizer.state_dict(), Path(directory) / OPTIMIZER_FILE)

    def load_state(self, directory: Path) -> None:
        """Optimizer state from a checkpoint (the weights were loaded from it already)."""
        self.optimizer.load_state_dict(torch.load(Path(directory) / OPTIMIZER_FILE, weights_only=False))


@LEARNERS.register("torch")
def torch_learner(recipe, model_dir: Path, base_model_dir: Path, model=None, teacher=None) -> TorchLearner:
    """`model` is the driver's own copy when embedded (the transformers engine generates with it);
    `teacher` the Ray-hosted teacher's client, when the Ray layer passes one (learner/teacher.py)."""
    reference = load_model(base_model_dir).eval() if recipe.algorithm.kl_coef > 0 else None
    return TorchLearner(model if model is not None else load_model(model_dir), objective_settings(recipe),
                        optim_settings(recipe), reference=reference, teacher=build_teacher(recipe, remote=teacher))
