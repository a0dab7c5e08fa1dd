"""Worker processes never outlive their parent, with real processes."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Lines

from relay.store.facade import Store

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    """Poll `condition` until it holds; fail after `seconds` (a bound, not a sync)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Running, not a zombie nobody reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def start_workers(tmp_path, cert_dir):
    if not Path("/proc/self/task").exists():
        pytest.skip("reads the process tree from /proc")
    database = tmp_path / "relay.db"
    Store(database).migrate()
    procs: list[subprocess.Popen[str]] = []

    def start(
        workers: int = 2, *, log: bool = False, **settings: str
    ) -> tuple[subprocess.Popen[str], int]:
        """`log`: the relay's JSON log lines on the process's stderr, else discarded."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(ROOT),
            "RELAY_LISTEN": f"127.0.0.1:{port}",
            "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
            "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
            "RELAY_DATABASE": str(database),
            "RELAY_HOSTNAME": "relay.test",
            "RELAY_WORKERS": str(workers),
            "RELAY_LOG_FORMAT": "json",
            **settings,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if log else subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        for pid in [proc.pid, *children(proc.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def listening_sockets(port: int) -> int:
    """Sockets listening on 127.0.0.1:`port`: one per worker that has bound (SO_REUSEPORT)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    fields = [line.split() for line in lines]
    return sum(1 for f in fields if f[1] == f"0100007F:{port:04X}" and f[3] == "0A")


def test_the_per_address_cap_holds_across_workers(start_workers, client_tls):
    _, port = start_workers(2, RELAY_MAX_CONNECTIONS_PER_IP="4")
    wait_for(lambda: listening_sockets(port) == 2)  # both workers take connections
    greeted, refused = [], []
    try:
        for _ in range(12):  # the kernel spreads them over both workers
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            tls = client_tls.wrap_socket(sock, server_hostname="localhost")
            line = tls.makefile("rb").readline().decode().rstrip("\r\n")
            if line.startswith("220 "):
                greeted.append(tls)
            else:
                refused.append(line)
                tls.close()
        assert len(greeted) == 4
        assert refused == ["421 4.7.0 Too many connections from your address"] * 8
    finally:
        for tls in greeted:
            tls.close()


def test_a_dead_workers_connections_leave_the_hosts_count(start_workers, client_tls):
    parent, port = start_workers(2, RELAY_MAX_CONNECTIONS_PER_IP="4")
    wait_for(lambda: listening_sockets(port) == 2 and len(children(parent.pid)) == 2)

    def connect() -> tuple[ssl.SSLSocket, str]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = client_tls.wrap_socket(sock, server_hostname="localhost")
        return tls, tls.makefile("rb").readline().decode()

    greeted = [connect() for _ in range(4)]
    assert all(line.startswith("220 ") for _, line in greeted)
    victim = children(parent.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim) and victim not in children(parent.pid))
    # The victim's connections were closed by the kernel when it died.
    open_ = [tls for tls, _ in greeted if not select.select([tls], [], [], 0)[0]]
    try:
        lines = []
        for _ in range(6):
            tls, line = connect()
            lines.append(line.rstrip("\r\n"))
            (greeted.append((tls, line)) if line.startswith("220 ") else tls.close())
        assert sum(line.startswith("220 ") for line in lines) == 4 - len(open_)
    finally:
        for tls, _ in greeted:
            tls.close()


def test_workers_stop_when_the_parent_is_killed(start_workers):
    parent, port = start_workers(2)
    wait_for(lambda: accepts(port) and len(children(parent.pid)) == 2)
    workers = children(parent.pid)
    parent.kill()  # SIGKILL: the parent runs nothing more
    parent.wait(10)
    wait_for(lambda: not any(alive(w) for w in workers))
    assert not accepts(port)


def test_sigterm_during_the_start_leaves_no_process(start_workers):
    parent, _ = start_workers(4)
    wait_for(lambda: len(children(parent.pid)) >= 1)  # forking has begun
    seen = set(children(parent.pid))
    parent.send_signal(signal.SIGTERM)
    seen |= set(children(parent.pid))
    parent.wait(30)
    wait_for(lambda: not any(alive(w) for w in seen))


def pending_signals(pid: int) -> int:
    """The signals waiting for `pid`, its own and its thread group's (/proc/PID/status)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_each_worker_is_sent_sigterm_by_the_kernel_when_the_parent_dies(start_workers):
    # The watchdog would stop a worker within a second anyway, so that a worker
    # stopping is no proof: stopped (SIGSTOP) workers cannot run their watchdog,
    # and only PR_SET_PDEATHSIG can leave a SIGTERM pending for them.
    parent, _ = start_workers(2, log=True)
    assert parent.stderr is not None
    log = Lines(parent.stderr)

    def listening(lines: list[str]) -> list[int]:
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r["pid"] for r in records if r["message"].startswith("relay listening on")]

    assert log.wait_for(lambda lines: len(listening(lines)) == 2), log.lines
    workers = listening(log.lines)
    assert set(workers) == set(children(parent.pid))
    try:
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
            wait_for(lambda w=worker: stopped(w))
            assert not pending_signals(worker) & (1 << (signal.SIGTERM - 1))
        parent.kill()
        parent.wait(10)
        for worker in workers:
            assert pending_signals(worker) & (1 << (signal.SIGTERM - 1)), worker
    finally:
        for worker in workers:
            if alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_workers_share_the_starttls_port_and_its_per_address_cap(start_workers, client_tls):
    """Each worker binds both ports; one address's connections count on both."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        submission = s.getsockname()[1]
    _, port = start_workers(
        2, RELAY_MAX_CONNECTIONS_PER_IP="4", RELAY_STARTTLS_LISTEN=f"127.0.0.1:{submission}"
    )
    wait_for(lambda: listening_sockets(port) == 2 and listening_sockets(submission) == 2)
    opened: list[socket.socket] = []
    try:
        implicit = client_tls.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        )
        opened.append(implicit)
        assert implicit.makefile("rb").readline().startswith(b"220 ")
        lines = []
        # The kernel spreads them over both workers; at most 8 from the address at
        # once, so none is over twice the cap (dropped without a 421).
        for _ in range(7):
            sock = socket.create_connection(("127.0.0.1", submission), timeout=10)
            opened.append(sock)
            reader = sock.makefile("rb")
            line = reader.readline().decode().rstrip("\r\n")
            lines.append(line)
            if not line.startswith("220 "):
                continue
            sock.sendall(b"EHLO client.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
            tls = client_tls.wrap_socket(sock, server_hostname="localhost")
            opened.append(tls)
            tls.sendall(b"NOOP\r\n")
            assert tls.makefile("rb").readline() == b"250 2.0.0 Ok\r\n"
        assert sum(line.startswith("220 ") for line in lines) == 3  # 4 less the implicit one
        refused = [line for line in lines if not line.startswith("220 ")]
        assert refused == ["421 4.7.0 Too many connections from your address"] * 4
    finally:
        for sock in opened:
            sock.close()
