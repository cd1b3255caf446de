"""The collective weight transport's two ends over gloo, in two processes without Ray:
cluster/broadcast.py's sender (learner rank 0) and receiver (a rollout worker)."""

import dataclasses
import multiprocessing
import socket

import torch

from efficient_rl.cluster.broadcast import BucketReceiver, join_group, send_buckets
from efficient_rl.models.weights import WeightBucket, plan_buckets

BUCKET_BYTES = 2048
SYNCS = 2


def model_weights() -> list[tuple[str, torch.Tensor]]:
    """A made-up model's weights in its parameter order, the same in every process."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(64, 8), (8,), (8, 8), (8, 8), (8, 8), (8,), (32, 8), (8, 32), (8,)] * 4
    return [(f"p{index}", torch.randn(shape, generator=generator)) for index, shape in enumerate(shapes)]


def buckets_of(weights) -> list[WeightBucket]:
    groups = plan_buckets([(tensor.numel(), tensor.dtype) for _, tensor in weights], BUCKET_BYTES)
    return [WeightBucket.pack([weights[i] for i in group]) for group in groups]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_as_rank_0(port: int) -> None:
    """Learner rank 0: every sync sends the buckets in the plan's order, each sync other weights."""
    communicator = join_group("gloo", "127.0.0.1", port, rank=0, world_size=2)
    for sync in range(SYNCS):
        send_buckets(communicator, buckets_of([(name, tensor + sync) for name, tensor in model_weights()]))


def test_gloo_receiver_streams_each_bucket_in_order_holding_one_at_a_time():
    weights = model_weights()
    plan = [dataclasses.replace(bucket, payload=None) for bucket in buckets_of(weights)]
    largest_bucket = max(bucket.nbytes for bucket in plan)
    largest_tensor = max(tensor.numel() * 4 for _, tensor in weights)
    total = sum(tensor.numel() * 4 for _, tensor in weights)
    assert len(plan) >= 6 and largest_bucket + 2 * largest_tensor < total / 2  # several buckets, each small

    port = free_port()
    sender = multiprocessing.get_context("spawn").Process(target=send_as_rank_0, args=(port,))
    sender.start()
    default_group_before = torch.distributed.is_initialized()  # an earlier test in this process may have made it
    try:
        receiver = BucketReceiver(join_group("gloo", "127.0.0.1", port, rank=1, world_size=2), plan)
        # the default group DeepSpeed uses is neither made nor replaced by joining
        assert torch.distributed.is_initialized() == default_group_before

        # Sync 0: a reader that loads each tensor and keeps none, as the engine does.
        names = []
        for name, tensor in receiver.weights():
            assert torch.equal(tensor, dict(weights)[name])
            names.append(name)
        receiver.check_complete()
        assert names == [name for name, _ in weights]
        # The buffer plus the tensor being read and the one before it (not yet dropped by the loop).
        assert receiver.held.peak <= largest_bucket + 2 * largest_tensor

        # Sync 1: a reader that keeps everything; the count sees it (the buffer and every copy).
        kept = list(receiver.weights())
        receiver.check_complete()
        assert all(torch.equal(tensor, dict(weights)[name] + 1) for name, tensor in kept)
        assert receiver.held.peak == largest_bucket + total
    finally:
        sender.join(timeout=120)
        if sender.is_alive():  # a receiver that failed early leaves the sender blocked in a broadcast
            sender.kill()
            sender.join()
    assert sender.exitcode == 0
