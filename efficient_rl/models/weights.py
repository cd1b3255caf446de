"""Weights in transit: parameters packed into a few flat buckets instead of one message each.

A bucket's payload is one byte buffer; any dtype, bfloat16 included, is viewed as bytes on the way.
The learner packs buckets and the Ray layer carries them, so this sits outside both learner/ and
cluster/ (docs/extending.md#layers).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WeightBucket:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    # uint8, the tensors' bytes back to back: a torch tensor on the sender's device, or a numpy
    # array for Ray's object store (which hands numpy buffers to the receiver without a copy)
    payload: torch.Tensor | np.ndarray | None

    @classmethod
    def pack(cls, named: list[tuple[str, torch.Tensor]]) -> "WeightBucket":
        flat = torch.cat([tensor.detach().reshape(-1) for _, tensor in named])
        return cls(
            names=[name for name, _ in named],
            shapes=[tuple(t.shape) for _, t in named],
            dtype=flat.dtype,
            payload=flat.view(torch.uint8),
        )

    def on_host(self) -> "WeightBucket":
        return dataclasses.replace(self, payload=self.payload.cpu().numpy())

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        """Views into the payload, one per parameter."""
        payload = self.payload
        if isinstance(payload, np.ndarray):
            with warnings.catch_warnings():  # Ray hands over a read-only buffer; the receiver only reads it
                warnings.simplefilter("ignore", UserWarning)
                payload = torch.frombuffer(memoryview(payload), dtype=torch.uint8)
        parts = payload.view(self.dtype).split([math.prod(shape) for shape in self.shapes])
        return [(name, part.view(shape)) for name, part, shape in zip(self.names, parts, self.shapes)]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes) * self.dtype.itemsize


def plan_buckets(sizes: list[tuple[int, torch.dtype]], bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices grouped into buckets of at most `bucket_bytes`.

    `sizes` holds (element count, dtype) per parameter. A parameter larger than a bucket gets
    one of its own; a dtype change starts a new bucket; bucket_bytes=0 gives one per parameter.
    """
    buckets, current, current_bytes, current_dtype = [], [], 0, None
    for index, (numel, dtype) in enumerate(sizes):
        nbytes = numel * dtype.itemsize
        if current and (dtype != current_dtype or current_bytes + nbytes > bucket_bytes):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += nbytes
        current_dtype = dtype
    if current:
        buckets.append(current)
    return buckets
