"""Weight sync by collective broadcast: learner rank 0 sends each bucket to every rollout worker.

One transport, two communicators with the same two-member surface (`device`, `broadcast`):
gloo (torch.distributed over TCP, host memory: a CPU option, and the one the test suite runs)
and NCCL (vLLM's StatelessProcessGroup + PyNcclCommunicator, GPU memory: NOT EXERCISED on the
CPU machines this project is tested on). Everything else here runs the same for both.

The group (learner rank 0 = rank 0, rollout worker i = rank i + 1) is formed once, at start, and
is a group of its own: the default torch.distributed group DeepSpeed's ranks use is untouched.
Every sync sends the same bucket plan, so receivers learn it once, when they join.

A receiver holds one bucket at a time: it receives a bucket into one buffer the size of the
largest bucket, hands the engine a copy of each of its tensors, and receives the next bucket
into the same buffer only when the engine asks for more (`BucketReceiver.weights` is read by
the engine's load). The copies are what the engine has not loaded yet: vLLM keeps the parts of a
fused layer (q, k, v -> qkv) until the whole layer arrived, then frees them (a layer whose rows
it pads, like a small vocabulary's embedding, it keeps to the end of the reload).
"""

from __future__ import annotations

import dataclasses
import socket
import weakref
from datetime import timedelta
from typing import Callable, Iterator

import torch

from efficient_rl.models.weights import WeightBucket

# How long a member waits for the others: to join, and for each bucket (the sender gathers a
# ZeRO-3 bucket before it sends it, and the receivers start waiting before the learner does).
GROUP_TIMEOUT = timedelta(minutes=30)


def address_towards(host: str, port: int) -> str:
    """This machine's address on the route to `host`: the one the other members can reach us at.
    (Connecting a UDP socket only picks the route; nothing is sent.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


class GlooCommunicator:
    """torch.distributed's gloo, constructed directly from a store of its own (no init_process_group)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device):
        import torch.distributed as dist

        # Rank 0 serves the rendezvous at host:port; the store must outlive the group's setup.
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=GROUP_TIMEOUT)
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address_towards(host, port))]
        options._timeout = GROUP_TIMEOUT
        self.group = dist.ProcessGroupGloo(self.store, rank, world_size, options)
        self.device = device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.group.broadcast(tensor, src).wait()


class NcclCommunicator:
    """The GPU-only lines: vLLM's NCCL wrapper over a stateless group. NOT EXERCISED on CPU."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=device)
        # vLLM hands back a disabled communicator, without an error, when the NCCL library does not
        # load or VLLM_DISABLE_PYNCCL is set; its broadcasts then return without sending anything.
        if self.comm.disabled:
            raise RuntimeError(
                "cluster.weight_transport: nccl: vLLM's NCCL communicator came up disabled (no NCCL library, "
                "or VLLM_DISABLE_PYNCCL set); use weight_transport: object_store"
            )
        self.device = device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.comm.broadcast(tensor, src=src)  # on the current stream: the engine's load reads after it


def host_memory() -> torch.device:
    return torch.device("cpu")


def current_gpu() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


# cluster.weight_transport -> (communicator, where its buffers live in the calling actor)
COMMUNICATORS: dict[str, tuple[type, Callable[[], torch.device]]] = {
    "gloo": (GlooCommunicator, host_memory),
    "nccl": (NcclCommunicator, current_gpu),
}


def join_group(kind: str, host: str, port: int, rank: int, world_size: int):
    """Join the weight-sync group; blocks until every member has joined."""
    communicator, device = COMMUNICATORS[kind]
    return communicator(host, port, rank, world_size, device())


def send_buckets(communicator, buckets) -> None:
    """Broadcast each bucket, in the plan's order (rank 0)."""
    for bucket in buckets:
        communicator.broadcast(bucket.payload.to(communicator.device), src=0)


class HeldBytes:
    """Bytes of received weights alive at once, now and at their peak: each tracked tensor counts
    until it is freed, by whoever held it last."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self.release, nbytes)
        return tensor

    def release(self, nbytes: int) -> None:
        self.now -= nbytes


class BucketReceiver:
    """A rollout worker's end: the plan's buckets as one stream of (name, tensor), received lazily."""

    def __init__(self, communicator, plan: list[WeightBucket]):
        self.communicator, self.plan = communicator, plan
        self.held = HeldBytes()
        self.received = 0  # buckets received in the current sync

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each bucket is received only once the tensors of the one before were taken, into the
        same buffer: the tensors handed out are copies, so nothing the engine keeps pins it."""
        self.held, self.received = HeldBytes(), 0
        buffer = self.held.track(
            torch.empty(max(bucket.nbytes for bucket in self.plan), dtype=torch.uint8, device=self.communicator.device)
        )
        for bucket in self.plan:
            payload = buffer[: bucket.nbytes]
            self.communicator.broadcast(payload, src=0)
            self.received += 1
            for name, tensor in dataclasses.replace(bucket, payload=payload).unpack():
                yield name, self.held.track(tensor.clone())

    def check_complete(self) -> None:
        """A receiver that stopped early would leave the sender blocked in its next broadcast."""
        if self.received != len(self.plan):
            raise RuntimeError(
                f"weight sync: the engine's load read {self.received} of the {len(self.plan)} buckets sent"
            )
