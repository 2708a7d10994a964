"""The worker as an operator runs it: ``mcp-hotmesh worker`` in its own OS process, logged in as a worker role.

The caller side is this process (a caller role). Tool handlers touch files in a directory the test watches,
so the test knows which process ran what without any side channel into the worker.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import anyio
import pytest

from mcp_hotmesh._streams import CallerAPI
from tests.helpers import Env, WorkerProcs, finished, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # worker subprocesses

# The workers' tool module, after helpers.TOOLS_PREAMBLE (toolset, MARKS).
TOOLS = '''
@toolset.tool(topic="proc.work", name="proc_work")
async def work(n: int) -> dict[str, int]:
    """Do some work on n."""
    (MARKS / f"started-{n}-{os.getpid()}").touch()
    if os.environ.get("TEST_HANG") == "1":
        await anyio.sleep(3600)
    return {"n": n, "pid": os.getpid()}
'''
HANG = {"TEST_HANG": "1"}  # the handler never finishes


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcs]:
    with WorkerProcs(tmp_path, TOOLS) as w:
        yield w


def started(workers: WorkerProcs, n: int) -> set[int]:
    """The pids of the processes that started the handler for ``n``."""
    return workers.ran("started").get(f"started-{n}", set())


async def live_workers(caller: CallerAPI) -> int:
    tools = await caller.tools()
    return tools[0].live_workers if tools else 0


async def wait_live(caller: CallerAPI, count: int) -> None:
    async def reached() -> bool:
        return await live_workers(caller) == count

    await wait_for(reached, 15)


async def wait_exit(proc: subprocess.Popen[bytes], seconds: float = 10) -> int:
    with anyio.fail_after(seconds):
        while (code := proc.poll()) is None:  # noqa: ASYNC110  (a process, not an event)
            await anyio.sleep(0.02)
    return code


async def held_by_a_hanging_worker(
    workers: WorkerProcs, caller: CallerAPI, n: int, dsn: str, schema: str, *extra: str, **environ: str
) -> tuple[subprocess.Popen[bytes], UUID]:
    """A worker whose handler never finishes (``extra`` and ``environ`` as for ``WorkerProcs.start``), once it has
    started the handler of a call of ``n``: the worker and the call."""
    proc = workers.start(dsn, schema, *extra, **HANG, **environ)
    await wait_live(caller, 1)
    call_id = await caller.call("proc.work", "", {"n": n}, 60_000)

    async def running() -> bool:
        return started(workers, n) == {proc.pid}

    await wait_for(running)
    return proc, call_id


async def test_cli_worker_answers_through_a_secured_role(env: Env, workers: WorkerProcs) -> None:
    role = await env.provision(["proc.work"], "worker")
    _, caller = await env.caller(["proc.work"])
    proc = workers.start(env.dsn(role), env.schema)
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
    env: Env, workers: WorkerProcs
) -> None:
    role = await env.provision(["proc.work"], "worker")
    _, caller = await env.caller(["proc.work"])
    doomed, call_id = await held_by_a_hanging_worker(workers, caller, 1, env.dsn(role), env.schema,
                                                     HOTMESH_RECLAIM_DELAY_MS="400")
    doomed.send_signal(signal.SIGKILL)
    await wait_exit(doomed)
    rescuer = workers.start(env.dsn(role), env.schema, HOTMESH_RECLAIM_DELAY_MS="400")
    result = await finished(caller, call_id, seconds=4)  # the default 10 s lease would not do
    assert result.state == "done" and result.result == {"n": 1, "pid": rescuer.pid}
    row = await env.call_row(call_id)
    assert row["reclaims"] == 1 and row["attempt"] == 0
    assert started(workers, 1) == {doomed.pid, rescuer.pid}  # it ran once more, not twice


async def test_sigterm_releases_claimed_work_for_another_worker_at_once(env: Env, workers: WorkerProcs) -> None:
    role = await env.provision(["proc.work"], "worker")
    _, caller = await env.caller(["proc.work"])
    credentials = (f"--user={role.role}", f"--password={role.password}")  # the seed's workerCredentials
    # ("=": a generated password may start with "-")
    # The default 10 s lease: only a release (not a reclaim) lets another worker take the message quickly.
    leaving, call_id = await held_by_a_hanging_worker(workers, caller, 2, env.server.base_dsn, env.schema,
                                                      *credentials, HOTMESH_SHUTDOWN_GRACE="0.3")
    leaving.send_signal(signal.SIGTERM)
    assert await wait_exit(leaving, seconds=5) == 0
    assert await live_workers(caller) == 0  # worker_goodbye
    row = await env.call_row(call_id)
    assert row["state"] == "ready" and row["reclaims"] == 0 and row["attempt"] == 0
    staying = workers.start(env.server.base_dsn, env.schema, *credentials)
    result = await finished(caller, call_id, seconds=5)
    assert result.result == {"n": 2, "pid": staying.pid}
    assert (await env.call_row(call_id))["reclaims"] == 0


async def test_cli_worker_refused_stream_is_one_line_on_stderr(env: Env, workers: WorkerProcs) -> None:
    role = await env.provision(["elsewhere"], "worker")
    proc = workers.start(env.dsn(role), env.schema)
    assert await wait_exit(proc) == 1
    assert proc.stdout is not None and proc.stdout.read() == b""
    err = workers.log_path(0).read_text().strip().splitlines()
    assert err == ["mcp-hotmesh worker: error: permission denied for stream 'proc.work'"]
