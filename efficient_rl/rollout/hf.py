"""Embedded rollout engine on transformers `generate`.

It shares the model object with the embedded learner, so a weight sync costs nothing; with
model.dtype bfloat16 it generates under bf16 autocast on those float32 weights. Log-probs
are of the temperature-scaled distribution before top-p truncation, the same quantity the
learner computes, so the engine/learner gap only measures numerical differences.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.data.prompts import stop_token_ids
from efficient_rl.models.modeling import DTYPES, compute_in, token_logprobs_and_entropy
from efficient_rl.rollout.base import ENGINES, SamplingSettings, left_pad
from efficient_rl.rollout.budget import generate_within_budget

if TYPE_CHECKING:  # annotations only: transformers is slow to import
    from transformers import GenerationConfig


def response_mask_until_eos(tokens: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first stop token, and which rows never produced one."""
    is_eos = torch.isin(tokens, torch.tensor(stop_ids, dtype=tokens.dtype, device=tokens.device))
    eos_seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~eos_seen_before).float(), ~is_eos.any(-1)


class TransformersEngine:
    """Generates on the device its model is on (the driver places it: driver/build.py) and hands
    the batch back on the host, where the driver scores and shapes it."""

    def __init__(self, model, tokenizer, max_batch_size: int = 256, dtype: str = "float32"):
        self.model = model
        self.dtype = DTYPES[dtype]  # the compute dtype of generation (model.dtype)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.max_batch_size = max_batch_size

    def generate(
        self, prompts: list[list[int]], samples: list[dict], group_ids: list[int], settings: SamplingSettings
    ) -> RolloutBatch:
        if settings.thinking_budget is not None:
            return generate_within_budget(self.generate, prompts, samples, group_ids, settings, self.tokenizer)
        rows = [
            (prompt, sample, gid) for prompt, sample, gid in zip(prompts, samples, group_ids) for _ in range(settings.n)
        ]
        chunks = [rows[i : i + self.max_batch_size] for i in range(0, len(rows), self.max_batch_size)]
        return RolloutBatch.concat([self._generate_chunk(chunk, settings) for chunk in chunks]).to("cpu")

    @torch.no_grad()
    def _generate_chunk(self, rows, settings: SamplingSettings) -> RolloutBatch:
        tok = self.tokenizer
        prompt_ids, prompt_mask = left_pad([r[0] for r in rows], tok.pad_token_id, self.model.device)
        was_training = self.model.training
        self.model.eval()
        with compute_in(self.dtype, prompt_ids.device.type):
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=self._generation_config(settings),
            )
        self.model.train(was_training)
        response_ids = out.sequences[:, prompt_ids.shape[1] :]
        response_mask, no_eos = response_mask_until_eos(response_ids, self.stop_ids)
        logits = torch.stack(out.logits, dim=1)  # raw logits of every generated step
        temperature = settings.temperature if settings.temperature > 0 else 1.0
        # over the tokens top-k / top-p left to sample from, as vLLM's processed log-probs and the learner's
        logprobs, _ = token_logprobs_and_entropy(logits, response_ids, temperature, False, settings.support)
        lengths = response_mask.sum(-1).long()
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids * response_mask.long() + tok.pad_token_id * (1 - response_mask.long()),
            response_mask=response_mask,
            rollout_logprobs=logprobs * response_mask,
            truncated=no_eos & (lengths >= settings.max_new_tokens),
            group_ids=torch.tensor([r[2] for r in rows], dtype=torch.long, device=response_ids.device),
            samples=[r[1] for r in rows],
            completions=tok.batch_decode(
                response_ids.masked_fill(response_mask == 0, tok.pad_token_id), skip_special_tokens=True
            ),
        ).trim_padding()

    def _generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        from transformers import GenerationConfig  # here: slow to import, and no CLI check needs it

        sample = settings.temperature > 0
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None,
            top_k=settings.top_k if sample else None,  # 0: no top-k truncation (transformers' default is 50)
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )

    def sync_weights(self, learner) -> dict[str, float]:
        # The embedded engine generates with the learner's own module: nothing to copy.
        assert learner.model is self.model, "the embedded engine must share the learner's model"
        return {}

    def own_weights(self) -> None:
        self.model = copy.deepcopy(self.model)

    def snapshot(self, learner) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in learner.named_weights()}

    @torch.no_grad()
    def load_snapshot(self, snapshot: dict[str, torch.Tensor]) -> dict[str, float]:
        parameters = dict(self.model.named_parameters())  # the copy ties what the learner's module ties
        for name, tensor in snapshot.items():
            parameters[name].copy_(tensor)
        return {}

    def pop_metrics(self) -> dict[str, float]:
        return {}


def transformers_check(_, recipe) -> str | None:
    if recipe.learner.lora is not None and recipe.cluster.pipeline.name == "overlapped":
        return (
            "learner.lora: not with cluster.pipeline overlapped on the transformers engine (its own copy of the "
            "policy loads plain weights by name); use rollout.engine: vllm or pipeline: sync"
        )
    return None


@ENGINES.register("transformers", check=transformers_check)
def transformers_engine(plan, setup) -> TransformersEngine:
    """Generates with the driver's own model, on the device build_setup put it on."""
    recipe = plan.recipe
    return TransformersEngine(setup.model, setup.tokenizer, recipe.rollout.max_batch_size, recipe.model.dtype)
