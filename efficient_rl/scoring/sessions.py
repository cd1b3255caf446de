"""The processes of a session, read from /proc, and ending them.

Each reward worker leads a session of its own (pool.worker_main), so every process a reward
starts, its children's children, and those that moved to a process group of their own, carry the
worker's pid as their session id, even after their parent died and they were adopted by init.
Only a process that starts a session itself (setsid, a daemon's double fork) leaves it.

A process is named by (pid, start time): a pid alone could have been reused by the time it is
signalled. Linux frees a pid number only once no process uses it as its pid, group or session, so
a session id read here still names the session it was read from while any member is alive.
"""

from __future__ import annotations

import os
import signal
import time

Identity = tuple[int, int]  # (pid, start time in clock ticks since boot)
REAP_POLL = 0.01  # seconds between looks while killed processes die


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat from the state on (field 3), or None if it is gone; the name may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def members(session: int) -> dict[Identity, int]:
    """Every live (not zombie) process of `session`: identity -> parent pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        # fields[0] state, [1] ppid, [3] session, [19] start time
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == session:
            found[(int(entry), int(fields[19]))] = int(fields[1])
    return found


def last_pid() -> int:
    """The pid the kernel gave last, to any process or thread: unchanged, nothing was started anywhere."""
    with open("/proc/loadavg") as loadavg:
        return int(loadavg.read().split()[-1])


def identity(pid: int) -> Identity | None:
    fields = stat_fields(pid)
    return None if fields is None else (pid, int(fields[19]))


def end_members(session: int, spare: set[Identity], deadline: float) -> int:
    """SIGKILL every live process of `session` not in `spare` until none is left (or the deadline:
    a process stuck in the kernel cannot be hurried); how many there were.

    Rounds, because a member may fork between the listing and its signal; a killed one forks no more.
    Direct children of this process are reaped, so none lingers as a zombie.
    """
    ended: set[Identity] = set()
    children = set()
    while True:
        left = {who: parent for who, parent in members(session).items() if who not in spare}
        for (pid, started), parent in left.items():
            if identity(pid) == (pid, started):  # still the process listed, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ended.add((pid, started))
            if parent == os.getpid():
                children.add(pid)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(REAP_POLL)
    for pid in children:  # dead by now (zombies), unless the deadline came first
        reap(pid)
    return len(ended)


def reap(pid: int) -> None:
    """Collect a killed child of this process if it has died (never waits)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # reaped elsewhere (subprocess's own bookkeeping)
