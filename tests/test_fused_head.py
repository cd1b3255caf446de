"""The fused log-prob head (efficient_rl/models/fused_head.py): values and gradients of log p(token)
and the entropy against a float64 log-softmax computed here by brute force, and no
[tokens x vocabulary] tensor along the way."""

import copy
import dataclasses
import weakref

import pytest
import torch
from test_selected_compute import PROMPT, RESPONSE, random_batch, settings_of
from torch.utils._python_dispatch import TorchDispatchMode

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.algos.losses import LossDenominators
from efficient_rl.learner.objective import loss_masks, policy_gradient_loss
from efficient_rl.models.fused_head import HeadTiles, fused_token_logprobs
from efficient_rl.models.modeling import load_model, sequence_inputs

TOKENS, HIDDEN, VOCAB = 37, 24, 53


def random_head(dtype: torch.dtype, seed: int, with_bias: bool):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.6).to(dtype)
    bias = (torch.randn(VOCAB, generator=generator) * 0.5).to(dtype) if with_bias else None
    tokens = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    tokens[:3] = torch.tensor([0, VOCAB - 1, 16])  # the first and last column, and a tile's first
    return hidden, weight, bias, tokens


def reference(hidden, weight, bias, tokens, temperature):
    """float64 log p(token) and entropy from the full [tokens x vocabulary] logits."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, tokens[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


# Upstream weights of the two outputs; zeros stand for masked positions (no gradient may reach them).
MASK = (torch.arange(TOKENS) % 5 != 3).double()
PICKED_WEIGHTS = torch.linspace(-1, 1.5, TOKENS, dtype=torch.float64) * MASK
ENTROPY_WEIGHTS = torch.linspace(0.7, -0.4, TOKENS, dtype=torch.float64) * MASK


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [HeadTiles(8, 16), HeadTiles(5, 7), HeadTiles(4096, 8192)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_against_a_float64_log_softmax(temperature, dtype, tiles, with_bias):
    inputs = random_head(dtype, seed=int(temperature * 10) + tiles.tokens, with_bias=with_bias)
    hidden, weight, bias = leaves(inputs[:3])
    tokens = inputs[3]
    picked, entropy = fused_token_logprobs(hidden, weight, bias, tokens, temperature, True, tiles)
    assert picked.dtype == entropy.dtype == torch.float32
    (picked.double() * PICKED_WEIGHTS + entropy.double() * ENTROPY_WEIGHTS).sum().backward()

    # The same numbers (bf16 ones widened) in float64.
    ref_hidden, ref_weight, ref_bias = leaves(inputs[:3], torch.float64)
    expected, expected_entropy = reference(ref_hidden, ref_weight, ref_bias, tokens, temperature)
    (expected * PICKED_WEIGHTS + expected_entropy * ENTROPY_WEIGHTS).sum().backward()

    assert torch.allclose(picked.double(), expected.detach(), atol=2e-5)
    assert torch.allclose(entropy.double(), expected_entropy.detach(), atol=2e-5)
    gradient_tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the gradients are rounded to it
    pairs = [(hidden, ref_hidden), (weight, ref_weight)] + ([(bias, ref_bias)] if with_bias else [])
    for fused, brute in pairs:
        assert fused.grad.dtype == dtype
        assert torch.allclose(fused.grad.double(), brute.grad, atol=gradient_tolerance, rtol=1e-2)
    assert (hidden.grad[MASK == 0] == 0).all()  # masked positions get no gradient


# Tiled (the backward recomputes each tile) and one tile for everything (kept from the forward).
BOTH_PATHS = [HeadTiles(8, 16), HeadTiles(4096, 8192)]


@pytest.mark.parametrize("tiles", BOTH_PATHS)
def test_log_probs_alone_and_the_entropy_alone(tiles):
    """Without the entropy (None, the log-probs unchanged and their gradients), and a loss of the
    entropy only."""
    inputs = random_head(torch.float32, seed=3, with_bias=False)
    hidden, weight, _ = leaves(inputs[:3])
    tokens = inputs[3]
    picked, entropy = fused_token_logprobs(hidden, weight, None, tokens, 0.6, False, tiles)
    assert entropy is None
    ref_hidden, ref_weight, _ = leaves(inputs[:3], torch.float64)
    expected, expected_entropy = reference(ref_hidden, ref_weight, None, tokens, 0.6)
    assert torch.allclose(picked.double(), expected.detach(), atol=2e-5)
    (picked.double() * PICKED_WEIGHTS).sum().backward()
    (expected * PICKED_WEIGHTS).sum().backward(retain_graph=True)  # the entropy shares its graph
    for fused, brute in ((hidden, ref_hidden), (weight, ref_weight)):
        assert torch.allclose(fused.grad.double(), brute.grad, atol=1e-5)
        fused.grad, brute.grad = None, None

    _, entropy = fused_token_logprobs(hidden, weight, None, tokens, 0.6, True, tiles)
    entropy.sum().backward()
    expected_entropy.sum().backward()
    assert torch.allclose(hidden.grad.double(), ref_hidden.grad, atol=1e-5)
    assert torch.allclose(weight.grad.double(), ref_weight.grad, atol=1e-5)


def test_a_second_backward_through_a_kept_tile_is_refused():
    """The kept tile becomes the gradient in place: a retained graph must not reuse it."""
    inputs = random_head(torch.float32, seed=5, with_bias=False)
    hidden, weight, _ = leaves(inputs[:3])
    picked, _ = fused_token_logprobs(hidden, weight, None, inputs[3], 1.0, False, HeadTiles(4096, 8192))
    picked.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        picked.sum().backward()


@pytest.mark.parametrize("tiles", BOTH_PATHS)
def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_theirs(tiles):
    """LoRA's case: the output matrix does not train; the gradient still reaches the body."""
    inputs = random_head(torch.float32, seed=4, with_bias=False)
    hidden, weight = inputs[0].clone().requires_grad_(), inputs[1]
    picked, _ = fused_token_logprobs(hidden, weight, None, inputs[3], 1.0, False, tiles)
    picked.sum().backward()
    ref_hidden = inputs[0].double().requires_grad_()
    reference(ref_hidden, weight.double(), None, inputs[3], 1.0)[0].sum().backward()
    assert weight.grad is None and torch.allclose(hidden.grad.double(), ref_hidden.grad, atol=1e-5)


class TensorsMade(TorchDispatchMode):
    """The shapes of the tensors operations return while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.append(tensor.shape)
        return out

    @property
    def largest(self) -> int:
        return max(shape.numel() for shape in self.shapes)


def test_no_tensor_as_large_as_tokens_by_vocabulary_exists():
    tokens, hidden_size, vocab, tiles = 300, 16, 500, HeadTiles(64, 128)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with TensorsMade() as seen:
        picked, entropy = fused_token_logprobs(hidden, weight, None, targets, 0.6, True, tiles)
        (picked + entropy).sum().backward()
    # The tile, the weight (its gradient) and the hidden states bound every tensor made.
    assert seen.largest == max(tiles.tokens * tiles.vocab, vocab * hidden_size, tokens * hidden_size)
    assert seen.largest < tokens * vocab / 4


class TileScaleLive(TorchDispatchMode):
    """The most elements that tensors of at least `smallest` elements held at once, counted after
    every operation from weak references to the tensors made (a view counts with the tensor made
    first on its storage)."""

    def __init__(self, smallest: int):
        super().__init__()
        self.smallest, self.made, self.most = smallest, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.smallest:
                self.made.setdefault(tensor.untyped_storage().data_ptr(), (weakref.ref(tensor), tensor.numel()))
        self.made = {key: (ref, size) for key, (ref, size) in self.made.items() if ref() is not None}
        self.most = max(self.most, sum(size for _, size in self.made.values()))
        return out


@pytest.mark.parametrize("with_entropy", [False, True])
def test_a_pass_holds_a_tile_and_half_a_tile_of_scratch_at_most(with_entropy):
    """Tokens and vocabulary of several tiles, with hidden states and weight far smaller than a
    tile: what lives at tile scale at once, forward or backward, is one tile and half a tile."""
    tokens, hidden_size, vocab, tiles = 300, 4, 500, HeadTiles(64, 128)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with TileScaleLive(smallest=tiles.tokens * tiles.vocab // 2) as live:
        picked, entropy = fused_token_logprobs(hidden, weight, None, targets, 0.6, with_entropy, tiles)
        (picked.sum() + (entropy.sum() if with_entropy else 0)).backward()
    assert live.most == tiles.tokens * tiles.vocab * 3 // 2


# ---------------------------------------------------------------- the learner's loss on the lab model
def plain_logprobs(model, rows: RolloutBatch, temperature: float) -> torch.Tensor:
    """Today's path by hand: the model's [B, R, V] logits, log_softmax, gather."""
    input_ids, attention_mask, position_ids = sequence_inputs(rows)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, PROMPT - 1 : -1] / temperature, -1)
    return logp.gather(-1, rows.response_ids[..., None])[..., 0]


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("with_selection", [False, True])
def test_the_learners_loss_and_gradients_are_a_float64_log_softmax(
    tiny_model_dir, temperature, packing, with_selection
):
    """The objective both learners call, on the tiny lab model (tied head, float32), against the
    same loss from a float64 copy's full logits; tiles that divide neither tokens nor vocabulary."""
    model = load_model(tiny_model_dir)
    batch = random_batch(torch.Generator().manual_seed(7), keep=0.6)  # token ids below the lab's vocabulary
    batch = batch if with_selection else dataclasses.replace(batch, loss_mask=None)
    settings = settings_of("algorithm.kl_coef=0", temperature=temperature, packing=packing, head_tiles=HeadTiles(7, 50))
    _, averaged_over = loss_masks(batch, settings)
    den = LossDenominators.of(averaged_over, RESPONSE)
    with TensorsMade() as made:
        loss, stats = settings.objective(model, batch, settings, den, None)
        loss.backward()
    # Nothing over the vocabulary: no logits, log-softmax or gradient of them, only tiles.
    assert not [shape for shape in made.shapes if shape and shape[-1] == model.config.vocab_size]

    reference = copy.deepcopy(model).double()
    reference.zero_grad()
    logprobs = plain_logprobs(reference, batch, temperature)
    expected, _ = policy_gradient_loss(logprobs, batch, settings, den)
    expected.backward()

    assert abs(loss.item() - expected.item()) < 1e-5
    trained = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad.double(), trained[name].grad, atol=1e-5, rtol=1e-4), name
    assert model.lm_head.weight.grad.abs().max() > 1e-3  # the head (tied to the embedding) trains
