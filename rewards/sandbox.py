"""Run model-written Python in a contained child process.

What the child gets (Linux; see docs/rewards.md for exactly what is and is not contained):
- a fresh, private /tmp (and /dev/shm, /var/tmp) holding only its working directory, in a mount
  namespace of its own; the rest of the file system read-only to it, as user nobody;
- no network: a network namespace of its own, with no interface up;
- resource limits: CPU seconds, address space, file size, open files, processes;
- a scrubbed environment; a wall-clock timeout after which its whole process group is killed;
- stdout and stderr read up to a cap, after which it is killed.
Isolation needs root (as in a container) or unprivileged user namespaces; without them the
child still runs with the limits, timeout and output cap, and `SandboxResult.contained` says so.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
NOBODY = 65534
PRIVATE_DIRS = ("/tmp", "/dev/shm", "/var/tmp")  # the world-writable places


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    cpu_seconds: int = 5
    memory_mb: int = 512  # address space
    file_mb: int = 16  # largest file it may write
    processes: int = 32  # for user nobody, machine-wide while it runs
    output_bytes: int = 64 * 1024  # stdout and stderr together


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    reason: str  # "ok", "exit code N", "timeout", "output over cap", "killed by signal N"
    contained: bool  # namespaces and user nobody were in force


def isolate(code: str, limits: Limits) -> None:
    """In the child, before exec: namespaces, private tmp dirs, the program file, limits, user."""
    if isolation_available():
        libc = ctypes.CDLL(None, use_errno=True)
        checked(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
        checked(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount")  # nothing leaks out
        for directory in PRIVATE_DIRS:
            if os.path.isdir(directory):
                size = f"size={limits.file_mb * 4}m".encode()
                checked(libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, size), f"mount {directory}")
        os.makedirs("/tmp/sandbox")
        os.chown("/tmp/sandbox", NOBODY, NOBODY)
        os.chdir("/tmp/sandbox")
    with open("main.py", "w") as program:
        program.write(code)
    for limit, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_mb << 20),
                         (resource.RLIMIT_FSIZE, limits.file_mb << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits.processes)):
        resource.setrlimit(limit, (value, value))
    if isolation_available():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def checked(status: int, what: str) -> None:
    if status != 0:
        raise OSError(ctypes.get_errno(), f"sandbox {what} failed")


@functools.cache
def isolation_available() -> bool:
    """Root (as in a container) with namespaces allowed: try it once in a throwaway child."""
    if os.getuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        os._exit(0 if ctypes.CDLL(None).unshare(CLONE_NEWNS | CLONE_NEWNET) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def interpreter() -> str:
    """A Python that user nobody can run: the system one (a virtualenv may live under /root)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run_python(code: str, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """Run `code` as a program with `stdin`; never raises for anything the program does."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="erl-sandbox-") as workdir:  # used when not isolated
        child = subprocess.Popen(
            [interpreter(), "-I", "-S", "main.py"],  # isolated mode: no site, no user paths, no PYTHON*
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
            preexec_fn=lambda: isolate(code, limits),
        )
        return collect(child, stdin, limits, started)


def collect(child: subprocess.Popen, stdin: str, limits: Limits, started: float) -> SandboxResult:
    """Feed stdin, read both pipes up to the cap, enforce the wall clock; kill the group at the end."""
    try:
        child.stdin.write(stdin.encode())
        child.stdin.close()
    except BrokenPipeError:
        pass
    selector = selectors.DefaultSelector()
    output = {child.stdout: bytearray(), child.stderr: bytearray()}
    for stream in output:
        selector.register(stream, selectors.EVENT_READ)
    reason = None
    while selector.get_map():
        remaining = limits.timeout - (time.monotonic() - started)
        if remaining <= 0:
            reason = "timeout"
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
            output[key.fileobj] += chunk
        if sum(map(len, output.values())) > limits.output_bytes:
            reason = "output over cap"
            break
    kill_group(child)
    returncode = child.wait()
    if reason is None:
        reason = "ok" if returncode == 0 else (f"killed by signal {-returncode}" if returncode < 0
                                              else f"exit code {returncode}")
    stdout, stderr = (bytes(output[s][: limits.output_bytes]).decode(errors="replace")
                      for s in (child.stdout, child.stderr))
    return SandboxResult(returncode, stdout, stderr, reason, contained=isolation_available())


def kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the program and everything it started
    except ProcessLookupError:
        pass
