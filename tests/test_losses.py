"""Policy losses and loss aggregations against independent brute-force references.

Every reference below is written from the method's definition (docs/algorithms.md, "Policy
losses", "GSPO", "CTPO", "Loss aggregation"; the papers' equations), as plain Python loops over
rows and tokens in float64 with `math`, never with the implementation's tensor code. Each
reference gives, per loss token, the value, the hand-derived derivative with respect to the
token's log-prob (or, for the sequence-level losses, of the sequence's loss with respect to each
of its tokens' log-probs) and its own classification of the token (clipped low / high / dual).
The implementation is run through autograd in float64 and compared with all three, on ragged,
right-padded batches whose loss masks have holes in the middle (as a token selection makes),
with advantages of both signs and ratios spread across both clip sides.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import RECIPES
from efficient_rl.algos.losses import AGGREGATIONS, POLICY_LOSSES, LossDenominators, LossInputs

SEEDS = [0, 1, 2, 3]
NORM_LENGTH = 16
BOUND = 20.0  # per-token log-ratio clamp (verl)
LOG_CAP = 10.0  # cap on log s_{i,t} (GSPO-token) and log r_t (CTPO)


# ---------------------------------------------------------------- test batches (plain Python lists)


def make_batch(
    seed: int,
    *,
    rows: int = 12,
    width: int = 10,
    token_sd: float = 0.3,
    row_sd: float = 0.0,
    spike_prob: float = 0.0,
    spike_range: tuple[float, float] = (1.2, 2.5),
    extreme: bool = False,
    row_advantages: bool = False,
    empty_row: bool = False,
    averaged: str = "kept",
) -> dict:
    """A ragged micro-batch: right-padded rows of different lengths, loss masks with holes.

    Log-ratios are row_offset + N(0, token_sd), some replaced by spikes of random sign; `extreme`
    adds tokens past the +-20 clamp and a row whose log-ratios sum past the cap of 10. Advantages
    are per token (a row value plus noise, some exactly 0), or constant along each row. Padding
    positions hold arbitrary numbers: nothing there may matter.
    """
    rng = random.Random(seed)
    lengths = [width, 1] + [rng.randint(2, width) for _ in range(rows - 2)]
    rng.shuffle(lengths)
    response = [[1.0 if t < lengths[b] else 0.0 for t in range(width)] for b in range(rows)]
    mask = [[1.0 if response[b][t] and rng.random() > 0.25 else 0.0 for t in range(width)] for b in range(rows)]
    for b in range(rows):  # every row keeps at least one token...
        if sum(mask[b]) == 0:
            mask[b][rng.randrange(lengths[b])] = 1.0
    longest = lengths.index(width)
    mask[longest] = [1.0 if t not in (2, 5) else 0.0 for t in range(width)]  # ...one has holes for sure
    if empty_row:  # ...but one, as a selection that keeps none of a rollout's tokens
        mask[(longest + 1) % rows] = [0.0] * width
    old = [[rng.uniform(-4.0, -0.05) for _ in range(width)] for _ in range(rows)]
    delta = []
    for b in range(rows):
        offset = rng.gauss(0.0, row_sd)
        line = []
        for _ in range(width):
            if rng.random() < spike_prob:
                line.append(rng.choice([-1.0, 1.0]) * rng.uniform(*spike_range))
            else:
                line.append(offset + rng.gauss(0.0, token_sd))
        delta.append(line)
    if extreme:
        kept = [(b, t) for b in range(rows) for t in range(width) if mask[b][t] and b != longest]
        (b1, t1), (b2, t2) = rng.sample(kept, 2)
        delta[b1][t1], delta[b2][t2] = 25.0, -25.0  # past the +-20 clamp
        delta[longest] = [11.0 + 0.5 * rng.random() for _ in range(width)]  # a sum past the cap of 10
    logp = [[old[b][t] + delta[b][t] for t in range(width)] for b in range(rows)]
    adv = []
    for b in range(rows):
        base = rng.choice([0.0, 1.0, -1.0]) * rng.uniform(0.3, 2.0)
        if row_advantages:
            adv.append([base] * width)
        else:
            adv.append([0.0 if rng.random() < 0.1 else base + rng.gauss(0.0, 0.7) for _ in range(width)])
    # at least one row of each sign, so both sides of every clip can appear
    adv[0] = [abs(a) + 0.1 for a in adv[0]]
    adv[1] = [-abs(a) - 0.1 for a in adv[1]]
    for b in range(rows):  # pad positions: arbitrary
        for t in range(lengths[b], width):
            adv[b][t] = rng.gauss(0.0, 3.0)
    averaged_over = mask if averaged == "kept" else response
    return dict(
        rows=rows, width=width, mask=mask, response=response, averaged_over=averaged_over, old=old, logp=logp, adv=adv
    )


def tensors(batch: dict) -> LossInputs:
    def t(key):
        return torch.tensor(batch[key], dtype=torch.float64)

    logprobs = t("logp").requires_grad_(True)
    advantages = t("adv")
    averaged_over = t("averaged_over")
    den = LossDenominators.of(averaged_over, NORM_LENGTH, advantages)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=t("old"),
        advantages=advantages,
        mask=t("mask"),
        averaged_over=averaged_over,
        den=den,
    )


def cells(batch: dict):
    return [(b, t) for b in range(batch["rows"]) for t in range(batch["width"])]


def kept(batch: dict):
    return [(b, t) for b, t in cells(batch) if batch["mask"][b][t]]


def clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def sign(x: float) -> float:
    return 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)


def row_mean(batch: dict, b: int, values) -> float:
    tokens = [t for t in range(batch["width"]) if batch["mask"][b][t]]
    return sum(values[t] for t in tokens) / len(tokens) if tokens else 0.0


def raw_log_ratio(batch: dict, b: int, t: int) -> float:
    return batch["logp"][b][t] - batch["old"][b][t]


def blank(batch: dict, fill=0.0):
    return [[fill] * batch["width"] for _ in range(batch["rows"])]


# ---------------------------------------------------------------- references
# Each returns dict(value=[b][t], deriv=[b][t], kind="token" | "sequence", flags={name: [b][t]}):
# kind "token": deriv[b][t] = d loss_{b,t} / d logp_{b,t} (a token's loss has no other dependence
# with gradient); kind "sequence": every loss token of row b carries the row's loss L_b and
# deriv[b][t] = d L_b / d logp_{b,t}. Only loss tokens are filled.


def ref_ppo_clip(batch, *, clip_low, clip_high, clip_ratio_c):
    value, deriv = blank(batch), blank(batch)
    flags = {name: blank(batch, False) for name in ("low", "high", "dual")}
    low, high = 1.0 - clip_low, 1.0 + clip_high
    for b, t in kept(batch):
        d = raw_log_ratio(batch, b, t)
        rho = math.exp(clamp(d, -BOUND, BOUND))
        a = batch["adv"][b][t]
        loss = -min(rho * a, clamp(rho, low, high) * a)
        is_low, is_high = a < 0 and rho < low, a > 0 and rho > high
        is_dual = clip_ratio_c is not None and a < 0 and -a * clip_ratio_c < loss
        if clip_ratio_c is not None and a < 0:
            loss = min(loss, -a * clip_ratio_c)
        value[b][t] = loss
        # gradient: -A rho on the unclipped branch (and inside the +-20 clamp), else none
        active = not (is_low or is_high or is_dual) and abs(d) < BOUND
        deriv[b][t] = -a * rho if active else 0.0
        flags["low"][b][t], flags["high"][b][t], flags["dual"][b][t] = is_low, is_high, is_dual
    return dict(value=value, deriv=deriv, kind="token", flags=flags)


def ref_gspo(batch, *, clip_low, clip_high):
    value, deriv = blank(batch), blank(batch)
    flags = {name: blank(batch, False) for name in ("low", "high", "dual")}
    low, high = 1.0 - clip_low, 1.0 + clip_high
    for b in range(batch["rows"]):
        tokens = [t for t in range(batch["width"]) if batch["mask"][b][t]]
        if not tokens:
            continue
        n = len(tokens)
        s = math.exp(sum(clamp(raw_log_ratio(batch, b, t), -BOUND, BOUND) for t in tokens) / n)
        a = sum(batch["adv"][b][t] for t in tokens) / n  # A_i: the mean token advantage
        loss = -min(s * a, clamp(s, low, high) * a)
        is_low, is_high = a < 0 and s < low, a > 0 and s > high
        for t in tokens:
            value[b][t] = loss
            active = not (is_low or is_high) and abs(raw_log_ratio(batch, b, t)) < BOUND
            deriv[b][t] = -a * s / n if active else 0.0  # d s_i / d logp_t = s_i / |o_i|
            flags["low"][b][t], flags["high"][b][t] = is_low, is_high
    return dict(value=value, deriv=deriv, kind="sequence", flags=flags)


def ref_gspo_token(batch, *, clip_low, clip_high):
    value, deriv = blank(batch), blank(batch)
    flags = {name: blank(batch, False) for name in ("low", "high", "dual")}
    low, high = 1.0 - clip_low, 1.0 + clip_high
    for b in range(batch["rows"]):
        tokens = [t for t in range(batch["width"]) if batch["mask"][b][t]]
        if not tokens:
            continue
        log_s = sum(clamp(raw_log_ratio(batch, b, t), -BOUND, BOUND) for t in tokens) / len(tokens)
        s = math.exp(min(log_s, LOG_CAP))  # s_{i,t}: the value of sg[s_i]
        for t in tokens:
            a = batch["adv"][b][t]
            value[b][t] = -min(s * a, clamp(s, low, high) * a)
            is_low, is_high = a < 0 and s < low, a > 0 and s > high
            # d s_{i,t} / d logp_t = s_i (the token's own log-prob only), none past the cap
            deriv[b][t] = -a * s if not (is_low or is_high) and log_s < LOG_CAP else 0.0
            flags["low"][b][t], flags["high"][b][t] = is_low, is_high
    return dict(value=value, deriv=deriv, kind="token", flags=flags)


def ref_cispo(batch, *, clip_low, clip_high):
    value, deriv = blank(batch), blank(batch)
    flags = {name: blank(batch, False) for name in ("low", "high")}
    low, high = 1.0 - clip_low, 1.0 + clip_high
    for b, t in kept(batch):
        rho = math.exp(clamp(raw_log_ratio(batch, b, t), -BOUND, BOUND))
        weight = clamp(rho, low, high)  # a constant (stop-gradient)
        a = batch["adv"][b][t]
        value[b][t] = -weight * a * batch["logp"][b][t]
        deriv[b][t] = -weight * a  # never zero from clipping
        # the clip acts on the importance weight itself, whatever the advantage's sign
        flags["low"][b][t], flags["high"][b][t] = rho < low, rho > high
    return dict(value=value, deriv=deriv, kind="token", flags=flags)


def ref_ctpo(batch, *, c_low, c_high, power, c_dual):
    value, deriv = blank(batch), blank(batch)
    flags = {name: blank(batch, False) for name in ("low", "high", "dual")}
    for b in range(batch["rows"]):
        cumulative = 0.0
        for t in range(batch["width"]):
            if not batch["mask"][b][t]:
                continue  # positions off the loss mask add nothing to the cumulative sum
            cumulative += clamp(raw_log_ratio(batch, b, t), -BOUND, BOUND)
            q = (t + 1) ** power  # 1-indexed response position over the padded row
            log_r = min(cumulative, LOG_CAP)
            r = math.exp(log_r)
            a = batch["adv"][b][t]
            loss = max(-a * r, -a * math.exp(clamp(log_r, -c_low * q, c_high * q)))
            is_low, is_high = a < 0 and log_r < -c_low * q, a > 0 and log_r > c_high * q
            is_dual = c_dual is not None and a < 0 and loss > -a * math.exp(c_dual * q)
            if c_dual is not None and a < 0:
                loss = min(loss, -a * math.exp(c_dual * q))
            value[b][t] = loss
            # gradient through logp_t - sg[logp_t] only: the +-20 clamp sits under sg, the cap of 10 does not
            active = not (is_low or is_high or is_dual) and cumulative < LOG_CAP
            deriv[b][t] = -a * r if active else 0.0
            flags["low"][b][t], flags["high"][b][t], flags["dual"][b][t] = is_low, is_high, is_dual
    return dict(value=value, deriv=deriv, kind="token", flags=flags)


def ref_gmpo(batch, *, clip):
    value, deriv = blank(batch), blank(batch)
    flags = {name: blank(batch, False) for name in ("low", "high")}
    for b in range(batch["rows"]):
        tokens = [t for t in range(batch["width"]) if batch["mask"][b][t]]
        if not tokens:
            continue
        n = len(tokens)
        a = sum(batch["adv"][b][t] for t in tokens) / n
        g = sign(a)
        pessimistic, unclipped = {}, {}
        for t in tokens:
            lr = clamp(raw_log_ratio(batch, b, t), -BOUND, BOUND)
            pessimistic[t] = g * min(g * lr, g * clamp(lr, -clip, clip))
            # the clip takes over on the side the advantage's sign makes optimistic
            unclipped[t] = (g > 0 and lr <= clip) or (g < 0 and lr >= -clip)
            flags["low"][b][t], flags["high"][b][t] = a < 0 and lr < -clip, a > 0 and lr > clip
        geometric = math.exp(sum(pessimistic.values()) / n)
        loss = -a * geometric
        for t in tokens:
            value[b][t] = loss
            active = unclipped[t] and abs(raw_log_ratio(batch, b, t)) < BOUND
            deriv[b][t] = -a * geometric / n if active else 0.0
    return dict(value=value, deriv=deriv, kind="sequence", flags=flags)


REFERENCES = {
    "ppo_clip": ref_ppo_clip,
    "gspo": ref_gspo,
    "gspo_token": ref_gspo_token,
    "cispo": ref_cispo,
    "ctpo": ref_ctpo,
    "gmpo": ref_gmpo,
}


def vjp(batch, ref, cotangent):
    """d/d logp of sum_{b,t} cotangent[b][t] * mask[b][t] * loss_{b,t}, from the reference."""
    grad = blank(batch)
    for b, t in kept(batch):
        if ref["kind"] == "token":
            grad[b][t] = cotangent[b][t] * ref["deriv"][b][t]
        else:  # row b's loss is carried by each of its loss tokens
            carried = sum(cotangent[b][u] for u in range(batch["width"]) if batch["mask"][b][u])
            grad[b][t] = carried * ref["deriv"][b][t]
    return grad


def weighted_sum(batch, ref, cotangent, row=None) -> float:
    return sum(cotangent[b][t] * ref["value"][b][t] for b, t in kept(batch) if row is None or b == row)


# ---------------------------------------------------------------- aggregation references


def aggregation_weights(name: str, batch: dict) -> list[list[float]]:
    """c[b][t] with aggregated = sum_{b,t} c[b][t] * value[b][t]; every aggregation is linear."""
    avg, adv = batch["averaged_over"], batch["adv"]
    rows, width = batch["rows"], batch["width"]
    counts = [sum(avg[b]) for b in range(rows)]
    sequences = sum(1 for b in range(rows) if counts[b] > 0)
    weights = blank(batch)
    if name == "token-mean":
        total = sum(counts)
        for b, t in cells(batch):
            weights[b][t] = avg[b][t] / max(total, 1.0)
    elif name == "seq-mean-token-mean":
        for b, t in cells(batch):
            weights[b][t] = avg[b][t] / max(counts[b], 1.0) / max(sequences, 1)
    elif name == "seq-mean-token-sum-norm":
        for b, t in cells(batch):
            weights[b][t] = avg[b][t] / (max(sequences, 1) * NORM_LENGTH)
    elif name == "balanced":
        positive = [(b, t) for b, t in cells(batch) if avg[b][t] and adv[b][t] > 0]
        negative = [(b, t) for b, t in cells(batch) if avg[b][t] and adv[b][t] < 0]
        s_pos = len({b for b, _ in positive})
        s_neg = len({b for b, _ in negative})
        if s_pos + s_neg == 0:
            return weights
        for b, t in positive:
            weights[b][t] = s_pos / len(positive) / (s_pos + s_neg)
        for b, t in negative:
            weights[b][t] = s_neg / len(negative) / (s_pos + s_neg)
    else:
        raise KeyError(name)
    assert all(len(line) == width for line in weights)
    return weights


def masked_weights(batch, weights):
    """The aggregation sees loss * mask (as the objective passes it): zero weight off the loss mask."""
    return [[weights[b][t] * batch["mask"][b][t] for t in range(batch["width"])] for b in range(batch["rows"])]


# ---------------------------------------------------------------- helpers on the implementation side


def as_tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(got: torch.Tensor, expected, what: str, rtol: float = 1e-10, atol: float = 1e-12):
    torch.testing.assert_close(
        got.detach(),
        expected if isinstance(expected, torch.Tensor) else as_tensor(expected),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


# ppo_clip, gspo and gspo_token receive their clip bounds as Python floats, which the
# implementation holds in float32 even when the ratios are float64 (see
# test_clip_bounds_keep_float64_precision): a clipped token's value is then off by up to ~6e-8
# relative. Their comparisons allow that; the others are held to float64 precision. Any logic
# error is orders of magnitude larger than either tolerance.
FLOAT32_BOUNDS = {"ppo_clip", "gspo", "gspo_token"}


def tolerance(name: str) -> dict:
    return dict(rtol=1e-6, atol=1e-9) if name in FLOAT32_BOUNDS else {}


def on_mask(batch, rows) -> torch.Tensor:
    return as_tensor(rows) * as_tensor(batch["mask"])


def run_loss(name: str, batch: dict, params: dict):
    inputs = tensors(batch)
    token = POLICY_LOSSES.get(name)(inputs, **params)
    return inputs, token


def implementation_vjp(name, batch, params, cotangent):
    inputs, token = run_loss(name, batch, params)
    (token.loss * inputs.mask * as_tensor(cotangent)).sum().backward()
    return inputs.logprobs.grad


def count(batch, flags) -> int:
    return sum(1 for b, t in kept(batch) if flags[b][t])


def random_cotangent(batch, seed):
    rng = random.Random(1000 + seed)
    return [[rng.uniform(-1.0, 1.0) for _ in range(batch["width"])] for _ in range(batch["rows"])]


# Data per loss: log-ratios spread so that both clip sides of the loss's parameters are hit.
DATA = {
    "ppo_clip": dict(token_sd=0.3, spike_prob=0.12, spike_range=(1.2, 2.5)),
    "cispo": dict(token_sd=0.3, spike_prob=0.12, spike_range=(1.2, 2.5)),
    "gspo": dict(rows=24, token_sd=1e-3, row_sd=1.5e-3),
    "gspo_token": dict(rows=24, token_sd=1e-3, row_sd=1.5e-3),
    "ctpo": dict(token_sd=0.1, row_sd=0.05),
    "gmpo": dict(token_sd=0.4, spike_prob=0.05),
}

# (loss, parameters, data variants): the registered defaults, read off the entry, and settings that
# switch on what the defaults leave off (dual clips, a lower CISPO bound, CTPO's geometric variant).
CASES = [
    ("ppo_clip", None, {}),
    ("ppo_clip", dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0), {}),
    ("gspo", None, {}),
    ("gspo_token", None, {}),
    ("cispo", None, {}),
    ("cispo", dict(clip_low=0.2, clip_high=0.28), {}),
    ("ctpo", None, {}),
    ("ctpo", dict(c_low=0.025, c_high=0.05, power=0.5, c_dual=0.15), dict(token_sd=0.15, row_sd=0.1)),
    ("ctpo", dict(c_low=0.05, c_high=0.1, power=-0.5, c_dual=None), dict(token_sd=0.3)),
    ("gmpo", None, {}),
]


def case_id(case):
    name, params, _ = case
    return name + ("-defaults" if params is None else "-" + "-".join(f"{k}={v}" for k, v in params.items()))


def case_batch(name, data, seed, **extra):
    return make_batch(seed, **{**DATA[name], **data, **extra})


def case_params(name, params):
    return POLICY_LOSSES.get(name).defaults() if params is None else params


def expected_sides(name, params) -> list[str]:
    """The indicator names the test data must hit: low and high, dual where a dual clip is set;
    CISPO's default sets no lower bound (clip_low 1.0: rho < 0 never happens)."""
    sides = ["high"] if name == "cispo" and params["clip_low"] >= 1.0 else ["low", "high"]
    if (name == "ppo_clip" and params["clip_ratio_c"] is not None) or (name == "ctpo" and params["c_dual"] is not None):
        sides.append("dual")
    return sides


# ---------------------------------------------------------------- 1. values and gradients per token


@pytest.mark.parametrize("averaged", ["kept", "all"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_policy_loss_matches_reference(case, seed, averaged):
    name, params, data = case
    params = case_params(name, params)
    batch = case_batch(name, data, seed, extreme=seed == 3, empty_row=seed == 2, averaged=averaged)
    ref = REFERENCES[name](batch, **params)
    for side in expected_sides(name, params):  # the data really reaches every clip
        assert count(batch, ref["flags"][side]) > 0, f"{name} seed {seed}: no token clipped {side}"
    assert sum(1 for b, t in kept(batch) if ref["deriv"][b][t] != 0.0) > 0, "no token with a gradient"

    inputs, token = run_loss(name, batch, params)
    assert token.loss.shape == inputs.logprobs.shape and token.loss.dtype == torch.float64
    close(token.loss * inputs.mask, on_mask(batch, ref["value"]), f"{name} token values", **tolerance(name))

    cotangent = random_cotangent(batch, seed)
    (token.loss * inputs.mask * as_tensor(cotangent)).sum().backward()
    close(inputs.logprobs.grad, vjp(batch, ref, cotangent), f"{name} gradient w.r.t. logprobs", **tolerance(name))


# ---------------------------------------------------------------- 1b. the hand-derived gradients themselves


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("case", [case for case in CASES if case[0] in ("ppo_clip", "gspo", "gmpo")], ids=case_id)
def test_reference_gradients_match_finite_differences(case, seed):
    """For the losses whose gradient is the derivative of their value (no stop-gradient), the
    hand-derived derivative of the reference equals a central finite difference of the reference
    value itself (float64, plain Python): the references are consistent on their own."""
    name, params, data = case
    params = case_params(name, params)
    batch = case_batch(name, data, seed, extreme=True)
    cotangent = random_cotangent(batch, seed)
    analytic = vjp(batch, REFERENCES[name](batch, **params), cotangent)
    step = 1e-7 if name == "gspo" else 1e-6
    for b, t in kept(batch):
        original = batch["logp"][b][t]
        batch["logp"][b][t] = original + step
        up = weighted_sum(batch, REFERENCES[name](batch, **params), cotangent, row=b)  # only row b moves
        batch["logp"][b][t] = original - step
        down = weighted_sum(batch, REFERENCES[name](batch, **params), cotangent, row=b)
        batch["logp"][b][t] = original
        numeric = (up - down) / (2 * step)
        assert math.isclose(numeric, analytic[b][t], rel_tol=1e-5, abs_tol=1e-6 * max(1.0, abs(up))), (
            name,
            b,
            t,
            numeric,
            analytic[b][t],
        )


# ---------------------------------------------------------------- 1c. aggregated scalars

AGGREGATED = [
    (name, params, data, "seq-mean-token-mean" if name in ("gspo", "gmpo") else "token-mean")
    for name, params, data in CASES
]
AGGREGATED += [
    ("ppo_clip", dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0), {}, "balanced"),
    ("gmpo", None, {}, "balanced"),
    ("cispo", None, {}, "seq-mean-token-sum-norm"),
]


@pytest.mark.parametrize("averaged", ["kept", "all"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", AGGREGATED, ids=lambda c: case_id(c[:3]) + "-" + c[3])
def test_aggregated_loss_and_gradient(case, seed, averaged):
    name, params, data, aggregation = case
    params = case_params(name, params)
    batch = case_batch(name, data, seed, extreme=seed == 3, empty_row=seed == 2, averaged=averaged)
    ref = REFERENCES[name](batch, **params)
    weights = masked_weights(batch, aggregation_weights(aggregation, batch))
    expected_value = weighted_sum(batch, ref, weights)
    expected_grad = vjp(batch, ref, weights)

    inputs, token = run_loss(name, batch, params)
    scalar = AGGREGATIONS.get(aggregation)(
        token.loss * inputs.mask, inputs.averaged_over, inputs.den, inputs.advantages
    )
    assert scalar.dim() == 0
    scalar.backward()
    close(scalar, torch.tensor(expected_value, dtype=torch.float64), f"{name} {aggregation} value", **tolerance(name))
    close(inputs.logprobs.grad, expected_grad, f"{name} {aggregation} gradient", **tolerance(name))


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_is_the_mean_of_sequence_losses(seed):
    """GSPO with seq-mean-token-mean is (1/G) sum_i loss_i, gradient -A_i s_i / (G |o_i|) where unclipped."""
    params = POLICY_LOSSES.get("gspo").defaults()
    batch = case_batch("gspo", {}, seed, empty_row=seed % 2 == 0)
    low, high = 1.0 - params["clip_low"], 1.0 + params["clip_high"]
    losses, grad = [], blank(batch)
    for b in range(batch["rows"]):
        tokens = [t for t in range(batch["width"]) if batch["mask"][b][t]]
        if not tokens:
            continue
        s = math.exp(sum(raw_log_ratio(batch, b, t) for t in tokens) / len(tokens))
        a = sum(batch["adv"][b][t] for t in tokens) / len(tokens)
        losses.append(-min(s * a, clamp(s, low, high) * a))
        clipped = (a > 0 and s > high) or (a < 0 and s < low)
        for t in tokens:
            grad[b][t] = 0.0 if clipped else -a * s / len(tokens)
    groups = len(losses)
    grad = [[g / groups for g in line] for line in grad]

    inputs, token = run_loss("gspo", batch, params)
    scalar = AGGREGATIONS.get("seq-mean-token-mean")(
        token.loss * inputs.mask, inputs.averaged_over, inputs.den, inputs.advantages
    )
    scalar.backward()
    close(
        scalar, torch.tensor(sum(losses) / groups, dtype=torch.float64), "gspo (1/G) sum_i loss_i", **tolerance("gspo")
    )
    close(inputs.logprobs.grad, grad, "gspo gradient", **tolerance("gspo"))


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_token_equals_gspo_with_sequence_advantages(seed):
    """With A_{i,t} = A_i and seq-mean-token-mean, GSPO-token equals GSPO in value and gradient."""
    batch = case_batch("gspo", {}, seed, row_advantages=True, empty_row=seed == 1)
    params = POLICY_LOSSES.get("gspo").defaults()
    assert POLICY_LOSSES.get("gspo_token").defaults() == params
    results = {}
    for name in ("gspo", "gspo_token"):
        inputs, token = run_loss(name, batch, params)
        scalar = AGGREGATIONS.get("seq-mean-token-mean")(
            token.loss * inputs.mask, inputs.averaged_over, inputs.den, inputs.advantages
        )
        scalar.backward()
        results[name] = (token.loss * inputs.mask, scalar, inputs.logprobs.grad)
        ref = REFERENCES[name](batch, **params)
        assert count(batch, ref["flags"]["low"]) > 0 and count(batch, ref["flags"]["high"]) > 0
    close(results["gspo_token"][0], results["gspo"][0], "per-token values")
    close(results["gspo_token"][1], results["gspo"][1], "aggregated value")
    close(results["gspo_token"][2], results["gspo"][2], "gradient")
    assert results["gspo"][2].abs().sum() > 0


# ---------------------------------------------------------------- 3. indicators


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_indicators_match_reference_classification(case, seed):
    name, params, data = case
    params = case_params(name, params)
    batch = case_batch(name, data, seed, extreme=seed == 3)
    ref = REFERENCES[name](batch, **params)
    _, token = run_loss(name, batch, params)
    assert {"low", "high"} <= set(token.indicators) <= set(ref["flags"]) | {"dual"}
    if "dual" in expected_sides(name, params):
        assert "dual" in token.indicators
    for side, flags in token.indicators.items():
        assert flags.dtype == torch.bool and flags.shape == token.loss.shape
        expected = ref["flags"].get(side, blank(batch, False))  # no dual clip: never flagged
        got = {(b, t) for b, t in kept(batch) if bool(flags[b, t])}
        want = {(b, t) for b, t in kept(batch) if expected[b][t]}
        assert got == want, f"{name} clip_ratio/{side}: only impl {sorted(got - want)}, only ref {sorted(want - got)}"
    # a flagged token is one whose gradient the clip removed (CISPO keeps every gradient)
    for b, t in kept(batch):
        if name != "cispo" and any(ref["flags"][side][b][t] for side in ref["flags"]):
            assert ref["deriv"][b][t] == 0.0


def test_clip_bounds_keep_float64_precision():
    """A clipped token's loss is -A (1 + eps_high) exactly, in the precision of the ratios.

    Fails today: clipped_surrogate turns a Python-float bound into torch.as_tensor(bound), a
    float32 tensor, so in float64 PPO clips at 1.2000000476837158 and 0.800000011920929 (GSPO at
    1.0003999471664429 and 0.9997000098228455) instead of 1 +- eps.
    """
    old = torch.log(torch.tensor([[1 / 1.5, 1 / 0.5]], dtype=torch.float64))  # ratios 1.5 and 0.5
    logprobs = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    inputs = LossInputs(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        mask=mask,
        averaged_over=mask,
        den=LossDenominators.of(mask, NORM_LENGTH, advantages),
    )
    token = POLICY_LOSSES.get("ppo_clip")(inputs, clip_low=0.2, clip_high=0.2, clip_ratio_c=None)
    assert token.loss.tolist() == [[-1.2, 0.8]]  # -A clip(rho): -1 * 1.2 and +1 * 0.8


# ---------------------------------------------------------------- 2. balanced aggregation


def balanced_batch(seed, *, rows=10, width=9, advantages="mixed", averaged="all"):
    batch = make_batch(seed, rows=rows, width=width, empty_row=True, averaged=averaged)
    rng = random.Random(seed + 77)
    batch["values"] = [[rng.uniform(-2.0, 2.0) for _ in range(width)] for _ in range(rows)]
    if advantages == "positive":
        batch["adv"] = [
            [0.0 if rng.random() < 0.2 else rng.uniform(0.1, 2.0) for _ in range(width)] for _ in range(rows)
        ]
    elif advantages == "zero":
        batch["adv"] = [[0.0] * width for _ in range(rows)]
    return batch


def reference_balanced(batch) -> tuple[float, list[list[float]]]:
    """(S+ sum_{T+} l / |T+| + S- sum_{T-} l / |T-|) / (S+ + S-), loops; and d/d values."""
    avg, adv, values = batch["averaged_over"], batch["adv"], batch["values"]
    pos_tokens = neg_tokens = 0
    pos_rows, neg_rows = set(), set()
    pos_sum = neg_sum = 0.0
    for b in range(batch["rows"]):
        for t in range(batch["width"]):
            if not avg[b][t]:
                continue
            if adv[b][t] > 0:
                pos_tokens += 1
                pos_rows.add(b)
                pos_sum += values[b][t]
            elif adv[b][t] < 0:
                neg_tokens += 1
                neg_rows.add(b)
                neg_sum += values[b][t]
    s_pos, s_neg = len(pos_rows), len(neg_rows)
    grad = blank(batch)
    if s_pos + s_neg == 0:
        return 0.0, grad
    value = 0.0
    if pos_tokens:
        value += s_pos * pos_sum / pos_tokens
    if neg_tokens:
        value += s_neg * neg_sum / neg_tokens
    value /= s_pos + s_neg
    for b in range(batch["rows"]):
        for t in range(batch["width"]):
            if avg[b][t] and adv[b][t] > 0:
                grad[b][t] = s_pos / pos_tokens / (s_pos + s_neg)
            elif avg[b][t] and adv[b][t] < 0:
                grad[b][t] = s_neg / neg_tokens / (s_pos + s_neg)
    return value, grad


def balanced_of(batch, rows=None, den=None):
    rows = list(range(batch["rows"])) if rows is None else rows
    values = as_tensor([batch["values"][b] for b in rows]).requires_grad_(True)
    mask = as_tensor([batch["averaged_over"][b] for b in rows])
    advantages = as_tensor([batch["adv"][b] for b in rows])
    den = LossDenominators.of(mask, NORM_LENGTH, advantages) if den is None else den
    return AGGREGATIONS.get("balanced")(values, mask, den, advantages), values


@pytest.mark.parametrize("averaged", ["kept", "all"])
@pytest.mark.parametrize("seed", SEEDS)
def test_balanced_value_and_gradient(seed, averaged):
    batch = balanced_batch(seed, averaged=averaged)
    expected, expected_grad = reference_balanced(batch)
    scalar, values = balanced_of(batch)
    scalar.backward()
    close(scalar, torch.tensor(expected, dtype=torch.float64), "balanced value")
    close(values.grad, expected_grad, "balanced gradient")
    # the sides really differ in size: an aggregation that ignores them would not pass
    weights = {round(w, 12) for line in expected_grad for w in line if w}
    assert len(weights) == 2


@pytest.mark.parametrize("seed", SEEDS)
def test_balanced_denominators_count_the_mini_batch(seed):
    batch = balanced_batch(seed)
    avg, adv = batch["averaged_over"], batch["adv"]
    den = LossDenominators.of(as_tensor(avg), NORM_LENGTH, as_tensor(adv))
    positive = [(b, t) for b, t in cells(batch) if avg[b][t] and adv[b][t] > 0]
    negative = [(b, t) for b, t in cells(batch) if avg[b][t] and adv[b][t] < 0]
    assert den.positive_tokens == len(positive) and den.negative_tokens == len(negative)
    assert den.positive_sequences == len({b for b, _ in positive})
    assert den.negative_sequences == len({b for b, _ in negative})
    assert den.tokens == sum(map(sum, avg))
    assert den.sequences == sum(1 for line in avg if sum(line) > 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("split", ["random", "by-sign"])
def test_balanced_micro_batches_add_up(seed, split):
    """Micro-batches with the mini-batch's denominators add up to the mini-batch loss, even when
    one micro-batch holds only one side."""
    batch = balanced_batch(seed)
    rows = list(range(batch["rows"]))
    if split == "random":
        random.Random(seed).shuffle(rows)
        first, second = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    else:

        def has_negative(b):
            return any(batch["averaged_over"][b][t] and batch["adv"][b][t] < 0 for t in range(batch["width"]))

        first = [b for b in rows if not has_negative(b)]
        second = [b for b in rows if has_negative(b)]
        assert first and second
    den = LossDenominators.of(as_tensor(batch["averaged_over"]), NORM_LENGTH, as_tensor(batch["adv"]))
    whole, _ = balanced_of(batch)
    parts = balanced_of(batch, first, den)[0] + balanced_of(batch, second, den)[0]
    close(parts, whole, "micro-batches vs mini-batch")
    close(whole, torch.tensor(reference_balanced(batch)[0], dtype=torch.float64), "balanced value")
    # the other aggregations add up the same way
    for name in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        aggregate = AGGREGATIONS.get(name)

        def of(rows_):
            return aggregate(
                as_tensor([batch["values"][b] for b in rows_]),
                as_tensor([batch["averaged_over"][b] for b in rows_]),
                den,
                as_tensor([batch["adv"][b] for b in rows_]),
            )

        expected = sum(
            w * v
            for line_w, line_v in zip(aggregation_weights(name, batch), batch["values"])
            for w, v in zip(line_w, line_v)
        )
        close(of(first) + of(second), of(rows), f"{name} micro-batches")
        close(of(rows), torch.tensor(expected, dtype=torch.float64), f"{name} value")


@pytest.mark.parametrize("seed", SEEDS)
def test_balanced_all_positive_is_the_positive_token_mean(seed):
    batch = balanced_batch(seed, advantages="positive")
    positive = [(b, t) for b, t in cells(batch) if batch["averaged_over"][b][t] and batch["adv"][b][t] > 0]
    zero = [(b, t) for b, t in cells(batch) if batch["averaged_over"][b][t] and batch["adv"][b][t] == 0]
    assert positive and zero  # zero-advantage tokens weigh nothing, not even in the denominator
    expected = sum(batch["values"][b][t] for b, t in positive) / len(positive)
    scalar, values = balanced_of(batch)
    scalar.backward()
    close(scalar, torch.tensor(expected, dtype=torch.float64), "balanced, all positive")
    grad = blank(batch)
    for b, t in positive:
        grad[b][t] = 1.0 / len(positive)
    close(values.grad, grad, "balanced gradient, all positive")


def test_balanced_all_zero_is_zero_with_a_graph():
    batch = balanced_batch(0, advantages="zero")
    scalar, values = balanced_of(batch)
    assert scalar.dim() == 0 and scalar.item() == 0.0
    assert scalar.requires_grad
    scalar.backward()
    assert values.grad is not None and float(values.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------- 4. registry and end to end

DOCUMENTED_DEFAULTS = {
    "ppo_clip": dict(clip_low=0.2, clip_high=0.2, clip_ratio_c=None),
    "gspo": dict(clip_low=3e-4, clip_high=4e-4),  # GSPO §5.1
    "gspo_token": dict(clip_low=3e-4, clip_high=4e-4),
    "cispo": dict(clip_low=1.0, clip_high=0.28),  # no lower bound, as MiniMax-M1
    "ctpo": dict(c_low=0.025, c_high=0.05, power=0.5, c_dual=0.05),  # CTPO-LA
    "gmpo": dict(clip=0.4),  # GMPO §4: (e^-0.4, e^0.4)
}


def test_every_loss_is_registered_with_its_documented_defaults():
    assert set(DOCUMENTED_DEFAULTS) <= set(POLICY_LOSSES.names())
    for name, defaults in DOCUMENTED_DEFAULTS.items():
        entry = POLICY_LOSSES.get(name)
        assert entry.defaults() == defaults, name
        assert entry.source, name
        # the bound entry (what a recipe naming the loss gets) is the function at those defaults
        batch = case_batch(name, {}, 0)
        _, explicit = run_loss(name, batch, defaults)
        bound = entry.bind()(tensors(batch))
        close(bound.loss, explicit.loss, f"{name} bound with defaults")
    assert set(AGGREGATIONS.names()) >= {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "balanced"}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DEFAULTS))
def test_two_training_steps_with_each_loss(name, tmp_path, tiny_overrides):
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import run_recipe

    aggregation = (
        "balanced" if name == "ppo_clip" else "seq-mean-token-mean" if name in ("gspo", "gmpo") else "token-mean"
    )
    overrides = tiny_overrides + [
        "steps=2",
        f"logging.name={name}",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "scoring.workers=0",
        f"algorithm.policy_loss={name}",
        f"algorithm.loss_agg={aggregation}",
        # the tiny model never answers right: a length shaping gives rewards a spread, so advantages are not all 0
        "algorithm.length_penalty=overlong",
        "algorithm.length_penalty.buffer=20",
        # two optimizer steps per rollout batch: the second one is off-policy, its ratios are not 1
        "learner.mini_batch_prompts=2",
        "learner.micro_batch_size=4",
    ]
    recipe = load_recipe(RECIPES / "quickstart.yaml", overrides)
    assert recipe.algorithm.policy_loss.name == name and recipe.algorithm.policy_loss.params == {}
    run, summary = run_recipe(recipe)
    assert summary["steps_completed"] == 2
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    indicators = set(POLICY_LOSSES.get(name).bind()(tensors(case_batch(name, {}, 0))).indicators)
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        for side in indicators:
            assert 0.0 <= row[f"clip_ratio/{side}"] <= 1.0, side
    assert any(row["grad_norm"] > 0 for row in rows)
