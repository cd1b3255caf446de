"""`efficient-rl submit` and `jobs` against a real Slurm: slurm/local-cluster.sh brings up a
controller and two nodes on this machine for this module and takes them down afterwards."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT, TINY_OVERRIDES

CLUSTER_SCRIPT = ROOT / "slurm" / "local-cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The local cluster; SLURM_CONF points the Slurm commands (and the CLI under test) at it."""
    env = {**os.environ, "ERL_SLURM_DIR": str(tmp_path_factory.mktemp("slurm"))}
    subprocess.run([str(CLUSTER_SCRIPT), "up"], env=env, check=True, capture_output=True, text=True)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(Path(env["ERL_SLURM_DIR"]) / "slurm.conf")
    yield
    subprocess.run([str(CLUSTER_SCRIPT), "down"], env=env, check=True, capture_output=True)
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous


def cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "efficient_rl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def submit(tmp_path, *args) -> str:
    result = cli("submit", *args, "--site", "local", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def job_state(job_id: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def wait_for(job_id: str, done, timeout: float, what: str) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if done(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: no {what} within {timeout} s; last state {job_state(job_id)}")


def finished(job_id: str, timeout: float = 300) -> dict:
    return wait_for(job_id, lambda s: s.get("JobState") in TERMINAL, timeout, "end")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def quiet(tmp_path, steps: int) -> list[str]:
    return TINY_OVERRIDES + [
        f"logging.output_dir={tmp_path / 'runs'}",
        f"steps={steps}",
        "logging.trackers=[]",
        "eval.before_training=false",
        "eval.after_training=false",
    ]


def test_quickstart_on_two_nodes_runs_ray_across_both(slurm, tmp_path, tiny_model_dir):
    job = submit(
        tmp_path,
        str(RECIPES / "quickstart.yaml"),
        *quiet(tmp_path, 2),
        "cluster.backend=ray",
        "rollout.engine=vllm",
        "--nodes",
        "2",
        "--time",
        "10",
    )
    state = finished(job)
    job_dir = tmp_path / "runs" / "slurm" / "quickstart"
    log = (job_dir / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert logged_steps(tmp_path / "runs" / "quickstart") == [1, 2]
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "step-00000002" / "trainer_state.pt").exists()
    cluster = json.loads((job_dir / f"ray-cluster-{job}.json").read_text())
    assert cluster["nodes"] == 2 and cluster["cpus"] == 4  # both Slurm nodes joined, 2 CPUs each
    assert "Ray cluster ready" in log and "driver exited with status 0" in log

    listing = cli("jobs", "--runs", str(tmp_path / "runs"), cwd=tmp_path)
    row = next(line for line in listing.stdout.splitlines() if line.split()[0] == job)
    assert "COMPLETED" in row and "2/2" in row and "acc/mean=" in row
    followed = cli("jobs", "--runs", str(tmp_path / "runs"), "--follow", job, cwd=tmp_path)
    assert "driver exited with status 0" in followed.stdout and f"job {job}: COMPLETED" in followed.stdout


def test_requeue_mid_training_resumes_and_runs_every_step_once(slurm, tmp_path, tiny_model_dir):
    job = submit(
        tmp_path, str(RECIPES / "quickstart.yaml"), *quiet(tmp_path, 40), "logging.name=requeued", "--time", "10"
    )
    run_dir = tmp_path / "runs" / "requeued"
    wait_for(
        job, lambda s: (run_dir / "metrics.jsonl").is_file() and len(logged_steps(run_dir)) >= 3, 120, "third step"
    )
    steps_before = len(logged_steps(run_dir))
    subprocess.run(["scontrol", "requeue", job], check=True)
    state = finished(job)
    log = (tmp_path / "runs" / "slurm" / "requeued" / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    assert logged_steps(run_dir) == list(range(1, 41))
    # The first attempt checkpointed on SIGTERM after the steps it had logged; the second resumed
    # from that checkpoint, so no step ran twice.
    resumed_at = int(re.search(r"stopped after step (\d+) of 40", log).group(1))
    assert resumed_at >= steps_before
    assert "attempt 1" in log and "driver exited with status 0" in log


def late_driver_site(tmp_path, job_dir: Path) -> Path:
    """The local site profile with an interpreter that holds the first attempt's driver back until
    the job's shell has logged the time-limit warning: the warning lands before the driver could
    receive any signal, the case a signal alone would lose."""
    wrapper = tmp_path / "late-python"
    wrapper.write_text(f"""#!/bin/bash
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && [ "$3" = train ]; then
    until grep -q "time limit near" {job_dir}/$SLURM_JOB_ID.out 2>/dev/null; do sleep 0.2; done
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    site = tmp_path / "late-driver.yaml"
    site.write_text((ROOT / "efficient_rl" / "slurm" / "sites" / "local.yaml").read_text() + f"python: {wrapper}\n")
    return site


def test_time_limit_warning_checkpoints_then_requeues(slurm, tmp_path, tiny_model_dir):
    # A 3-minute limit with the warning 170 s before it, far too short for 100,000 steps: each
    # attempt checkpoints at the warning; one requeue is allowed, then the job gives up. The
    # first attempt's driver starts only after the warning came. The 170 s are the driver's to
    # start, finish its step and checkpoint: ample on a busy machine too.
    run_dir, job_dir = tmp_path / "runs" / "limited", tmp_path / "runs" / "slurm" / "limited"
    result = cli(
        "submit",
        str(RECIPES / "quickstart.yaml"),
        *quiet(tmp_path, 100_000),
        "logging.name=limited",
        "--time",
        "3",
        "--warning",
        "170",
        "--max-requeues",
        "1",
        "--site",
        str(late_driver_site(tmp_path, job_dir)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    state = finished(job, timeout=900)
    log = (job_dir / f"{job}.out").read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "75:0", log[-3000:]  # not TIMEOUT
    assert log.count("time limit near") == 2 and "requeueing (restart 1 of at most 1)" in log
    assert "not requeueing: 1 restarts used" in log
    assert "a stop was requested" in log  # the first driver read the warning from the stop file
    stops = [int(n) for n in re.findall(r"stopped after step (\d+) of 100000", log)]
    assert len(stops) == 2 and 0 < stops[0] < stops[1]
    assert logged_steps(run_dir) == list(range(1, stops[1] + 1))
    assert (run_dir / "checkpoints" / f"step-{stops[1]:08d}" / "trainer_state.pt").exists()

    # Resubmitted with --resume (and more time), it continues from that checkpoint to the end.
    overrides = [o for o in quiet(tmp_path, 100_000) if not o.startswith("steps=")] + [f"steps={stops[1] + 3}"]
    again = submit(
        tmp_path, str(RECIPES / "quickstart.yaml"), *overrides, "logging.name=limited", "--resume", "--time", "10"
    )
    assert finished(again)["JobState"] == "COMPLETED"
    assert logged_steps(run_dir) == list(range(1, stops[1] + 4))


def test_a_study_trains_each_run_as_a_slurm_job_and_reports(slurm, tmp_path, tiny_model_dir):
    study = RECIPES / "studies" / "tiny.yaml"
    overrides = [f"output_dir={tmp_path}", "launcher=slurm", "slurm.site=local", "slurm.time=10"]
    result = cli("study", "run", str(study), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = tmp_path / "tiny" / "runs"
    for name in ("grpo-s0", "dler-s0"):  # one job each, through submit's job directory
        (submission,) = [
            json.loads(line) for line in (runs / "slurm" / name / "submissions.jsonl").read_text().splitlines()
        ]
        assert f"{name}: submitted job {submission['job_id']}" in result.stdout
        assert "driver exited with status 0" in (runs / "slurm" / name / f"{submission['job_id']}.out").read_text()
        assert logged_steps(runs / name) == [1, 2, 3, 4]
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert {run["state"] for run in report["runs"].values()} == {"done"}
    assert {p["method"] for p in report["points"]} == {"grpo", "dler", "lab:tiny"}
    status = cli("study", "status", str(study), *overrides, cwd=tmp_path)
    assert status.stdout.count(" done ") == 2, status.stdout


def probe_placement(
    tmp_path, placement: str, workers: int, nodes: int, gpus_per_node: int = 2, *request: str
) -> tuple[str, dict, dict]:
    """Submit the quickstart recipe on Ray with a GPU per actor and --placement-only (`request`:
    more submit options); the job's id, what its Ray cluster reported, and where each actor landed."""
    job = submit(
        tmp_path,
        str(RECIPES / "quickstart.yaml"),
        *quiet(tmp_path, 2),
        "cluster.backend=ray",
        "rollout.engine=vllm",
        "learner.backend=deepspeed",
        f"cluster.placement={placement}",
        f"cluster.rollout.workers={workers}",
        f"cluster.learner.workers={workers}",
        "cluster.rollout.gpus=1",
        "cluster.learner.gpus=1",
        "--nodes",
        str(nodes),
        "--gpus-per-node",
        str(gpus_per_node),
        "--time",
        "10",
        "--placement-only",
        *request,
    )
    state = finished(job)
    job_dir = tmp_path / "runs" / "slurm" / "quickstart"
    log = (job_dir / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert not (tmp_path / "runs" / "quickstart").exists()  # nothing trained, no run directory
    cluster = json.loads((job_dir / f"ray-cluster-{job}.json").read_text())
    seen = json.loads((job_dir / f"placement-{job}.json").read_text())
    return job, cluster, seen


def landed(seen: dict) -> dict[str, tuple[str, str]]:
    """Each actor's (Slurm node, GPU id), checked on the way: it sees exactly that one GPU, as
    device 0 (CUDA_VISIBLE_DEVICES), and Slurm gave that GPU to the job on that node."""
    nodes = seen["nodes"]
    where = {}
    for actor, report in seen["actors"].items():
        (gpu,) = report["gpu_ids"]
        assert report["cuda_visible_devices"] == gpu, (actor, report)
        node = nodes[report["ray_node"]]
        assert report["slurm_node"] == node["slurm_node"] and gpu in node["slurm_gpus"].split(","), (actor, report)
        where[actor] = (node["slurm_node"], gpu)
    return where


def test_colocated_pairs_share_a_slurm_gpu_and_learner_ranks_do_not(slurm, tmp_path, tiny_model_dir):
    # DLER's layout on 2 nodes x 2 GPUs: rollout worker i and learner rank i share bundle i's GPU.
    job, cluster, seen = probe_placement(tmp_path, "colocate", workers=4, nodes=2)
    assert cluster["nodes"] == 2 and cluster["gpus"] == 4  # the job's Ray waited for every GPU
    # Ray counts on each Slurm node exactly the 2 GPUs Slurm gave the job there.
    per_node = {node["slurm_node"]: (node["gpus"], node["slurm_gpus"]) for node in seen["nodes"].values()}
    assert per_node == {"n1": (2.0, "0,1"), "n2": (2.0, "0,1")}
    where = landed(seen)
    every_gpu = {("n1", "0"), ("n1", "1"), ("n2", "0"), ("n2", "1")}
    assert all(where[f"rollout{i}"] == where[f"learner{i}"] for i in range(4))
    assert {where[f"learner{i}"] for i in range(4)} == every_gpu  # four ranks, four different GPUs
    log = (tmp_path / "runs" / "slurm" / "quickstart" / f"{job}.out").read_text()
    assert "node n1: Ray counts 2 CPUs, 2 GPUs; Slurm's GPUs 0,1" in log
    listing = cli("jobs", "--runs", str(tmp_path / "runs"), cwd=tmp_path)
    row = next(line for line in listing.stdout.splitlines() if line.split()[0] == job)
    assert "COMPLETED" in row and "placement" in row


def test_split_actors_each_get_a_gpu_of_their_own(slurm, tmp_path, tiny_model_dir):
    _, cluster, seen = probe_placement(tmp_path, "split", workers=1, nodes=1)
    assert cluster["nodes"] == 1 and cluster["gpus"] == 2
    assert sorted(landed(seen).values()) == [("n1", "0"), ("n1", "1")]


def test_an_actor_sees_the_gpu_slurm_chose_not_the_first(slurm, tmp_path, tiny_model_dir):
    # Another job holds GPU 0 of both nodes, so Slurm gives the probe GPU 1 of its node: Ray must
    # take its GPU ids from Slurm (the step's CUDA_VISIBLE_DEVICES), not count from 0.
    held = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=1"]
        + [f"--output={tmp_path}/holder.out", "--wrap", "sleep 600"],
        capture_output=True,
        text=True,
        check=True,
    )
    holder = held.stdout.strip()
    try:
        wait_for(holder, lambda s: s.get("JobState") == "RUNNING", 120, "start")
        _, cluster, seen = probe_placement(tmp_path, "colocate", 1, 1, 1, "--cpus-per-node", "1")
    finally:
        subprocess.run(["scancel", holder], check=True)
    assert cluster["gpus"] == 1
    assert [node["slurm_gpus"] for node in seen["nodes"].values()] == ["1"]
    assert {gpu for _, gpu in landed(seen).values()} == {"1"}  # both colocated actors: Slurm's GPU 1


def test_placement_only_needs_ray_actors(tmp_path):
    result = cli("submit", str(RECIPES / "quickstart.yaml"), "--placement-only", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        "efficient-rl: error: --placement-only: the recipe runs in one process (cluster.backend=embedded), "
        "with no actors to place; set cluster.backend=ray"
    )


def test_dry_run_scripts_parse_and_carry_the_request(tmp_path):
    for nodes in (1, 4):  # a dry run renders the request as given, without asking the cluster
        result = cli(
            "submit",
            str(RECIPES / "quickstart.yaml"),
            "cluster.backend=ray",
            "rollout.engine=vllm",
            "cluster.rollout.gpus=1",
            "cluster.learner.gpus=1",
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            "2",
            "--cpus-per-node",
            "16",
            "--time",
            "2-00:30",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--dry-run",
            "--site",
            "example",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        script = tmp_path / f"job-{nodes}.sbatch"
        script.write_text(result.stdout)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        options = dict(
            line[len("#SBATCH --") :].split("=", 1)
            for line in result.stdout.splitlines()
            if line.startswith("#SBATCH --") and "=" in line
        )
        assert options["nodes"] == str(nodes) and options["gpus-per-node"] == "2"
        assert options["cpus-per-task"] == "16" and options["ntasks-per-node"] == "1"
        assert options["time"] == "2-00:30" and options["partition"] == "gpu" and options["account"] == "proj"
        assert options["signal"] == "B:USR1@300" and options["constraint"] == "a100"  # the site's extra line
        assert "module load cuda/12.4" in result.stdout and "cluster.address=auto" in result.stdout
        # Each node's `ray start` runs under srun with the job's CPUs: without --cpus-per-task some Slurm
        # versions give the step one core, shared by Ray and every actor.
        (ray_node,) = [line for line in result.stdout.splitlines() if "srun --overlap --nodes=1 --ntasks=1" in line]
        assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in ray_node
        assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_the_script_counts_gpus_of_a_typed_request(tmp_path):
    # Slurm sets SLURM_GPUS_PER_NODE to --gpus-per-node as written: "a100:2" asks Ray for 2.
    result = cli("submit", str(RECIPES / "quickstart.yaml"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    counting = "\n".join(line for line in result.stdout.splitlines() if line.startswith("gpus_per_node="))
    for given, count in (("a100:2", "2"), ("4", "4"), (None, "0")):
        env = {"PATH": os.environ["PATH"], **({"SLURM_GPUS_PER_NODE": given} if given else {})}
        shown = subprocess.run(["bash", "-c", counting + '\necho "$gpus_per_node"'], env=env, capture_output=True)
        assert shown.stdout.decode().strip() == count, (given, counting)


def test_gpu_nodes_for_actors_that_ask_for_no_gpu_are_refused(tmp_path):
    # cluster.*.gpus default to 0: on GPU nodes Ray would start every actor without a GPU (or,
    # depending on its version, with all of them, each rank on cuda:0).
    result = cli(
        "submit",
        str(RECIPES / "dler.yaml"),
        "cluster.backend=ray",
        "rollout.engine=vllm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--dry-run",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stderr.strip() == (
        "efficient-rl: error: --gpus-per-node 8: the recipe's actors ask for no GPU (cluster.rollout.gpus and "
        "cluster.learner.gpus are 0); give each its share, e.g. cluster.rollout.gpus=1 cluster.learner.gpus=1"
    )
    assert not (tmp_path / "runs").exists()


def test_the_full_scale_dler_recipe_renders_a_gpu_job(tmp_path):
    """efficient_rl/recipes/dler_r1_1p5b.yaml (DLER's own sizes, bf16, 16 GPUs) passes every check submit makes
    without a cluster: the recipe, its actors against 2 nodes x 8 GPUs, and the script."""
    recipe = RECIPES / "dler_r1_1p5b.yaml"
    result = cli(
        "submit",
        str(recipe),
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--cpus-per-node",
        "64",
        "--time",
        "4:00:00",
        "--dry-run",
        "--site",
        "example",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    script = tmp_path / "dler.sbatch"
    script.write_text(result.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    options = dict(
        line[len("#SBATCH --") :].split("=", 1)
        for line in result.stdout.splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )
    assert options["nodes"] == "2" and options["gpus-per-node"] == "8" and options["job-name"] == "erl-dler_r1_1p5b"
    assert str(recipe) in result.stdout and not (tmp_path / "runs").exists()
    # 16 colocated GPU bundles do not fit one node of 8
    one_node = cli(
        "submit",
        str(recipe),
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--cpus-per-node",
        "64",
        "--dry-run",
        "--site",
        "example",
        cwd=tmp_path,
    )
    assert one_node.returncode == 2 and "the recipe's actors need 96 CPUs and 16 GPUs" in one_node.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "3"], "--nodes 3: partition debug has 2 nodes"),
        (["--nodes", "0"], "--nodes: expected an integer >= 1, got 0"),
        (["--gpus-per-node", "3"], "--gpus-per-node 3: partition debug has 0 nodes with that many GPUs (most: 2)"),
        (["--cpus-per-node", "8"], "--cpus-per-node 8: partition debug has 0 nodes"),
        (["--partition", "gpu"], "--partition gpu: no such partition (sinfo lists: debug)"),
        (["cluster.learner.gpus=1", "learner.backend=deepspeed"], "the recipe's actors need 2 CPUs and 1 GPUs"),
        (["cluster.rollout.cpus=3", "--nodes", "2"], "one actor needs 3 CPUs"),
        (["cluster.backend=embedded", "--nodes", "2"], "--nodes 2: the recipe runs in one process"),
        (["--time", "soon"], "--time soon: expected minutes"),
        (["--time", "1", "--warning", "90"], "--warning 90: expected seconds between 0 and the time limit (60 s)"),
        (["rollout.engine=transformers"], "rollout.engine: the ray backend runs vLLM rollout workers"),
    ],
)
def test_bad_requests_are_refused_before_submission(slurm, tmp_path, monkeypatch, capsys, args, message):
    from efficient_rl.cli import main

    monkeypatch.chdir(tmp_path)
    status = main(
        [
            "submit",
            str(RECIPES / "quickstart.yaml"),
            "cluster.backend=ray",
            "rollout.engine=vllm",
            f"logging.output_dir={tmp_path / 'runs'}",
            *args,
            "--site",
            "local",
        ]
    )
    stderr = capsys.readouterr().err
    assert status == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted
    assert subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout == ""


def test_missing_sbatch_and_existing_run_directory_are_one_line_errors(tmp_path):
    bare = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no Slurm commands
    result = cli("submit", str(RECIPES / "quickstart.yaml"), cwd=tmp_path, env=bare)
    assert result.returncode == 2 and "sbatch: not found on this machine" in result.stderr
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    result = cli("submit", str(RECIPES / "quickstart.yaml"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "run directory exists; pass --resume" in result.stderr


def test_restart_mode_resumes_a_checkpoint_and_restarts_a_run_without_one(tmp_path):
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.run.checkpoint import restart_mode

    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"logging.output_dir={tmp_path}", "logging.name=r"])
    assert restart_mode(recipe) == (False, False)  # nothing there: a new run
    (tmp_path / "r" / "checkpoints" / ".tmp-step-00000004").mkdir(parents=True)
    assert restart_mode(recipe) == (False, True)  # only a half-written checkpoint: start over
    (tmp_path / "r" / "checkpoints" / "step-00000002").mkdir()
    (tmp_path / "r" / "checkpoints" / "step-00000002" / "trainer_state.pt").write_bytes(b"")
    assert restart_mode(recipe) == (True, False)
