"""The Ray layer's pure parts: bucket planning and packing, prompt shares, resource sums."""

import numpy as np
import pytest
import torch

from efficient_rl.cluster.ray_backend import even_shares, unplaceable
from efficient_rl.config.placement import resolve_placement
from efficient_rl.config.schema import ClusterSection, RoleResources
from efficient_rl.learner.objective import ObjectiveSettings
from efficient_rl.learner.torch_learner import OptimSettings, TorchLearner, load_model
from efficient_rl.models.weights import WeightBucket, plan_buckets

F32, BF16 = torch.float32, torch.bfloat16


def test_plan_buckets_fills_up_to_the_limit_in_order():
    sizes = [(10, F32), (10, F32), (30, F32), (5, F32), (100, F32), (1, F32)]  # 40, 40, 120, 20, 400, 4 bytes
    assert plan_buckets(sizes, bucket_bytes=100) == [[0, 1], [2], [3], [4], [5]]
    assert plan_buckets(sizes, bucket_bytes=200) == [[0, 1, 2], [3], [4], [5]]
    assert plan_buckets(sizes, bucket_bytes=10**9) == [[0, 1, 2, 3, 4, 5]]
    assert plan_buckets(sizes, bucket_bytes=0) == [[i] for i in range(6)]  # one per parameter


def test_plan_buckets_starts_a_new_bucket_when_the_dtype_changes():
    assert plan_buckets([(4, F32), (4, BF16), (4, BF16), (4, F32)], 10**6) == [[0], [1, 2], [3]]


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_pack_unpack_round_trip_through_host_bytes(dtype):
    torch.manual_seed(0)
    named = [
        ("a", torch.randn(3, 4).to(dtype)),
        ("b.weight", torch.randn(5).to(dtype)),
        ("c", torch.randn(2, 1, 2).to(dtype)),
    ]
    bucket = WeightBucket.pack(named).on_host()
    assert isinstance(bucket.payload, np.ndarray) and bucket.nbytes == 21 * dtype.itemsize
    bucket.payload.setflags(write=False)  # as Ray's object store hands it over
    for (name, tensor), (got_name, got) in zip(named, bucket.unpack()):
        assert got_name == name and got.dtype == dtype and torch.equal(got, tensor)


def test_weight_plan_describes_the_buckets_without_data(tiny_model_dir):
    learner = TorchLearner(load_model(tiny_model_dir), ObjectiveSettings(), OptimSettings())
    buckets = list(learner.weight_buckets(bucket_bytes=100_000))
    plan = learner.weight_plan(bucket_bytes=100_000)
    assert len(buckets) > 1
    described = [(b.names, b.shapes, b.dtype, b.nbytes) for b in plan]
    assert described == [(b.names, b.shapes, b.dtype, b.nbytes) for b in buckets]
    sent = dict(pair for bucket in buckets for pair in bucket.unpack())
    assert sent.keys() == dict(learner.model.named_parameters()).keys()  # tied lm_head once, as embed_tokens
    assert all(torch.equal(sent[name], p) for name, p in learner.model.named_parameters())


def test_even_shares_cover_every_prompt_once():
    for count in range(0, 12):
        for parts in range(1, 5):
            shares = even_shares(count, parts)
            assert [i for share in shares for i in share] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_placement_split_and_colocated():
    # Worked by hand: split, a bundle per actor: 1 x (2 CPU, 1 GPU) + 2 x (1, 1) = (4, 3).
    cluster = ClusterSection(
        rollout=RoleResources(workers=1, cpus=2, gpus=1), learner=RoleResources(workers=2, cpus=1, gpus=1)
    )
    split = resolve_placement(cluster)
    assert split.totals() == (4, 3) and split.largest_bundle() == (2, 1)
    assert split.counts == {"rollout": 1, "learner": 2} and split.actor_resources("learner") == {"CPU": 1, "GPU": 1}
    # Colocated: max(workers) = 2 bundles of (max cpus, max gpus) = (2, 1), each actor half of one.
    cluster.placement = "colocate"
    shared = resolve_placement(cluster)
    assert shared.totals() == (4, 2) and shared.counts == {"shared": 2}
    assert shared.groups == {"rollout": "shared", "learner": "shared"}
    assert shared.actor_resources("rollout") == shared.actor_resources("learner") == {"CPU": 1.0, "GPU": 0.5}
    # No GPUs asked for: no GPU resource in the bundle at all (Ray would otherwise want a GPU node).
    cpu_only = resolve_placement(ClusterSection(learner=RoleResources(workers=3, cpus=0.5)))
    assert cpu_only.totals() == (2.5, 0.0) and "GPU" not in cpu_only.bundles["learner"]


def test_an_unplaceable_request_says_what_the_cluster_lacks():
    # By hand: 1 x (2 CPU) + 2 x (4 CPU, 1 GPU) = 10 CPUs and 2 GPUs asked of a 6-CPU cluster.
    cluster = ClusterSection(rollout=RoleResources(cpus=2), learner=RoleResources(workers=2, cpus=4, gpus=1))
    message = unplaceable(resolve_placement(cluster), {"CPU": 6.0, "memory": 1e9}, timeout=5)
    assert message == (
        "cluster: Ray did not place the actors within cluster.placement_timeout (5 s): the plan asks for bundles "
        "1 x {CPU: 2}, 2 x {CPU: 4, GPU: 1} (cluster.rollout, cluster.learner), the cluster has {CPU: 6}; "
        "it lacks {CPU: 4, GPU: 2} in all"
    )
    # Enough in all, but spread over nodes too small for a bundle: Ray reports totals only.
    assert unplaceable(resolve_placement(cluster), {"CPU": 16.0, "GPU": 2.0}, timeout=5).endswith(
        "no node holds one whole bundle"
    )
