"""A torch function mode that records every tensor efficient_rl's own code creates without saying
on which device.

On a CPU machine a tensor made without `device=` lands where it should by luck: the same call on
a GPU run puts it on the CPU beside CUDA tensors, and the step fails (or silently copies every
step). The mode sees each factory call (torch.zeros, torch.tensor, ...) and walks the stack to the
first frame outside torch: if that frame is in the efficient_rl package and no device was named,
the call is recorded with its file and line. Libraries (transformers, peft, vLLM) are theirs to
place; their calls are not recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import efficient_rl

PACKAGE = Path(efficient_rl.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
HERE = Path(__file__).resolve()

# Calls that make a new tensor from nothing, on the default (CPU) device unless told otherwise.
# *_like and Tensor.new_* take their input's device: they are not here.
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.tensor,
    torch.as_tensor,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.linspace,
    torch.eye,
}


def creator(frame) -> Path | None:
    """The file of the first frame outside torch and this module: who asked for the tensor."""
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not (path.is_relative_to(TORCH) or path == HERE):
            return path, frame.f_lineno
        frame = frame.f_back
    return None


class DeviceAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.unplaced: dict[str, str] = {}  # "file:line" -> the factory's name
        self.calls = 0  # factory calls from the package, placed or not

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            found = creator(sys._getframe(1))
            if found is not None and found[0].is_relative_to(PACKAGE):
                self.calls += 1
                if kwargs.get("device") is None and not from_tensor(func, args):
                    self.unplaced[f"{found[0].relative_to(PACKAGE.parent)}:{found[1]}"] = func.__name__
        return func(*args, **kwargs)


def from_tensor(func, args) -> bool:
    """torch.as_tensor / torch.tensor of a tensor keep its device."""
    return func in (torch.as_tensor, torch.tensor) and bool(args) and isinstance(args[0], torch.Tensor)


def audited(method, audit: DeviceAudit):
    """`method` run under `audit` at every call."""

    def call(*args, **kwargs):
        with audit:
            return method(*args, **kwargs)

    return call
