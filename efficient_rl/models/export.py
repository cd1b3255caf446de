"""`efficient-rl export RUN_OR_CHECKPOINT OUT_DIR`: a run's checkpoint as a plain Hugging Face model
directory (save_pretrained of the model and the tokenizer), without optimizer or trainer state.
It is written in the checkpoint's dtype, the model's own (models/files.py): a model released in
bf16 exports in bf16, a float32 one in float32; the learner's float32 masters stay behind.

A run directory exports its latest usable checkpoint. A LoRA run's checkpoint holds the merged
weights next to its adapter/ (learner/torch_learner.py `save`), so the export is the merged
model: from_pretrained reads it with no PEFT installed, and every engine serves it as is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from efficient_rl.errors import ConfigError


def checkpoint_of(source: Path) -> Path:
    """The checkpoint `source` names: itself, or a run directory's latest usable one."""
    from efficient_rl.run.checkpoint import TRAINER_STATE_FILE, checkpoint_problem, latest_checkpoint

    if not source.is_dir():
        raise ConfigError(f"export: {source}: no such directory (give a run directory or one of its checkpoints)")
    if (source / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise ConfigError(f"export: {source}: the run has no usable checkpoint in {source / 'checkpoints'}")
        return checkpoint
    if not (source / TRAINER_STATE_FILE).is_file():
        raise ConfigError(
            f"export: {source}: neither a run directory (with checkpoints/) nor a checkpoint "
            f"(with {TRAINER_STATE_FILE})"
        )
    problem = checkpoint_problem(source)
    if problem is not None:
        raise ConfigError(f"export: damaged checkpoint: {problem}")
    return source


def export(source: Path, out: Path) -> Path:
    """Write the model of `source`'s checkpoint to `out` (a new or empty directory); returns the checkpoint."""
    from efficient_rl.data.prompts import load_tokenizer
    from efficient_rl.models.files import released_dtype
    from efficient_rl.models.modeling import load_model
    from efficient_rl.models.publish import staged

    checkpoint = checkpoint_of(source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: {out}: exists and is not an empty directory")
    # In the dtype the checkpoint's files are in: no upcast, and save_pretrained's config says it.
    model = load_model(checkpoint, released_dtype(checkpoint))
    with staged(out, "export") as staging:  # whole or not at all: a full disk leaves no half model
        model.save_pretrained(staging)
        load_tokenizer(checkpoint).save_pretrained(staging)
    return checkpoint


def cmd_export(args) -> int:
    checkpoint = export(Path(args.source), Path(args.out))
    print(f"exported {checkpoint} to {args.out}")
    return 0


def add_parser(commands) -> argparse.ArgumentParser:
    """`efficient-rl export`: add it to the CLI's subcommands."""
    parser = commands.add_parser(
        "export", help="a run's checkpoint (LoRA runs: merged) as a Hugging Face model directory"
    )
    parser.add_argument("source", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("out", help="output directory, new or empty")
    parser.set_defaults(handler=cmd_export)
    return parser
