"""Model forward passes to per-token log-probabilities and entropies of response tokens.

Both sides of training need them: the learner for its loss, and the vLLM engine to check a weight
sync against the Hugging Face model's own log-probs. They live here, in neither package, so that
rollout/ and learner/ never import each other (docs/extending.md#layers).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.models.fused_head import HeadTiles, fused_token_logprobs

# model.dtype names (Hugging Face's and vLLM's) -> torch dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Attention kernels that take packed sequences as one row with restarting position ids and never
# form the row's full query x key matrix (flash-attn varlen); the others (sdpa, eager) attend
# through a mask over every pair of a row, so packed rows are kept as short as the longest sequence.
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3"}


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """A Hugging Face causal LM: the policy (float32 master weights), a KL reference, a teacher or
    a sync check (those in model.dtype)."""
    from transformers import AutoModelForCausalLM  # here: slow to import, and no CLI check needs it

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)


def torch_device(kind: str) -> torch.device:
    """A role's device (config/plan.py Devices) in this process. "cuda" is the GPU of this process's
    local rank: Ray shows each actor only its own GPU, as device 0; torchrun sets LOCAL_RANK."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if kind == "cuda" else torch.device("cpu")


# learner.precision names (DeepSpeed's and Accelerate's) -> the compute dtype of the learner
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_in(dtype: torch.dtype, device_type: str):
    """The context of forward passes over float32 weights that compute in `dtype`: autocast
    (matmuls in bf16 from bf16 copies of the weights; softmax, norms and losses stay float32)."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)


@dataclass(frozen=True)
class Support:
    """The tokens the engine samples from at a step (rollout.top_k, rollout.top_p): the top_k most
    likely (0: every token), and of those the fewest most likely whose probability reaches top_p
    (1.0: every one). The learner's log-probs are over the same tokens, renormalised, as the
    engines' are (vLLM's processed log-probs; the transformers engine computes them so), so that
    on-policy the importance ratio is 1 whatever the truncation."""

    top_k: int = 0
    top_p: float = 1.0

    @property
    def whole(self) -> bool:
        return self.top_k <= 0 and self.top_p >= 1.0


WHOLE_VOCABULARY = Support()


def outside_support(scaled_logits: torch.Tensor, support: Support) -> torch.Tensor:
    """[..., V] True where top-k or top-p cuts a token, by the rule vLLM's sampler and transformers'
    warpers share: sort ascending; top-k cuts what is below the k-th largest logit; top-p then cuts
    the tokens whose cumulative probability (of the top-k-renormalised distribution, from the
    least likely up) is at most 1 - top_p, never the most likely one."""
    ascending, order = scaled_logits.sort(-1)
    cut = torch.zeros_like(ascending, dtype=torch.bool)
    if 0 < support.top_k < ascending.shape[-1]:
        cut |= ascending < ascending[..., -support.top_k, None]
    if support.top_p < 1.0:
        cumulative = ascending.masked_fill(cut, float("-inf")).softmax(-1).cumsum(-1)
        cut |= cumulative <= 1.0 - support.top_p
        cut[..., -1] = False
    return torch.empty_like(cut).scatter_(-1, order, cut)


def sequence_inputs(rows: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input ids, attention mask and position ids for prompt + response."""
    input_ids = torch.cat([rows.prompt_ids, rows.response_ids], 1)
    attention_mask = torch.cat([rows.prompt_mask, rows.response_mask.long()], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logprobs(
    model,
    rows: RolloutBatch,
    temperature: float,
    with_entropy: bool = True,
    selected: torch.Tensor | None = None,
    packed: bool = False,
    support: Support = WHOLE_VOCABULARY,
    tiles: HeadTiles | None = None,
    whole_model: bool = False,
):
    """Log-probs of the response tokens (and per-token entropy) under `model`, both [B, R], of the
    distribution over `support`'s tokens at each position.

    The LM head, log-softmax and entropy run on the `selected` positions only ([B, R] bool; all of
    them when None), through the fused head (`head_token_logprobs`, `tiles` its tile sizes):
    [B, R, V] logits never exist, which is where a large vocabulary's memory and time go. Other
    positions are 0 (and carry no gradient), exactly what full compute followed by masking would
    give the loss. With a selection, the transformer body is called on its own and the head on
    the selected hidden states; without one, or with `whole_model` (ZeRO-3, which gathers each
    module's weights in that module's own forward and backward hooks), the model is called whole
    and the fused head runs inside the LM head's forward (`head_computing_logprobs`).

    `packed`: the sequences go through the body packed (`pack_rows`), and the head runs on the
    response positions only (or the selected ones): the same values as the padded rows give.
    Logits are float32 before the log-softmax whatever the compute dtype.
    """
    if packed and selected is None:
        selected = rows.response_mask > 0
    if selected is not None and not whole_model:
        return selected_logprobs(model, rows, temperature, with_entropy, selected.bool(), packed, support, tiles)
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]

    def whole():  # logits at position p predict token p + 1: the head sees the last R + 1 positions
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=width + 1
        ).logits

    if not support.whole:
        return token_logprobs_and_entropy(whole()[:, :-1], rows.response_ids, temperature, with_entropy, support)
    positions = torch.ones_like(rows.response_ids, dtype=torch.bool) if selected is None else selected.bool()
    head = output_head(model)
    with head_computing_logprobs(head, rows.response_ids, positions, temperature, with_entropy, tiles):
        both = whole()
    return both[..., 0], both[..., 1] if with_entropy else None


@contextlib.contextmanager
def head_computing_logprobs(
    head: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    tiles: HeadTiles | None,
):
    """Within, the LM head's forward takes the hidden states [B, R + 1, H] that a model called
    whole hands it and returns [B, R, 2]: log p(token) and the entropy (0 without with_entropy)
    of the R response `tokens` [B, R] at `positions` [B, R] (0 elsewhere), from the fused head
    instead of [B, R + 1, V] logits. Inside the head's own forward, ZeRO-3's hooks on the head
    module gather its weight for the forward and again, on the output's gradient, for the
    backward; a function handed the weight from outside would see ZeRO-3's empty partition."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        logprobs, entropy = head_token_logprobs(
            head, hidden[:, :-1][positions], tokens[positions], temperature, with_entropy, tiles=tiles
        )
        entropy = torch.zeros_like(logprobs) if entropy is None else entropy
        return torch.stack([scatter_selected(logprobs, positions), scatter_selected(entropy, positions)], -1)

    own = head.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks do): restored
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits over the sampling temperature, as the engine sampled (no [.., V] copy at 1.0)."""
    return logits if temperature == 1.0 else logits / temperature


def output_head(model) -> torch.nn.Module:
    """The LM head of a Hugging Face model, or of the one a DeepSpeed engine wraps."""
    return getattr(model, "module", model).get_output_embeddings()


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    support: Support = WHOLE_VOCABULARY,
):
    """log p(token) and the entropy of each row of `logits` / temperature ([..., V] in any dtype;
    tokens [...]), both float32, of the distribution over `support`'s tokens."""
    return TokenLogprobs.apply(logits, tokens, temperature, with_entropy, support)


class TokenLogprobs(torch.autograd.Function):
    """log p(token) from logits / temperature, computed in float32 whatever the logits' dtype, and
    the entropy beside it (a statistic: no gradient). The backward keeps the logits as they came
    and the float32 log-normaliser only, and recomputes the softmax from them: log_softmax of a
    float32 copy would keep a float32 [..., V] tensor, twice the bytes of bf16 logits, and the
    vocabulary makes it one of the largest activations a learner holds. With a truncated support
    it also keeps which tokens were cut (one byte a token). The sampled token always counts: on
    the engine's side it was in the support, and a near-tie decided the other way here must not
    make its log-prob -inf."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool, support):
        scaled_logits = logits.float() / temperature  # temporaries, like logp_all: not kept
        cut = None
        if not support.whole:
            cut = outside_support(scaled_logits, support).scatter_(-1, tokens[..., None], False)
            scaled_logits = scaled_logits.masked_fill_(cut, float("-inf"))
        log_normaliser = torch.logsumexp(scaled_logits, -1)
        logp_all = scaled_logits - log_normaliser[..., None]
        picked = logp_all.gather(-1, tokens[..., None])[..., 0]
        entropy = None
        if with_entropy:
            finite = logp_all if cut is None else logp_all.masked_fill(cut, 0.0)  # a cut token's 0 x -inf is 0
            entropy = -(logp_all.exp() * finite).sum(-1)
        ctx.save_for_backward(logits, tokens, log_normaliser, *([cut] if cut is not None else []))
        ctx.temperature = temperature
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked: torch.Tensor, _grad_entropy):
        logits, tokens, log_normaliser, *cut = ctx.saved_tensors
        # d log p(y) / d z_v = (1[v = y] - p_v) / temperature, and 0 for a cut token
        probs = torch.exp(logits.float() / ctx.temperature - log_normaliser[..., None])
        if cut:
            probs = probs.masked_fill_(cut[0], 0.0)
        grad = (-grad_picked[..., None] * probs).scatter_add_(-1, tokens[..., None], grad_picked[..., None])
        return (grad / ctx.temperature).to(logits.dtype), None, None, None, None


def response_hidden_states(model, rows: RolloutBatch, packed: bool = False) -> torch.Tensor:
    """[B, R, H] final hidden states at the positions that predict each response token (0 past
    a row's response when `packed`)."""
    network = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
    if packed:
        return packed_hidden_states(network, rows)
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    hidden = network.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return hidden[:, -(width + 1) : -1]


def selected_logprobs(
    model,
    rows: RolloutBatch,
    temperature: float,
    with_entropy: bool,
    selected: torch.Tensor,
    packed: bool = False,
    support: Support = WHOLE_VOCABULARY,
    tiles: HeadTiles | None = None,
):
    hidden = response_hidden_states(model, rows, packed)[selected]  # [K, H]: gathered before the head
    picked_logprobs, picked_entropy = head_token_logprobs(
        output_head(model), hidden, rows.response_ids[selected], temperature, with_entropy, support, tiles
    )
    return scatter_selected(picked_logprobs, selected), (
        scatter_selected(picked_entropy, selected) if with_entropy else None
    )


def head_token_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    support: Support = WHOLE_VOCABULARY,
    tiles: HeadTiles | None = None,
):
    """log p(token) and the entropy at K hidden states [K, H] through the LM head, both [K] float32.
    Over the whole vocabulary: the fused head, tile by tile from the head's weight (tied to the
    input embedding or not; LoRA never targets the head, models/lora.py). A truncated support
    needs each position's whole row of logits at once (top-p sorts it), so it goes through the
    [K, V] logits and TokenLogprobs."""
    if not support.whole:
        return token_logprobs_and_entropy(head(hidden), tokens, temperature, with_entropy, support)
    if type(head) is not torch.nn.Linear:
        raise TypeError(f"the fused log-prob head needs the model's output head to be a torch.nn.Linear, got {head}")
    return fused_token_logprobs(hidden, head.weight, head.bias, tokens, temperature, with_entropy, tiles)


def scatter_selected(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[K] values back into a [B, R] tensor of zeros at the selected positions (differentiable)."""
    return torch.zeros(selected.shape, dtype=values.dtype, device=values.device).masked_scatter(selected, values)


# ---------------------------------------------------------------- packing
@dataclass
class PackedRows:
    """Sequences (prompt + response, no padding) laid end to end in rows of one width.

    Position ids restart at 0 for every sequence, and nothing else separates them: with no
    attention mask, transformers reads the restarts as packed sequences and keeps attention
    within each (a block-causal mask for sdpa and eager, cu_seqlens for flash-attn varlen;
    masking_utils.find_packed_sequence_indices). A row's unused tail restarts at 0 too, so it is a
    sequence of its own that no real token attends to.
    """

    input_ids: torch.Tensor  # [rows, width] long
    position_ids: torch.Tensor  # [rows, width] long
    # [N] index into the flattened [rows * width] of the position predicting each response token,
    # in row-major order of the batch's response mask
    sources: torch.Tensor
    tokens: int  # real tokens (the rest of rows * width is padding)


def sequence_lengths(rows: RolloutBatch) -> tuple[list[int], list[int]]:
    """(prompt, response) lengths of each row, without padding."""
    return rows.prompt_mask.sum(-1).tolist(), rows.response_mask.sum(-1).long().tolist()


def pack_bins(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices in rows of `width` tokens: first fit, longest first."""
    bins, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if fit is None:
            bins.append([])
            room.append(width)
            fit = len(bins) - 1
        bins[fit].append(index)
        room[fit] -= lengths[index]
    return bins


def packed_width(attn_implementation: str, lengths: list[int]) -> int:
    return sum(lengths) if attn_implementation in VARLEN_ATTENTION else max(lengths)


def pack_rows(rows: RolloutBatch, attn_implementation: str = "sdpa") -> PackedRows:
    prompt_lengths, response_lengths = sequence_lengths(rows)
    lengths = [p + r for p, r in zip(prompt_lengths, response_lengths)]
    width = packed_width(attn_implementation, lengths)
    bins = pack_bins(lengths, width)
    # Built on the host, a sequence at a time; packed_hidden_states moves them to the model.
    input_ids = torch.zeros(len(bins), width, dtype=torch.long, device="cpu")
    position_ids = torch.zeros(len(bins), width, dtype=torch.long, device="cpu")
    start_of = {}  # sequence -> flat position of its first token
    for row, members in enumerate(bins):
        offset = 0
        for index in members:
            prompt = rows.prompt_ids[index][rows.prompt_mask[index] > 0]
            sequence = torch.cat([prompt, rows.response_ids[index, : response_lengths[index]]])
            input_ids[row, offset : offset + lengths[index]] = sequence
            position_ids[row, offset : offset + lengths[index]] = torch.arange(lengths[index], device="cpu")
            start_of[index] = row * width + offset
            offset += lengths[index]
        position_ids[row, offset:] = torch.arange(width - offset, device="cpu")  # the tail: a sequence of its own
    # Logits at position p predict token p + 1: response token t of a sequence with a prompt of
    # P tokens is predicted at P - 1 + t.
    sources = torch.cat(
        [
            start_of[i] + prompt_lengths[i] - 1 + torch.arange(response_lengths[i], device="cpu")
            for i in range(len(lengths))
        ]
    )
    return PackedRows(input_ids, position_ids, sources.long(), sum(lengths))


def packed_hidden_states(network, rows: RolloutBatch) -> torch.Tensor:
    device = rows.response_ids.device
    packed = pack_rows(rows.to("cpu"), getattr(network.config, "_attn_implementation", "sdpa"))
    # No cache: transformers looks for packed sequences only when there is none (a cache means
    # generation), and one is made by default otherwise.
    hidden = network.base_model(
        input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device), use_cache=False
    ).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])[packed.sources.to(device)]
    out = flat.new_zeros(*rows.response_ids.shape, hidden.shape[-1])
    return out.masked_scatter((rows.response_mask > 0)[..., None], flat)


def forward_positions(rows: RolloutBatch, packed: bool, attn_implementation: str = "sdpa") -> tuple[int, int]:
    """(token positions one forward pass over `rows` computes, real tokens among them)."""
    prompt_lengths, response_lengths = sequence_lengths(rows)
    tokens = sum(prompt_lengths) + sum(response_lengths)
    if not packed:
        return len(rows) * (rows.prompt_ids.shape[1] + rows.response_ids.shape[1]), tokens
    lengths = [p + r for p, r in zip(prompt_lengths, response_lengths)]
    width = packed_width(attn_implementation, lengths)
    return len(pack_bins(lengths, width)) * width, tokens
