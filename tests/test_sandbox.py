"""The code sandbox against hostile programs, and the code reward on top of it. All for real."""

import ctypes
import os
import random
import signal
import socket
import threading
import time
import uuid

import pytest

from efficient_rl.rewards.code import code_reward, extract_code
from efficient_rl.rewards.sandbox import Limits, isolation_available, run_python, run_uncontained

LIMITS = Limits(timeout=3.0)


@pytest.fixture
def bait(tmp_path):
    """A file and a listening socket on the host that a contained program must not reach."""
    marker = tmp_path / "marker"
    marker.write_text("host data")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield marker, server.getsockname()[1]
    server.close()


def test_this_machine_isolates():
    assert isolation_available()  # root in a container here: namespaces and user nobody in force


def test_a_plain_program_runs_with_its_stdin():
    result = run_python("print(sum(map(int, input().split())))", stdin="2 3 4\n", limits=LIMITS)
    assert (result.reason, result.stdout, result.contained) == ("ok", "9\n", True)


@pytest.mark.parametrize(
    "name, program, reason, message",
    [
        ("writing outside its directory", "open('/etc/PWNED', 'w').write('x')", "exit code 1", "Permission denied"),
        (
            "writing into the project",
            "open({project!r} + '/PWNED', 'w').write('x')",
            "exit code 1",
            "Error",
        ),  # Permission denied, or No such file when the checkout lives under the private /tmp
        ("deleting a host file", "import os; os.remove({marker!r})", "exit code 1", "No such file"),
        (
            "opening a socket",
            "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
            "exit code 1",
            "Network is unreachable",
        ),
        ("a fork bomb", "import os\nwhile True:\n    os.fork()", "exit code 1", "Resource temporarily unavailable"),
        ("allocating 10 GB", "x = bytearray(10 * 2**30)", "exit code 1", "MemoryError"),
        ("sleeping forever", "import time; time.sleep(3600)", "timeout", ""),
        ("printing 1 GB", "import sys\nfor _ in range(1024): sys.stdout.write('x' * 2**20)", "output over cap", ""),
        (
            "signalling its parent",
            "import os, signal; os.kill({parent}, signal.SIGKILL)",
            "exit code 1",
            "No such process",
        ),  # a pid namespace of its own: no host process has a pid in it
    ],
)
def test_hostile_programs_are_contained(bait, name, program, reason, message):
    marker, port = bait
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = program.format(project=project, marker=str(marker), port=port, parent=os.getpid())
    result = run_python(code, limits=LIMITS)
    assert result.reason == reason, (name, result.stderr[-500:])
    assert message in result.stderr
    assert len(result.stdout) <= LIMITS.output_bytes
    assert marker.read_text() == "host data"
    assert not os.path.exists(os.path.join(project, "PWNED")) and not os.path.exists("/etc/PWNED")


SOLUTION = "Here it is:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\nDone."
TESTS = [{"input": "1 2", "output": "3"}, {"input": "10 -4", "output": "6"}, {"input": "0 0", "output": "0"}]


def test_code_reward_scores_the_fraction_of_tests_passed():
    assert extract_code(SOLUTION) == "a, b = map(int, input().split())\nprint(a + b)\n"
    assert code_reward(SOLUTION, {"tests": TESTS}) == {
        "score": 1.0,
        "accuracy": 1.0,
        "has_code": 1.0,
        "timeouts": 0.0,
        "leftovers": 0.0,
    }
    off_by_one = SOLUTION.replace("a + b", "a + b + (a == 0)")
    assert code_reward(off_by_one, {"tests": TESTS})["score"] == pytest.approx(2 / 3)
    assert code_reward(off_by_one, {"tests": TESTS}, all_or_nothing=True)["score"] == 0.0
    hangs = "```python\nimport time; time.sleep(60)\n```"
    assert code_reward(hangs, {"tests": TESTS[:1]}, timeout=1.0)["timeouts"] == 1.0
    asserts = "```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward(asserts, {"tests": "assert add(2, 2) == 4\nassert add(-1, 1) == 0"})["score"] == 1.0
    assert code_reward("no code here", {"tests": TESTS})["has_code"] == 0.0
    daemon = "```python\nimport os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint(3)\n```"
    assert code_reward(daemon, {"tests": TESTS[:1]}) == {
        "score": 1.0,
        "accuracy": 1.0,
        "has_code": 1.0,
        "timeouts": 0.0,
        "leftovers": 1.0,
    }


# ---- programs that try to outlive their run ------------------------------------------------------
# Each of these fails against a sandbox that only kills the program's process group. A marker in a
# process's argv lets the test find it among the host's processes; a test that fails kills what it finds.

HOSTILE = Limits(timeout=20.0)  # a hang guard only: each of these ends on its own, long before it


@pytest.fixture
def marker():
    """A unique argv word for the processes a test's program starts; whatever still carries it is killed."""
    word = f"erl-sandbox-test-{uuid.uuid4().hex}"
    yield word
    for pid in processes_with(word):
        with_suppressed(os.kill, pid, signal.SIGKILL)


def processes_with(word: str) -> list[int]:
    """Host pids whose command line holds `word` (a process in a pid namespace is listed here too)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if word.encode() in cmdline.read():
                        found.append(int(entry))
            except OSError:
                pass  # gone meanwhile
    return found


def with_suppressed(function, *args):
    try:
        function(*args)
    except OSError:
        pass


def sleeper(word: str, then: str = "") -> str:
    """Program text: exec a Python that runs `then` and sleeps a minute, with `word` in its argv."""
    return (
        f"os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', "
        f"'import os, sys, time\\n{then}\\ntime.sleep(60)', {word!r}])"
    )


def test_a_grandchild_in_a_new_session_dies_with_the_program(marker):
    # The double fork of a daemon: the grandchild is in a session of its own and holds stdout open.
    # It says it is running (a byte on a pipe) before the program exits at once.
    program = f"""
import os, sys
ready, tell = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.dup2(tell, 9)  # inheritable: the exec'd sleeper tells on fd 9
        {sleeper(marker, 'os.write(9, b"x")')}
    os._exit(0)
assert os.read(ready, 1) == b"x"
print("parent done")
"""
    result = run_python(program, limits=HOSTILE)
    assert (result.reason, result.stdout) == ("ok", "parent done\n"), result.stderr[-500:]
    assert result.leftover_processes >= 1  # the grandchild (and the child, if it had not exited yet)
    assert processes_with(marker) == []


def test_b_a_program_that_hits_the_process_limit_does_not_fail_the_next(marker):
    # Children in sessions of their own, until user nobody's process limit refuses one: before pid
    # namespaces they held it machine-wide, and the next, correct program failed to start a subprocess.
    limits = Limits(timeout=20.0, processes=12)
    hog = f"""
import os, sys
children = 0
while True:
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        os.setsid()
        {sleeper(marker)}
    children += 1
print(children)
"""
    first = run_python(hog, limits=limits)
    assert first.reason == "ok", first.stderr[-500:]
    assert int(first.stdout) >= 1 and first.leftover_processes == int(first.stdout)
    assert processes_with(marker) == []
    legitimate = (
        "import subprocess, sys\n"
        "print(subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True, text=True,"
        " check=True).stdout.strip())"
    )
    second = run_python(legitimate, limits=limits)
    assert (second.reason, second.stdout, second.leftover_processes) == ("ok", "1\n", 0), second.stderr[-500:]


def shm_segments(first_key: int, count: int) -> list[int]:
    """Ids of the host's SysV shared memory segments with keys first_key .. first_key + count - 1."""
    with open("/proc/sysvipc/shm") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [int(row[1]) for row in rows if first_key <= int(row[0]) < first_key + count]


def test_c_sysv_shared_memory_is_capped_and_goes_with_the_program():
    # Segments attached, touched and detached stay resident, counted by no rlimit: 16 x 64 MB is 1 GB
    # against a 256 MB limit, and without an IPC namespace they outlived the program.
    key, count = random.randrange(1 << 20, 1 << 30), 16
    limits = Limits(timeout=30.0, memory_mb=256)
    program = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.shmdt.argtypes = [ctypes.c_void_p]
size, held = 64 << 20, 0
for index in range({count}):
    segment = libc.shmget({key} + index, size, 0o1600)  # IPC_CREAT, read and write for its owner
    if segment < 0:
        break
    address = libc.shmat(segment, None, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        break
    ctypes.memset(address, 1, size)
    libc.shmdt(address)
    held += size >> 20
print(held)
"""
    try:
        result = run_python(program, limits=limits)
        assert result.reason == "ok", result.stderr[-500:]
        assert 0 < int(result.stdout) <= limits.memory_mb  # refused past the memory limit
        assert shm_segments(key, count) == []  # and nothing of it outlived the program
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        for segment in shm_segments(key, count):  # only when the test failed: a sandbox leaked them
            libc.shmctl(segment, 0, None)  # IPC_RMID


def test_d_a_program_cannot_ptrace_another_run(marker):
    # Both runs are user nobody, and nothing restricts ptrace here (no Yama): before pid namespaces
    # run 2 attached to run 1's program by its host pid. Now run 1 has no pid in run 2's namespace.
    results = {}
    first = threading.Thread(
        target=lambda: results.update(
            first=run_python(f"import os, sys\n{sleeper(marker)}", limits=Limits(timeout=60.0))
        )
    )
    first.start()
    try:
        give_up = time.monotonic() + 30  # a hang guard
        while not processes_with(marker) and time.monotonic() < give_up:
            time.sleep(0.05)
        [target] = processes_with(marker)
        attacher = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
attached = [pid for pid in sorted({{{target}, 1, 2}} - {{os.getpid()}}) if libc.ptrace(16, pid, None, None) == 0]
print(attached)  # 16 is PTRACE_ATTACH
"""
        second = run_python(attacher, limits=Limits(timeout=20.0))
        assert (second.reason, second.stdout) == ("ok", "[]\n"), second.stderr[-500:]
    finally:
        for pid in processes_with(marker):
            with_suppressed(os.kill, pid, signal.SIGKILL)  # ends run 1 now
        first.join(timeout=90)
    assert not first.is_alive()
    assert results["first"].reason == "killed by signal 9"


def test_without_isolation_the_limits_timeout_and_cap_still_hold():
    # The fallback for a machine without namespaces (not root): the same supervisor, no containment.
    plain = run_uncontained("print(input()[::-1])", stdin="olleh\n", limits=LIMITS)
    assert (plain.reason, plain.stdout, plain.contained) == ("ok", "hello\n", False)
    assert run_uncontained("import time; time.sleep(3600)", limits=Limits(timeout=1.0)).reason == "timeout"
    assert run_uncontained("x = bytearray(10 * 2**30)", limits=LIMITS).reason == "exit code 1"
    printing = "import sys\nfor _ in range(1024): sys.stdout.write('x' * 2**20)"
    assert run_uncontained(printing, limits=LIMITS).reason == "output over cap"


def test_unread_stdin_cannot_hang_the_caller():
    # 1 MB of stdin for a program that never reads it: the writes wait in the selector, not in write().
    result = run_python("import time; time.sleep(3600)", stdin="x" * 2**20, limits=Limits(timeout=1.0))
    assert result.reason == "timeout"


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="as str"):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="Limits.memory_mb must be a positive whole number"):
        Limits(memory_mb=0)
