"""Run model-written Python in a contained child process.

A run is three processes besides the caller (Linux; docs/rewards.md lists exactly what is and is
not contained):

    caller --fork--> supervisor --fork--> init --fork, exec--> python main.py
                     (host pids)          pid 1 of the run's own pid, IPC, mount and network namespaces

- The supervisor unshares the namespaces (mount, network and IPC apply to it and its children, the
  pid namespace to its children only, so its one child is pid 1 there) and is the only process
  that stops a run: it kills init's process group, and when init dies the kernel kills every
  process left in the namespace. It waits for init without reaping it (WNOWAIT) until the run is
  over, so it never signals a pid that could have been reused.
- Init mounts a fresh /proc (this namespace's processes only) and private tmpfs on /tmp, /dev/shm
  and /var/tmp, caps SysV IPC, writes main.py and runs the program as user nobody with rlimits.
  When the program exits, init counts the processes still alive (the leftovers), writes the
  result and exits: the leftovers die with it, and the IPC namespace takes its shared memory,
  message queues and semaphores with it.
- The caller feeds stdin, reads stdout and stderr up to the cap, and reads the result from a
  status pipe that only the supervisor holds open to the end: its end of file means the run,
  namespace and all, is over. At the wall-clock timeout, or past the output cap, the caller stops
  the run through the supervisor (SIGALRM), which also stops it on its own timer and when the
  caller dies (PR_SET_PDEATHSIG).
Isolation needs root (as in a container); without it the supervisor runs the program itself, as
the calling user, with the limits, timeout and output cap only, and `SandboxResult.contained` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import math
import os
import resource
import selectors
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NOBODY = 65534
PRIVATE_DIRS = ("/tmp", "/dev/shm", "/var/tmp")  # the world-writable places
PROGRAM_DIR = "/tmp/sandbox"  # inside the private /tmp
PROGRAM_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
STATUS_FD = 3  # the supervisor's, init's and (until exec) the program's end of the status pipe
# A job's stop signals (Slurm's requeue reaches every process, Ctrl-C a terminal's group): the
# supervisor ignores them, as the reward workers do, so a run in the last step still ends with its
# program's own result; its life is bounded by the run's timeout and by its caller's anyway.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
GRACE = 2.0  # seconds: past the timeout, the supervisor stops the run itself; past a stop, the caller kills it
SYSV_QUEUES, SYSV_SEMAPHORES = 16, "250 4096 32 64"  # per IPC namespace: kernel.msgmni and kernel.sem


class SandboxError(RuntimeError):
    """The sandbox failed, not the program: a setup step was refused, or its supervisor was lost."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    cpu_seconds: int = 5
    memory_mb: int = 512  # address space, and all SysV shared memory together
    file_mb: int = 16  # largest file it may write
    processes: int = 32  # for user nobody, machine-wide while it runs
    output_bytes: int = 64 * 1024  # stdout and stderr together

    def __post_init__(self):
        for name in ("timeout", "cpu_seconds", "memory_mb", "file_mb", "processes", "output_bytes"):
            value = getattr(self, name)
            kinds = (int, float) if name == "timeout" else int
            if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
                kind = "number" if name == "timeout" else "whole number"
                raise ValueError(f"sandbox Limits.{name} must be a positive {kind}, got {value!r}")


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    reason: str  # "ok", "exit code N", "timeout", "output over cap", "killed by signal N"
    contained: bool  # namespaces and user nobody were in force
    leftover_processes: int = 0  # still running when the program exited, then killed (counted when contained)


@dataclass(frozen=True)
class Plan:
    """What a forked supervisor needs: it gets this object by the fork itself, nothing is sent."""

    source: bytes
    limits: Limits
    isolated: bool
    workdir: str | None = None  # the program's directory when not isolated
    probe: bool = False  # set everything up, run nothing: isolation_available()


def run_python(code: str, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """Run `code` as a program with `stdin`; never raises for anything the program does."""
    source, data = checked_arguments(code, stdin, limits)
    if isolation_available():
        return supervised_run(Plan(source, limits, isolated=True), data)
    return run_uncontained(code, stdin, limits)


def run_uncontained(code: str, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """The fallback without namespaces or user switch: limits, timeout and output cap only."""
    source, data = checked_arguments(code, stdin, limits)
    with tempfile.TemporaryDirectory(prefix="erl-sandbox-") as workdir:
        write_program(workdir, source)
        return supervised_run(Plan(source, limits, isolated=False, workdir=workdir), data)


def checked_arguments(code, stdin, limits) -> tuple[bytes, bytes]:
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise TypeError(
            f"run_python takes the program and its stdin as str, got {type(code).__name__} and {type(stdin).__name__}"
        )
    if not isinstance(limits, Limits):
        raise TypeError(f"run_python's limits must be a sandbox Limits, got {type(limits).__name__}")
    return code.encode(), stdin.encode()


@functools.cache
def isolation_available() -> bool:
    """Root with namespaces allowed: set a run up once, the same way as for real, with no program."""
    if not sys.platform.startswith("linux") or os.getuid() != 0:
        return False
    try:
        probe = supervised_run(Plan(b"", Limits(timeout=30.0), isolated=True, probe=True), b"")
    except (SandboxError, OSError):
        return False
    return probe.reason == "ok"


def interpreter() -> str:
    """A Python that user nobody can run: the system one (a virtualenv may live under /root)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


# ---- the caller's side ----------------------------------------------------------------------


class Pipes:
    """stdin, stdout, stderr and the status pipe between the caller and the supervisor."""

    def __init__(self):
        self.pairs: list[tuple[int, int]] = []
        try:
            for _ in range(4):
                self.pairs.append(os.pipe())
        except OSError:
            self.close(self.everything())
            raise
        (_, self.stdin), (self.stdout, _), (self.stderr, _), (self.status, _) = self.pairs
        self.open = {self.stdin, self.stdout, self.stderr, self.status}  # the caller's ends

    def release(self, fd: int) -> None:
        """Close one of the caller's ends once: a second close could hit a reused fd number."""
        if fd in self.open:
            self.open.discard(fd)
            os.close(fd)

    def child_ends(self) -> list[int]:  # in the order they become fds 0, 1, 2 and STATUS_FD
        return [self.pairs[0][0], self.pairs[1][1], self.pairs[2][1], self.pairs[3][1]]

    def everything(self) -> list[int]:
        return [fd for pair in self.pairs for fd in pair]

    def attach(self) -> None:
        """In the supervisor: the child ends become 0, 1, 2 and STATUS_FD; every other fd closes."""
        # Copied above 9 first: a child end that is itself 0-3 must not be overwritten before use.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in self.child_ends()]
        for target, fd in enumerate(high):
            os.dup2(fd, target, inheritable=target != STATUS_FD)  # the program never gets the status pipe
        os.closerange(STATUS_FD + 1, os.sysconf("SC_OPEN_MAX"))  # the caller's sockets and pipes too

    @staticmethod
    def close(fds) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Transcript:
    stdout: bytearray
    stderr: bytearray
    status: bytearray
    stopped: str | None = None  # "timeout" or "output over cap" when the caller stopped the run
    finished: bool = False  # the status pipe reached end of file: the supervisor is gone


def supervised_run(plan: Plan, stdin: bytes) -> SandboxResult:
    """Fork the supervisor, exchange stdin, output and status with it, and always reap it."""
    started = time.monotonic()
    caller = os.getpid()
    libc()  # loaded here: a fork taken while another thread holds the loader's lock must not need it
    pipes = Pipes()
    try:
        pid = os.fork()
    except OSError:
        pipes.close(pipes.everything())
        raise
    if pid == 0:
        become_supervisor(plan, pipes, caller)
    pipes.close(pipes.child_ends())
    transcript = Transcript(bytearray(), bytearray(), bytearray())
    try:
        exchange(pid, pipes, stdin, plan.limits, started, transcript)
    finally:
        if not transcript.finished:
            os.kill(pid, signal.SIGKILL)  # not reaped yet, so its pid is still its own
        os.waitpid(pid, 0)
        for fd in list(pipes.open):
            pipes.release(fd)
    return result_of(transcript, plan, started)


def exchange(pid: int, pipes: Pipes, stdin: bytes, limits: Limits, started: float, transcript: Transcript) -> None:
    """Feed stdin and read everything until the status pipe closes; stop the run at its limits."""
    with selectors.DefaultSelector() as selector:
        pump(pid, pipes, stdin, limits, started, transcript, selector)


def pump(
    pid: int,
    pipes: Pipes,
    stdin: bytes,
    limits: Limits,
    started: float,
    transcript: Transcript,
    selector: selectors.BaseSelector,
) -> None:
    sinks = {pipes.stdout: transcript.stdout, pipes.stderr: transcript.stderr, pipes.status: transcript.status}
    for fd in sinks:
        selector.register(fd, selectors.EVENT_READ)
    feeder = Feeder(pipes, stdin, selector)
    stop_at, kill_at = started + limits.timeout, None
    while not transcript.finished:
        now = time.monotonic()
        if kill_at is None and now >= stop_at:
            if not has_result(transcript):  # else the program is over and the supervisor just finishing
                stop(pid, transcript, "timeout")
            kill_at = now + GRACE
        elif kill_at is not None and now >= kill_at:
            return  # the supervisor did not end in time: supervised_run kills it
        for key, events in selector.select(timeout=(kill_at or stop_at) - now):
            if events & selectors.EVENT_WRITE:
                feeder.feed()
            elif not read_into(key.fd, sinks[key.fd], limits):
                selector.unregister(key.fd)
                if key.fd == pipes.status:
                    transcript.finished = True
        if transcript.stopped is None and output_size(transcript) > limits.output_bytes:
            stop(pid, transcript, "output over cap")
            kill_at = time.monotonic() + GRACE
    feeder.close()
    for fd in (pipes.stdout, pipes.stderr):  # what the program wrote last, before its end was known
        if fd in selector.get_map():
            drain(fd, sinks[fd], limits)


class Feeder:
    """Writes stdin without ever blocking: a program that does not read it cannot hang the caller."""

    def __init__(self, pipes: Pipes, data: bytes, selector):
        self.pipes, self.fd, self.data, self.selector, self.offset = pipes, pipes.stdin, memoryview(data), selector, 0
        if data:
            os.set_blocking(self.fd, False)
            selector.register(self.fd, selectors.EVENT_WRITE)
        else:
            self.close()

    def feed(self) -> None:
        try:
            self.offset += os.write(self.fd, self.data[self.offset : self.offset + 65536])
        except BlockingIOError:
            return
        except BrokenPipeError:  # it exited, or closed its stdin: the rest is not wanted
            self.offset = len(self.data)
        if self.offset >= len(self.data):
            self.close()

    def close(self) -> None:  # end of file for the program
        if self.fd in self.selector.get_map():
            self.selector.unregister(self.fd)
        self.pipes.release(self.fd)


def read_into(fd: int, sink: bytearray, limits: Limits) -> bool:
    """One read; False at end of file. Output past the cap is read (so no writer blocks) but dropped."""
    chunk = os.read(fd, 65536)
    if len(sink) <= limits.output_bytes:
        sink += chunk
    return bool(chunk)


def drain(fd: int, sink: bytearray, limits: Limits) -> None:
    """Read what is already there. Without namespaces a process the program left may hold the pipe open."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while read_into(fd, sink, limits):
            pass


def output_size(transcript: Transcript) -> int:
    return len(transcript.stdout) + len(transcript.stderr)


def has_result(transcript: Transcript) -> bool:
    return b"result " in transcript.status


def stop(pid: int, transcript: Transcript, reason: str) -> None:
    """Ask the supervisor (alive: the status pipe is open) to kill the run; it then reports and exits."""
    transcript.stopped = reason
    os.kill(pid, signal.SIGALRM)


def result_of(transcript: Transcript, plan: Plan, started: float) -> SandboxResult:
    """The reason is the program's own end, unless the caller stopped it; sandbox failures raise."""
    lines = transcript.status.decode(errors="replace").splitlines()
    errors = [line.removeprefix("error ") for line in lines if line.startswith("error ")]
    if errors:
        raise SandboxError(f"sandbox setup failed: {errors[0]}")
    results = [line.split()[1:] for line in lines if line.startswith("result ")]
    returncode, leftovers = (int(results[0][0]), int(results[0][1])) if results else (None, 0)
    reason = transcript.stopped
    if reason is None and output_size(transcript) > plan.limits.output_bytes:
        reason = "output over cap"  # the last of it came with the drain
    if reason is None and returncode is None:
        if time.monotonic() - started < plan.limits.timeout:
            raise SandboxError("the sandbox's supervisor ended without a result")
        reason = "timeout"  # the supervisor's own timer stopped it, before the caller did
    if reason is not None and returncode is None:
        returncode = -signal.SIGKILL  # what the stop did to it
    if reason is None:
        reason = (
            "ok"
            if returncode == 0
            else (f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}")
        )
    stdout, stderr = (
        bytes(stream[: plan.limits.output_bytes]).decode(errors="replace")
        for stream in (transcript.stdout, transcript.stderr)
    )
    return SandboxResult(returncode, stdout, stderr, reason, contained=plan.isolated, leftover_processes=leftovers)


# ---- the forked processes: supervisor, init, program --------------------------------------------


def become_supervisor(plan: Plan, pipes: Pipes, caller: int):
    """The caller's forked child: wire the pipes, then supervise. Never returns into the caller's code."""
    try:
        pipes.attach()
        os.setsid()  # away from the caller's terminal and process group
    except BaseException:
        os._exit(1)  # no status pipe to report on: the caller sees its end of file and no result
    end_child(supervise, plan, caller)


def end_child(work, *args):
    """Run `work` in a forked child and exit with it; a failure goes to the status pipe first."""
    code = 1
    try:
        work(*args)
        code = 0
    except BaseException as error:
        with contextlib.suppress(BaseException):
            message = " ".join(f"{work.__name__}: {type(error).__name__}: {error}".split())
            os.write(STATUS_FD, f"error {message}\n".encode(errors="replace"))
    finally:
        os._exit(code)


def supervise(plan: Plan, caller: int) -> None:
    """Start the run (init, or the program itself without isolation), stop it when asked, reap it."""
    reset_caller_signals()
    stopper = Stopper()
    signal.signal(signal.SIGALRM, stopper)
    prctl(PR_SET_PDEATHSIG, signal.SIGALRM)  # the caller died: stop the run, nobody reads it any more
    if os.getppid() != caller:
        return  # it died before the line above
    if plan.isolated:
        enter_namespaces()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # no stop between fork and knowing the pid
    child = os.fork()
    if child == 0:
        end_child(run_init if plan.isolated else run_program, plan)
    with contextlib.suppress(OSError):
        os.setpgid(child, child)  # as the child does itself: whichever runs first
    stopper.target = child
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    signal.setitimer(signal.ITIMER_REAL, plan.limits.timeout + GRACE)  # if the caller never stops it
    ended = os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # a zombie still holds its pid
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if not plan.isolated:
        kill_group(child)  # what the program left in its group: all there is to reach without a pid namespace
        if not stopper.fired:
            report(f"result {exit_code(ended)} 0")
    os.waitpid(child, 0)


class Stopper:
    """The supervisor's SIGALRM: the caller's stop, its own timer, or the caller's death."""

    def __init__(self):
        self.target: int | None = None
        self.fired = False

    def __call__(self, signum, frame) -> None:
        self.fired = True
        if self.target is None:
            os._exit(1)  # nothing started yet
        kill_group(self.target)  # with isolation: init, and with it the whole namespace


def run_init(plan: Plan) -> None:
    """Pid 1 of the run's namespaces: their file system, the program, and the count of what it left."""
    os.setpgid(0, 0)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the supervisor killed: the namespace goes with init
    signal.signal(signal.SIGALRM, lambda signum, frame: os._exit(1))  # a backstop if that came too late
    signal.alarm(math.ceil(plan.limits.timeout + 2 * GRACE))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    prepare_namespace(plan.limits)
    write_program(PROGRAM_DIR, plan.source)
    if plan.probe:
        report("result 0 0")
        return
    program = os.fork()
    if program == 0:
        end_child(run_program, plan)
    returncode = wait_for(program)
    report(f"result {returncode} {count_leftovers()}")  # returning, init exits: the kernel kills them


def run_program(plan: Plan) -> None:
    """The program's process: its user, signals and limits, then exec; only a failure returns."""
    if plan.isolated:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    else:
        os.setpgid(0, 0)  # a group of its own, which the supervisor kills at the end
        os.chdir(plan.workdir)
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # set-user-ID programs (su, mount) gain nothing
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the user switch, which clears it
    for restored in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores both; a program starts with them
        signal.signal(restored, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    python = interpreter()
    argv = [python, "-I", "-S", "main.py"]  # isolated mode: no site, no user paths, no PYTHON*
    set_limits(plan.limits)  # last: the address-space limit binds this fork of the caller too
    os.execve(python, argv, PROGRAM_ENV)


def set_limits(limits: Limits) -> None:
    for limit, value in (
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.file_mb << 20),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, limits.processes),
    ):
        hard = resource.getrlimit(limit)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # already lower: as user nobody it could not be raised, nor need be
        resource.setrlimit(limit, (value, value))


def enter_namespaces() -> None:
    """In the supervisor: new mount, network and IPC namespaces now, a new pid namespace for its child."""
    checked(libc().unshare(NAMESPACES), "unshare")
    checked(libc().mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount /")  # nothing leaks out


def prepare_namespace(limits: Limits) -> None:
    """In init: its own /proc, capped SysV IPC, fresh private tmp dirs, the program's directory."""
    # A fresh proc shows this namespace's processes only (init counts them), and its IPC sysctls.
    checked(libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
    cap_sysv_ipc(limits.memory_mb)
    for directory in PRIVATE_DIRS:
        if os.path.isdir(directory):
            size = f"size={limits.file_mb * 4}m".encode()
            checked(
                libc().mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size), f"mount {directory}"
            )
    os.makedirs(PROGRAM_DIR)
    os.chown(PROGRAM_DIR, NOBODY, NOBODY)
    os.chdir(PROGRAM_DIR)


def cap_sysv_ipc(memory_mb: int) -> None:
    """A fresh IPC namespace allows near-unlimited SysV memory (detached shm stays resident, queues and
    semaphores are kernel memory) that no rlimit counts: all segments together get the memory limit."""
    page = os.sysconf("SC_PAGE_SIZE")
    for name, value in (
        ("shmmax", memory_mb << 20),
        ("shmall", (memory_mb << 20) // page),
        ("msgmni", SYSV_QUEUES),
        ("sem", SYSV_SEMAPHORES),
    ):
        with open(f"/proc/sys/kernel/{name}", "w") as setting:
            setting.write(f"{value}\n")


def write_program(directory: str, source: bytes) -> None:
    path = os.path.join(directory, "main.py")
    with open(path, "wb") as program:
        program.write(source)
    os.chmod(path, 0o644)  # readable by nobody whatever the caller's umask; written by root, so not writable


def wait_for(program: int) -> int:
    """Reap every child (orphans re-parent to init) until the program itself: its exit code."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            return os.waitstatus_to_exitcode(status)


def count_leftovers() -> int:
    """In init: processes alive in the namespace besides init, once those already ended are reaped."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
    return sum(
        1
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) != os.getpid() and process_state(entry) not in ("Z", "X", None)
    )


def process_state(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]  # after the command, which may hold spaces
    except (OSError, IndexError):
        return None  # gone meanwhile


def reset_caller_signals() -> None:
    """The caller's Python handlers are its business, not the supervisor's; the job's stop signals ignored."""
    for number in signal.valid_signals():
        if number not in (signal.SIGKILL, signal.SIGSTOP) and callable(signal.getsignal(number)):
            signal.signal(number, signal.SIG_DFL)
    for number in JOB_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # ignored, children would be reaped before their end is known


def kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def exit_code(ended) -> int:
    return ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status


def report(line: str) -> None:
    os.write(STATUS_FD, f"{line}\n".encode())


@functools.cache
def libc():
    library = ctypes.CDLL(None, use_errno=True)
    for name in ("unshare", "mount", "prctl"):  # looked up now, in the caller, and kept by ctypes
        getattr(library, name)
    return library


def prctl(option: int, value: int) -> None:
    arguments = (ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    checked(libc().prctl(option, *arguments), f"prctl {option}")


def checked(status: int, what: str) -> None:
    if status != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"sandbox {what} failed: {os.strerror(error)}")
