"""Weight-sync time against model size: bucketed vs one call per parameter, side by side.

For each model size a Qwen2 with random weights (the lab tokenizer) gets a Ray learner actor and a
vLLM-CPU rollout actor; the learner's weights are then synced to the engine `--rounds` times in
each mode, alternating: buckets of `cluster.sync_bucket_mb` (64 MB) and one message per
parameter (bucket size 0). The figure is the ratio of median sync times.

    .venv/bin/python benchmarks/weight_sync.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
# (hidden size, layers, MLP width, attention heads). 28 layers is the depth of Qwen2.5-1.5B/7B:
# 339 tensors. The last shape has the size of the third with a quarter of its tensors.
SIZES = [(128, 3, 384, 4), (256, 28, 768, 4), (512, 28, 1536, 8), (1024, 8, 3072, 16)]
MODES = {"bucketed (64 MB)": 64 * 2**20, "per parameter": 0}


def make_model(directory: Path, hidden: int, layers: int, mlp: int, heads: int) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from efficient_rl.data.prompts import load_tokenizer
    from efficient_rl.lab.build import lab_model_dir

    tokenizer = load_tokenizer(lab_model_dir("quickstart"))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def sync_components(directory: Path, overrides: tuple[str, ...] = ()):
    """A Ray learner actor and one vLLM-CPU rollout actor, both on the model in `directory`."""
    from efficient_rl.cluster.ray_backend import ray_components
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.validate import validate

    recipe = load_recipe(
        ROOT / "efficient_rl" / "recipes" / "quickstart.yaml",
        [
            f"model.path={directory}",
            "model.lab=null",
            "cluster.backend=ray",
            "rollout.engine=vllm",
            "rollout.max_prompt_length=64",
            "rollout.max_response_length=64",
            "eval.max_new_tokens=64",
            *overrides,
        ],
    )
    return ray_components(validate(recipe), SimpleNamespace(model_dir=directory, base_model_dir=directory))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from efficient_rl.cluster.runtime import start_ray

    session = start_ray(None, cpus=2, gpus=0)  # one cluster for every size
    rows = []
    try:
        for hidden, layers, mlp, heads in SIZES:
            directory = Path(tempfile.mkdtemp(prefix="erl-sync-"))
            params = make_model(directory, hidden, layers, mlp, heads)
            parts = sync_components(directory)
            try:
                times = {mode: [] for mode in MODES}
                loads, tensors = [], 0
                for _ in range(args.rounds):
                    for mode, bucket_bytes in MODES.items():
                        parts.engine.transport.bucket_bytes = bucket_bytes
                        metrics = parts.engine.sync_weights(parts.learner)
                        times[mode].append(metrics["sync/seconds"])
                        loads.append(metrics["sync/load_seconds"])
                        tensors = max(tensors, int(metrics["sync/buckets"]))
            finally:
                parts.close()
                shutil.rmtree(directory, ignore_errors=True)
            medians = {mode: statistics.median(values) for mode, values in times.items()}
            rows.append((params, metrics["sync/bytes"], tensors, medians, statistics.median(loads)))
    finally:
        session.close()
    print(f"median of {args.rounds} syncs each, learner actor -> one vLLM-CPU actor")
    print(
        f"{'parameters':>12s} {'MB':>8s} {'tensors':>8s} "
        + " ".join(f"{m:>18s}" for m in MODES)
        + f" {'ratio':>7s} {'engine load':>12s}"
    )
    for params, nbytes, tensors, medians, load in rows:
        bucketed, per_param = medians.values()
        print(
            f"{params:12,d} {nbytes / 2**20:8.1f} {tensors:8d} "
            + " ".join(f"{s:17.3f}s" for s in medians.values())
            + f" {per_param / bucketed:6.2f}x {load:11.3f}s"
        )


if __name__ == "__main__":
    main()
