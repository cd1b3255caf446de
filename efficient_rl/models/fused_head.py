"""The policy's token log-probs and entropies straight from hidden states and the output matrix.

The logits exist one tile at a time, [token tile x vocabulary tile] in float32, never as a
[tokens x vocabulary] tensor: the forward keeps a running log-sum-exp per token (the online
softmax), the sampled token's logit and the entropy's moment; the backward recomputes each tile
from the hidden states and the weight. Memory is then flat in the number of tokens past the token
tile: about two float32 tiles, plus a float32 copy of one vocabulary tile of the weight and of the
hidden states when they are bf16 (docs/memory.md#the-log-prob-head).

The temperature is folded into the tile (divided in place), and the logits are float32 from
float32 products whatever the inputs' dtype: bf16 hidden states and weights are widened per tile.
Autocast is off inside, so that the dtype is this module's choice, not the context's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficient_rl.config.schema import LearnerSection


@dataclass(frozen=True)
class HeadTiles:
    """Tile sizes of the fused head (learner.head_token_tile, learner.head_vocab_tile)."""

    tokens: int = LearnerSection.head_token_tile
    vocab: int = LearnerSection.head_vocab_tile


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    tiles: HeadTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) and (with_entropy) the entropy of softmax((hidden @ weight.T + bias) /
    temperature) for each of N hidden states [N, H] and tokens [N]; both float32 [N], and both
    differentiable with respect to hidden, weight and bias."""
    return FusedTokenLogprobs.apply(hidden, weight, bias, tokens, temperature, with_entropy, tiles or HeadTiles())


def tile_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """float32 [tokens, vocab] logits of one tile over the temperature, from float32 operands."""
    logits = torch.mm(hidden, weight.T) if bias is None else torch.addmm(bias, hidden, weight.T)
    return logits if temperature == 1.0 else logits.div_(temperature)


def spans(total: int, size: int):
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def tokens_in_span(tokens: torch.Tensor, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose token lies in the vocabulary span, its column within the span)."""
    inside = (tokens >= span.start) & (tokens < span.stop)
    rows = inside.nonzero()[:, 0]
    return rows, tokens[rows] - span.start


@dataclass
class RunningSoftmax:
    """Per token, over the vocabulary tiles seen so far: the largest logit m, total = sum exp(s - m)
    and moment = sum exp(s - m) (s - m). Then log Z = m + log total and the entropy is
    log Z - E[s] = log total - moment / total."""

    largest: torch.Tensor
    total: torch.Tensor
    moment: torch.Tensor | None

    @classmethod
    def start(cls, count: int, device: torch.device, with_entropy: bool) -> RunningSoftmax:
        # The lowest finite float, not -inf: a first tile's rescaling is then exp(-huge) = 0 and
        # its moment correction 0 x finite, never -inf x 0.
        lowest = torch.full((count,), torch.finfo(torch.float32).min, device=device)
        zeros = torch.zeros(count, device=device)
        return cls(lowest, zeros, zeros.clone() if with_entropy else None)

    def add(self, rows: slice, logits: torch.Tensor) -> None:
        """Fold one tile in; `logits` is consumed (overwritten in place)."""
        largest = torch.maximum(self.largest[rows], logits.amax(1))
        shift = self.largest[rows] - largest  # <= 0: how far the old sums' reference moved down
        rescale = shift.exp()
        shifted = logits.sub_(largest[:, None])
        if self.moment is None:
            self.total[rows] = self.total[rows] * rescale + shifted.exp_().sum(1)
        else:
            weights = shifted.exp()
            moment = rescale * (self.moment[rows] + shift * self.total[rows])
            self.total[rows] = self.total[rows] * rescale + weights.sum(1)
            self.moment[rows] = moment + weights.mul_(shifted).sum(1)
        self.largest[rows] = largest

    def log_normaliser(self) -> torch.Tensor:
        return self.largest + self.total.log()

    def entropy(self) -> torch.Tensor | None:
        return None if self.moment is None else self.total.log() - self.moment / self.total


class FusedTokenLogprobs(torch.autograd.Function):
    """Forward and backward tile by tile, vocabulary tiles outside and token tiles inside: a
    vocabulary tile of the weight is widened to float32 once, and its gradient is summed in
    float32 over the token tiles before it is written in the weight's dtype. The backward keeps
    per token only the log-normaliser and the mean scaled logit E[s] (for the entropy's gradient,
    dH/ds_v = -p_v (s_v - E[s]))."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, with_entropy, tiles):
        with torch.autocast(hidden.device.type, enabled=False):
            wide = hidden.float()
            picked = torch.zeros(len(hidden), device=hidden.device)
            running = RunningSoftmax.start(len(hidden), hidden.device, with_entropy)
            for columns in spans(weight.shape[0], tiles.vocab):
                weight_tile, bias_tile = weight[columns].float(), None if bias is None else bias[columns].float()
                for rows in spans(len(hidden), tiles.tokens):
                    logits = tile_logits(wide[rows], weight_tile, bias_tile, temperature)
                    hits, at = tokens_in_span(tokens[rows], columns)
                    picked[rows.start + hits] = logits[hits, at]
                    running.add(rows, logits)
            log_normaliser = running.log_normaliser()
            entropy = running.entropy()
        mean = None if entropy is None else log_normaliser - entropy  # E[s] = log Z - H
        ctx.save_for_backward(hidden, weight, bias, tokens, log_normaliser, mean)
        ctx.temperature, ctx.tiles = temperature, tiles
        ctx.set_materialize_grads(False)
        return picked - log_normaliser, entropy

    @staticmethod
    def backward(ctx, grad_picked, grad_entropy):
        hidden, weight, bias, tokens, log_normaliser, mean = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        zeros = torch.zeros(len(hidden), device=hidden.device)
        # d/dz of the upstream-weighted log p(y) and H, each already over the temperature:
        # d log p(y)/ds_v = 1[v = y] - p_v, dH/ds_v = -p_v (s_v - E[s]), and ds/dz = 1/T.
        over_t = 1.0 / ctx.temperature
        picked_weight = (zeros if grad_picked is None else grad_picked.float()) * over_t
        entropy_weight = None if grad_entropy is None else grad_entropy.float() * over_t
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            wide = hidden.float()
            for columns in spans(weight.shape[0], ctx.tiles.vocab):
                weight_tile, bias_tile = weight[columns].float(), None if bias is None else bias[columns].float()
                weight_sum = torch.zeros_like(weight_tile) if needs_weight else None
                bias_sum = torch.zeros(weight_tile.shape[0], device=hidden.device) if needs_bias else None
                for rows in spans(len(hidden), ctx.tiles.tokens):
                    logits = tile_logits(wide[rows], weight_tile, bias_tile, ctx.temperature)
                    grad = logit_gradients(
                        logits,
                        log_normaliser[rows],
                        picked_weight[rows],
                        None if entropy_weight is None else (entropy_weight[rows], mean[rows]),
                    )
                    hits, at = tokens_in_span(tokens[rows], columns)
                    grad[hits, at] += picked_weight[rows][hits]
                    if needs_hidden:
                        grad_hidden[rows].addmm_(grad, weight_tile)
                    if needs_weight:
                        weight_sum.addmm_(grad.T, wide[rows])
                    if needs_bias:
                        bias_sum += grad.sum(0)
                if needs_weight:
                    grad_weight[columns] = weight_sum
                if needs_bias:
                    grad_bias[columns] = bias_sum
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def logit_gradients(logits, log_normaliser, picked_weight, entropy_terms):
    """The gradient at one tile of scaled logits, less the sampled token's +picked_weight:
    -p_v (picked_weight + entropy_weight (s_v - E[s])). `logits` is consumed."""
    if entropy_terms is None:
        return logits.sub_(log_normaliser[:, None]).exp_().mul_(-picked_weight[:, None])
    entropy_weight, mean = entropy_terms
    probs = (logits - log_normaliser[:, None]).exp_()
    return logits.sub_(mean[:, None]).mul_(entropy_weight[:, None]).add_(picked_weight[:, None]).mul_(probs).neg_()
