"""The code sandbox against hostile programs, and the code reward on top of it. All for real."""

import os
import socket

import pytest

from efficient_rl.rewards.code import code_reward, extract_code
from efficient_rl.rewards.sandbox import Limits, isolation_available, run_python

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


@pytest.mark.parametrize("name, program, reason, message", [
    ("writing outside its directory", "open('/etc/PWNED', 'w').write('x')", "exit code 1", "Permission denied"),
    ("writing into the project", "open({project!r} + '/PWNED', 'w').write('x')", "exit code 1",
     "Error"),  # Permission denied, or No such file when the checkout lives under the private /tmp
    ("deleting a host file", "import os; os.remove({marker!r})", "exit code 1", "No such file"),
    ("opening a socket", "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)", "exit code 1",
     "Network is unreachable"),
    ("a fork bomb", "import os\nwhile True:\n    os.fork()", "exit code 1", "Resource temporarily unavailable"),
    ("allocating 10 GB", "x = bytearray(10 * 2**30)", "exit code 1", "MemoryError"),
    ("sleeping forever", "import time; time.sleep(3600)", "timeout", ""),
    ("printing 1 GB", "import sys\nfor _ in range(1024): sys.stdout.write('x' * 2**20)", "output over cap", ""),
    ("signalling its parent", "import os, signal; os.kill({parent}, signal.SIGKILL)", "exit code 1",
     "Operation not permitted"),
])
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
    assert code_reward(SOLUTION, {"tests": TESTS}) == {"score": 1.0, "accuracy": 1.0, "has_code": 1.0,
                                                        "timeouts": 0.0}
    off_by_one = SOLUTION.replace("a + b", "a + b + (a == 0)")
    assert code_reward(off_by_one, {"tests": TESTS})["score"] == pytest.approx(2 / 3)
    assert code_reward(off_by_one, {"tests": TESTS}, all_or_nothing=True)["score"] == 0.0
    hangs = "```python\nimport time; time.sleep(60)\n```"
    assert code_reward(hangs, {"tests": TESTS[:1]}, timeout=1.0)["timeouts"] == 1.0
    asserts = "```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward(asserts, {"tests": "assert add(2, 2) == 4\nassert add(-1, 1) == 0"})["score"] == 1.0
    assert code_reward("no code here", {"tests": TESTS})["has_code"] == 0.0
