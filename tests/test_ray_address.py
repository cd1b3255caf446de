"""`cluster.address`: a run joins a Ray cluster someone else started, and leaves it running."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from conftest import RECIPES

HEAD = """
import sys, ray
ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1],
         _system_config={"worker_niceness": 0})  # as docs/engines.md tells users to start theirs
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""


def train_on(address: str, overrides: list[str], env: dict) -> subprocess.CompletedProcess:
    """`efficient-rl train` of the quickstart on the Ray cluster at `address`."""
    command = [sys.executable, "-m", "efficient_rl.cli", "train", str(RECIPES / "quickstart.yaml"), *overrides]
    command += ["cluster.backend=ray", "rollout.engine=vllm", f"cluster.address={address}"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)


def test_a_run_joins_an_existing_cluster_and_leaves_it_running(tmp_path, tiny_overrides):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="erl-head-")
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD, temp_dir], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = head.stdout.readline().strip()
        quiet = ["eval.before_training=false", "eval.after_training=false"]
        result = train_on(address, [*tiny_overrides, *quiet, "steps=2", "logging.name=joined"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "runs" / "joined" / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2] and all(row["sync/bytes"] > 0 for row in rows)
        status = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "status", f"--address={address}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert head.poll() is None and status.returncode == 0, status.stderr[-2000:]  # still up
        # A run that asks for more than the cluster has is refused in one line once the wait is over,
        # and leaves the cluster as it was (its placement groups removed again).
        too_big = ["cluster.learner.cpus=8", "cluster.placement_timeout=5", "steps=1", "logging.name=too-big"]
        refused = train_on(address, [*tiny_overrides, *too_big], env)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and lines[-1].startswith("efficient-rl: error: cluster: Ray did not place"), (
            refused.stderr[-3000:]
        )
        assert "it lacks {CPU: 6} in all" in lines[-1] and head.poll() is None
        assert not (tmp_path / "runs" / "too-big").exists()  # nothing written for it
    finally:
        head.stdin.close()
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
