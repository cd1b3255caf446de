"""Does the GPU install resolve? `make test` runs this (it is no pytest module): the `gpu` extra
(the official vLLM, which brings a CUDA torch 2.14, with Ray and DeepSpeed) and flash-attn
together with this project, for Linux x86-64 and Python 3.11, from package metadata only.

pip cannot show it here without downloading every wheel: this machine's package index serves no
separate metadata files, so pip's resolver (`pip install --dry-run --report`, with or without
`--use-feature=fast-deps`) fetched 1.8 GB of wheels, torch's 555 MB and vLLM's 336 MB among them.
uv's resolver reads a wheel's METADATA with HTTP range requests instead (seconds, a few MB).
flash-attn is an sdist whose build imports torch, so no resolver can read its requirements
without building: pip builds its metadata here (an 8.5 MB download, no CUDA compile), with the
installed torch, and uv is handed what that build says.

Exit 0 and one line of what resolved; otherwise a one-line reason and exit 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def pinned(requirement: str) -> tuple[str, str]:
    name, version = requirement.split("==")
    return name.strip(), version.strip()


def flash_attn_requirements(requirement: str, work: Path) -> list[str]:
    """flash-attn's Requires-Dist, from its sdist's metadata built the way its docs install it
    (no build isolation: its setup imports torch) and without compiling its CUDA kernels."""
    report = work / "flash-attn.json"
    env = {**os.environ, "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--no-deps",
            "--no-build-isolation",
            "--report",
            str(report),
            requirement,
        ],
        check=True,
        env=env,
    )
    (install,) = json.loads(report.read_text())["install"]
    return install["metadata"].get("requires_dist", [])


class Unresolvable(Exception):
    pass


def resolve(
    requirements: list[str], flash_name: str, flash_version: str, flash_requires: list[str], work: Path
) -> tuple[dict[str, str], str]:
    """(name -> version, the lock file) of everything `requirements` resolve to, by uv, without
    installing anything."""
    config = work / "uv.toml"
    config.write_text(
        f'[[dependency-metadata]]\nname = "{flash_name}"\nversion = "{flash_version}"\n'
        f"requires-dist = {json.dumps(flash_requires)}\n"
    )
    inputs = work / "requirements.in"
    inputs.write_text("\n".join(requirements) + "\n")
    lock = work / "requirements.txt"
    uv = Path(sys.executable).parent / "uv"
    result = subprocess.run(
        [
            str(uv),
            "pip",
            "compile",
            "--quiet",
            "--config-file",
            str(config),
            "--cache-dir",
            str(work / "cache"),
            *PLATFORM,
            "-o",
            str(lock),
            str(inputs),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise Unresolvable(" ".join(result.stderr.split())[-600:])
    text = lock.read_text()
    return {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)
    }, text


def problems(versions: dict[str, str], lock: str, gpu: list[str], flash: str) -> list[str]:
    found = []
    for requirement in gpu + [flash]:
        if "==" in requirement:
            name, version = pinned(requirement)
            if versions.get(name) != version:
                found.append(f"{name} resolved to {versions.get(name)}, not the pinned {version}")
    if not versions.get("torch", "").startswith("2.14"):
        found.append(f"torch resolved to {versions.get('torch')}, not the 2.14 the official vLLM builds on")
    if "+cpu" in versions.get("torch", ""):
        found.append("torch resolved to the CPU wheel")
    if not re.search(r"^efficient-rl @ ", lock, re.M):
        found.append("the project itself is not in the resolution")
    return found


def main(also: list[str] = ()) -> int:
    """`also`: further requirements, to see the check fail (`python tests/gpu_install.py torch==2.13.0`)."""
    table = extras()
    flash = table["flash-attn"][0]
    flash_name, flash_version = pinned(flash)
    with tempfile.TemporaryDirectory(prefix="erl-gpu-install-") as work:
        work = Path(work)
        flash_requires = flash_attn_requirements(flash, work)
        try:
            versions, lock = resolve(
                [f"efficient-rl[gpu] @ {ROOT.as_uri()}", flash, *also], flash_name, flash_version, flash_requires, work
            )
        except Unresolvable as err:
            print(f"gpu install: does not resolve: {err}", file=sys.stderr)
            return 1
    found = problems(versions, lock, table["gpu"], flash)
    if found:
        print(f"gpu install: {'; '.join(found)}", file=sys.stderr)
        return 1
    print(
        f"gpu install resolves: {len(versions)} packages, torch {versions['torch']}, vllm {versions['vllm']}, "
        f"transformers {versions['transformers']}, deepspeed {versions['deepspeed']}, ray {versions['ray']}, "
        f"flash-attn {versions[flash_name]} (requires {', '.join(flash_requires)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
