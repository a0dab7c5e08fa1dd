"""What the kernel says about a server's processes: CPU time, RSS, peak RSS, listening sockets.

Read from /proc (Linux only), for a process and the workers it forked, so a
`relay serve --workers N` counts as one server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp (include/net/tcp_states.h)


@dataclass(frozen=True)
class Usage:
    """CPU seconds and memory of a process tree at one instant."""

    cpu: float  # utime + stime, all threads, summed over the tree
    rss: int  # bytes, VmRSS summed over the tree
    peak: int  # bytes, VmHWM summed over the tree (since start or the last reset)
    processes: int


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (a forking server's workers)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    # Fields after the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    fields = (PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def usage(pids: list[int]) -> Usage:
    cpu, rss, peak, alive = 0.0, 0, 0, 0
    for pid in pids:
        try:
            cpu += cpu_seconds(pid)
            rss += _status_kib(pid, "VmRSS:") * 1024
            peak += _status_kib(pid, "VmHWM:") * 1024
            alive += 1
        except (OSError, IndexError, ValueError):  # exited between listing and reading
            continue
    return Usage(cpu, rss, peak, alive)


def reset_peak(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (clear_refs "5", Linux 4.0+), so a peak is per phase.

    Returns False where that is not allowed; the caller then falls back to sampling.
    """
    try:
        for pid in pids:
            (PROC / str(pid) / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def listeners(port: int) -> int:
    """How many sockets listen on `port` on IPv4: one per SO_REUSEPORT worker once all are up."""
    wanted = f":{port:04X}"
    count = 0
    for line in (PROC / "net" / "tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted) and fields[3] == TCP_LISTEN:
            count += 1
    return count
