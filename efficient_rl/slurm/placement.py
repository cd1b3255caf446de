"""What `efficient-rl submit --placement-only` runs in a job instead of the driver: where the
recipe's actors would land on the job's Ray cluster (cluster/placement_probe.py), printed and
written as JSON. The recipe is validated as `train` validates it; nothing is trained and the run
directory is not touched.

    python -m efficient_rl.slurm.placement RECIPE [key.path=value ...] --record FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from efficient_rl.config.placement import ROLES
from efficient_rl.errors import ConfigError


def gpu_list(ids) -> str:
    return ",".join(ids) if ids else "none"


def describe(seen: dict) -> list[str]:
    """The probe's findings as lines for the job's log: a line per node, then one per actor."""
    names = {node_id: node["slurm_node"] or node_id[:8] for node_id, node in seen["nodes"].items()}
    lines = [f"[efficient-rl] placement on {len(names)} Ray nodes (nothing trained):"]
    for node_id, node in sorted(seen["nodes"].items(), key=lambda item: names[item[0]]):
        lines.append(
            f"  node {names[node_id]}: Ray counts {node['cpus']:g} CPUs, {node['gpus']:g} GPUs; "
            f"Slurm's GPUs {node['slurm_gpus'] or 'none'}"
        )
    for actor, report in seen["actors"].items():
        lines.append(
            f"  {actor:<10} on {names.get(report['ray_node'], report['ray_node'][:8])}: Ray GPU ids "
            f"{gpu_list(report['gpu_ids'])}, CUDA_VISIBLE_DEVICES={report['cuda_visible_devices']}"
        )
    return lines


def probe(recipe_path: str, overrides: list[str]) -> dict:
    from efficient_rl.cluster.placement_probe import probe_placement
    from efficient_rl.cluster.runtime import start_ray
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.validate import validate

    recipe = load_recipe(recipe_path, overrides)
    plan = validate(recipe)
    if recipe.cluster.backend != "ray":
        raise ConfigError("cluster.backend: a placement probe places Ray actors; set cluster.backend=ray")
    session = start_ray(recipe.cluster.address, *plan.placement.totals())
    try:
        workers = {role: getattr(recipe.cluster, role).workers for role in ROLES}
        return probe_placement(plan.placement, workers, recipe.cluster.placement_timeout)
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--record", required=True, help="write what the probe saw to this JSON file")
    args = parser.parse_args(argv)
    try:
        seen = probe(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"efficient-rl: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(describe(seen)), flush=True)
    Path(args.record).write_text(json.dumps(seen, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
