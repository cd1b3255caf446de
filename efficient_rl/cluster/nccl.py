"""GPU weight sync: learner rank 0 broadcasts each bucket over NCCL to every rollout worker.

NOT EXERCISED on the CPU machines this project is developed and tested on (no GPU, no NCCL).
It is kept thin and sits behind the same calls as the object-store path: the driver asks the
learner group to send and the rollout workers to receive, bucket by bucket, then the workers load
the buckets exactly as on CPU (`VLLMEngine.load_weights`).

The group (learner rank 0 = rank 0, rollout worker i = rank i + 1) is vLLM's
StatelessProcessGroup, which does not disturb the default torch.distributed group DeepSpeed uses.
Every sync sends the same bucket plan, so receivers learn it once, when they join.
"""

from __future__ import annotations

import dataclasses

import torch

from efficient_rl.models.weights import WeightBucket


class NcclBroadcast:
    def __init__(self, host: str, port: int, rank: int, world_size: int):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.comm = PyNcclCommunicator(group, device=self.device)

    def send(self, bucket: WeightBucket) -> None:
        self.comm.broadcast(bucket.payload.to(self.device), src=0)

    def receive(self, plan: WeightBucket) -> WeightBucket:
        """The next bucket; `plan` holds its names, shapes and dtype."""
        payload = torch.empty(plan.nbytes, dtype=torch.uint8, device=self.device)
        self.comm.broadcast(payload, src=0)
        return dataclasses.replace(plan, payload=payload)
