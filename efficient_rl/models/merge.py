"""DLER update-selective weight merging (docs/algorithms.md#update-selective-merging), streamed
tensor by tensor.

    theta_merged = theta_base + scale * TopK_keep(theta_tuned - theta_base)

Only the `keep` fraction of delta entries with the largest magnitude is added back, scaled. The
paper (keep 0.25, scale 0.7) does not say whether the top fraction is taken per tensor (mergekit)
or over the whole model (the TIES reference code); both are offered, `global` is the default.

Memory: base and tuned are read with `safetensors.safe_open` one tensor at a time, and each tensor
in blocks of rows of about CHUNK entries (`get_slice`); output shards are written block by block.
So the process holds a few float32 copies of one block (4M entries, 16 MB) plus two 65,536-bin
histograms and the tensor names, whatever the size of the model or of its largest tensor. The
exact threshold takes two reading passes (global: over the model, per tensor: over the tensor)
before the writing pass, so every input byte is read three times.

torch, numpy and safetensors are imported inside the functions that use them: the CLI imports this
module to build its parser, and every command should stay quick to start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from efficient_rl.errors import ConfigError, one_line
from efficient_rl.models.publish import staged

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_KEEP = 0.25  # paper §4.6: "top 25% of parameter deltas"
DEFAULT_SCALE = 0.7  # paper §4.6
# The paper leaves the selection scope open. "Top 25% of parameter deltas", inspired by TIES, reads
# as one ranking over the model's task vector, which is what the TIES reference code does.
DEFAULT_SELECTION = "global"
SELECTIONS = ("global", "per-tensor")
DEFAULT_MAX_SHARD_MB = 5000.0  # 5 GB shards, the size most Hugging Face models are published in

INDEX_FILE = "model.safetensors.index.json"
# Copied from the tuned model; a run checkpoint's optimizer and trainer state are left behind.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.tiktoken",
)

# Bytes per element of each safetensors dtype code. fp8 and smaller codes are missing on purpose:
# quantized weights come with scales, and adding their raw deltas would be wrong.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # torch names

BINS = 1 << 16  # the radix select splits a float32 bit pattern into two 16-bit halves
CHUNK = 1 << 22  # entries read, merged and counted at a time: float32 temporaries of 16 MB


# ------------------------------------------------------------------ reading model directories
@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def weight_files(directory: Path, argument: str) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (single file or sharded)."""
    if not directory.is_dir():
        raise ConfigError(f"{argument}: {directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{argument}: {directory} has no config.json (not a Hugging Face model directory)")
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in names:
            if not (directory / name).is_file():
                raise ConfigError(f"{argument}: {directory / name} is listed in {INDEX_FILE} but missing")
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{argument}: {directory} has no *.safetensors weights")
    if len(files) > 1:
        raise ConfigError(f"{argument}: {directory} has {len(files)} *.safetensors files but no {INDEX_FILE}")
    return files


def open_weight_file(file: Path, argument: str):
    """safe_open of one weight file; a truncated or damaged one is one line naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{argument}: {file} is not a readable safetensors file ({one_line(err)})") from None


class Weights:
    """The tensors of one model directory: their headers up front, their data a block at a time."""

    def __init__(self, directory: Path, argument: str):
        self.directory = directory
        self.argument = argument
        self.tensors: dict[str, TensorInfo] = {}
        self._handles = {}
        with contextlib.ExitStack() as stack:  # closes the files again if a header is refused
            for file in weight_files(directory, argument):
                handle = stack.enter_context(open_weight_file(file, argument))  # memory-mapped
                self._handles[file] = handle
                for name in handle.keys():
                    piece = handle.get_slice(name)  # the header only, no data is read
                    info = TensorInfo(piece.get_dtype(), tuple(piece.get_shape()), file)
                    if info.dtype not in DTYPE_BYTES:
                        raise ConfigError(
                            f"{argument}: tensor {name} in {file} has dtype {info.dtype}, which "
                            "merge does not handle (dequantize fp8/quantized weights first)"
                        )
                    self.tensors[name] = info
            self._stack = stack.pop_all()

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor in blocks of whole rows (leading dimension) of about CHUNK entries, each read
        from disk when it is needed."""
        info = self.tensors[name]
        handle = self._handles[info.file]
        if not info.shape:  # a scalar
            yield handle.get_tensor(name)
            return
        rows = max(1, CHUNK // max(1, math.prod(info.shape[1:])))
        piece = handle.get_slice(name)
        for start in range(0, info.shape[0], rows):
            yield piece[start : start + rows]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_same_tensors(base: Weights, tuned: Weights) -> None:
    """Same names, shapes and kinds (float or not) in both models, else a one-line error."""
    only_tuned = sorted(tuned.tensors.keys() - base.tensors.keys())
    if only_tuned:
        name = only_tuned[0]
        raise ConfigError(f"tensor {name}: in {tuned.tensors[name].file} (--tuned) but not in --base {base.directory}")
    only_base = sorted(base.tensors.keys() - tuned.tensors.keys())
    if only_base:
        name = only_base[0]
        raise ConfigError(f"tensor {name}: in {base.tensors[name].file} (--base) but not in --tuned {tuned.directory}")
    for name in sorted(tuned.tensors):
        ours, theirs = base.tensors[name], tuned.tensors[name]
        if ours.shape != theirs.shape:
            raise ConfigError(
                f"tensor {name}: shape {list(ours.shape)} in {ours.file} (--base) but "
                f"{list(theirs.shape)} in {theirs.file} (--tuned)"
            )
        if ours.is_float != theirs.is_float:
            raise ConfigError(
                f"tensor {name}: dtype {ours.dtype} in {ours.file} (--base) but "
                f"{theirs.dtype} in {theirs.file} (--tuned)"
            )
    if not tuned.tensors:
        raise ConfigError(f"--tuned: {tuned.directory} holds no tensors")


# ------------------------------------------------------------------ selection
def keep_count(keep: float, numel: int) -> int:
    """How many entries `keep` of `numel` means: the nearest integer (halves up), at least 1."""
    if numel == 0:
        return 0
    return max(1, math.floor(keep * numel + 0.5))


def _bit_patterns(magnitudes: Callable[[], Iterable[torch.Tensor]]) -> Iterator[np.ndarray]:
    """The streamed values as int32 bit patterns (non-negative float32 values sort like their bit
    patterns), cut to at most CHUNK entries (a block can be one long row) so the histogram
    temporaries stay small."""
    import numpy as np

    for values in magnitudes():
        bits = values.reshape(-1).numpy().view(np.int32)  # no copy
        for start in range(0, len(bits), CHUNK):
            yield bits[start : start + CHUNK]


def _bin_of_rank(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest entry (1-based), and that entry's rank inside the bin."""
    import numpy as np

    from_top = np.cumsum(histogram[::-1])  # from_top[i]: entries in the i+1 highest bins
    position = int(np.searchsorted(from_top, rank))  # the first position with from_top >= rank
    top_bin = len(histogram) - 1 - position
    above = int(from_top[position]) - int(histogram[top_bin])
    return top_bin, rank - above


def kth_largest(magnitudes: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """Exact k-th largest (counted with repeats) of the non-negative float32 values streamed by
    `magnitudes()`, which is called twice. Two-level radix select: the first pass counts values per
    high 16 bits of their bit pattern and finds the bin holding the k-th largest; the second counts
    that bin's values per low 16 bits, which pins the value down exactly. No value is kept around.
    The histograms are numpy's: single-threaded, they stay cheap for the many small tensors."""
    import numpy as np

    if k <= 0:
        return math.inf  # nothing to keep
    high = np.zeros(BINS, dtype=np.int64)
    for bits in _bit_patterns(magnitudes):
        high += np.bincount(bits >> 16, minlength=BINS)
    high_bits, rank = _bin_of_rank(high, k)
    low = np.zeros(BINS, dtype=np.int64)
    for bits in _bit_patterns(magnitudes):
        low += np.bincount(bits[(bits >> 16) == high_bits] & 0xFFFF, minlength=BINS)
    low_bits, _ = _bin_of_rank(low, rank)
    return float(np.array([high_bits << 16 | low_bits], dtype=np.int32).view(np.float32)[0])


def merge_block(
    base: torch.Tensor, tuned: torch.Tensor, magnitude: torch.Tensor, threshold: float, scale: float
) -> tuple[torch.Tensor, int]:
    """float32 base + scale * delta where |delta| (`magnitude`) >= threshold, base elsewhere; and the
    kept count. Ties: every entry equal to the threshold is kept, so ties at the threshold can keep a
    few more than k entries. Zero deltas are never counted as kept (adding them changes nothing)."""
    import torch

    mask = (magnitude >= threshold) & (magnitude > 0)
    # lerp is base + scale * (tuned - base), computed so that scale 1 gives tuned bit for bit.
    merged = torch.where(mask, torch.lerp(base, tuned, scale), base)
    return merged, int(mask.sum())


# ------------------------------------------------------------------ writing
def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    shards, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(
    path: Path, names: list[str], infos: dict[str, TensorInfo], produce: Callable[[str], Iterable[torch.Tensor]]
) -> None:
    """A safetensors file written block by block. Shapes and dtypes are known in advance, so the
    header goes first and each tensor's blocks (`produce(name)`, in row order) follow as they are
    made: neither the shard nor one tensor has to sit in memory whole (safetensors' own save_file
    takes a dict of whole tensors)."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = infos[name]
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            written = 0
            for block in produce(name):
                data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
                handle.write(data)
                written += len(data)
            if written != infos[name].nbytes:  # would corrupt every later offset
                raise RuntimeError(f"tensor {name}: produced {written} bytes, expected {infos[name].nbytes}")


def write_index(directory: Path, shards: list[list[str]], infos: dict[str, TensorInfo]) -> None:
    weight_map = {name: shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    total = sum(info.nbytes for info in infos.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_model_files(source: Path, destination: Path) -> None:
    for pattern in COPIED_FILES:
        for path in sorted(source.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, destination / path.name)


# ------------------------------------------------------------------ the merge
@dataclass
class MergeSummary:
    out: Path
    selection: str
    keep: float
    scale: float
    tensors_merged: int = 0
    tensors_copied: int = 0  # not floating point: taken from the tuned model as they are
    entries: int = 0  # floating-point delta entries
    kept: int = 0
    threshold: float | None = None  # global selection only
    shards: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.entries if self.entries else 0.0

    def describe(self) -> str:
        lines = [
            f"merged {self.tensors_merged} floating-point tensors ({self.selection} selection), "
            f"copied {self.tensors_copied} other tensors from --tuned",
            f"kept {self.kept:,} of {self.entries:,} delta entries: {self.kept_fraction:.4%} "
            f"(--keep {self.keep:g}), added back at --scale {self.scale:g}",
        ]
        if self.threshold is not None:
            lines.append(f"global threshold: |delta| >= {self.threshold:.6g}")
        lines.append(f"wrote {self.out} ({self.shards} shard{'s' if self.shards != 1 else ''})")
        return "\n".join(lines)


def check_arguments(
    base: Path, tuned: Path, out: Path, keep: float, scale: float, selection: str, max_shard_mb: float, overwrite: bool
) -> None:
    if not 0 < keep <= 1:  # also refuses NaN
        raise ConfigError(f"--keep must be a fraction in (0, 1], got {keep}")
    if not math.isfinite(scale):
        raise ConfigError(f"--scale must be a finite number, got {scale}")
    if selection not in SELECTIONS:
        raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if not max_shard_mb > 0:
        raise ConfigError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    target = out.resolve()
    for argument, source in (("--base", base), ("--tuned", tuned)):
        if target == source.resolve():
            raise ConfigError(f"--out: {out} is the {argument} directory; write the merged model elsewhere")
        if target in source.resolve().parents:  # --overwrite would delete the input
            raise ConfigError(f"--out: {out} contains the {argument} directory {source}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out: {out} exists and is not empty; pass --overwrite to replace it")


def merge_models(
    base: Path | str,
    tuned: Path | str,
    out: Path | str,
    keep: float = DEFAULT_KEEP,
    scale: float = DEFAULT_SCALE,
    selection: str = DEFAULT_SELECTION,
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
    overwrite: bool = False,
) -> MergeSummary:
    """Write base + scale * TopK_keep(tuned - base) to `out` as a Hugging Face model directory.

    Everything is checked before anything is written; the model is written to a temporary sibling
    of `out` and renamed into place at the end, so `out` is either the whole merged model or
    untouched."""
    base, tuned, out = Path(base), Path(tuned), Path(out)
    check_arguments(base, tuned, out, keep, scale, selection, max_shard_mb, overwrite)
    with Weights(base, "--base") as base_weights, Weights(tuned, "--tuned") as tuned_weights:
        check_same_tensors(base_weights, tuned_weights)
        with staged(out, "merge") as staging:
            summary = _write_merged(base_weights, tuned_weights, staging, keep, scale, selection, max_shard_mb)
            copy_model_files(tuned, staging)
    summary.out = out
    return summary


def _write_merged(
    base: Weights, tuned: Weights, staging: Path, keep: float, scale: float, selection: str, max_shard_mb: float
) -> MergeSummary:
    import torch

    summary = MergeSummary(out=staging, selection=selection, keep=keep, scale=scale)
    names = sorted(tuned.tensors)
    float_names = [name for name in names if tuned.tensors[name].is_float]
    summary.entries = sum(tuned.tensors[name].numel for name in float_names)

    def deltas(name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Block by block: base and tuned in float32, and |tuned - base|."""
        for base_block, tuned_block in zip(base.blocks(name), tuned.blocks(name)):
            base32, tuned32 = base_block.to(torch.float32), tuned_block.to(torch.float32)
            magnitude = (tuned32 - base32).abs()
            if not torch.isfinite(magnitude).all():  # a NaN or inf would poison the ranking
                raise ConfigError(
                    f"tensor {name}: non-finite values in {base.tensors[name].file} (--base) "
                    f"or {tuned.tensors[name].file} (--tuned)"
                )
            yield base32, tuned32, magnitude

    def magnitudes(names: list[str]) -> Callable[[], Iterator[torch.Tensor]]:
        """What kth_largest streams (twice): |delta| of the named tensors, block by block."""
        return lambda: (magnitude for name in names for _, _, magnitude in deltas(name))

    if selection == "global":
        # Two streaming passes find the exact threshold; the writing pass below applies it.
        summary.threshold = kth_largest(magnitudes(float_names), keep_count(keep, summary.entries))

    def produce(name: str) -> Iterator[torch.Tensor]:
        info = tuned.tensors[name]
        if not info.is_float:
            summary.tensors_copied += 1
            yield from tuned.blocks(name)
            return
        threshold = summary.threshold
        if threshold is None:  # per tensor: this tensor's own top fraction
            threshold = kth_largest(magnitudes([name]), keep_count(keep, info.numel))
        summary.tensors_merged += 1
        for base32, tuned32, magnitude in deltas(name):
            merged, kept = merge_block(base32, tuned32, magnitude, threshold, scale)
            summary.kept += kept
            yield merged.to(getattr(torch, FLOAT_DTYPES[info.dtype]))  # the output keeps the tuned dtypes

    max_bytes = max(1, int(max_shard_mb * 1024 * 1024))
    shards = plan_shards({name: tuned.tensors[name].nbytes for name in names}, max_bytes)
    for i, shard in enumerate(shards):
        write_shard(staging / shard_name(i, len(shards)), shard, tuned.tensors, produce)
    if len(shards) > 1:
        write_index(staging, shards, tuned.tensors)
    summary.shards = len(shards)
    return summary


# ------------------------------------------------------------------ command line
def cmd_merge(args) -> int:
    summary = merge_models(
        args.base,
        args.tuned,
        args.out,
        keep=args.keep,
        scale=args.scale,
        selection=args.selection,
        max_shard_mb=args.max_shard_mb,
        overwrite=args.overwrite,
    )
    print(summary.describe())
    return 0


def add_parser(commands) -> argparse.ArgumentParser:
    """`efficient-rl merge`: add it to the CLI's subcommands (an argparse subparsers object)."""
    merge = commands.add_parser(
        "merge", help="DLER update-selective merge: base + scale * top-keep fraction of (tuned - base)"
    )
    merge.add_argument("--base", required=True, help="the model before RL: a Hugging Face model directory")
    merge.add_argument("--tuned", required=True, help="the RL-tuned model or a run checkpoint directory")
    merge.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    merge.add_argument(
        "--keep",
        type=float,
        default=DEFAULT_KEEP,
        help=f"fraction of delta entries kept, largest magnitude first (default {DEFAULT_KEEP})",
    )
    merge.add_argument(
        "--scale", type=float, default=DEFAULT_SCALE, help=f"factor on the kept deltas (default {DEFAULT_SCALE})"
    )
    scope = merge.add_mutually_exclusive_group()
    scope.add_argument(
        "--global",
        dest="selection",
        action="store_const",
        const="global",
        help="rank all floating-point delta entries of the model together (default; TIES)",
    )
    scope.add_argument(
        "--per-tensor",
        dest="selection",
        action="store_const",
        const="per-tensor",
        help="each tensor keeps its own top fraction (mergekit)",
    )
    merge.add_argument(
        "--max-shard-mb",
        type=float,
        default=DEFAULT_MAX_SHARD_MB,
        help=f"output shard size limit in MiB (default {DEFAULT_MAX_SHARD_MB:g})",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    merge.set_defaults(handler=cmd_merge, selection=DEFAULT_SELECTION)
    return merge
