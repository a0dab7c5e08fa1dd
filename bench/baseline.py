"""The cost of failover and the queue when the queue is off: a same-run pair.

The relay of this checkout with `RELAY_QUEUE=off` (the default) against the
relay as it was before failover and the durable queue (`BASELINE`, a commit of
this repository), each a fresh process with a fresh database, the same 2 KiB
load in alternate rounds against the same sink. Only the two relays differ; a
drift of the shared machine hits both.

The earlier relay is unpacked from git (`git archive`) into the run's
directory; without git or without that commit (a shallow clone, a tarball) the
row is skipped with one line saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import report, stack

if TYPE_CHECKING:
    from bench.run import Runner, Side

# The last commit before failover and the queue: the relay the pair measures
# against ("git log --oneline 4a1bbdf -1": the CLI split into relay/cli/).
BASELINE = "4a1bbdf"
GIT_TIMEOUT = 60.0


async def unpack(revision: str, into: Path) -> str | None:
    """The relay at `revision` extracted under `into`; None, or why it could not be."""
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(stack.REPO),
            "archive",
            "--format=tar",
            revision,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return f"git is not available ({exc.strerror})"
    try:
        async with asyncio.timeout(GIT_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return "git archive did not finish"
    if process.returncode != 0:
        return f"git archive {revision}: {err.decode(errors='replace').strip()}"
    await asyncio.to_thread(_extract, out, into)
    return None


def _extract(tar: bytes, into: Path) -> None:
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")


async def pair(runner: Runner, setup: stack.Setup, sink: stack.ReferenceServer) -> None:
    """2 KiB through the baseline relay and this one (queue off), alternating."""
    from bench.run import WARMUP_MESSAGES, merge, relay_side

    head = runner.headline()
    if head is None or not runner.plan.baseline:
        return
    revision = runner.plan.baseline
    source = setup.directory / "baseline-source"
    why = await unpack(revision, source)
    if why is not None:
        runner.log(f"baseline pair skipped: {why}")
        runner.result["baseline"] = {"revision": revision, "skipped": why}
        return
    sessions, per = head["sessions"], head["messages_per_session"]
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    sides: dict[str, Side] = {}
    async with contextlib.AsyncExitStack() as relays:
        # "off": the baseline (no failover, no queue); "on": this relay, queue off.
        for name, repo in (("off", source), ("on", stack.REPO)):
            directory = setup.directory / f"baseline-{name}"
            directory.mkdir()
            own = await stack.configure(directory, repo=repo)
            relay = await relays.enter_async_context(
                stack.Relay.start(
                    own,
                    sink.port,
                    workers=1,
                    max_connections=runner.max_connections,
                    extra_env={"RELAY_QUEUE": "off"} if repo == stack.REPO else {},
                    repo=repo,
                )
            )
            sides[name] = relay_side(own, relay, sink)
            await runner.closed(sides[name], report.HEADLINE_SIZE, 2, WARMUP_MESSAGES // 2)
        await runner.alternate(
            f"queue off against {revision}", sides["off"], sides["on"], sessions, per, rounds
        )
    entry: dict[str, Any] = {
        "label": f"{report.size_label(report.HEADLINE_SIZE)} x {sessions} sessions",
        "revision": revision,
    }
    for name, key in (("off", "baseline"), ("on", "relay")):
        merged = merge(rounds[name])
        entry[key] = {
            "messages_per_s": merged["messages_per_s"],
            "server_cpu_s_per_1000": merged["server_cpu_s_per_1000"],
            "forwarded_all": merged["forwarded_all"],
        }
    entry["rate_ratio"] = report.ratio(
        entry["relay"]["messages_per_s"], entry["baseline"]["messages_per_s"]
    )
    entry["cpu_ratio"] = report.ratio(
        entry["relay"]["server_cpu_s_per_1000"], entry["baseline"]["server_cpu_s_per_1000"]
    )
    runner.result["baseline"] = entry
