"""The operator's day: what an operator sees when a command is stopped, misused or pointed at the wrong thing.
Each test runs the real ``mcp-hotmesh`` command."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.helpers import Env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # the real command, in subprocesses

BOUND = 30  # seconds: the most a stop may take on a busy machine (it takes about one when it works)


def _command() -> list[str]:
    return [sys.executable, "-m", "mcp_hotmesh"]


def _environment(env: Env) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HOTMESH_", "PYTHONUNBUFFERED"))}
    return {**clean, "HOTMESH_DSN": env.server.admin_dsn, "HOTMESH_SCHEMA": env.schema}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_serve_over_stdio_in_a_terminal_stops_on_a_signal(env: Env, signum: signal.Signals) -> None:
    """stdin is a terminal nobody types in: the read blocks, and a signal must still stop the process."""
    controller, terminal = pty.openpty()
    try:
        async with await anyio.open_process([*_command(), "serve"], stdin=terminal, env=_environment(env)) as process:
            with anyio.fail_after(BOUND):  # serving: the gateway's pool and its LISTEN connection are in
                while await env.admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", f"{env.schema}_c_gateway"
                ) < 2:
                    assert process.returncode is None
                    await anyio.sleep(0.1)
            await anyio.sleep(1)  # past the last step of starting: the signal handler is in place
            process.send_signal(signum)
            try:
                with anyio.fail_after(BOUND):
                    await process.wait()
            finally:
                if process.returncode is None:  # it hung: do not hang the suite with it
                    process.kill()
            assert process.stderr is not None
            stderr = await process.stderr.receive(1 << 20)
        assert b"stopping" in stderr and b"Traceback" not in stderr, stderr.decode(errors="replace")
        assert process.returncode in (0, 130, -signum), process.returncode
    finally:
        os.close(controller)
        os.close(terminal)


async def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(BOUND):
        return await anyio.run_process([*_command(), *args], env=env, check=False)


async def test_serve_refuses_a_port_that_is_no_port(env: Env) -> None:
    done = await _run("serve", "--transport", "http", "--port", "99999", env=_environment(env))
    stderr = done.stderr.decode()
    assert done.returncode == 2 and stderr.strip().splitlines()[-1].endswith("is not a TCP port (1 to 65535)")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("where", ["taken", "host.invalid"])
async def test_serve_refuses_an_address_it_cannot_serve_in_one_line_before_starting_anything(
    env: Env, where: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = ["--port", str(taken.getsockname()[1])] if where == "taken" else ["--host", where]
        done = await _run("serve", "--transport", "http", *address,
                          env={**_environment(env), "HOTMESH_TOKEN": "t" * 32})
    stderr = done.stderr.decode()
    assert done.returncode == 1 and "cannot serve HTTP on" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    # nothing was started: no gateway role was made or taken over
    assert not await env.admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"{env.schema}%gateway")


@pytest.mark.parametrize(("dsn", "says"), [
    ("notadsn", "is not a PostgreSQL URL"),
    ("postgresql://u:secret@127.0.0.1:1/db", "could not reach PostgreSQL at postgresql://u:***@127.0.0.1:1/db"),
    ("postgresql://u:secret@127.0.0.1:1/db?sslmode=bogus", "invalid DSN 'postgresql://u:***@127.0.0.1:1/db?"),
])
async def test_a_wrong_dsn_is_one_line_that_says_where(dsn: str, says: str) -> None:
    done = await _run("status", "--dsn", dsn)
    stderr = done.stderr.decode()
    assert done.returncode != 0 and says in stderr, stderr
    assert "secret" not in stderr and len(stderr.strip().splitlines()) == 1


async def test_a_revoked_worker_stops_with_one_line(env: Env) -> None:
    from mcp_hotmesh import revoke
    from mcp_hotmesh.examples import toolset

    role = await env.provision(sorted({t.topic for t in toolset.tools}), "worker")
    async with await anyio.open_process(
        [*_command(), "worker", "--tools", "mcp_hotmesh.examples:toolset", "--dsn", env.dsn(role),
         "--schema", env.schema, "--poll-interval", "0.5"],
        env=_environment(env),
    ) as process:
        try:
            with anyio.fail_after(BOUND):  # serving: its heartbeat is in
                while not await env.admin.fetchval(  # noqa: ASYNC110 (the server's state: no event to wait on)
                    f'SELECT count(*) FROM "{env.schema}".workers WHERE role_name = $1', role.role
                ):
                    await anyio.sleep(0.1)
            await revoke(env.admin, role.role, schema=env.schema)
            with anyio.fail_after(BOUND):  # the login grace (10 s) and a margin
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
        assert process.stderr is not None
        stderr = (await process.stderr.receive(1 << 20)).decode(errors="replace")
    lines = stderr.strip().splitlines()
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr and len(lines) < 20, stderr
    assert lines[-1].startswith("mcp-hotmesh worker: error: PostgreSQL refused the login"), lines[-1]


async def test_the_embedded_server_keeps_its_port_across_a_quick_restart(tmp_path: Path) -> None:
    """Clients were connected over TCP when it stopped: their sockets linger in TIME_WAIT on its port."""
    import asyncpg

    from mcp_hotmesh import _embedded as embedded
    from mcp_hotmesh import migrate, provision_role

    server = await anyio.to_thread.run_sync(lambda: embedded.start(tmp_path / "pg"))
    try:
        admin = await asyncpg.connect(server.admin_dsn)
        await migrate(admin, "port_check")
        role = await provision_role(admin, ["a"], "caller", schema="port_check")
        clients = [await asyncpg.connect(server.role_dsn(role.role, role.password)) for _ in range(3)]
        await admin.close()
    finally:
        # the server closes the TCP connections first: TIME_WAIT on its side
        await anyio.to_thread.run_sync(server.stop)
    for client in clients:
        client.terminate()
    again = await anyio.to_thread.run_sync(lambda: embedded.start(tmp_path / "pg"))
    try:
        assert again.port == server.port
    finally:
        await anyio.to_thread.run_sync(again.stop)


async def test_wrong_database_schema_or_role_say_what_to_fix(env: Env) -> None:
    caller = await env.provision(["a"], "caller")
    worker = await env.provision(["echo"], "worker")
    no_database = env.server.role_dsn(caller.role, caller.password).rsplit("/", 1)[0] + "/nosuchdb"
    done = await _run("status", "--dsn", no_database)
    assert 'database "nosuchdb" does not exist: check the database name' in done.stderr.decode(), done.stderr
    done = await _run("status", "--dsn", env.dsn(caller), "--schema", env.schema)
    stderr = done.stderr.decode()
    assert "this command needs the admin" in stderr and caller.role in stderr, stderr
    done = await _run("worker", "--tools", "mcp_hotmesh.examples:toolset", "--dsn", env.dsn(worker),
                      "--schema", "nosuchschema")
    stderr = done.stderr.decode()
    assert done.returncode == 1 and "run mcp-hotmesh migrate for it, or give the right --schema" in stderr, stderr
    assert "Traceback" not in stderr


async def test_the_embedded_server_can_be_found_reached_and_stopped(tmp_path: Path) -> None:
    """An orphan (a serve that started it left while others were connected) is found and stopped by a command;
    ``db dsn`` is what a worker role needs to reach it."""
    data = str(tmp_path / "pg")
    done = await _run("db", "start", "--data-dir", data)
    assert done.returncode == 0, done.stderr
    status = json.loads((await _run("db", "--json", "--data-dir", data)).stdout)
    assert status["running"] and status["data_dir"] == data
    dsn = (await _run("db", "dsn", "--data-dir", data)).stdout.decode().strip()
    assert dsn == f"postgresql://ROLE:PASSWORD@127.0.0.1:{status['port']}/hotmesh"
    done = await _run("db", "stop", "--data-dir", data)
    assert done.returncode == 0 and "stopped" in done.stderr.decode()
    assert not json.loads((await _run("db", "--json", "--data-dir", data)).stdout)["running"]
    assert not (tmp_path / "pg" / "postmaster.pid").exists()
    done = await _run("db", "dsn", "--data-dir", data)
    assert done.returncode == 2 and "is not running: mcp-hotmesh db start" in done.stderr.decode()


@pytest.mark.parametrize("kind", ["file", "not empty", "cannot be made"])
async def test_a_bad_data_directory_is_one_line_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "given"
    if kind == "file":
        target.write_text("")
    elif kind == "not empty":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target = Path("/proc/1/nowhere/pg")
    before = sorted(os.listdir(tmp_path))
    done = await _run("status", "--data-dir", str(target))
    stderr = done.stderr.decode()
    assert done.returncode == 1 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert str(target) in stderr
    assert sorted(os.listdir(tmp_path)) == before  # no half-made directory, no lock file


async def test_a_tool_nobody_serves_can_be_listed_and_removed(env: Env) -> None:
    _, worker = await env.worker(["gone"])
    await worker.register_tool("gone", "", {"name": "old_tool", "description": "d", "input_schema": {"type": "object"}})
    common = ["--dsn", env.server.admin_dsn, "--schema", env.schema]
    listed = json.loads((await _run("tools", "--json", *common)).stdout)
    assert [(t["name"], t["stream"], t["live_workers"]) for t in listed] == [("old_tool", "gone", 0)]
    done = await _run("tools", "remove", "old_tool", *common)
    assert done.returncode == 0 and "removed tool old_tool" in done.stderr.decode(), done.stderr
    assert json.loads((await _run("tools", "--json", *common)).stdout) == []
    done = await _run("tools", "remove", "old_tool", *common)
    assert done.returncode == 1 and "no registered tool named 'old_tool'" in done.stderr.decode()


async def test_small_things_an_operator_types(env: Env) -> None:
    from mcp_hotmesh import __version__, revoke

    done = await _run("--version")
    assert done.returncode == 0 and done.stdout.decode().strip() == f"mcp-hotmesh {__version__}"
    done = await _run("status", "--log-level", "LOUD")
    assert done.returncode == 2 and "invalid choice: 'LOUD'" in done.stderr.decode()
    common = ["--dsn", env.server.admin_dsn, "--schema", env.schema]
    done = await _run("settings", "retention=1d", "--json", *common)  # the unit, and the key without _ms
    assert done.returncode == 0 and json.loads(done.stdout)["retention_ms"] == 86_400_000, done.stderr
    for change, says in (("min_lease_ms=0", "min_lease_ms must be between 1"), ("max_attempts=0", "between 1")):
        done = await _run("settings", change, *common)
        assert done.returncode == 2 and says in done.stderr.decode(), done.stderr
    role = await env.provision(["a", "b"], "worker")
    await revoke(env.admin, role.role, schema=env.schema)
    listed = {r["role"]: r for r in json.loads((await _run("roles", "--json", *common)).stdout)}
    assert listed[role.role]["streams"] == [] and listed[role.role]["revoked_at"]
