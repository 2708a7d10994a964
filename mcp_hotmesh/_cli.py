"""The ``mcp-hotmesh`` command line.

Every command takes ``--dsn`` (or ``HOTMESH_DSN``) and ``--schema`` (or ``HOTMESH_SCHEMA``); with no DSN the
embedded PostgreSQL is started in ``--data-dir`` (or ``HOTMESH_DATA_DIR``). Output meant for scripts goes to
stdout; logs and errors go to stderr; an error is one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from . import __version__, _admin, _format
from . import _approvals as approvals
from . import _embedded as embedded
from . import _logs as logs
from ._config import DEFAULT_SCHEMA, WorkerCredentials, check_schema
from ._migrate import full_sql, migrate
from ._postgres import connect, is_transient
from ._roles import CONNECTION_LIMIT, list_roles, provision_role, revoke, rotate, set_limits
from .errors import ConfigError, HotMeshError, PermissionDenied

log = logging.getLogger("mcp_hotmesh")

EXIT_ERROR = 1
EXIT_USAGE = 2


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return port


def _common(parser: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get("HOTMESH_DSN"),
        help="PostgreSQL DSN (default: $HOTMESH_DSN; none starts the embedded server)" if data_dir else
        "PostgreSQL DSN with the worker role's login, postgresql://ROLE:PASSWORD@HOST:PORT/DATABASE (default: "
        "$HOTMESH_DSN; required). For the embedded server: postgresql://ROLE:PASSWORD@127.0.0.1:PORT/hotmesh, "
        "with the port `mcp-hotmesh db` prints",
    )
    parser.add_argument(
        "--schema",
        default=os.environ.get("HOTMESH_SCHEMA", DEFAULT_SCHEMA),
        help=f"schema holding the streams (default: $HOTMESH_SCHEMA or {DEFAULT_SCHEMA!r})",
    )
    if data_dir:
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=os.environ.get("HOTMESH_DATA_DIR"),
            help="embedded server's data directory (default: $HOTMESH_DATA_DIR or "
            f"{embedded.default_data_dir()})",
        )
    parser.add_argument("--log-level", type=str.upper, choices=logs.LEVELS,
                        default=os.environ.get("HOTMESH_LOG_LEVEL", "INFO").upper(),
                        help="log level on stderr: debug, info, warning or error (default: $HOTMESH_LOG_LEVEL or info)")
    _log_format(parser)


def _log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get("HOTMESH_LOG_FORMAT", "text"),
                        help="logs on stderr as text lines or JSON lines (default: $HOTMESH_LOG_FORMAT or text)")


@contextlib.asynccontextmanager
async def admin_connection(args: argparse.Namespace) -> AsyncIterator[asyncpg.Connection]:
    """The admin's connection: ``--dsn``, or the embedded server (started here, stopped on exit)."""
    server = None
    dsn = args.dsn
    if not dsn:
        server = await anyio.to_thread.run_sync(lambda: embedded.start(args.data_dir))
        dsn = server.admin_dsn
    try:
        conn = await connect(dsn)
        try:
            yield conn
        except PermissionDenied as exc:  # say who may, and who this is
            who = None
            with contextlib.suppress(Exception):
                who = await conn.fetchval("SELECT session_user")
            raise PermissionDenied(
                f"{exc}: this command needs the admin (a superuser, or a member of {args.schema}_owner), "
                f"and this DSN logs in as {who!r}"
            ) from None
        finally:
            await conn.close()
    finally:
        if server is not None:
            await anyio.to_thread.run_sync(server.stop)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


@contextlib.asynccontextmanager
async def admin_dsn(args: argparse.Namespace) -> AsyncIterator[str]:
    """The admin's DSN: ``--dsn``, or the embedded server's (started here, stopped on exit if started here)."""
    if args.dsn:
        yield args.dsn
        return
    server = await anyio.to_thread.run_sync(lambda: embedded.start(args.data_dir))
    try:
        yield server.admin_dsn
    finally:
        await anyio.to_thread.run_sync(server.stop)


# ------------------------------------------------------------------------------------------------ commands

async def cmd_migrate(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        applied = await migrate(conn, check_schema(args.schema))
    log.info("schema %s is up to date (%s)", args.schema,
             f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply")
    return 0


async def cmd_sql(args: argparse.Namespace) -> int:
    sys.stdout.write(full_sql(check_schema(args.schema)) + "\n")
    return 0


async def cmd_provision(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        await migrate(conn, check_schema(args.schema))
        role = await provision_role(conn, args.stream, args.kind, schema=args.schema, password=args.password,
                                    connection_limit=args.connection_limit)
    if args.json:
        _print_json(role.as_json())
    else:
        sys.stdout.write(f"role: {role.role}\npassword: {role.password}\nkind: {role.kind}\n"
                         f"streams: {', '.join(role.streams)}\n")
    return 0


async def cmd_rotate(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        role = await rotate(conn, args.role, args.password, schema=check_schema(args.schema))
    if args.json:
        _print_json(role.as_json())
    else:
        sys.stdout.write(f"role: {role.role}\npassword: {role.password}\n")
    return 0


async def cmd_revoke(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        ended = await revoke(conn, args.role, schema=check_schema(args.schema))
    log.info("revoked %s: it can no longer log in; ended %d open session(s); its streams and grants are gone",
             args.role, ended)
    return 0


async def cmd_limits(args: argparse.Namespace) -> int:
    schema = check_schema(args.schema)
    async with admin_connection(args) as conn:
        await migrate(conn, schema)
        limits = await set_limits(conn, args.role, schema=schema, connection_limit=args.connection_limit,
                                  max_queued=args.max_queued, max_queued_bytes=args.max_queued_bytes)
    if args.json:
        _print_json(limits.as_json())
    else:
        sys.stdout.write(f"role: {limits.role}\nconnection limit: {limits.connection_limit}\n"
                         f"queued messages per stream: {limits.max_queued}\n"
                         f"queued bytes per stream: {limits.max_queued_bytes}\n")
    return 0


async def cmd_tools(args: argparse.Namespace) -> int:
    """The tool catalog: every definition, live or waiting for approval; show, approve or remove one."""
    schema = check_schema(args.schema)
    command = args.tools_command
    if command in ("show", "approve", "remove") and not args.name and not (command == "approve" and args.all):
        raise ConfigError(f"say which tool: mcp-hotmesh tools {command} NAME")
    async with admin_connection(args) as conn:
        await migrate(conn, schema)
        if command == "approve":
            approved = (await approvals.approve_all(conn, schema) if args.all and not args.name
                        else [await approvals.approve(conn, schema, args.name, args.stream)])
            for tool in approved:
                log.info("approved tool %s (stream %s): agents see %s now", tool.name, tool.stream,
                         ", ".join(tool.changes) if tool.state == "changed" else "it")
            if not approved:
                log.info("no tool definition waits for approval")
            return 0
        if command == "remove":
            removed = await approvals.remove(conn, schema, args.name, args.stream, release=args.release)
            if removed is not None:
                log.info("removed tool %s (stream %s)%s", removed.name, removed.stream,
                         f"; {removed.live_workers} live worker(s) serve its stream and will register it again"
                         if removed.live_workers else "")
            log.info("the name %s is %s", args.name, "released: any stream may register it" if args.release
                     else "still reserved to its stream (--release frees it)")
            return 0
        if command == "show":
            shown = await approvals.find(conn, schema, args.name, args.stream)
            _print_json(shown.as_json(full=True))
            return 0
        listed = await approvals.definitions(conn, schema)
    if args.json:
        _print_json([t.as_json() for t in listed])
    else:
        rows = [("TOOL", "STREAM", "WORKFLOW", "STATE", "REGISTERED BY", "WORKERS", "UPDATED")] + [
            (t.name, t.stream, t.workflow_name or "-", t.state + (f" ({', '.join(t.changes)})" if t.changes and
             t.state == "changed" else ""), t.registered_by, str(t.live_workers), f"{t.updated_at:%Y-%m-%d %H:%M}")
            for t in listed]
        sys.stdout.write(_format.table(rows) if listed else "no tools registered\n")
        waiting = [t.name for t in listed if t.pending is not None]
        if waiting:
            sys.stdout.write(f"! {len(waiting)} definition(s) wait for approval: mcp-hotmesh tools show NAME, "
                             "then mcp-hotmesh tools approve NAME\n")
    return 0


async def cmd_roles(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        roles = await list_roles(conn, schema=check_schema(args.schema))
    if args.json:
        _print_json([r.as_json() for r in roles])
        return 0
    rows = [("ROLE", "KIND", "STREAMS", "LOGIN", "CREATED", "ROTATED", "REVOKED")]
    for r in roles:
        def day(v: Any) -> str:
            return v.strftime("%Y-%m-%d %H:%M") if v else "-"

        rows.append((r.role, r.kind, ",".join(r.streams), "yes" if r.can_login else "no",
                     day(r.created_at) if r.managed else "(by hand)", day(r.rotated_at), day(r.revoked_at)))
    sys.stdout.write(_format.table(rows))
    return 0


async def cmd_tokens(args: argparse.Namespace) -> int:
    """Bearer tokens of the identities a gateway serves (serve --identity-config): add, list, revoke."""
    from . import _identity

    schema = check_schema(args.schema)
    async with admin_connection(args) as conn:
        await migrate(conn, schema)
        if args.tokens_command == "add":
            if not args.name or not args.role:
                raise ConfigError("say who and as which caller role: mcp-hotmesh tokens add NAME --role ROLE")
            token = await _identity.add_token(conn, args.name, args.role, schema=schema)
            if args.json:
                _print_json({"name": args.name, "role": args.role, "token": token})
            else:
                sys.stdout.write(f"name: {args.name}\nrole: {args.role}\ntoken: {token}\n"
                                 "(shown once: only its hash is kept)\n")
            return 0
        if args.tokens_command == "revoke":
            if not args.name:
                raise ConfigError("say whose token: mcp-hotmesh tokens revoke NAME")
            await _identity.revoke_token(conn, args.name, schema=schema)
            log.info("revoked the token of %s: refused from its next request on", args.name)
            return 0
        tokens = await _identity.list_tokens(conn, schema=schema)
    if args.json:
        _print_json([t.as_json() for t in tokens])
    else:
        rows = [("NAME", "ROLE", "CREATED", "REVOKED")] + [
            (t.name, t.role, f"{t.created_at:%Y-%m-%d %H:%M}",
             f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "-") for t in tokens]
        sys.stdout.write(_format.table(rows) if tokens else "no tokens\n")
    return 0


async def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail of the calls gateways served for identities, oldest first."""
    from . import _audit

    schema = check_schema(args.schema)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    since = _format.parse_duration(args.since) if args.since else None
    async with admin_connection(args) as conn:
        await migrate(conn, schema)
        records = await _audit.query(conn, schema=schema, identity=args.identity, tool=args.tool, since=since,
                                     limit=args.limit or 100)
    if args.json:
        _print_json([r.as_json() for r in records])
    else:
        rows = [("TIME", "IDENTITY", "ROLE", "TOOL", "OUTCOME", "MS", "ARGS B", "RESULT B", "CALL")] + [
            (f"{r.at:%Y-%m-%d %H:%M:%S}", r.identity, r.role, r.tool, r.outcome, f"{r.duration_ms:.0f}",
             str(r.args_bytes), str(r.result_bytes), str(r.call_id) if r.call_id else "-") for r in records]
        sys.stdout.write(_format.table(rows) if records else "no audit records\n")
    return 0


def _park_after(text: str) -> float | str:
    """``--park-after``: seconds (not negative), or 'never'."""
    if text.strip().lower() == "never":
        return "never"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more) or 'never'")
    return value


async def cmd_worker(args: argparse.Namespace) -> int:
    """Serve a tool set until SIGTERM/SIGINT (a second signal stops at once)."""
    from ._tools import load_toolset
    from ._worker import run_worker

    if not args.dsn:
        raise ConfigError("mcp-hotmesh worker needs --dsn (or HOTMESH_DSN): a worker role's DSN")
    credentials = None
    if args.user or args.password:
        if not (args.user and args.password):
            raise ConfigError("--user and --password go together")
        credentials = WorkerCredentials(user=args.user, password=args.password)
    options: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("reclaim_delay", "reclaim_count", "task_queue", "poll_interval", "shutdown_grace", "pool_size",
                     "listen_dsn", "pooler")
        if getattr(args, name) is not None
    }
    if args.readonly:
        options["readonly"] = True
    if args.park_after is not None:
        options["park_after"] = None if args.park_after == "never" else args.park_after
    schema = check_schema(args.schema)
    tools = load_toolset(args.tools)
    await run_worker(tools=tools, connection=args.dsn, credentials=credentials, schema=schema,
                     concurrency=args.concurrency, purge_interval=args.purge_interval, **options)
    return 0



async def cmd_status(args: argparse.Namespace) -> int:
    """Per stream: ready, in flight, stalled, retrying, dead, oldest waiting, live workers, calls/s."""
    schema = check_schema(args.schema)
    if args.interval <= 0:
        raise ConfigError("--interval must be positive")
    if not args.watch:
        async with admin_connection(args) as admin:
            await migrate(admin, schema)  # idempotent; a fresh install shows its empty queues
            st = await _admin.status(admin, schema)
        if args.json:
            _print_json(st.as_json())
        else:
            sys.stdout.write(_format.format_status(st))
        return 0
    clear = sys.stdout.isatty() and not args.json
    async with admin_dsn(args) as dsn:
        conn: asyncpg.Connection | None = None
        shown = 0
        try:
            while args.count is None or shown < args.count:
                try:
                    if conn is None:
                        conn = await connect(dsn)
                        await migrate(conn, schema)
                    st = await _admin.status(conn, schema)
                except HotMeshError as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("status: %s; trying again in %gs", exc, args.interval)
                    if conn is not None:
                        conn.terminate()
                    conn = None
                else:
                    if args.json:  # one object per line
                        sys.stdout.write(json.dumps(st.as_json()) + "\n")
                    else:
                        top = "\x1b[H\x1b[2J" if clear else ("\n" if shown else "")  # clear the terminal
                        sys.stdout.write(top + _format.format_status(st))
                    sys.stdout.flush()
                shown += 1
                if args.count is None or shown < args.count:
                    await anyio.sleep(args.interval)
        finally:
            if conn is not None:
                await conn.close()
    return 0


def _dlq_filter(args: argparse.Namespace, *, limit: int | None = None) -> _admin.DlqFilter:
    return _admin.DlqFilter(
        ids=list(args.ids) if getattr(args, "ids", None) else None,
        stream=args.stream,
        older_than=_format.parse_duration(args.older_than) if args.older_than else None,
        newer_than=_format.parse_duration(args.newer_than) if args.newer_than else None,
        limit=args.limit if args.limit is not None else limit,
    )


def _chosen(args: argparse.Namespace, what: str) -> _admin.DlqFilter:
    where = _dlq_filter(args)
    if where.empty and not args.all:
        raise ConfigError(f"say which dead messages to {what}: IDs, --stream, --older-than, --newer-than, or --all")
    if args.all and args.ids:
        raise ConfigError("give IDs or --all, not both")
    return where


async def cmd_dlq_list(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        await migrate(conn, check_schema(args.schema))
        dead = await _admin.dlq_list(conn, check_schema(args.schema), _dlq_filter(args, limit=100))
        now = await conn.fetchval("SELECT now()")
    if args.json:
        _print_json([m.as_json() for m in dead])
    else:
        sys.stdout.write(_format.format_dlq(dead, now))
    return 0


async def cmd_dlq_show(args: argparse.Namespace) -> int:
    async with admin_connection(args) as conn:
        await migrate(conn, check_schema(args.schema))
        dead = await _admin.dlq_show(conn, check_schema(args.schema), args.id)
    if args.json:
        _print_json(dead.as_json(full=True))
    else:
        sys.stdout.write(_format.format_dead(dead))
    return 0


async def cmd_dlq_retry(args: argparse.Namespace) -> int:
    where = _chosen(args, "retry")
    timeout = _format.parse_duration(args.timeout) if args.timeout else None
    async with admin_connection(args) as conn:
        await migrate(conn, check_schema(args.schema))
        retried = await _admin.dlq_retry(conn, check_schema(args.schema), where, deadline_in=timeout,
                                         publish=args.publish)
    if args.json:
        _print_json([r.as_json() for r in retried])
    else:
        for r in retried:
            how = f"published anew as message {r.new_id}" if r.new_id != r.id else (
                f"queued again for call {r.call_id}" if r.call_id else "queued again")
            sys.stdout.write(f"{r.id} ({r.stream}): {how}\n")
        sys.stdout.write(f"retried {len(retried)} dead message(s)\n")
    return 0


async def cmd_dlq_purge(args: argparse.Namespace) -> int:
    where = _chosen(args, "purge")
    async with admin_connection(args) as conn:
        await migrate(conn, check_schema(args.schema))
        count = await _admin.dlq_purge(conn, check_schema(args.schema), where)
    if args.json:
        _print_json({"purged": count})
    else:
        sys.stdout.write(f"purged {count} dead message(s)\n")
    return 0


async def cmd_settings(args: argparse.Namespace) -> int:
    """Show the admin's settings, or change some: ``KEY=VALUE`` (durations for the ``*_ms`` keys)."""
    texts: dict[str, str] = {}
    for item in args.changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"write a change as KEY=VALUE, not {item!r}")
        texts[key.strip()] = value
    async with admin_connection(args) as conn:
        await migrate(conn, check_schema(args.schema))
        known = await _admin.settings(conn, args.schema)
        changes: dict[str, int] = {}
        for key, value in texts.items():
            if key not in known and f"{key}_ms" in known:  # retention=1d: the setting is retention_ms
                key = f"{key}_ms"
            changes[key] = _format.parse_setting(key, value)
        if changes:
            current = await _admin.change_settings(conn, args.schema, changes)
            log.info("changed %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
        else:
            current = await _admin.settings(conn, args.schema)
    if args.json:
        _print_json(current)
    else:
        width = max(map(len, current))
        for key, value in current.items():
            shown = f"{value}" + (f"  ({_format.format_age(value / 1000)})" if key.endswith("_ms") and value else "")
            sys.stdout.write(f"{key.ljust(width)}  {shown}\n")
    return 0


async def cmd_db(args: argparse.Namespace) -> int:
    """The embedded server: where it is, whether it runs, who uses it, how to reach it; start and stop it."""
    data_dir = (args.data_dir or embedded.default_data_dir()).expanduser().resolve()
    if args.db_command == "start":
        started = await anyio.to_thread.run_sync(lambda: embedded.start(data_dir))
        if not started.started_here:
            log.info("embedded PostgreSQL already running in %s on 127.0.0.1:%d", data_dir, started.port)
    elif args.db_command == "stop":
        stopped = await anyio.to_thread.run_sync(lambda: embedded.stop(data_dir))
        log.info("embedded PostgreSQL in %s %s", data_dir, "stopped" if stopped else "was not running")
        return 0
    server = embedded.running(data_dir)
    info: dict[str, Any] = {"data_dir": str(data_dir), "running": server is not None}
    if server is not None:
        conn = await connect(server.admin_dsn)
        try:
            users = {r["usename"]: r["n"] for r in await conn.fetch(
                "SELECT usename, count(*) AS n FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() GROUP BY usename ORDER BY usename")}
        finally:
            await conn.close()
        info |= {"port": server.port, "admin_dsn": server.admin_dsn,
                 "role_dsn": f"postgresql://ROLE:PASSWORD@127.0.0.1:{server.port}/{embedded.DATABASE}",
                 "sessions": users}
    if args.json:
        _print_json(info)
    elif args.db_command == "dsn":
        if server is None:
            raise ConfigError(f"the embedded PostgreSQL in {data_dir} is not running: mcp-hotmesh db start")
        sys.stdout.write(f"{info['role_dsn']}\n")
    elif server is None:
        sys.stdout.write(f"embedded PostgreSQL in {data_dir}: not running (mcp-hotmesh db start)\n")
    else:
        sessions = ", ".join(f"{user} {n}" for user, n in info["sessions"].items()) or "none"
        sys.stdout.write(
            f"embedded PostgreSQL in {data_dir}: running on 127.0.0.1:{server.port}\n"
            f"admin (this machine, its OS user): {server.admin_dsn}\n"
            f"a worker or caller role:          {info['role_dsn']}\n"
            f"sessions: {sessions}\n")
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from ._serve import ServeOptions, serve

    await serve(ServeOptions(
        tools=args.tools, dsn=args.dsn, data_dir=args.data_dir, schema=args.schema, transport=args.transport,
        host=args.host, port=args.port, token=args.token, no_worker=args.no_worker, timeout=args.timeout,
        max_args_bytes=args.max_args_bytes, purge_interval=args.purge_interval, keepalive=args.keepalive,
        identity_config=args.identity_config, allowed_hosts=tuple(args.allowed_host or ()),
        listen_dsn=args.listen_dsn, pooler=args.pooler,
    ))
    return 0


# ------------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-hotmesh",
        description="An MCP tool server whose tools are served by secured workers on PostgreSQL streams.",
    )
    parser.add_argument("--version", action="version", version=f"mcp-hotmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], Awaitable[int]], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add("serve", cmd_serve, "Serve the tools to MCP clients (stdio or Streamable HTTP), with an attached worker.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """\
what the DSN decides:
  no DSN          start the embedded PostgreSQL (--data-dir), then as with an admin DSN
  admin DSN       (a superuser or a member of <schema>_owner) migrate; create or take over the roles
                  <schema>_c_gateway (caller) and <schema>_w_gateway (worker) for the tool set's topics, with
                  fresh passwords; serve agents as the caller role and run an attached worker as the worker
                  role (--no-worker: workers run elsewhere)
  caller role DSN serve only (mcp-hotmesh provision --kind caller); workers run elsewhere

stdio (what desktop hosts launch) writes only protocol to stdout; logs go to stderr.
http serves http://HOST:PORT/mcp and requires a bearer token (--token or HOTMESH_TOKEN, 16+ characters) on
every address, loopback included; GET /healthz needs no token and says whether the database answers.
With --identity-config FILE, each person or agent has a token of their own (mcp-hotmesh tokens add) or an
OAuth access token, and is served as the caller role the file maps it to; --token then guards /metrics only.
Each call is audited (mcp-hotmesh audit)."""
    _common(p)
    p.add_argument("--tools", default="mcp_hotmesh.examples:toolset",
                   help="the tool set: MODULE:ATTR or path/file.py:ATTR (default: the example tools); with an "
                        "admin DSN its topics are the streams the gateway's roles get")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="default: stdio")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8765, help="HTTP port (default: 8765)")
    p.add_argument("--token", default=os.environ.get("HOTMESH_TOKEN"),
                   help="bearer token HTTP clients must send; required with --transport http "
                        "(default: $HOTMESH_TOKEN)")
    p.add_argument("--identity-config", dest="identity_config", type=Path,
                   default=os.environ.get("HOTMESH_IDENTITY_CONFIG"),
                   help="with http: serve each identity (tokens add, or an OAuth JWT) as its own caller role, as "
                        "this TOML file says; --token then guards /metrics only (default: "
                        "$HOTMESH_IDENTITY_CONFIG)")
    p.add_argument("--allowed-host", dest="allowed_host", action="append", metavar="HOST[:PORT]",
                   help="a name clients reach this server by (repeatable): requests naming another Host or Origin "
                        "are refused (DNS-rebinding protection beyond loopback)")
    p.add_argument("--no-worker", action="store_true", help="serve only; workers run elsewhere")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a tool call may take before it is cancelled (default: 60)")
    p.add_argument("--max-args-bytes", type=int, default=1 << 20,
                   help="largest tool arguments accepted, in bytes of JSON; larger calls are refused before "
                        "anything is queued (default: 1 MiB)")
    p.add_argument("--keepalive", type=float, default=15.0, metavar="SECONDS",
                   help="a client that asked for progress hears from a call quiet this long: where it is in its "
                        "queue, or how long it has run (default: 15)")
    _purge_interval(p)
    _pooling(p, serve=True)

    p = add("worker", cmd_worker, "Run a secured worker for a tool set; it needs only a worker role's login.")
    _common(p, data_dir=False)
    p.add_argument("--tools", required=True, help="the tool set: MODULE:ATTR or path/file.py:ATTR")
    p.add_argument("--user", default=os.environ.get("HOTMESH_WORKER_USER"),
                   help="worker role; replaces the DSN's user (the seed's workerCredentials)")
    p.add_argument("--password", default=os.environ.get("HOTMESH_WORKER_PASSWORD"),
                   help="worker role's password; replaces the DSN's password")
    p.add_argument("--concurrency", type=int, default=10, help="handlers run at once (default: 10)")

    p.add_argument("--reclaim-delay", dest="reclaim_delay", type=int, metavar="MS",
                   default=os.environ.get("HOTMESH_RECLAIM_DELAY_MS"),
                   help="ms a lease lasts before another worker may reclaim the message; extended at half-time "
                   "while the handler runs (default: $HOTMESH_RECLAIM_DELAY_MS or 10000)")
    p.add_argument("--reclaim-count", dest="reclaim_count", type=int, metavar="N",
                   default=os.environ.get("HOTMESH_RECLAIM_COUNT"),
                   help="reclaims before a message is dead-lettered (default: $HOTMESH_RECLAIM_COUNT or 3)")
    p.add_argument("--task-queue", dest="task_queue", default=os.environ.get("HOTMESH_TASK_QUEUE"),
                   help="components naming the same task queue share one pool (default: $HOTMESH_TASK_QUEUE)")
    p.add_argument("--pool-size", dest="pool_size", type=int, metavar="N", default=os.environ.get("HOTMESH_POOL_SIZE"),
                   help="most connections of the worker's pool; it holds one while idle, plus one to LISTEN "
                   "(default: $HOTMESH_POOL_SIZE or 10)")
    p.add_argument("--poll-interval", dest="poll_interval", type=float, metavar="SECONDS",
                   default=os.environ.get("HOTMESH_POLL_INTERVAL"),
                   help="fallback poll when no NOTIFY arrives (default: $HOTMESH_POLL_INTERVAL or 5)")
    p.add_argument("--shutdown-grace", dest="shutdown_grace", type=float, metavar="SECONDS",
                   default=os.environ.get("HOTMESH_SHUTDOWN_GRACE"),
                   help="on SIGTERM, how long running handlers may finish before their calls are released "
                   "(default: $HOTMESH_SHUTDOWN_GRACE or 10)")
    p.add_argument("--park-after", dest="park_after", type=_park_after, metavar="SECONDS",
                   default=os.environ.get("HOTMESH_PARK_AFTER"),
                   help="seconds idle before the process stops listening while others of its role serve its "
                   "streams; it then polls each second and takes calls that waited one; 'never' to keep "
                   "listening (default: $HOTMESH_PARK_AFTER or 5)")
    p.add_argument("--readonly", action="store_true",
                   help="never claim messages; only register the tools (and publish from Python)")
    _purge_interval(p)
    _pooling(p, serve=False)

    p = add("migrate", cmd_migrate, "Create or update the schema, its owner role and its functions.")
    _common(p)

    p = add("sql", cmd_sql, "Print the SQL that migrate runs, for review; connects to nothing.")
    p.add_argument("--schema", default=os.environ.get("HOTMESH_SCHEMA", DEFAULT_SCHEMA))
    p.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    _log_format(p)

    p = add("provision", cmd_provision, "Create a scoped role that may use only the given streams.")
    _common(p)
    p.add_argument("--stream", action="append", required=True, help="a stream the role may use (repeatable)")
    p.add_argument("--kind", choices=["worker", "caller"], required=True,
                   help="worker: consumes and answers; caller: makes calls (what a gateway logs in as)")
    p.add_argument("--password", default=None, help="the password (default: a new random one)")
    p.add_argument("--connection-limit", dest="connection_limit", type=int, default=CONNECTION_LIMIT, metavar="N",
                   help=f"sessions the role may hold at once (default {CONNECTION_LIMIT}: two or three processes)")
    p.add_argument("--json", action="store_true", help='print {"role", "password", "kind", "streams"}')

    p = add("rotate", cmd_rotate, "Give a role a new password; the old one stops working at once.")
    _common(p)
    p.add_argument("role")
    p.add_argument("--password", default=None, help="the new password (default: a new random one)")
    p.add_argument("--json", action="store_true", help='print {"role", "password", "kind", "streams"}')

    p = add("revoke", cmd_revoke, "Take a role's login, streams and grants away and end its open sessions.")
    _common(p)
    p.add_argument("role")

    p = add("limits", cmd_limits, "Show or set a role's limits: sessions, and messages and bytes it may have "
            "waiting per stream (the schema's settings max_queued_messages/max_queued_bytes are the defaults).")
    _common(p)
    p.add_argument("role")
    p.add_argument("--connection-limit", dest="connection_limit", type=int, default=None, metavar="N",
                   help="sessions the role may hold at once")
    p.add_argument("--max-queued", dest="max_queued", type=int, default=None, metavar="N",
                   help="messages the role may have waiting on each stream (-1: back to the schema's default)")
    p.add_argument("--max-queued-bytes", dest="max_queued_bytes", type=int, default=None, metavar="BYTES",
                   help="their stored size per stream (-1: back to the schema's default)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("db", cmd_db, "The embedded PostgreSQL: where it is and who uses it (status), the DSN a worker role "
            "uses to reach it (dsn), start it and leave it running (start), stop it (stop).")
    p.add_argument("db_command", nargs="?", choices=["status", "dsn", "start", "stop"], default="status")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("HOTMESH_DATA_DIR"),
                   help=f"its data directory (default: $HOTMESH_DATA_DIR or {embedded.default_data_dir()})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--log-level", type=str.upper, choices=logs.LEVELS, default="INFO", help=argparse.SUPPRESS)
    _log_format(p)

    p = add("tools", cmd_tools, "The tool definitions: list them (live, or waiting for an admin's approval), show one "
            "(the approved and the waiting definition, as JSON), approve one (agents see it from then on), or "
            "remove one that nobody serves any more (its name stays reserved to its stream unless --release).")
    _common(p)
    p.add_argument("tools_command", nargs="?", choices=["list", "show", "approve", "remove"], default="list")
    p.add_argument("name", nargs="?", help="with show, approve, remove: the tool's name")
    p.add_argument("--stream", help="the tool's stream, when tools of several streams have the name")
    p.add_argument("--all", action="store_true", help="with approve: every definition that waits")
    p.add_argument("--release", action="store_true",
                   help="with remove: free the name too, so that any stream may register it")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("tokens", cmd_tokens, "Bearer tokens of the identities a gateway serves (serve --identity-config): "
            "tokens add NAME --role ROLE (prints the token once), tokens list, tokens revoke NAME.")
    _common(p)
    p.add_argument("tokens_command", nargs="?", choices=["list", "add", "revoke"], default="list")
    p.add_argument("name", nargs="?", help="with add and revoke: the identity's name")
    p.add_argument("--role", help="with add: the caller role the identity acts as")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("audit", cmd_audit, "The audit trail: one record per call a gateway served for an identity (time, "
            "identity, caller role, tool, outcome, duration, sizes), oldest first.")
    _common(p)
    p.add_argument("--identity", help="only this identity's calls")
    p.add_argument("--tool", help="only calls of this tool")
    p.add_argument("--since", metavar="AGE", help="only calls of the last AGE (30s, 15m, 2h, 7d)")
    p.add_argument("--limit", type=int, default=None, help="the newest N records (default: 100)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("roles", cmd_roles, "List the roles that can use this schema: kind, streams, created, rotated, revoked.")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("status", cmd_status, "Show each stream's queue: ready, in flight, stalled, retrying, dead, oldest "
            "waiting, live workers, calls per second.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """\
columns:
  READY           messages waiting to be claimed now
  IN FLIGHT       claimed by a worker that holds the lease
  STALLED         claimed, but the lease expired: the worker died or lost the database; the next claim on
                  the stream reclaims them (or dead-letters them after --reclaim-count reclaims)
  RETRYING        a handler raised; waiting out the retry backoff
  DEAD            in the dead-letter queue: mcp-hotmesh dlq list
  OLDEST WAITING  how long the oldest ready message has waited to be claimed
  WORKERS         live workers (heartbeat within three intervals)
  CALLS/S         calls that ended (answered or dead) per second, over the last minute
--json prints one object with the same numbers (keys: streams[].ready, .in_flight, .stalled, .retrying, .dead,
.done, .oldest_waiting_seconds, .live_workers, .calls_per_second; totals; retention); with --watch, one
object per line."""
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON (stable keys, for scripts)")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default: 2)")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after this many refreshes")

    p = add("settings", cmd_settings, "Show the admin's settings (lease bounds, size limits, retention), or change "
            "some with KEY=VALUE.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """\
examples:
  mcp-hotmesh settings                                  show them all
  mcp-hotmesh settings retention_ms=1d                  keep done calls a day (durations for *_ms keys)
  mcp-hotmesh settings dead_retention_ms=30d            purge dead calls after 30 days (0: keep until purged)
  mcp-hotmesh settings max_payload_bytes=4194304        larger arguments and results"""
    _common(p)
    p.add_argument("changes", nargs="*", metavar="KEY=VALUE", help="settings to change")
    p.add_argument("--json", action="store_true", help="print JSON")

    dlq = sub.add_parser("dlq", help="List, show, retry or purge dead messages (the dead-letter queue).",
                         description="The dead-letter queue: messages whose attempts, reclaims or deadline ran out, "
                         "or that were cancelled. They stay until retried or purged.")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    def dlq_add(name: str, fn: Callable[[argparse.Namespace], Awaitable[int]], help: str,
                *, ids: bool = True) -> argparse.ArgumentParser:
        q = dsub.add_parser(name, help=help, description=help)
        q.set_defaults(fn=fn)
        _common(q)
        if ids:
            q.add_argument("ids", nargs="*", type=int, metavar="ID", help="message ids (from dlq list)")
            q.add_argument("--stream", help="only messages of this stream")
            q.add_argument("--older-than", metavar="AGE", help="only messages that died at least AGE ago (30s, 15m, "
                           "2h, 7d)")
            q.add_argument("--newer-than", metavar="AGE", help="only messages that died at most AGE ago")
            q.add_argument("--limit", type=int, default=None, help="at most this many messages")
        q.add_argument("--json", action="store_true", help="print JSON")
        return q

    q = dlq_add("list", cmd_dlq_list, "List dead messages, oldest first (100 unless --limit): id, stream, workflow, "
                "call, attempts, reclaims, when it died, why.")
    q = dlq_add("show", cmd_dlq_show, "Show one dead message in full: its arguments, error and answer.", ids=False)
    q.add_argument("id", type=int, metavar="ID")
    q = dlq_add("retry", cmd_dlq_retry, "Queue dead messages again, attempts and reclaims from zero. A call keeps "
                "its call id and gets a fresh deadline, so a caller still waiting for it gets the answer; "
                "--publish queues a fire-and-forget copy instead and deletes the dead one.")
    q.add_argument("--all", action="store_true", help="every dead message that matches the filters (or all)")
    q.add_argument("--timeout", metavar="DURATION", help="the fresh deadline, from now (default: the time the call "
                   "had at first)")
    q.add_argument("--publish", action="store_true", help="re-enqueue as a new fire-and-forget message: nobody "
                   "waits for its answer")
    q = dlq_add("purge", cmd_dlq_purge, "Delete dead messages for good.")
    q.add_argument("--all", action="store_true", help="every dead message that matches the filters (or all)")
    return parser


def _purge_interval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--purge-interval", dest="purge_interval", type=float, metavar="SECONDS",
                   default=float(os.environ.get("HOTMESH_PURGE_INTERVAL", "60")),
                   help="how often this process purges finished calls of its streams past the retention period "
                   "(default: $HOTMESH_PURGE_INTERVAL or 60; 0: never)")


def _pooling(p: argparse.ArgumentParser, *, serve: bool) -> None:
    login = ("with the same login as --dsn; an admin DSN's work (migrate) goes there too" if serve
             else "--user and --password replace its login too")
    p.add_argument("--listen-dsn", dest="listen_dsn", metavar="DSN", default=os.environ.get("HOTMESH_LISTEN_DSN"),
                   help="where LISTEN connects when --dsn goes through a transaction pooler: PostgreSQL itself or a "
                   f"session-mode pool; {login} (default: $HOTMESH_LISTEN_DSN, else --dsn)")
    p.add_argument("--pooler", choices=["transaction"], default=os.environ.get("HOTMESH_POOLER") or None,
                   help="transaction: --dsn goes through a pooler in transaction mode (PgBouncer's pool_mode = "
                   "transaction); statements are then not kept prepared, and --listen-dsn is required (default: "
                   "$HOTMESH_POOLER)")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format, sys.stderr)
    command = args.command if args.command != "dlq" else f"dlq {args.dlq_command}"
    try:
        code = anyio.run(args.fn, args)
    except KeyboardInterrupt:
        code = 130
    except (HotMeshError, BaseExceptionGroup) as exc:
        error = _our_error(exc)
        if error is None:
            raise
        sys.stderr.write(logs.error_line(command, str(error), args.log_format))
        code = EXIT_USAGE if isinstance(error, ConfigError) else EXIT_ERROR
    # The event loop is closed: what asyncio would still report as it collects the driver's leftover futures (a
    # connection the server ended mid-query, "exception was never retrieved") would follow the last line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.exit(code)


def _our_error(exc: BaseException) -> HotMeshError | None:
    """The error to tell the operator in one line: ours, or ours inside the exception groups of task groups
    (a failure in one task of ``serve`` arrives wrapped); None for anything else, a bug to show in full."""
    if isinstance(exc, HotMeshError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_our_error(inner) for inner in exc.exceptions]
        if found and all(e is not None for e in found):
            return found[0]
    return None


if __name__ == "__main__":
    main()
