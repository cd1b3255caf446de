"""A whole learner update against a plain hand-written PyTorch loop on the same batch (issue 34).

SmolLM2-135M-Instruct (vocabulary 49,152, hidden 576), float32, 8 rows of a 32-token prompt and a
224-token response (8 x 256 tokens), one optimizer step per update, PPO-clip 0.2 token-mean, no
KL, grad clip 1.0, AdamW. Three copies of the model take turns on the same batch, `--rounds` times after
one warm-up round; the figures are the medians and their ratios to the plain loop's:

- `plain`: logits of the response positions, float32 log_softmax, gather, PPO-clip, backward,
  clip, step: the loop one writes by hand (no entropy);
- `learner`: TorchLearner.update through the fused head at the recipe's default tiles (with the
  entropy it logs);
- `learner_one_tile`: the same with a vocabulary tile as wide as the vocabulary, so that the
  pass's tokens and the whole vocabulary are one tile whose log-probs the backward reuses.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learner_vs_plain.py --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch
from learner_precision import make_batch

from efficient_rl.algos.batch import RolloutBatch
from efficient_rl.learner.objective import ObjectiveSettings
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner
from efficient_rl.models.fused_head import HeadTiles
from efficient_rl.models.modeling import load_model, sequence_inputs
from efficient_rl.models.sources import model_directory

ROWS, PROMPT, RESPONSE, CLIP, LR = 8, 32, 224, 0.2, 1e-5


class PlainLoop:
    """The hand-written update: one forward, the PPO-clip token-mean loss, backward, step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        input_ids, attention_mask, position_ids = sequence_inputs(batch)
        width = batch.response_ids.shape[1]
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=width + 1
        ).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, batch.response_ids[..., None])[..., 0]
        ratio = torch.exp(logprobs - logprobs.detach())
        advantages = batch.advantages
        token_loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - CLIP, 1 + CLIP) * advantages)
        loss = (token_loss * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}


def learner(model: torch.nn.Module, tiles: HeadTiles) -> TorchLearner:
    settings = dataclasses.replace(ObjectiveSettings(), head_tiles=tiles)
    return TorchLearner(model, settings, OptimSettings(lr=LR, weight_decay=0.01, grad_clip=1.0, micro_batch_size=ROWS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load_model(model_directory("smollm2", "model"))
    vocab = model.config.vocab_size
    batch = make_batch(vocab, ROWS, PROMPT, RESPONSE, shortest=RESPONSE)  # every row 256 tokens
    arms = {
        "plain": PlainLoop(copy.deepcopy(model)),
        "learner": learner(copy.deepcopy(model), HeadTiles()),
        "learner_one_tile": learner(model, HeadTiles(tokens=ROWS * RESPONSE, vocab=vocab)),
    }
    times = {name: [] for name in arms}
    for round_ in range(args.rounds + 1):  # round 0: warm-up, and the arms' first losses side by side
        for name, arm in arms.items():
            started = time.perf_counter()
            metrics = arm.update(batch)
            if round_:
                times[name].append(time.perf_counter() - started)
            else:
                print(f"{name}: first loss {metrics['loss']:.6f}, grad norm {metrics['grad_norm']:.6f}", flush=True)
    tokens = int(batch.response_mask.sum())
    print(f"{tokens} response tokens of {ROWS} rows, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| update | median s | x plain | seconds |\n|---|---|---|---|")
    plain = statistics.median(times["plain"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.2f} | {median / plain:.3f} | {', '.join(f'{s:.2f}' for s in seconds)} |")


if __name__ == "__main__":
    main()
