"""`efficient-rl submit RECIPE [overrides] --nodes N --gpus-per-node G --time T ...`

Checks the request against the partition (sinfo) and the recipe's resources, renders
efficient_rl/slurm/job.sbatch with the site profile, and submits it with sbatch. Every check runs before
anything is written or submitted; `--dry-run` prints the script instead of submitting it.

runs/slurm/<run name>/      the job directory (next to the run directory runs/<run name>/)
  <job id>.out              the job's log (every attempt of a requeued job appends to it)
  <job id>.sbatch           the script as submitted
  ray-cluster-<job id>.json what the job's Ray cluster reported once complete
  submissions.jsonl         one line per submission, read by `efficient-rl jobs`
  placement-<job id>.json   with --placement-only: where each actor landed and what it saw
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from efficient_rl.config.placement import resolve_placement
from efficient_rl.config.rules import as_flag, check_numbers
from efficient_rl.config.schema import Recipe
from efficient_rl.errors import ConfigError

SLURM_DIR = Path(__file__).resolve().parent  # the template and site profiles ship inside the package
TEMPLATE = SLURM_DIR / "job.sbatch"
SITES_DIR = SLURM_DIR / "sites"
DEFAULT_WARNING_SECONDS = 300  # the time-limit warning: time enough to finish a step and checkpoint


# ---------------------------------------------------------------- site profiles
@dataclass
class SiteProfile:
    """What differs between clusters, kept out of the template (docs/slurm.md, "Site profile")."""

    name: str = "default"
    partition: str | None = None  # used when --partition is not given
    account: str | None = None  # used when --account is not given
    env: dict[str, str] = field(default_factory=dict)  # exported first
    setup: list[str] = field(default_factory=list)  # shell lines: module load, source an environment
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. "--constraint=a100"
    python: str | None = None  # the interpreter on the compute nodes; default: the one running submit
    ray_args: list[str] = field(default_factory=list)  # extra `ray start` options on every node
    ray_ready_timeout: float = 300.0  # seconds for the Ray cluster to report every node


def load_site(reference: str | None) -> SiteProfile:
    """A site profile: a YAML file, a name in efficient_rl/slurm/sites/, $EFFICIENT_RL_SITE, or the defaults."""
    reference = reference or os.environ.get("EFFICIENT_RL_SITE")
    if not reference:
        return SiteProfile()
    path = Path(reference)
    if not path.is_file():
        path = SITES_DIR / f"{reference}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SITES_DIR.glob("*.yaml")))
        raise ConfigError(f"--site {reference}: no such file, and not a shipped profile ({shipped})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a site profile is a mapping of settings")
    known = {f.name: f.type for f in fields(SiteProfile)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown site setting '{key}' (known: {', '.join(known)})")
        expected = {"env": dict, "setup": list, "sbatch": list, "ray_args": list}.get(key)
        if expected is not None and not isinstance(value, expected):
            raise ConfigError(f"{path}: '{key}' must be a {expected.__name__}, got {type(value).__name__}")
    profile = SiteProfile(**{"name": path.stem, **raw})
    profile.env = {str(k): str(v) for k, v in profile.env.items()}
    return profile


# ---------------------------------------------------------------- the request
@dataclass
class JobRequest:
    nodes: int
    gpus_per_node: int
    cpus_per_node: int | None
    time_limit: str
    partition: str | None
    account: str | None
    job_name: str | None
    max_requeues: int
    warning_seconds: int | None
    first_attempt_mode: str  # "", "--resume" or "--overwrite"
    placement_only: bool = False  # the job probes where the actors land instead of training


TIME_FORMATS = [  # Slurm's --time forms and the seconds per field
    (r"(\d+)", (60,)),
    (r"(\d+):(\d+)", (60, 1)),
    (r"(\d+):(\d+):(\d+)", (3600, 60, 1)),
    (r"(\d+)-(\d+)", (86400, 3600)),
    (r"(\d+)-(\d+):(\d+)", (86400, 3600, 60)),
    (r"(\d+)-(\d+):(\d+):(\d+)", (86400, 3600, 60, 1)),
]


def time_limit_seconds(text: str) -> int:
    for pattern, units in TIME_FORMATS:
        match = re.fullmatch(pattern, text.strip())
        if match:
            seconds = sum(int(value) * unit for value, unit in zip(match.groups(), units))
            if seconds <= 0:
                break
            return seconds
    raise ConfigError(f"--time {text}: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]] (more than zero)")


def warning_seconds(request: JobRequest) -> int:
    """When the job asks for its warning: by default 5 minutes, but at most half the time limit."""
    limit = time_limit_seconds(request.time_limit)
    if request.warning_seconds is None:
        return min(DEFAULT_WARNING_SECONDS, limit // 2)
    if not 0 < request.warning_seconds < limit:
        raise ConfigError(
            f"--warning {request.warning_seconds}: expected seconds between 0 and the time limit ({limit} s)"
        )
    return request.warning_seconds


# ---------------------------------------------------------------- what the partition has
@dataclass
class Partition:
    name: str
    node_cpus: list[int]
    node_gpus: list[int]


def gpus_in(gres: str) -> int:
    """GPUs in a node's GRES string: 'gpu:4', 'gpu:a100:4(S:0-1)', 'gpu:2,shard:8', '(null)'."""
    return sum(int(count) for count in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def query_partition(name: str | None) -> Partition:
    """The partition's nodes from sinfo; the default partition (marked '*') when name is None."""
    result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%G"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(
            f"sinfo failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
        )
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 3]
    partitions = sorted({p.rstrip("*") for _, p, _, _ in rows})
    if name is None:
        defaults = sorted({p.rstrip("*") for _, p, _, _ in rows if p.endswith("*")})
        if not defaults:
            raise ConfigError(
                f"--partition: the cluster has no default partition; choose one of {', '.join(partitions)}"
            )
        name = defaults[0]
    nodes = {node: (int(cpus), gpus_in(gres)) for node, p, cpus, gres in rows if p.rstrip("*") == name}
    if not nodes:
        raise ConfigError(f"--partition {name}: no such partition (sinfo lists: {', '.join(partitions) or 'none'})")
    return Partition(name, [c for c, _ in nodes.values()], [g for _, g in nodes.values()])


def check_partition(request: JobRequest, partition: Partition) -> int:
    """The request fits the partition; returns the CPUs per node to ask for."""
    count = len(partition.node_cpus)
    if request.nodes > count:
        raise ConfigError(f"--nodes {request.nodes}: partition {partition.name} has {count} nodes")
    with_gpus = sum(g >= request.gpus_per_node for g in partition.node_gpus)
    if with_gpus < request.nodes:
        raise ConfigError(
            f"--gpus-per-node {request.gpus_per_node}: partition {partition.name} has "
            f"{with_gpus} nodes with that many GPUs (most: {max(partition.node_gpus)}), "
            f"{request.nodes} asked for"
        )
    cpus = request.cpus_per_node or min(partition.node_cpus)
    with_cpus = sum(c >= cpus for c in partition.node_cpus)
    if with_cpus < request.nodes:
        raise ConfigError(
            f"--cpus-per-node {cpus}: partition {partition.name} has {with_cpus} nodes with that "
            f"many CPUs (most: {max(partition.node_cpus)}), {request.nodes} asked for"
        )
    return cpus


# ---------------------------------------------------------------- what the recipe needs
def recipe_needs(recipe: Recipe) -> tuple[float, float, float, float]:
    """(CPUs, GPUs) for all of the recipe's Ray actors, and the most one bundle of them needs (a
    node must hold it): the placement the run itself resolves (config/placement.py)."""
    placement = resolve_placement(recipe.cluster)
    return (*placement.totals(), *placement.largest_bundle())


def check_recipe_fits(recipe: Recipe, request: JobRequest, cpus_per_node: int) -> None:
    if recipe.cluster.backend != "ray":
        if request.nodes > 1:
            raise ConfigError(
                f"--nodes {request.nodes}: the recipe runs in one process (cluster.backend="
                f"{recipe.cluster.backend}); ask for --nodes 1 or set cluster.backend=ray"
            )
        return
    cpus, gpus, actor_cpus, actor_gpus = recipe_needs(recipe)
    if request.gpus_per_node > 0 and gpus == 0:
        # Ray would start every actor with num_gpus=0: no GPU visible to it, or (Ray versions
        # differ) every GPU, with each rank on cuda:0.
        raise ConfigError(
            f"--gpus-per-node {request.gpus_per_node}: the recipe's actors ask for no GPU (cluster.rollout.gpus and "
            "cluster.learner.gpus are 0); give each its share, e.g. cluster.rollout.gpus=1 cluster.learner.gpus=1"
        )
    have_cpus, have_gpus = request.nodes * cpus_per_node, request.nodes * request.gpus_per_node
    if cpus > have_cpus or gpus > have_gpus:
        raise ConfigError(
            f"the recipe's actors need {cpus:g} CPUs and {gpus:g} GPUs (cluster.rollout, "
            f"cluster.learner); {request.nodes} nodes x {cpus_per_node} CPUs x "
            f"{request.gpus_per_node} GPUs give {have_cpus} and {have_gpus}"
        )
    if actor_cpus > cpus_per_node or actor_gpus > request.gpus_per_node:
        raise ConfigError(
            f"one actor needs {actor_cpus:g} CPUs and {actor_gpus:g} GPUs, more than a node "
            f"gives ({cpus_per_node} CPUs, {request.gpus_per_node} GPUs)"
        )


def check_placement_only(recipe: Recipe) -> None:
    if recipe.cluster.backend != "ray":
        raise ConfigError(
            f"--placement-only: the recipe runs in one process (cluster.backend={recipe.cluster.backend}), "
            "with no actors to place; set cluster.backend=ray"
        )


def check_run_directory(recipe: Recipe, request: JobRequest) -> Path:
    from efficient_rl.run.checkpoint import latest_checkpoint

    run_dir = (Path(recipe.logging.output_dir) / recipe.logging.name).resolve()
    if request.placement_only:  # the probe leaves the run directory alone, whatever it holds
        return run_dir
    if request.first_attempt_mode == "--resume" and latest_checkpoint(run_dir) is None:
        raise ConfigError(f"{run_dir}: nothing to resume (no checkpoint in {run_dir / 'checkpoints'})")
    if not request.first_attempt_mode and run_dir.exists():
        raise ConfigError(f"{run_dir}: run directory exists; pass --resume to continue it or --overwrite to replace it")
    return run_dir


# ---------------------------------------------------------------- the script
def render(template: str, values: dict[str, str]) -> str:
    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise ConfigError(f"{TEMPLATE}: unknown placeholder {{{{{match.group(1)}}}}}")
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", fill, template)


def sbatch_lines(request: JobRequest, site: SiteProfile, cpus_per_node: int, job_dir: Path, run_name: str) -> list[str]:
    options = [
        f"--job-name=erl-{request.job_name or run_name}",
        f"--nodes={request.nodes}",
        "--ntasks-per-node=1",  # one Ray node per Slurm node
        f"--cpus-per-task={cpus_per_node}",
        f"--time={request.time_limit}",
        f"--output={job_dir}/%j.out",
        "--open-mode=append",  # a requeued attempt adds to the same log
        "--requeue",
        f"--signal=B:USR1@{warning_seconds(request)}",
        f"--chdir={Path.cwd()}",
    ]
    if request.gpus_per_node:
        options.append(f"--gpus-per-node={request.gpus_per_node}")
    if request.partition or site.partition:
        options.append(f"--partition={request.partition or site.partition}")
    if request.account or site.account:
        options.append(f"--account={request.account or site.account}")
    return [f"#SBATCH {option}" for option in options + site.sbatch]


def job_script(
    recipe_path: Path,
    overrides: list[str],
    recipe: Recipe,
    request: JobRequest,
    site: SiteProfile,
    cpus_per_node: int,
    run_dir: Path,
    job_dir: Path,
) -> str:
    use_ray = recipe.cluster.backend == "ray"
    train_args = [str(recipe_path.resolve()), *overrides] + (["cluster.address=auto"] if use_ray else [])
    setup = [f"export {key}={shlex.quote(value)}" for key, value in site.env.items()] + site.setup
    return render(
        TEMPLATE.read_text(),
        {
            "site": site.name,
            "sbatch_lines": "\n".join(sbatch_lines(request, site, cpus_per_node, job_dir, run_dir.name)),
            "site_setup": "\n".join(setup) or "# (none)",
            "python": shlex.quote(site.python or sys.executable),
            "run_dir": shlex.quote(str(run_dir)),
            "job_dir": shlex.quote(str(job_dir)),
            "use_ray": "1" if use_ray else "0",
            "placement_only": "1" if request.placement_only else "0",
            "ray_ready_timeout": f"{site.ray_ready_timeout:g}",
            "ray_args": " ".join(shlex.quote(arg) for arg in site.ray_args),
            "max_requeues": str(request.max_requeues),
            "train_args": " ".join(shlex.quote(arg) for arg in train_args),
            "first_attempt_mode": request.first_attempt_mode,
        },
    )


# ---------------------------------------------------------------- submission
def job_directory(run_dir: Path) -> Path:
    return run_dir.parent / "slurm" / run_dir.name


def submit(script: str, job_dir: Path, record: dict) -> str:
    """sbatch the script; keep it and a line about the submission in the job directory."""
    job_dir.mkdir(parents=True, exist_ok=True)  # the log goes here as soon as the job starts
    pending = job_dir / f".pending-{os.getpid()}.sbatch"
    pending.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(pending)], capture_output=True, text=True)
    if result.returncode != 0:
        pending.unlink()
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        raise ConfigError(f"sbatch refused the job: {reason}")
    job_id = result.stdout.strip().split(";")[0]
    pending.rename(job_dir / f"{job_id}.sbatch")
    with open(job_dir / "submissions.jsonl", "a") as out:
        out.write(json.dumps({"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")
    return job_id


@dataclass
class SubmitOptions:
    """What `submit` asks Slurm for besides the recipe: its command-line options, with their
    defaults (the option parser and a study's `slurm:` section both read them from here)."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None  # default: what the partition's nodes have
    time: str = "1:00:00"
    partition: str | None = None
    account: str | None = None
    site: str | None = None
    job_name: str | None = None
    max_requeues: int = 10
    warning: int | None = None


# Where each number of a Slurm request may lie (config/rules.py's notation): `submit`'s flags and
# a study's slurm section.
SUBMIT_NUMBER_RULES = {
    "nodes": "[1, inf)",
    "gpus_per_node": "[0, inf)",
    "cpus_per_node": "[1, inf)",
    "max_requeues": "[0, inf)",
    "warning": ("[1, inf)", "seconds"),
}


@dataclass
class Submission:
    """A job checked and rendered, not yet submitted."""

    script: str
    run_dir: Path
    job_dir: Path
    record: dict


def prepare_submission(
    recipe_path: Path,
    overrides: list[str],
    options: SubmitOptions,
    mode: str = "",
    dry_run: bool = False,
    recipe: Recipe | None = None,
    placement_only: bool = False,
) -> Submission:
    """Every check submit makes, then the script; nothing written. `mode`: "", "--resume" or
    "--overwrite" for the first attempt. `placement_only`: the job shows where the actors land and
    trains nothing (cluster/placement_probe.py)."""
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.validate import validate

    check_numbers(options, SUBMIT_NUMBER_RULES, named=as_flag)
    recipe = recipe or load_recipe(recipe_path, overrides)
    validate(recipe)  # what `train` would refuse, refused before the job queues
    site = load_site(options.site)
    request = JobRequest(
        nodes=options.nodes,
        gpus_per_node=options.gpus_per_node,
        cpus_per_node=options.cpus_per_node,
        time_limit=options.time,
        partition=options.partition,
        account=options.account,
        job_name=options.job_name,
        max_requeues=options.max_requeues,
        warning_seconds=options.warning,
        first_attempt_mode=mode,
        placement_only=placement_only,
    )
    if placement_only:
        check_placement_only(recipe)
    warning_seconds(request)  # checks --time and --warning
    if not dry_run and shutil.which("sbatch") is None:
        raise ConfigError(
            "sbatch: not found on this machine; submit from a Slurm login node (or try --dry-run to see the script)"
        )
    if dry_run:  # the script for the request as given: the cluster is not consulted
        cpus_per_node = request.cpus_per_node or max(1, math.ceil(recipe_needs(recipe)[0] / request.nodes))
    else:
        cpus_per_node = check_partition(request, query_partition(request.partition or site.partition))
    check_recipe_fits(recipe, request, cpus_per_node)
    run_dir = check_run_directory(recipe, request)
    job_dir = job_directory(run_dir)
    script = job_script(recipe_path, overrides, recipe, request, site, cpus_per_node, run_dir, job_dir)
    return Submission(
        script,
        run_dir,
        job_dir,
        {
            "recipe": str(recipe_path),
            "overrides": overrides,
            "run_dir": str(run_dir),
            "nodes": request.nodes,
            "site": site.name,
            **({"placement_only": True} if placement_only else {}),
        },
    )


def cmd_submit(args) -> int:
    options = SubmitOptions(**{name: getattr(args, name) for name in (f.name for f in fields(SubmitOptions))})
    mode = "--resume" if args.resume else "--overwrite" if args.overwrite else ""
    from efficient_rl.config.shipped import resolve_recipe

    prepared = prepare_submission(
        resolve_recipe(args.recipe),
        args.overrides,
        options,
        mode,
        dry_run=args.dry_run,
        placement_only=args.placement_only,
    )
    if args.dry_run:
        print(prepared.script, end="")
        return 0
    job_id = submit(prepared.script, prepared.job_dir, prepared.record)
    run_dir = prepared.run_dir
    what = f"placement of run {run_dir.name}'s actors" if args.placement_only else f"run {run_dir}"
    print(
        f"submitted job {job_id}: {what}\n  log: {prepared.job_dir / f'{job_id}.out'}\n"
        f"  follow: efficient-rl jobs --runs {run_dir.parent} --follow {job_id}"
    )
    return 0


def add_parser(commands) -> None:
    submit_parser = commands.add_parser(
        "submit", help="submit a recipe to Slurm: efficient-rl submit RECIPE [key.path=value ...] --nodes N --time T"
    )
    submit_parser.add_argument("recipe", help="recipe: a YAML file, or a shipped recipe's name")
    submit_parser.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    defaults = SubmitOptions()
    submit_parser.add_argument("--nodes", type=int, default=defaults.nodes)
    submit_parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    submit_parser.add_argument("--cpus-per-node", type=int, help="default: what the partition's nodes have")
    submit_parser.add_argument(
        "--time", default=defaults.time, help=f"time limit, Slurm's format (default {defaults.time})"
    )
    submit_parser.add_argument("--partition", help="default: the site profile's, else the cluster's default")
    submit_parser.add_argument("--account", help="default: the site profile's")
    submit_parser.add_argument(
        "--site", help="site profile: a YAML file or a name in efficient_rl/slurm/sites/ (default: $EFFICIENT_RL_SITE)"
    )
    submit_parser.add_argument("--job-name", help="default: erl-<run name>")
    submit_parser.add_argument(
        "--max-requeues",
        type=int,
        default=defaults.max_requeues,
        help="restarts after time-limit checkpoints before the job gives up",
    )
    submit_parser.add_argument(
        "--warning",
        type=int,
        help="seconds before the time limit at which the run checkpoints (default 300, at most half the limit)",
    )
    submit_parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submit_parser.add_argument(
        "--placement-only",
        action="store_true",
        help="the job starts Ray, shows where each actor lands and which GPUs it sees, and trains nothing",
    )
    mode = submit_parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    submit_parser.set_defaults(handler=cmd_submit)
