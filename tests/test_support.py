"""Truncated sampling support (rollout.top_k, rollout.top_p): the learner's log-probs are over the
tokens the engine sampled from. Against brute-force references here; against the engines' own
samples and log-probs in tests/test_vllm_engine.py."""

import pytest
import torch

from efficient_rl.models.modeling import Support, outside_support, token_logprobs_and_entropy


def kept_by_hand(logits: list[float], top_k: int, top_p: float) -> set[int]:
    """Tokens from the most likely down: the top_k (0: all), then as long as the mass of those
    already kept is below top_p (the most likely is always kept)."""
    order = sorted(range(len(logits)), key=lambda v: -logits[v])
    if top_k:
        order = order[:top_k]
    weights = [torch.tensor(logits[v], dtype=torch.float64).exp().item() for v in order]
    total, kept, mass = sum(weights), set(), 0.0
    for v, weight in zip(order, weights):
        if kept and mass >= top_p:
            break
        kept.add(v)
        mass += weight / total
    return kept


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (5, 1.0), (5, 0.7), (1, 0.9), (0, 0.95), (40, 0.3)])
def test_the_support_is_the_engines_rule(top_k, top_p):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(top_k), dtype=torch.float64) * 2
    cut = outside_support(logits, Support(top_k, top_p))
    for row in range(len(logits)):
        kept = {v for v in range(logits.shape[1]) if not cut[row, v]}
        assert kept == kept_by_hand(logits[row].tolist(), top_k, top_p), row


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_their_gradients_over_the_support(temperature, dtype):
    """Against a float64 log-softmax over the kept tokens; the sampled token always counts."""
    support = Support(top_k=8, top_p=0.8)
    logits = (torch.randn(40, 30, generator=torch.Generator().manual_seed(1)) * 3).to(dtype).requires_grad_()
    tokens = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(2))
    picked, entropy = token_logprobs_and_entropy(logits, tokens, temperature, True, support)
    (picked * torch.linspace(-1, 1, 40)).sum().backward()

    reference_logits = logits.detach().double().requires_grad_()
    scaled = reference_logits / temperature
    cut = outside_support(scaled.detach(), support)
    cut[torch.arange(40), tokens] = False  # a token sampled outside (a near-tie) still counts
    logp = torch.log_softmax(scaled.masked_fill(cut, float("-inf")), -1)
    expected = logp.gather(-1, tokens[:, None])[:, 0]
    (expected * torch.linspace(-1, 1, 40, dtype=torch.float64)).sum().backward()
    expected_entropy = -(logp.exp() * logp.masked_fill(cut, 0.0)).sum(-1)

    tolerance = 1e-5 if dtype == torch.float32 else 1e-4  # the inputs are the same bf16 numbers
    assert torch.allclose(picked.double(), expected.detach(), atol=tolerance)
    assert torch.allclose(entropy.double(), expected_entropy.detach(), atol=tolerance)
    assert torch.allclose(logits.grad.double(), reference_logits.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert (logits.grad.double()[cut] == 0).all()  # a cut token gets no gradient
    assert bool(cut.any()) and bool((~cut).sum(-1).gt(1).any())  # the cases cut something, and keep several


def test_a_whole_support_is_the_plain_log_softmax():
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    tokens = torch.arange(5)
    picked, _ = token_logprobs_and_entropy(logits, tokens, 1.0, False, Support())
    assert torch.allclose(picked, torch.log_softmax(logits, -1)[torch.arange(5), tokens])
