"""Output directories written whole or not at all (`export`, `merge`).

The files go to a staging directory beside the target (one filesystem, so the final rename is
atomic), which is renamed into place only once everything is written. A failure on the way (a full
disk, a kill) leaves the target as it was: absent, empty, or (merge --overwrite) the old model.
The staging name is fixed per target, so the leftovers of a killed command are cleared by the next.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from efficient_rl.errors import OutputFailure, one_line


def staging_of(out: Path, command: str) -> Path:
    return out.parent / f".{out.name}.{command}-tmp"


@contextlib.contextmanager
def staged(out: Path, command: str) -> Iterator[Path]:
    """A fresh staging directory for `out`; published to `out` when the block ends without an
    error, removed in every case. An OSError while writing is one line (OutputFailure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_of(out, command)
    shutil.rmtree(staging, ignore_errors=True)
    from safetensors import SafetensorError  # its writer reports a full disk as this, not an OSError

    try:
        staging.mkdir()
        yield staging
        publish(staging, out)
    except (OSError, SafetensorError) as err:
        raise OutputFailure(f"{command}: {out} could not be written ({one_line(err)}); it is left as it was") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Move the finished directory to `out`. An empty `out` is replaced; a full one (merge
    --overwrite) is moved aside first and removed only once the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)
        return
    old = staging.with_name(staging.name + "-old")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
