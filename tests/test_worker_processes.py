"""The worker as an operator runs it: ``mcp-hotmesh worker`` in its own OS process, logged in as a worker role.

The caller side is this process (a caller role). Tool handlers touch files in a directory the test watches,
so the test knows which process ran what without any side channel into the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from mcp_hotmesh._streams import CallerAPI
from tests.conftest import Env
from tests.test_worker import finished, until

pytestmark = pytest.mark.anyio

TOOLS = '''
from __future__ import annotations

import os
from pathlib import Path

import anyio

from mcp_hotmesh._tools import ToolSet

toolset = ToolSet()
MARKS = Path(os.environ["TEST_MARKS"])


@toolset.tool(topic="proc.work")
async def work(n: int) -> dict[str, int]:
    """Do some work on n."""
    (MARKS / f"started-{n}-{os.getpid()}").touch()
    if os.environ.get("TEST_HANG") == "1":
        await anyio.sleep(3600)
    return {"n": n, "pid": os.getpid()}
'''


class Workers:
    """Starts ``mcp-hotmesh worker`` processes; kills whatever is left at the end of the test."""

    def __init__(self, env: Env, tmp_path: Path) -> None:
        self.env = env
        self.tmp = tmp_path
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        (tmp_path / "tools.py").write_text(textwrap.dedent(TOOLS))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, dsn: str, *extra: str, hang: bool = False, **env_vars: str) -> subprocess.Popen[bytes]:
        environ = {**os.environ, "TEST_MARKS": str(self.marks), "TEST_HANG": "1" if hang else "0",
                   "HOTMESH_POLL_INTERVAL": "0.2", **env_vars}
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcp_hotmesh", "worker", "--tools", f"{self.tmp / 'tools.py'}:toolset",
             "--dsn", dsn, "--schema", self.env.schema, *extra],
            stdout=subprocess.PIPE, stderr=log, env=environ,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def started(self, n: int) -> list[int]:
        """The pids of the processes that started the handler for ``n``."""
        return [int(p.name.rsplit("-", 1)[1]) for p in self.marks.glob(f"started-{n}-*")]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()


@pytest.fixture
def workers(env: Env, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(env, tmp_path)
    try:
        yield w
    finally:
        w.cleanup()


async def live_workers(caller: CallerAPI) -> int:
    tools = await caller.tools()
    return tools[0].live_workers if tools else 0


async def wait_live(caller: CallerAPI, count: int) -> None:
    async def reached() -> bool:
        return await live_workers(caller) == count

    await until(reached, seconds=15)


async def wait_exit(proc: subprocess.Popen[bytes], seconds: float = 10) -> int:
    with anyio.fail_after(seconds):
        while (code := proc.poll()) is None:  # noqa: ASYNC110  (a process, not an event)
            await anyio.sleep(0.02)
    return code


async def test_cli_worker_answers_through_a_secured_role(env: Env, workers: Workers) -> None:
    role = await env.provision(["proc.work"], "worker")
    _, caller = await env.caller(["proc.work"])
    proc = workers.start(env.dsn(role))
    await wait_live(caller, 1)
    [tool] = await caller.tools()
    assert tool.name == "proc_work" and tool.description == "Do some work on n."
    result = await finished(caller, await caller.call("proc.work", "", {"n": 7}, 10_000))
    assert result.state == "done" and result.result == {"n": 7, "pid": proc.pid}
    proc.send_signal(signal.SIGINT)
    assert await wait_exit(proc) == 0
    assert proc.stdout is not None and proc.stdout.read() == b""  # logs go to stderr only
    assert await live_workers(caller) == 0


async def test_killed_worker_message_reclaimed_after_reclaim_delay_and_answered_once(
    env: Env, workers: Workers
) -> None:
    role = await env.provision(["proc.work"], "worker")
    _, caller = await env.caller(["proc.work"])
    doomed = workers.start(env.dsn(role), hang=True, HOTMESH_RECLAIM_DELAY_MS="400")
    await wait_live(caller, 1)
    call_id = await caller.call("proc.work", "", {"n": 1}, 30_000)

    async def started() -> bool:
        return workers.started(1) == [doomed.pid]

    await until(started)
    doomed.send_signal(signal.SIGKILL)
    await wait_exit(doomed)
    rescuer = workers.start(env.dsn(role), HOTMESH_RECLAIM_DELAY_MS="400")
    result = await finished(caller, call_id, seconds=4)  # the default 10 s lease would not do
    assert result.state == "done" and result.result == {"n": 1, "pid": rescuer.pid}
    row = await env.call_row(call_id)
    assert row["reclaims"] == 1 and row["attempt"] == 0
    assert sorted(workers.started(1)) == sorted([doomed.pid, rescuer.pid])  # it ran once more, not twice


async def test_sigterm_releases_claimed_work_for_another_worker_at_once(env: Env, workers: Workers) -> None:
    role = await env.provision(["proc.work"], "worker")
    _, caller = await env.caller(["proc.work"])
    base = f"postgresql://{env.server.tcp_host}:{env.server.tcp_port}/{env.server.database}"
    credentials = (f"--user={role.role}", f"--password={role.password}")  # the seed's workerCredentials
    # ("=": a generated password may start with "-")
    # The default 10 s lease: only a release (not a reclaim) lets another worker take the message quickly.
    leaving = workers.start(base, *credentials, hang=True, HOTMESH_SHUTDOWN_GRACE="0.3")
    await wait_live(caller, 1)
    call_id = await caller.call("proc.work", "", {"n": 2}, 60_000)

    async def started() -> bool:
        return workers.started(2) == [leaving.pid]

    await until(started)
    leaving.send_signal(signal.SIGTERM)
    assert await wait_exit(leaving, seconds=5) == 0
    assert await live_workers(caller) == 0  # worker_goodbye
    row = await env.call_row(call_id)
    assert row["state"] == "ready" and row["reclaims"] == 0 and row["attempt"] == 0
    staying = workers.start(base, *credentials)
    result = await finished(caller, call_id, seconds=5)
    assert result.result == {"n": 2, "pid": staying.pid}
    assert (await env.call_row(call_id))["reclaims"] == 0



async def test_cli_worker_refused_stream_is_one_line_on_stderr(env: Env, workers: Workers) -> None:
    role = await env.provision(["elsewhere"], "worker")
    proc = workers.start(env.dsn(role))
    assert await wait_exit(proc) == 1
    assert proc.stdout is not None and proc.stdout.read() == b""
    err = (workers.tmp / "worker-0.log").read_text().strip().splitlines()
    assert err == ["mcp-hotmesh worker: error: permission denied for stream 'proc.work'"]
