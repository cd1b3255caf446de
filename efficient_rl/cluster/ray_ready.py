"""Wait until a Ray cluster reports the expected nodes and resources: what a Slurm job does
between starting Ray and starting the driver, instead of a fixed `sleep`. It talks to Ray, so it
lives in the Ray layer (cluster/), not beside the Slurm code that renders the job script.

    python -m efficient_rl.cluster.ray_ready --address HOST:PORT --nodes N [--cpus C] [--gpus G]
        [--timeout S] [--record FILE]

Exits 0 once the cluster is complete (and writes what it saw to FILE), 1 at the timeout with a
line saying what was missing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def cluster_view() -> dict:
    import ray

    alive = [node for node in ray.nodes() if node["Alive"]]
    resources = ray.cluster_resources()
    return {
        "nodes": len(alive),
        "node_addresses": sorted(n["NodeManagerAddress"] for n in alive),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def missing(view: dict, nodes: int, cpus: float, gpus: float) -> str:
    """What the cluster still lacks, or "" once it has everything."""
    wanted = (("nodes", nodes), ("cpus", cpus), ("gpus", gpus))
    return ", ".join(f"{name} {view[name]:g} of {count:g}" for name, count in wanted if view[name] < count)


def wait_for_cluster(address: str, nodes: int, cpus: float, gpus: float, timeout: float) -> dict:
    started = time.time()
    deadline = started + timeout
    while not port_open(address):  # the head's GCS is not listening yet
        if time.time() > deadline:
            raise TimeoutError(f"no Ray head answered at {address} within {timeout:g} s")
        time.sleep(0.5)
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        while lacking := missing(view := cluster_view(), nodes, cpus, gpus):
            if time.time() > deadline:
                raise TimeoutError(f"Ray cluster at {address} incomplete after {timeout:g} s: {lacking}")
            time.sleep(0.5)
    finally:
        ray.shutdown()
    return {**view, "seconds": round(time.time() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--cpus", type=float, default=0.0)
    parser.add_argument("--gpus", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--record", help="write what the cluster reported to this JSON file")
    args = parser.parse_args()
    try:
        view = wait_for_cluster(args.address, args.nodes, args.cpus, args.gpus, args.timeout)
    except TimeoutError as err:
        print(f"ray_ready: {err}", file=sys.stderr)
        return 1
    print(
        f"[efficient-rl] Ray cluster ready after {view['seconds']} s: {view['nodes']} nodes, "
        f"{view['cpus']:g} CPUs, {view['gpus']:g} GPUs",
        flush=True,
    )
    if args.record:
        Path(args.record).write_text(json.dumps(view, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
