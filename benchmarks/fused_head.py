"""The learner's log-prob head side by side (issue 34): peak memory and time of one forward and
backward of log p(token) (and the entropy where the head gives it) for N tokens, hidden 576 and a
vocabulary V, each point in a fresh process:

- `token_logprobs`: the former path, [N, V] logits then TokenLogprobs (with the entropy);
- `fused`: efficient_rl/models/fused_head.py at the recipe's default tiles (with the entropy);
- `trl_selective`: [N, V] logits then TRL's `selective_log_softmax` (log-probs only; TRL is
  imported from --trl-path, e.g. `pip install --no-deps --target /tmp/trlpkgs trl==1.16.0`);
- `plain`: [N, V] logits, log_softmax, gather: the hand-written head (log-probs only).

Peak memory is the process's peak resident set above its resident set once the inputs exist.
A point whose estimated [N x V] buffers exceed --max-gib is left out (the machine's memory).
With --timing R, each point is one process instead, in which the heads take turns R times after
a warm-up turn: median seconds, and their ratio to `plain`'s (no memory figures).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_head.py --trl-path /tmp/trlpkgs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_head.py --timing 3 --tokens 2048 --vocab 49152 \
        --heads plain token_logprobs fused
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 576
# float32 [N x V] buffers each head holds at its peak (measured: issue 34), for --max-gib
NV_BUFFERS = {"token_logprobs": 5.5, "trl_selective": 3.5, "fused": 0.0, "plain": 4.0}


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def head_call(name: str):
    """(hidden, weight, targets) -> the tensors whose sum is backpropagated."""
    import torch

    if name == "fused":
        from efficient_rl.models.fused_head import fused_token_logprobs

        return lambda h, w, t: fused_token_logprobs(h, w, None, t, 1.0, True)
    if name == "token_logprobs":
        from efficient_rl.models.modeling import token_logprobs_and_entropy

        return lambda h, w, t: token_logprobs_and_entropy(h @ w.T, t, 1.0, True)[:1]
    if name == "plain":
        return lambda h, w, t: (torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None]),)
    from trl.trainer.utils import selective_log_softmax

    return lambda h, w, t: (selective_log_softmax(h @ w.T, t),)


def head_inputs(tokens: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=generator) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)  # as a learner's exist
    return hidden, weight, targets


def forward_backward(call, inputs) -> float:
    started = time.perf_counter()
    outputs = call(*inputs)
    sum(output.sum() for output in outputs if output is not None).backward()
    return time.perf_counter() - started


def run_point(name: str, tokens: int, vocab: int) -> dict:
    call, inputs = head_call(name), head_inputs(tokens, vocab)
    baseline = resident_bytes()
    seconds = forward_backward(call, inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"head": name, "tokens": tokens, "vocab": vocab, "peak_gib": (peak - baseline) / 2**30, "seconds": seconds}


def time_point(names: list[str], tokens: int, vocab: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each head's forward and backward, the heads taking turns; the first turn dropped."""
    calls, inputs = {name: head_call(name) for name in names}, head_inputs(tokens, vocab)
    times = {name: [] for name in names}
    for _ in range(rounds + 1):
        for name, call in calls.items():
            times[name].append(forward_backward(call, inputs))
    return {name: seconds[1:] for name, seconds in times.items()}


def print_timing(args, env) -> None:
    import statistics

    print("| vocab | tokens | head | median s | x plain | seconds |\n|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for tokens in args.tokens:
            child = [sys.executable, __file__, "--timing", str(args.timing), "--heads", *args.heads]
            child += ["--child", "all", str(tokens), str(vocab)]
            done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            times = json.loads(done.stdout.splitlines()[-1])
            plain = statistics.median(times["plain"]) if "plain" in times else math.nan
            for name, seconds in times.items():
                median = statistics.median(seconds)
                runs = ", ".join(f"{s:.2f}" for s in seconds)
                print(f"| {vocab} | {tokens} | {name} | {median:.2f} | {median / plain:.2f} | {runs} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--heads", nargs="+", default=list(NV_BUFFERS))
    parser.add_argument("--max-gib", type=float, default=9.0)
    parser.add_argument("--trl-path", default=None)
    parser.add_argument("--timing", type=int, default=0, metavar="ROUNDS")
    parser.add_argument("--child", nargs=3, metavar=("HEAD", "TOKENS", "VOCAB"))
    args = parser.parse_args()
    if args.child and args.timing:
        print(json.dumps(time_point(args.heads, int(args.child[1]), int(args.child[2]), args.timing)))
        return
    if args.child:
        print(json.dumps(run_point(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), args.trl_path]))}
    if args.timing:
        print_timing(args, env)
        return
    print("| vocab | tokens | head | peak GiB | seconds |\n|---|---|---|---|---|")
    for vocab in args.vocab:
        for tokens in args.tokens:
            for name in args.heads:
                if NV_BUFFERS[name] * 4 * tokens * vocab / 2**30 > args.max_gib:
                    print(f"| {vocab} | {tokens} | {name} | not run (> {args.max_gib:g} GiB) | |", flush=True)
                    continue
                child = [sys.executable, __file__, "--child", name, str(tokens), str(vocab)]
                done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
                point = json.loads(done.stdout.splitlines()[-1])
                print(f"| {vocab} | {tokens} | {name} | {point['peak_gib']:.3f} | {point['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
