"""Token and sample selection: which rollouts and response tokens enter the loss.

Pure tensor functions; formulas and sources are in docs/algorithms.md:
  * token selectors (TOKEN_SELECTORS): the 80/20 high-entropy mask (#high-entropy-forking-tokens),
    D³S token level (#d3s-token-level), TIP Soft-OR and the Q3 detector, the OPD repo's
    entropy-weighted sampling (#tip-selection-rules) and a uniform random baseline;
  * D³S sample level (#d3s-sample-level) and its linear schedule (#d3s-schedule);
  * TIP quadrant shares (#tip-quadrants), a diagnostic.
Bare anchors here and below name headings of docs/algorithms.md too.

A selector returns a [B, R] bool mask, always a subset of the valid response tokens. It does not
decide the loss denominator (all tokens or kept tokens, #training-on-selected-tokens): that is the loss
aggregation's choice.

Every "floor(fraction * count)" below tolerates the float error of a decimal fraction (0.29 * 100
is 28.999999999999996, taken as 29); see floor_counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from efficient_rl.registry import Registry

# name -> fn(stats: TokenStats, *, generator: torch.Generator | None, **params) -> [B, R] bool. An
# entry needs the TOKEN_STATISTICS it reads (and "progress" when scheduled); its `metrics`,
# fn(stats, **params) -> {name: value}, are logged each step.
TOKEN_SELECTORS: Registry = Registry("token selector", provided=("generator",))
# name -> fn(advantages [B], group_ids [B], *, progress: float, **params) -> [B] bool, the rollouts kept
SAMPLE_SELECTORS: Registry = Registry("sample selector", provided=("progress",))

QUADRANT_KEYS = ("tip/q1_share", "tip/q2_share", "tip/q3_share", "tip/q4_share")


@dataclass
class TokenStats:
    """What a token selector reads: [B, R] float tensors aligned with a right-padded response
    batch. `statistics` holds the per-token statistics the selector's entry `needs`, by their
    TOKEN_STATISTICS names (algos/divergence.py): the learner computes exactly those."""

    mask: torch.Tensor  # 1 on valid response tokens
    advantages: torch.Tensor | None = None  # A_{i,t}
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "entropy": H_{i,t} in nats
    vocab_size: int | None = None  # |V|, for the normalised entropy h = H / ln|V|
    progress: float = 0.0  # training progress p in [0, 1], for scheduled selectors (D³S)

    def require(self, name: str, selector: str) -> torch.Tensor:
        value = self.statistics.get(name)
        if value is None:
            raise ValueError(f"token selector {selector!r} needs the token statistic {name!r}")
        return value


# --- shared pieces -----------------------------------------------------------------------------


def floor_counts(fraction: float, counts: torch.Tensor) -> torch.Tensor:
    """floor(fraction * counts) elementwise, as long.

    A product within 1e-9 (relative) of an integer counts as that integer, so a decimal fraction
    keeps its decimal meaning despite binary rounding (0.29 * 100 -> 29, not 28).
    """
    exact = fraction * counts.double()
    nearest = exact.round()
    on_integer = (exact - nearest).abs() <= 1e-9 * exact.clamp(min=1.0)
    return torch.where(on_integer, nearest, exact.floor()).long()


def floor_count(fraction: float, count: int) -> int:
    return int(floor_counts(fraction, torch.tensor(count)))


def check_fraction(name: str, value: float, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def valid_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of values over the valid entries (torch.quantile, linear interpolation, as
    TRL; torch.quantile accepts at most 2^24 entries, about 16M valid tokens per batch)."""
    return torch.quantile(values[valid].double(), q)


def min_max_normalise(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the valid entries (float64, 0 elsewhere); a constant axis
    carries no ranking information and normalises to 0. Needs at least one valid entry."""
    values = values.double()
    low, high = values[valid].min(), values[valid].max()
    if high <= low:
        return torch.zeros_like(values)
    return torch.where(valid, (values - low) / (high - low), 0.0)


def top_per_row(score: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, R] bool: in each row i, the counts[i] valid entries with the highest score.

    Equal scores go to the earlier position (a stable sort of -score), so the result is
    deterministic. Padding sorts after every valid entry whatever its score. Scores must be finite.
    """
    key = torch.where(valid, -score.double(), math.inf)
    order = torch.argsort(key, dim=1, stable=True)
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[i, t]: t's place in row i's order
    return (rank < counts[:, None]) & valid


def top_global(score: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """[B, R] bool: the `count` valid entries of the whole batch with the highest score; equal
    scores go to the earlier flat (row-major) position."""
    flat = top_per_row(score.reshape(1, -1), valid.reshape(1, -1), torch.tensor([count], device=score.device))
    return flat.view_as(valid)


def sample_without_replacement(
    weights: torch.Tensor, valid: torch.Tensor, count: int, generator: torch.Generator | None
) -> torch.Tensor:
    """[B, R] bool: `count` valid entries drawn one after another without replacement, each draw
    with probability proportional to its weight among the entries not yet drawn.

    Efraimidis-Spirakis: with E_j ~ Exp(1) i.i.d., the `count` smallest E_j / w_j have exactly
    that distribution (the one torch.multinomial(replacement=False) samples), without
    multinomial's 2^24 category limit. A zero weight gives the key +inf, so zero-weight entries
    are drawn only once every positive-weight entry is, i.e. only when needed to reach `count`,
    and then uniformly: the keys are sorted in a random order with a stable sort, so equal +inf
    keys come out in random order.
    """
    candidates = valid.flatten().nonzero().squeeze(1)
    shuffle = torch.randperm(len(candidates), generator=generator, device=valid.device)
    candidates = candidates[shuffle]
    arrivals = torch.empty(len(candidates), dtype=torch.float64, device=valid.device).exponential_(generator=generator)
    keys = arrivals / weights.flatten()[candidates].double()
    chosen = candidates[torch.argsort(keys, stable=True)[:count]]
    selected = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    selected[chosen] = True
    return selected.view_as(valid)


def tip_entropy_axis(stats: TokenStats, valid: torch.Tensor, clip_quantile: float, selector: str) -> torch.Tensor:
    """TIP's ĥ (#tip-selection-rules, Soft-OR steps 1-3): h = H / ln|V|, clipped at the batch's
    `clip_quantile` over valid tokens so a few near-uniform positions do not squash everyone else
    toward 0, then min-max normalised over the valid tokens. Needs at least one valid token."""
    if stats.vocab_size is None or stats.vocab_size < 2:
        raise ValueError(
            f"token selector {selector!r} needs the vocabulary size (vocab_size >= 2), got {stats.vocab_size}"
        )
    check_fraction("entropy_clip_quantile", clip_quantile)
    h = stats.require("entropy", selector).double() / math.log(stats.vocab_size)
    h = torch.minimum(h, valid_quantile(h, valid, clip_quantile))
    return min_max_normalise(h, valid)


# --- token selectors ---------------------------------------------------------------------------


@TOKEN_SELECTORS.register("all", source="every token: plain GRPO, full-token OPD")
def select_all(stats: TokenStats, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every valid response token (plain GRPO / full-token OPD)."""
    return stats.mask > 0


@TOKEN_SELECTORS.register(
    "high_entropy",
    needs=("entropy",),
    ranges={"top_fraction": "(0, 1]"},
    source="Beyond the 80/20 rule (arXiv 2506.01939); TRL's top_entropy_quantile",
)
def select_high_entropy(
    stats: TokenStats, *, generator: torch.Generator | None = None, top_fraction: float = 0.2
) -> torch.Tensor:
    """Beyond the 80/20 rule (#high-entropy-forking-tokens): tokens whose entropy reaches the
    batch's top-`top_fraction` threshold, τ = quantile(H over valid tokens, 1 - top_fraction) with
    linear interpolation, kept when H >= τ (as TRL's top_entropy_quantile). Ties at τ are all kept,
    so equal entropies keep every token and more than top_fraction may pass."""
    check_fraction("top_fraction", top_fraction, allow_zero=False)
    valid = stats.mask > 0
    entropy = stats.require("entropy", "high_entropy").double()
    if not valid.any():
        return valid
    return (entropy >= valid_quantile(entropy, valid, 1.0 - top_fraction)) & valid


def select_d3s_tokens(
    stats: TokenStats, *, generator: torch.Generator | None = None, keep_fraction: float
) -> torch.Tensor:
    """D³S token level (#d3s-token-level): the top `keep_fraction` (K) of valid tokens by |A_{i,t}|·H_{i,t}.

    Batch-global, our reading of #d3s-token-level: with outcome advantages the key ranks tokens by
    entropy within a rollout and weighs rollouts by |A_i|. k = floor(K·N) of the N valid tokens,
    at least 1 when N > 0; ties go to the earlier flat position. K has no official default
    (#d3s-schedule), so it must be given (d3s_schedule's K). The mask should already exclude the rollouts
    D³S's sample level dropped.
    """
    check_fraction("keep_fraction", keep_fraction, allow_zero=False)
    valid = stats.mask > 0
    if stats.advantages is None:
        raise ValueError("token selector 'd3s_tokens' needs the advantages")
    key = stats.advantages.double().abs() * stats.require("entropy", "d3s_tokens").double()
    valid_tokens = int(valid.sum())
    count = max(floor_count(keep_fraction, valid_tokens), 1) if valid_tokens else 0
    return top_global(key, valid, count)


def tip_quadrants(stats: TokenStats, **params) -> dict[str, float]:
    return quadrant_shares(stats.require("entropy", "tip"), stats.require("reverse_kl", "tip"), stats.mask)


@TOKEN_SELECTORS.register(
    "tip_soft_or",
    needs=("entropy", "reverse_kl"),
    metrics=tip_quadrants,
    ranges={"rho": "[0, 1]", "entropy_clip_quantile": "[0, 1]"},
    source="TIP (arXiv 2604.14084), Soft-OR; docs/algorithms.md#tip-selection-rules",
)
def select_tip_soft_or(
    stats: TokenStats,
    *,
    generator: torch.Generator | None = None,
    rho: float = 0.5,
    entropy_clip_quantile: float = 0.98,
) -> torch.Tensor:
    """TIP Soft-OR (#tip-selection-rules): s = ĥ + δ̂ - ĥ·δ̂ = 1 - (1 - ĥ)(1 - δ̂), high when either
    the student is uncertain or it disagrees with the teacher; keeps floor(rho·|o_i|) tokens per
    rollout.

    ĥ: tip_entropy_axis (98th-percentile clip, then min-max over the batch's valid tokens);
    δ̂: reverse KL min-max normalised over the batch's valid tokens. Within a rollout the
    highest scores are kept, ties to the earlier position.
    """
    check_fraction("rho", rho)
    valid = stats.mask > 0
    if not valid.any():
        return valid
    h = tip_entropy_axis(stats, valid, entropy_clip_quantile, "tip_soft_or")
    d = min_max_normalise(stats.require("reverse_kl", "tip_soft_or"), valid)
    score = h + d - h * d
    return top_per_row(score, valid, floor_counts(rho, valid.sum(1)))


@TOKEN_SELECTORS.register(
    "tip_q3",
    needs=("entropy", "forward_kl", "reverse_kl"),
    metrics=tip_quadrants,
    ranges={"rho": "[0, 1]", "entropy_clip_quantile": "[0, 1]"},
    source="TIP (arXiv 2604.14084), the Q3 detector; docs/algorithms.md#tip-selection-rules",
)
def select_tip_q3(
    stats: TokenStats,
    *,
    generator: torch.Generator | None = None,
    rho: float = 0.2,
    entropy_clip_quantile: float = 0.98,
) -> torch.Tensor:
    """TIP's Q3 detector (#tip-selection-rules): w = KL(P_T || P_S)·(1 - ĥ), overconfident-and-wrong tokens.

    Forward KL ranks here because it penalises teacher mass a confident student misses; the loss
    itself stays reverse KL. ĥ is Soft-OR's (clipped, min-max normalised) entropy axis; forward KL
    is used raw. Keeps floor(rho·|o_i|) tokens per rollout by w, ties to the earlier position.
    Default rho = 0.2: the budget of the paper's Q3-only result (#tip-published-results: 20% beats full OPD).
    """
    check_fraction("rho", rho)
    valid = stats.mask > 0
    if not valid.any():
        return valid
    confidence = 1.0 - tip_entropy_axis(stats, valid, entropy_clip_quantile, "tip_q3")
    score = stats.require("forward_kl", "tip_q3").double() * confidence
    return top_per_row(score, valid, floor_counts(rho, valid.sum(1)))


def entropy_sampling_needs(params) -> tuple[str, ...]:
    return ("entropy", "jsd") if params.gamma != 0 else ("entropy",)


@TOKEN_SELECTORS.register(
    "entropy_sampling",
    needs=entropy_sampling_needs,
    ranges={"ratio": "[0, 1]", "alpha": "[0, inf)", "gamma": "[0, inf)"},
    source="the OPD repo's entropy_weighted_sample (HJSang/OPSD_OnPolicyDistillation)",
)
def select_entropy_sampling(
    stats: TokenStats,
    *,
    generator: torch.Generator | None = None,
    ratio: float = 0.5,
    alpha: float = 1.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """TIP's entropy-only rule as the OPD repo's entropy_weighted_sample (#tip-selection-rules): k =
    floor(N·ratio) of the batch's N valid tokens, drawn without replacement with probability ∝
    h^alpha · (JSD / ln 2)^gamma; gamma = 0 is pure entropy and then `jsd` is not needed.

    h = H / ln|V| when vocab_size is known; the constant factor cancels in a proportional draw, so
    raw H gives the same distribution. Entropies and JSDs are clamped at 0 (float error can make a
    near-deterministic entropy slightly negative). Zero-weight tokens (0^alpha with alpha > 0,
    e.g. a one-hot student) are drawn only when fewer than k tokens have positive weight, and then
    uniformly at random among themselves (see sample_without_replacement); 0^0 = 1, so alpha = 0
    is uniform sampling.
    """
    check_fraction("ratio", ratio)
    if alpha < 0 or gamma < 0:
        raise ValueError(f"alpha and gamma must be >= 0, got alpha={alpha}, gamma={gamma}")
    valid = stats.mask > 0
    h = stats.require("entropy", "entropy_sampling").double().clamp(min=0.0)
    if stats.vocab_size is not None and stats.vocab_size >= 2:
        h = h / math.log(stats.vocab_size)
    weights = h**alpha
    if gamma != 0:
        jsd = stats.require("jsd", "entropy_sampling").double().clamp(min=0.0) / math.log(2.0)
        weights = weights * jsd**gamma
    count = floor_count(ratio, int(valid.sum()))
    return sample_without_replacement(weights, valid, count, generator)


@TOKEN_SELECTORS.register("random", ranges={"ratio": "[0, 1]"}, source="uniform baseline")
def select_random(stats: TokenStats, *, generator: torch.Generator | None = None, ratio: float = 0.5) -> torch.Tensor:
    """Baseline: floor(N·ratio) of the batch's N valid tokens, uniformly without replacement."""
    check_fraction("ratio", ratio)
    valid = stats.mask > 0
    weights = torch.ones(valid.shape, dtype=torch.float64, device=valid.device)
    return sample_without_replacement(weights, valid, floor_count(ratio, int(valid.sum())), generator)


# --- D³S sample level and schedule --------------------------------------------------------------


def max_variance_subset(values: torch.Tensor, size: int) -> torch.Tensor:
    """Sorted LongTensor of the indices of a size-`size` subset of `values` [n] with maximal variance.

    A maximal-variance subset of fixed size is always the k largest plus the (size - k) smallest
    values for some k (our reading in #d3s-sample-level, PODS), so scan k = 0..size with prefix sums of the sorted
    values. Deterministic: values are sorted stably (equal values in index order, the smallest
    index counting as the smallest value), and among k within float rounding of the best
    variance the smallest k wins.
    """
    count = values.numel()
    if values.dim() != 1 or not 0 <= size <= count:
        raise ValueError(f"need a 1-D tensor and 0 <= size <= its length, got shape {tuple(values.shape)}, size {size}")
    order = torch.argsort(values, stable=True)
    if size == 0:
        return order[:0]
    ordered = values.double()[order]
    ordered = ordered - ordered.mean()  # centring keeps E[x²] - E[x]² free of cancellation
    zero = ordered.new_zeros(1)
    low_sum, low_squares = (torch.cat([zero, x.cumsum(0)]) for x in (ordered, ordered**2))
    high_sum, high_squares = (torch.cat([zero, x.flip(0).cumsum(0)]) for x in (ordered, ordered**2))
    top = torch.arange(size + 1, device=values.device)  # k largest values + (size - k) smallest
    mean = (high_sum[top] + low_sum[size - top]) / size
    variance = (high_squares[top] + low_squares[size - top]) / size - mean**2
    best_variance = variance.max()
    best = int(torch.nonzero(variance >= best_variance - 1e-12 * (1.0 + best_variance.abs()))[0])
    return torch.cat([order[: size - best], order[count - best :]]).sort().values


def d3s_sample_mask(
    advantages: torch.Tensor, group_ids: torch.Tensor, keep_per_group: int, scope: str = "group"
) -> torch.Tensor:
    """D³S sample level (#d3s-sample-level): [B] bool, the rollouts that stay in the batch.

    advantages: [B] per-rollout advantages, computed from all G rollouts of each group BEFORE this
    selection and NOT re-normalised after it (#d3s-sample-level, step 3): the kept rollouts keep
    their advantages as they are.
    scope "group": each group keeps its max-variance subset of min(keep_per_group, group size)
    rollouts (an all-equal group keeps that many rollouts of advantage 0, which carry no signal).
    scope "batch" (D³S's cross-group selection): one max-variance subset of
    min(keep_per_group × number of groups, B) rollouts over the whole batch, so groups with zero
    advantage naturally drop out and informative groups may keep more than keep_per_group.
    """
    if advantages.dim() != 1 or group_ids.shape != advantages.shape:
        raise ValueError("advantages and group_ids must both be [B]")
    if keep_per_group < 0:
        raise ValueError(f"keep_per_group must be >= 0, got {keep_per_group}")
    keep = torch.zeros(advantages.shape, dtype=torch.bool, device=advantages.device)
    group_names, group_index = torch.unique(group_ids, return_inverse=True)
    if scope == "batch":
        size = min(keep_per_group * len(group_names), len(advantages))
        keep[max_variance_subset(advantages, size)] = True
    elif scope == "group":
        for group in range(len(group_names)):
            rows = torch.nonzero(group_index == group).squeeze(1)
            chosen = max_variance_subset(advantages[rows], min(keep_per_group, len(rows)))
            keep[rows[chosen]] = True
    else:
        raise ValueError(f"unknown D3S scope {scope!r}; expected 'group' or 'batch'")
    return keep


def d3s_schedule(progress: float, n_init: int, n_final: int, k_init: float, k_final: float) -> tuple[int, float]:
    """D³S curriculum (#d3s-schedule): [N, K] = (1 - p)·[N_init, K_init] + p·[N_final, K_final].

    p = training progress, clamped to [0, 1]. N (rollouts kept per group) is rounded to the
    nearest integer, halves up (see round_half_up); K (token keep fraction) is returned as is. No
    official values of the four endpoints exist (#d3s).
    """
    return round_half_up(linear_schedule(progress, n_init, n_final)), linear_schedule(progress, k_init, k_final)


def linear_schedule(progress: float, start: float, end: float) -> float:
    """(1 - p)·start + p·end, with p clamped to [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return (1.0 - p) * start + p * end


def d3s_token_fraction(stats: TokenStats, *, token_fraction: list[float]) -> dict[str, float]:
    return {"d3s/token_fraction": linear_schedule(stats.progress, *token_fraction)}


@TOKEN_SELECTORS.register(
    "d3s_tokens",
    needs=("entropy",),
    metrics=d3s_token_fraction,
    ranges={"token_fraction": "(0, 1]"},
    check=lambda params, recipe: two_endpoints(params.token_fraction, "token_fraction"),
    source="D³S (arXiv 2509.22115), token level on its schedule; docs/algorithms.md#d3s-token-level",
)
def d3s_tokens(
    stats: TokenStats, *, generator: torch.Generator | None = None, token_fraction: list[float] = [0.2, 0.5]
) -> torch.Tensor:
    """D³S's token level on its schedule: K moves linearly from token_fraction[0] to [1] over
    training (no official endpoints exist; 0.2 -> 0.5 is this library's lab sweep's choice)."""
    return select_d3s_tokens(stats, keep_fraction=linear_schedule(stats.progress, *token_fraction))


def two_endpoints(values: list, name: str) -> str | None:
    return None if len(values) == 2 else f"{name}: expected [start, end], got {values}"


@SAMPLE_SELECTORS.register("none", source="every rollout")
def keep_every_rollout(advantages: torch.Tensor, group_ids: torch.Tensor, *, progress: float) -> torch.Tensor:
    return torch.ones(advantages.shape, dtype=torch.bool, device=advantages.device)


def d3s_rollouts_fit(params, recipe) -> str | None:
    group_size = recipe.rollout.group_size
    if len(params.rollouts) != 2 or not all(1 <= n <= group_size for n in params.rollouts):
        return (
            f"rollouts: expected [N_init, N_final] within 1..rollout.group_size ({group_size}), got {params.rollouts}"
        )
    return None


@SAMPLE_SELECTORS.register(
    "d3s",
    ranges={"rollouts": "[1, inf)"},
    check=d3s_rollouts_fit,
    source="D³S (arXiv 2509.22115), sample level (D³S-Cross) on its schedule; docs/algorithms.md#d3s-sample-level",
)
def d3s_samples(
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    progress: float,
    scope: Literal["group", "batch"] = "batch",
    rollouts: list[int] = [4, 8],
) -> torch.Tensor:
    """D³S's sample level on its schedule: N rollouts per prompt on average, N moving linearly
    from rollouts[0] to rollouts[1] over training; scope batch is D³S-Cross (the paper's best)."""
    keep_per_group = round_half_up(linear_schedule(progress, *rollouts))
    return d3s_sample_mask(advantages, group_ids, keep_per_group, scope)


def round_half_up(value: float) -> int:
    """The nearest integer, halves up. A value within 1e-9 (relative) of a half counts as that
    half, for the same reason as in floor_counts: (1 - 5/6) * 10 + 5/6 * 1 is 2.4999999999999996
    in binary, and means 2.5."""
    return int(math.floor(value + 0.5 + 1e-9 * max(1.0, abs(value))))


# --- TIP diagnostics ----------------------------------------------------------------------------


def quadrant_shares(entropy_normalised: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Shares of valid tokens in TIP's quadrants (#tip-quadrants), summing to 1 (all 0 with no valid token).

    Q1 high h / high δ, Q2 high h / low δ, Q3 low h / high δ, Q4 low h / low δ. The paper's
    thresholds are unknown (#tip-quadrants); here "high" means >= the batch median over valid
    tokens (torch.quantile 0.5, the mean of the two middle values for an even count), so each
    axis splits the batch about in half and the shares show how the two axes co-vary.
    """
    valid = mask > 0
    if not valid.any():
        return dict.fromkeys(QUADRANT_KEYS, 0.0)
    h, d = entropy_normalised.double()[valid], divergence.double()[valid]
    high_h = h >= torch.quantile(h, 0.5)
    high_d = d >= torch.quantile(d, 0.5)
    quadrants = (high_h & high_d, high_h & ~high_d, ~high_h & high_d, ~high_h & ~high_d)
    return {key: float(members.sum()) / h.numel() for key, members in zip(QUADRANT_KEYS, quadrants)}
