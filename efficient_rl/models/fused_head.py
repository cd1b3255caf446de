"""The policy's token log-probs and entropies straight from hidden states and the output matrix.

The logits exist one tile at a time, [token tile x vocabulary tile] in float32, never as a
[tokens x vocabulary] tensor: the forward keeps a running log-sum-exp per token (the online
softmax), the sampled token's logit and the entropy's moment; the backward recomputes each tile
from the hidden states and the weight (unless all tokens and the whole vocabulary are one tile:
that tile's log-probs are then kept from the forward). Memory is then flat in the number of tokens
past the token tile: a float32 tile and half of one, reused by every tile of a pass, plus a
float32 copy of one vocabulary tile of the weight and of the hidden states when they are bf16
(docs/memory.md#the-log-prob-head).

The temperature is the tile product's own scale factor (no pass over the tile), and the logits are
float32 from float32 products whatever the inputs' dtype: bf16 hidden states and weights are
widened per tile. Autocast is off inside, so that the dtype is this module's choice, not the
context's.
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


def tile_logits(hidden, weight, bias, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """(hidden @ weight.T + bias) / temperature for one tile, written into `out` (float32, from
    float32 operands): the temperature is the product's own scale factor, not a pass of its own."""
    scale = 1.0 / temperature
    if bias is None:  # beta 0: out's old contents are ignored, not multiplied
        return torch.addmm(out, hidden, weight.T, beta=0.0, alpha=scale, out=out)
    return torch.addmm(bias, hidden, weight.T, beta=scale, alpha=scale, out=out)


class TileBuffers:
    """One float32 tile and half a tile of scratch, reused by every tile of a pass: on a CPU a fresh
    tile-sized tensor is fresh pages from the system each time (page faults, zeroed memory). The
    scratch takes a tile's exponentials half its rows at a time (`halves`), so a pass holds 1.5
    tiles, not 2."""

    def __init__(self, rows: int, columns: int, device: torch.device):
        self.tile = torch.empty(rows * columns, device=device)
        self.scratch = torch.empty(scratch_rows(rows) * columns, device=device)

    def views(self, rows: slice, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = rows.stop - rows.start, columns.stop - columns.start
        return self.tile[: height * width].view(height, width), scratch_view(self.scratch, height, width)


def scratch_rows(rows: int) -> int:
    return (rows + 1) // 2


def scratch_view(flat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Half a tile of `height` rows (rounded up) from the flat scratch `flat`."""
    return flat[: scratch_rows(height) * width].view(scratch_rows(height), width)


def halves(height: int) -> list[slice]:
    """A tile's rows in the two parts its half-tile scratch takes in turn."""
    return spans(height, max(1, scratch_rows(height)))


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

    def add(self, rows: slice, logits: torch.Tensor, spare: torch.Tensor) -> None:
        """Fold one tile in; `logits` is left holding s - m (m the new largest logit), `spare` is
        scratch."""
        largest = torch.maximum(self.largest[rows], logits.amax(1))
        shift = self.largest[rows] - largest  # <= 0: how far the old sums' reference moved down
        rescale = shift.exp()
        shifted = logits.sub_(largest[:, None])
        tile_total, tile_moment = torch.empty_like(largest), torch.empty_like(largest)
        for part in halves(len(shifted)):  # the exponentials half a tile at a time, in `spare`
            weights = torch.exp(shifted[part], out=spare[: part.stop - part.start])
            tile_total[part] = weights.sum(1)
            if self.moment is not None:
                tile_moment[part] = weights.mul_(shifted[part]).sum(1)
        if self.moment is not None:  # the old moment moves with the old total
            self.moment[rows] = rescale * (self.moment[rows] + shift * self.total[rows]) + tile_moment
        self.total[rows] = self.total[rows] * rescale + tile_total
        self.largest[rows] = largest

    def log_normaliser(self) -> torch.Tensor:
        return self.largest + self.total.log()

    def entropy(self) -> torch.Tensor | None:
        return None if self.moment is None else self.total.log() - self.moment / self.total


def kept_whole(count: int, vocab: int, tiles: HeadTiles) -> bool:
    """Whether every token and the whole vocabulary are one tile: the forward then keeps that
    tile's log-probs for the backward (a tile is held in the backward anyway), which saves the
    recomputing product."""
    return 0 < count <= tiles.tokens and vocab <= tiles.vocab  # no token (a masked pass): no tile


class FusedTokenLogprobs(torch.autograd.Function):
    """Forward and backward tile by tile, vocabulary tiles outside and token tiles inside: a
    vocabulary tile of the weight is widened to float32 once, and its gradient is summed in
    float32 over the token tiles before it is written in the weight's dtype. The backward keeps
    per token only the log-normaliser and the entropy, and recomputes each tile's log-probs
    (unless the whole [tokens x vocabulary] is one tile, kept from the forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, with_entropy, tiles):
        count, vocab = len(hidden), weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            wide = hidden.float()
            picked = torch.zeros(count, device=hidden.device)
            running = RunningSoftmax.start(count, hidden.device, with_entropy)
            buffers = TileBuffers(min(count, tiles.tokens), min(vocab, tiles.vocab), hidden.device)
            for columns in spans(vocab, tiles.vocab):
                weight_tile, bias_tile = weight[columns].float(), None if bias is None else bias[columns].float()
                for rows in spans(count, tiles.tokens):
                    logits, spare = buffers.views(rows, columns)
                    tile_logits(wide[rows], weight_tile, bias_tile, temperature, out=logits)
                    hits, at = tokens_in_span(tokens[rows], columns)
                    picked[rows.start + hits] = logits[hits, at]
                    running.add(rows, logits, spare)
                del weight_tile, bias_tile  # before the next one is made (see the backward)
            log_normaliser = running.log_normaliser()
            entropy = running.entropy()
        # The one tile holds s - m: the log-probs s - log Z once log(total) is taken off.
        kept = [logits, running.total.log()] if kept_whole(count, vocab, tiles) else []
        ctx.save_for_backward(hidden, weight, bias, tokens, log_normaliser, entropy, *kept)
        ctx.temperature, ctx.tiles = temperature, tiles
        ctx.set_materialize_grads(False)
        return picked - log_normaliser, entropy

    @staticmethod
    def backward(ctx, grad_picked, grad_entropy):
        hidden, weight, bias, tokens, log_normaliser, entropy, *kept = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        count, vocab, temperature = len(hidden), weight.shape[0], ctx.temperature
        # The gradient at the scaled logits s = z / T (then ds/dz = 1/T), with w = grad_picked and
        # e = grad_entropy: d log p(y)/ds_v = 1[v = y] - p_v and dH/ds_v = -p_v (s_v - E[s]) =
        # -p_v (log p_v + H), so w 1[v = y] - p_v (w + e H + e log p_v).
        picked_weight = torch.zeros(count, device=hidden.device) if grad_picked is None else grad_picked.float()
        entropy_weight = None if grad_entropy is None else grad_entropy.float()
        offset = picked_weight if entropy_weight is None else picked_weight + entropy_weight * entropy
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            wide = hidden.float()
            buffers = (
                None if kept else TileBuffers(min(count, ctx.tiles.tokens), min(vocab, ctx.tiles.vocab), hidden.device)
            )
            for columns in spans(vocab, ctx.tiles.vocab):
                weight_tile, bias_tile = weight[columns].float(), None if bias is None else bias[columns].float()
                weight_sum = torch.zeros_like(weight_tile) if needs_weight else None
                bias_sum = torch.zeros(weight_tile.shape[0], device=hidden.device) if needs_bias else None
                for rows in spans(count, ctx.tiles.tokens):
                    if kept:
                        log_probs = kept[0].sub_(kept[1][:, None])
                        spare = torch.empty(scratch_rows(count), vocab, device=hidden.device)
                    else:
                        log_probs, spare = buffers.views(rows, columns)
                        tile_logits(wide[rows], weight_tile, bias_tile, temperature, out=log_probs)
                        log_probs.sub_(log_normaliser[rows, None])
                    grad = logit_gradients(
                        log_probs,
                        spare,
                        offset[rows],
                        None if entropy_weight is None else entropy_weight[rows],
                    )
                    hits, at = tokens_in_span(tokens[rows], columns)
                    grad[hits, at] += picked_weight[rows][hits]
                    if needs_hidden:
                        grad_hidden[rows].addmm_(grad, weight_tile)
                    if needs_weight:
                        weight_sum.addmm_(grad.T, wide[rows])
                    if needs_bias:
                        bias_sum += grad.sum(0)
                # the 1/T of ds/dz, once per vocabulary tile rather than once per tile of logits
                if needs_weight:
                    grad_weight[columns] = weight_sum.mul_(1.0 / temperature)
                if needs_bias:
                    grad_bias[columns] = bias_sum.mul_(1.0 / temperature)
                # Freed before the next vocabulary tile's are made: a rebinding frees the old ones
                # only after the new ones exist, two weight tiles and two sums at once.
                del weight_tile, bias_tile, weight_sum, bias_sum
        grad_hidden = None if grad_hidden is None else grad_hidden.mul_(1.0 / temperature).to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def logit_gradients(log_probs, spare, offset, entropy_weight):
    """The gradient at one tile of scaled logits, less the sampled token's +grad_picked:
    -p_v (offset + entropy_weight log p_v), offset = grad_picked + entropy_weight H. Written
    into `log_probs`; `spare` (half a tile) takes p, half the rows at a time."""
    if entropy_weight is None:
        return log_probs.exp_().mul_(-offset[:, None])
    for part in halves(len(log_probs)):  # p half a tile at a time, in `spare`
        probs = torch.exp(log_probs[part], out=spare[: part.stop - part.start])
        terms = torch.addcmul(-offset[part, None], log_probs[part], -entropy_weight[part, None], out=log_probs[part])
        terms.mul_(probs)
    return log_probs
