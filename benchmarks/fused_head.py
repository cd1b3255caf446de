"""The learner's log-prob head side by side (issue 34): peak memory and time of one forward and
backward of log p(token) (and the entropy where the head gives it) for N tokens, hidden 576 and a
vocabulary V, each point in a fresh process:

- `token_logprobs`: the former path, [N, V] logits then TokenLogprobs (with the entropy);
- `fused`: efficient_rl/models/fused_head.py at the recipe's default tiles (with the entropy);
- `trl_selective`: [N, V] logits then TRL's `selective_log_softmax` (log-probs only; TRL is
  imported from --trl-path, e.g. `pip install --no-deps --target /tmp/trlpkgs trl==1.16.0`).

Peak memory is the process's peak resident set above its resident set once the inputs exist.
A point whose estimated [N x V] buffers exceed --max-gib is left out (the machine's memory).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_head.py --trl-path /tmp/trlpkgs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 576
# float32 [N x V] buffers each head holds at its peak (measured: issue 34), for --max-gib
NV_BUFFERS = {"token_logprobs": 5.5, "trl_selective": 3.5, "fused": 0.0}


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def head_call(name: str):
    """(hidden, weight, targets) -> the tensors whose sum is backpropagated."""

    if name == "fused":
        from efficient_rl.models.fused_head import fused_token_logprobs

        return lambda h, w, t: fused_token_logprobs(h, w, None, t, 1.0, True)
    if name == "token_logprobs":
        from efficient_rl.models.modeling import token_logprobs_and_entropy

        return lambda h, w, t: token_logprobs_and_entropy(h @ w.T, t, 1.0, True)[:1]
    from trl.trainer.utils import selective_log_softmax

    return lambda h, w, t: (selective_log_softmax(h @ w.T, t),)


def run_point(name: str, tokens: int, vocab: int) -> dict:
    import torch

    call = head_call(name)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=generator) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)  # as a learner's exist
    baseline = resident_bytes()
    started = time.perf_counter()
    outputs = call(hidden, weight, targets)
    sum(output.sum() for output in outputs if output is not None).backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"head": name, "tokens": tokens, "vocab": vocab, "peak_gib": (peak - baseline) / 2**30, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--heads", nargs="+", default=list(NV_BUFFERS))
    parser.add_argument("--max-gib", type=float, default=9.0)
    parser.add_argument("--trl-path", default=None)
    parser.add_argument("--child", nargs=3, metavar=("HEAD", "TOKENS", "VOCAB"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_point(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), args.trl_path]))}
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
