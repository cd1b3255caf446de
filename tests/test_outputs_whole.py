"""Outputs written whole or not at all: `export` and `merge` write beside their target and rename
into place (efficient_rl/models/publish.py), so a disk that fills up mid-write leaves the target
as it was and no staging behind; an unreadable input is one line naming the file.

A full disk is a file-size limit on the command's process (RLIMIT_FSIZE, with SIGXFSZ ignored so
that a write past it fails with an OSError, as on a full disk), set below the model's size."""

import resource
import shutil
import signal
import subprocess

import pytest

from conftest import run_cli

FILE_LIMIT = 64 * 1024  # bytes: below the tiny lab model's weight file (about 340 KB)


def limited_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def run_on_a_full_disk(*arguments, cwd) -> subprocess.CompletedProcess:
    return run_cli(*arguments, cwd=cwd, timeout=600, preexec_fn=limited_disk)


def leftovers(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("target_exists", [False, True], ids=["new", "empty"])
def test_an_export_that_fills_the_disk_leaves_its_target_as_it_was(tiny_checkpoint, tmp_path, target_exists):
    out = tmp_path / "exported"
    if target_exists:
        out.mkdir()
    done = run_on_a_full_disk("export", tiny_checkpoint, out, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    *progress, line = done.stderr.strip().splitlines()  # transformers' progress bars, then the one line
    assert "Traceback" not in done.stderr
    assert line.startswith(f"efficient-rl: error: export: {out} could not be written (") and "File too large" in line
    assert leftovers(tmp_path) == (["exported"] if target_exists else [])  # no staging directory left
    assert not target_exists or not any(out.iterdir())
    # The next export, with room, is not blocked by anything the failed one left.
    from conftest import run_cli

    again = run_cli("export", tiny_checkpoint, out, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def test_a_merge_that_fills_the_disk_keeps_the_model_it_would_overwrite(tiny_checkpoint, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, out)
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    done = run_on_a_full_disk(
        "merge", "--base", tiny_model_dir, "--tuned", tiny_checkpoint, "--out", out, "--overwrite", cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr[-2000:]
    *progress, line = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert line.startswith(f"efficient-rl: error: merge: {out} could not be written (")
    assert leftovers(tmp_path) == ["merged"]
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_a_truncated_weight_file_is_one_line_naming_it(tiny_checkpoint, tiny_model_dir, tmp_path):
    from conftest import run_cli

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_checkpoint, tuned)
    (weights,) = tuned.glob("model*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    done = run_cli("merge", "--base", tiny_model_dir, "--tuned", tuned, "--out", tmp_path / "merged", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"efficient-rl: error: --tuned: {weights} is not a readable safetensors file (")
    assert leftovers(tmp_path) == ["tuned"]
