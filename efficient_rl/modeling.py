"""Model forward passes to per-token log-probabilities and entropies of response tokens.

Both sides of training need them: the learner for its loss, and the vLLM engine to check a weight
sync against the Hugging Face model's own log-probs. They live here, in neither package, so that
rollout/ and learner/ never import each other (docs/extending.md#layers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from efficient_rl.algos.batch import RolloutBatch


def load_model(model_dir: Path) -> torch.nn.Module:
    """A Hugging Face causal LM in float32: the policy, a KL reference, a teacher, a sync check."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def sequence_inputs(rows: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input ids, attention mask and position ids for prompt + response."""
    input_ids = torch.cat([rows.prompt_ids, rows.response_ids], 1)
    attention_mask = torch.cat([rows.prompt_mask, rows.response_mask.long()], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logprobs(model, rows: RolloutBatch, temperature: float, with_entropy: bool = True,
                      selected: torch.Tensor | None = None):
    """Log-probs of the response tokens (and per-token entropy) under `model`, both [B, R].

    With `selected` ([B, R] bool), the transformer body still runs on the full sequences, but the
    LM head, log-softmax and entropy only on the selected positions: [B, R, V] logits never exist,
    which is where a large vocabulary's memory and time go. Other positions are 0 (and carry no
    gradient), exactly what full compute followed by masking would give the loss.
    """
    if selected is not None:
        return selected_logprobs(model, rows, temperature, with_entropy, selected.bool())
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    # Logits at position p predict token p + 1: keep the last R + 1 positions, drop the final one.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=width + 1).logits[:, :-1].float()
    return token_logprobs_and_entropy(scaled(logits, temperature), rows.response_ids, with_entropy)


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits over the sampling temperature, as the engine sampled (no [.., V] copy at 1.0)."""
    return logits if temperature == 1.0 else logits / temperature


def output_head(model) -> torch.nn.Module:
    """The LM head of a Hugging Face model, or of the one a DeepSpeed engine wraps."""
    return getattr(model, "module", model).get_output_embeddings()


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool):
    """log p(token) and the entropy of each row of `logits` ([..., V]; tokens [...])."""
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, tokens[..., None])[..., 0]
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a statistic, not a loss term: no [.., V] tensors kept for backward
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def response_hidden_states(model, rows: RolloutBatch) -> torch.Tensor:
    """[B, R, H] final hidden states at the positions that predict each response token."""
    network = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    width = rows.response_ids.shape[1]
    hidden = network.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state
    return hidden[:, -(width + 1):-1]


def selected_logprobs(model, rows: RolloutBatch, temperature: float, with_entropy: bool, selected: torch.Tensor):
    head = output_head(model)
    hidden = response_hidden_states(model, rows)[selected]  # [K, H]: gathered before the head
    logits = scaled(head(hidden).float(), temperature)
    picked_logprobs, picked_entropy = token_logprobs_and_entropy(logits, rows.response_ids[selected], with_entropy)
    return scatter_selected(picked_logprobs, selected), (
        scatter_selected(picked_entropy, selected) if with_entropy else None)


def scatter_selected(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[K] values back into a [B, R] tensor of zeros at the selected positions (differentiable)."""
    return torch.zeros(selected.shape, dtype=values.dtype, device=values.device).masked_scatter(selected, values)
