"""A model's files in its own dtype: the one it was released in, whatever the learner trains in.

The learner keeps float32 master weights (it steps them in float32 whatever learner.precision
computes in), but a model released in bfloat16 is written back in bfloat16: a checkpoint's and an
export's model files are what the user got, at the size they got it, with config.json saying so.
Where float32 masters would be lost by that rounding, the learner saves them beside the model
files as trainer state (learner/torch_learner.py MASTER_WEIGHTS_FILE; DeepSpeed keeps its own).

Learners and the export command both write through here, so this sits in models/
(docs/extending.md#layers).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from efficient_rl.errors import ConfigError

# A model directory whose config.json names no dtype: transformers' own default, float32.
DEFAULT_RELEASE_DTYPE = torch.float32
CONFIG_FILE = "config.json"
# config.json keys naming the dtype, newest first (transformers wrote `torch_dtype` before 4.56)
DTYPE_KEYS = ("dtype", "torch_dtype")


def released_dtype(model_dir: Path) -> torch.dtype:
    """The dtype `model_dir`'s weights were released in: its config.json's `dtype` (or the older
    `torch_dtype`), float32 when it names none. Read from the file itself: a model loaded with
    from_pretrained(dtype=...) reports the dtype it was loaded in, not the released one."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); it names the dtype the model's files are written in") from None
    name = next((config[key] for key in DTYPE_KEYS if config.get(key) is not None), None)
    if name is None:
        return DEFAULT_RELEASE_DTYPE
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{path}: dtype {name!r} is not a floating-point torch dtype")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how config.json spells a dtype."""
    return str(dtype).removeprefix("torch.")


def in_dtype(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor as a copy of its own, the floating-point ones in `dtype` (safetensors refuses
    tensors sharing memory, which views into one weight bucket would)."""
    return {
        name: tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
        for name, tensor in named
    }


def save_model_files(model, directory: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """`model`'s save_pretrained with `weights` (already in `dtype`) as its tensors, and its
    config.json saying `dtype`. save_pretrained writes the dtype of the module's parameters there
    (the float32 masters'), so the config is written again from a copy that names `dtype`: the
    live model's config is left as save_pretrained leaves it."""
    model.save_pretrained(directory, state_dict=weights)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(directory)


def persistent_buffers(model) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers save_pretrained writes beside the parameters (its state_dict's)."""
    saved = model.state_dict().keys()
    return [(name, buffer) for name, buffer in model.named_buffers() if name in saved]
