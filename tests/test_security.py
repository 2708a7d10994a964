"""Negative security tests: an attacker holding a worker role's (or a caller role's) password.

Every test makes the attack as the restricted role, over TCP with its password (``env.connect`` for raw SQL, or
the WorkerAPI / CallerAPI of ``env.worker`` / ``env.caller``), asserts that it is refused with the right error,
and asserts as the admin that nothing changed: ``snapshot`` reads every table of the schema and the catalog
state (objects, ACLs, owners, stored role settings, memberships) before and after.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import pytest

from mcp_hotmesh._common import Kind
from mcp_hotmesh._migrate import migrate, migrations
from mcp_hotmesh._roles import ProvisionedRole, revoke, rotate
from mcp_hotmesh._streams import CallerAPI, Claimed, WorkerAPI, caller_channel, tools_channel, worker_channel
from mcp_hotmesh.errors import (
    ConfigError,
    ConnectionFailed,
    DatabaseError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from tests.helpers import Env, drop_schema

pytestmark = pytest.mark.anyio

TABLES = ("messages", "tools", "workers", "roles", "settings", "migrations", "definitions")
DENIED = asyncpg.InsufficientPrivilegeError  # SQLSTATE 42501

# ------------------------------------------------------------------------------------------------ helpers


async def snapshot(env: Env) -> dict[str, Any]:
    """Everything an attack could change, read as the admin: rows of every table and the catalog state."""
    s, admin = env.schema, env.admin
    snap: dict[str, Any] = {}
    for table in TABLES:
        rows = await admin.fetch(f'SELECT to_jsonb(t)::text AS j FROM "{s}".{table} t')
        snap[table] = sorted(r["j"] for r in rows)
    like = s.replace("_", "\\_") + "\\_%"
    queries = {
        "relations": """SELECT c.relname, c.relkind::text, c.relowner::regrole::text, c.relacl::text
                        FROM pg_class c WHERE c.relnamespace = $1::regnamespace""",
        "functions": """SELECT p.oid::regprocedure::text, p.proowner::regrole::text, p.proacl::text,
                               p.prosecdef, p.proconfig::text, md5(p.prosrc)
                        FROM pg_proc p WHERE p.pronamespace = $1::regnamespace""",
        "schema": "SELECT n.nspowner::regrole::text, n.nspacl::text FROM pg_namespace n WHERE n.nspname = $1",
    }
    for key, sql in queries.items():
        snap[key] = sorted(tuple(r) for r in await admin.fetch(sql, s))
    snap["public"] = sorted(
        tuple(r)
        for r in await admin.fetch(
            """SELECT 'rel', relname FROM pg_class WHERE relnamespace = 'public'::regnamespace
               UNION ALL SELECT 'proc', proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"""
        )
    )
    snap["schemas"] = sorted(
        r[0]
        for r in await admin.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname !~ '^pg_(toast_)?temp_'"
        )
    )
    snap["role_settings"] = sorted(
        tuple(r)
        for r in await admin.fetch(
            """SELECT s.setdatabase, s.setrole::regrole::text, s.setconfig::text FROM pg_db_role_setting s
               JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname LIKE $1 ESCAPE '\\'""",
            like,
        )
    )
    snap["pg_roles"] = sorted(
        tuple(r)
        for r in await admin.fetch(
            """SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication,
                      rolbypassrls, rolconnlimit, rolvaliduntil::text
               FROM pg_roles WHERE rolname LIKE $1 ESCAPE '\\'""",
            like,
        )
    )
    snap["password_hashes"] = sorted(
        tuple(r)
        for r in await admin.fetch(
            "SELECT rolname, md5(coalesce(rolpassword, '')) FROM pg_authid WHERE rolname LIKE $1 ESCAPE '\\'",
            like,
        )
    )
    snap["memberships"] = sorted(
        tuple(r)
        for r in await admin.fetch(
            """SELECT m.roleid::regrole::text, m.member::regrole::text, m.admin_option FROM pg_auth_members m
               JOIN pg_roles a ON a.oid = m.roleid JOIN pg_roles b ON b.oid = m.member
               WHERE a.rolname LIKE $1 ESCAPE '\\' OR b.rolname LIKE $1 ESCAPE '\\'""",
            like,
        )
    )
    return snap


async def refused(
    attempt: Awaitable[object], exc: type[BaseException] | tuple[type[BaseException], ...] = DENIED
) -> BaseException:
    """Await one attack (an API call not awaited yet) and require that it raises ``exc``; returns the exception."""
    with pytest.raises(exc) as info:
        await attempt
    return info.value


async def not_refused(conn: asyncpg.Connection, statements: list[str]) -> list[str]:
    """The statements of ``statements`` that were NOT refused with 42501 (each runs in its own transaction)."""
    missed = []
    for sql in statements:
        try:
            async with conn.transaction():
                await conn.execute(sql)
        except DENIED:
            continue
        except asyncpg.PostgresError as exc:
            missed.append(f"{sql} -> {exc.sqlstate} {exc}")
        else:
            missed.append(f"{sql} -> succeeded")
    return missed


async def functions_of(env: Env, pattern: str) -> list[tuple[str, str]]:
    """(name, a call of it with NULL arguments) for every function of the schema whose name matches."""
    rows = await env.admin.fetch(
        """SELECT p.proname,
                  format('SELECT %I.%I(%s)', n.nspname, p.proname,
                         coalesce((SELECT string_agg('NULL::' || format_type(t, NULL), ', ' ORDER BY i)
                                   FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i)), '')) AS call
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = $1 AND p.proname ~ $2 ORDER BY p.proname""",
        env.schema,
        pattern,
    )
    return [(r["proname"], r["call"]) for r in rows]


@dataclass
class World:
    """Two streams, ``a`` and ``b``, each with its own worker and caller role, and live state on ``b``."""

    wa: ProvisionedRole
    worker_a: WorkerAPI
    wb: ProvisionedRole
    worker_b: WorkerAPI
    ca: ProvisionedRole
    caller_a: CallerAPI
    cb: ProvisionedRole
    caller_b: CallerAPI
    queued_b: uuid.UUID  # caller b's call on b, still queued
    held_b: Claimed  # a call on b that worker b holds the lease of
    held_call_b: uuid.UUID


TOOL = {
    "name": "echo_b",
    "description": "Echo.",
    "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
}


async def world(env: Env) -> World:
    wa, worker_a = await env.worker(["a"])
    wb, worker_b = await env.worker(["b"])
    ca, caller_a = await env.caller(["a"])
    cb, caller_b = await env.caller(["b"])
    held_call_b = await caller_b.call("b", "", {"secret": "held"}, 60_000)
    [held_b] = await worker_b.dequeue("b", "wb1", 1, 60_000)
    queued_b = await caller_b.call("b", "", {"secret": "queued"}, 60_000)
    await worker_b.publish("b", "", {"secret": "published"})
    assert await worker_b.register_tool("b", "", TOOL)
    await worker_b.heartbeat(["b"], "wb1", 60_000)
    return World(wa, worker_a, wb, worker_b, ca, caller_a, cb, caller_b, queued_b, held_b, held_call_b)


def worker_attacks(s: str, stream: str | None, w: World) -> list[tuple[str, str, tuple[Any, ...]]]:
    """Every worker function, aimed at ``stream`` (with b's real message id and lease where one is needed)."""
    id_, lease = w.held_b.id, w.held_b.lease
    return [
        ("dequeue", f"SELECT count(*) FROM {s}.worker_dequeue($1::text, 'evil', 100, 60000)", (stream,)),
        ("respond", f"SELECT {s}.worker_respond($1::text, $2::bigint, $3::uuid, '{{\"x\":1}}')", (stream, id_, lease)),
        ("fail", f"SELECT {s}.worker_fail($1::text, $2::bigint, $3::uuid, 'x', NULL)", (stream, id_, lease)),
        ("extend", f"SELECT {s}.worker_extend($1::text, $2::bigint, $3::uuid, 60000)", (stream, id_, lease)),
        ("progress", f"SELECT {s}.worker_progress($1::text, $2::bigint, $3::uuid, 1, 2, 'x')", (stream, id_, lease)),
        ("release", f"SELECT {s}.worker_release($1::text, $2::bigint, $3::uuid)", (stream, id_, lease)),
        ("publish", f"SELECT {s}.worker_publish($1::text, '', '{{}}')", (stream,)),
        ("register", f"SELECT {s}.worker_register_tool($1::text, 'x', $2::jsonb)",
         (stream, json.dumps({**TOOL, "name": "evil"}))),
        ("unregister", f"SELECT {s}.worker_unregister_tool($1::text, '')", (stream,)),
        ("heartbeat", f"SELECT {s}.worker_heartbeat(ARRAY[$1::text], 'evil', 60000)", (stream,)),
    ]


async def all_worker_attacks_refused(conn: asyncpg.Connection, s: str, stream: str | None, w: World) -> None:
    for name, sql, args in worker_attacks(s, stream, w):
        with pytest.raises(DENIED, match="permission denied for this stream"):
            async with conn.transaction():  # a savepoint when the caller has a transaction open
                await conn.fetchval(sql, *args)
        assert name  # (the name shows in the traceback when one of them is not refused)


# --------------------------------------------------------------------------------------- direct SQL access


def table_attacks(s: str) -> list[str]:
    a_column = {"messages": "stream", "tools": "name", "workers": "consumer", "roles": "kind",
                "settings": "value", "migrations": "name", "definitions": "checksum"}
    attacks = []
    for table in TABLES:
        t = f"{s}.{table}"
        attacks += [
            f"SELECT * FROM {t}",
            f"SELECT count(*) FROM {t}",
            f"INSERT INTO {t} DEFAULT VALUES",
            f"UPDATE {t} SET {a_column[table]} = {a_column[table]}",
            f"DELETE FROM {t}",
            f"TRUNCATE {t}",
            f"TRUNCATE {t} CASCADE",
            f"ALTER TABLE {t} ADD COLUMN evil int",
            f"ALTER TABLE {t} OWNER TO current_user",
            f"ALTER TABLE {t} DISABLE ROW LEVEL SECURITY",
            f"CREATE INDEX ON {t} ({a_column[table]})",
            f"CREATE TRIGGER evil AFTER INSERT ON {t} EXECUTE FUNCTION pg_catalog.now()",
            f"GRANT SELECT ON {t} TO current_user",
            f"DROP TABLE {t}",
            f"COMMENT ON TABLE {t} IS 'evil'",
            f"LOCK TABLE {t} IN ACCESS SHARE MODE",
        ]
    attacks += [
        f"SELECT nextval('{s}.messages_id_seq')",
        f"SELECT setval('{s}.messages_id_seq', 1)",
        f"SELECT last_value FROM {s}.messages_id_seq",
        f"CREATE TABLE {s}.evil (x int)",
        f"CREATE VIEW {s}.evil AS SELECT 1",
        f"CREATE FUNCTION {s}.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        f"CREATE FUNCTION {s}.worker_dequeue(text) RETURNS int LANGUAGE sql AS 'SELECT 1'",  # an overload
        "CREATE TABLE public.evil (x int)",
        "CREATE FUNCTION public.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE SCHEMA evil",
        f"ALTER SCHEMA {s} OWNER TO current_user",
        f"DROP SCHEMA {s} CASCADE",
        f"ALTER FUNCTION {s}.worker_publish(text, text, jsonb) SECURITY INVOKER",
        f"ALTER FUNCTION {s}.worker_publish(text, text, jsonb) RESET search_path",
        f"CREATE OR REPLACE FUNCTION {s}._allowed_streams() RETURNS text[] LANGUAGE sql AS $$SELECT '{{b}}'::text[]$$",
        f"DROP FUNCTION {s}._authorize(text)",
        # (for its own future objects a role may: harmless, it can create none; for the owner's it may not)
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {s}_owner IN SCHEMA {s} GRANT ALL ON TABLES TO current_user",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {s}_owner GRANT EXECUTE ON FUNCTIONS TO PUBLIC",
        f"SET ROLE {s}_owner",
        "SET SESSION AUTHORIZATION postgres",
    ]
    return attacks


@pytest.mark.parametrize("kind", ["worker", "caller"])
async def test_no_direct_access_to_any_table_or_ddl(env: Env, kind: Kind) -> None:
    await world(env)
    role = await env.provision(["a", "b"], kind)
    before = await snapshot(env)
    assert before["messages"] and before["tools"] and before["workers"] and before["settings"]
    async with env.session(role) as conn:
        assert await not_refused(conn, table_attacks(env.schema)) == []
        for table in TABLES:
            with pytest.raises(DENIED):
                await conn.copy_from_table(table, schema_name=env.schema, output=io.BytesIO())
        # GRANT of what it may use itself, but without the grant option: only a warning, and nothing granted
        own = "worker_publish(text, text, jsonb)" if kind == "worker" else "caller_tools()"
        await conn.execute(f"GRANT EXECUTE ON FUNCTION {env.schema}.{own} TO PUBLIC")
        await conn.execute(f"GRANT USAGE ON SCHEMA {env.schema} TO PUBLIC")
    assert await snapshot(env) == before


@pytest.mark.parametrize("kind", ["worker", "caller"])
async def test_internal_helpers_are_not_callable(env: Env, kind: Kind) -> None:
    await world(env)
    role = await env.provision(["a", "b"], kind)
    helpers = await functions_of(env, "^_")
    assert {name for name, _ in helpers} >= {"_authorize", "_allowed_streams", "_is_admin", "_setting",
                                              "_notify_caller", "_clamp_lease", "_check_tool", "_watchdog",
                                              "_own_streams", "_check_quota"}
    before = await snapshot(env)
    async with env.session(role) as conn:
        for name, call in helpers:
            with pytest.raises(DENIED, match=f"permission denied for function {name}"):
                await conn.fetchval(call)
    assert await snapshot(env) == before


async def test_worker_cannot_call_caller_functions_and_caller_cannot_call_worker_functions(env: Env) -> None:
    w = await world(env)
    worker_fns = await functions_of(env, "^worker_")
    caller_fns = await functions_of(env, "^caller_")
    assert len(worker_fns) >= 11 and len(caller_fns) >= 4
    before = await snapshot(env)
    async with env.session(w.wb) as conn:
        for name, call in caller_fns:
            with pytest.raises(DENIED, match=f"permission denied for function {name}"):
                await conn.fetch(call)
        # with real arguments too: worker b asks for caller b's call on its own stream
        with pytest.raises(DENIED):
            await conn.fetch(f"SELECT * FROM {env.schema}.caller_result($1)", w.queued_b)
        with pytest.raises(DENIED):
            await conn.fetch(f"SELECT {env.schema}.caller_call('b', '', '{{}}', 1000)")
    async with env.session(w.cb) as conn:
        for name, call in worker_fns:
            with pytest.raises(DENIED, match=f"permission denied for function {name}"):
                await conn.fetch(call)
        with pytest.raises(DENIED):
            await conn.fetch(f"SELECT * FROM {env.schema}.worker_dequeue('b', 'c', 10, 60000)")
    # and through the Python API, as the gateway and worker code would call them
    wrong_worker = WorkerAPI(w.caller_b.pool, env.schema)
    wrong_caller = CallerAPI(w.worker_b.pool, env.schema)
    await refused(wrong_worker.dequeue("b", "c", 10, 60_000), PermissionDenied)
    await refused(wrong_worker.respond("b", w.held_b.id, w.held_b.lease, {}), PermissionDenied)
    await refused(wrong_caller.call("b", "", {}, 1000), PermissionDenied)
    await refused(wrong_caller.result(w.queued_b), PermissionDenied)
    await refused(wrong_caller.cancel(w.queued_b), PermissionDenied)
    await refused(wrong_caller.tools(), PermissionDenied)
    assert await snapshot(env) == before


# ------------------------------------------------------------------------------------ the stream allow-list


async def test_worker_is_refused_on_another_stream(env: Env) -> None:
    w = await world(env)
    before = await snapshot(env)
    async with env.session(w.wa) as conn:
        await all_worker_attacks_refused(conn, env.schema, "b", w)
        assert await conn.fetchval(f"SELECT count(*) FROM {env.schema}.worker_dequeue('a', 'w', 10, 1000)") == 0
    await refused(w.worker_a.dequeue("b", "w", 10, 60_000), PermissionDenied)
    await refused(w.worker_a.heartbeat(["a", "b"], "w", 60_000), PermissionDenied)
    assert await snapshot(env) == before


async def test_set_and_set_config_do_not_widen_the_scope(env: Env) -> None:
    w = await world(env)
    before = await snapshot(env)
    s = env.schema
    async with env.session(w.wa) as conn:
        for widen in [
            "SET app.allowed_streams = 'a,b'",
            "SET SESSION app.allowed_streams = 'b'",
            "SELECT set_config('app.allowed_streams', 'a,b', false)",
            "SELECT set_config('app.allowed_streams', 'b', true)",
        ]:
            async with conn.transaction():
                await conn.execute(widen)  # any session may set a custom setting ...
                assert "b" in await conn.fetchval("SELECT current_setting('app.allowed_streams')")
                await all_worker_attacks_refused(conn, s, "b", w)  # ... but it is never read
    async with env.session(w.ca) as conn:
        await conn.execute("SET app.allowed_streams = 'a,b'")
        with pytest.raises(DENIED, match="permission denied for this stream"):
            await conn.fetchval(f"SELECT {s}.caller_call('b', '', '{{}}', 1000)")
        assert await conn.fetch(f"SELECT * FROM {s}.caller_tools()") == []  # b's tool stays hidden
    assert await snapshot(env) == before


async def test_alter_role_on_itself_cannot_widen_or_unnarrow_the_scope(env: Env) -> None:
    w = await world(env)
    s = env.schema
    # A role-wide setting wider than the database-specific one that wins: undoing the narrow one would widen.
    await env.admin.execute(f"ALTER ROLE \"{w.wa.role}\" SET app.allowed_streams = 'a,b'")
    before = await snapshot(env)
    db = env.server.database
    async with env.session(w.wa) as conn:
        assert not await conn.fetchval("SELECT has_parameter_privilege('app.allowed_streams', 'SET')")
        for statement in [
            "ALTER ROLE current_user SET app.allowed_streams = 'a,b'",
            f"ALTER ROLE current_user IN DATABASE {db} SET app.allowed_streams = 'a,b'",
            f"ALTER ROLE \"{w.wa.role}\" SET app.allowed_streams TO 'b'",
            f"ALTER ROLE current_user IN DATABASE {db} RESET app.allowed_streams",
            "ALTER ROLE current_user RESET app.allowed_streams",
            f"ALTER ROLE \"{w.wb.role}\" SET app.allowed_streams = 'a'",
            f"ALTER ROLE {s}_worker SET app.allowed_streams = 'b'",
            f"ALTER DATABASE {db} SET app.allowed_streams = 'b'",
            "ALTER ROLE ALL SET app.allowed_streams = 'b'",
            "ALTER SYSTEM SET app.allowed_streams = 'b'",
        ]:
            with pytest.raises(DENIED):
                await conn.execute(statement)
        # RESET ALL "succeeds" but keeps what the role may not change
        await conn.execute(f"ALTER ROLE current_user IN DATABASE {db} RESET ALL")
        await conn.execute("ALTER ROLE current_user RESET ALL")
        await all_worker_attacks_refused(conn, s, "b", w)
    async with env.session(w.wa) as conn:  # a new session: still only a
        await all_worker_attacks_refused(conn, s, "b", w)
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.worker_dequeue('a', 'w', 1, 1000)") == 0
    assert await snapshot(env) == before


async def test_set_role_to_the_group_stays_scoped_to_the_session_user(env: Env) -> None:
    w = await world(env)
    s = env.schema
    before = await snapshot(env)
    async with env.session(w.wa) as conn:
        await conn.execute(f"SET ROLE {s}_worker")
        assert await conn.fetchval("SELECT current_user") == f"{s}_worker"
        await all_worker_attacks_refused(conn, s, "b", w)
        with pytest.raises(DENIED):
            await conn.execute(f"ALTER ROLE {s}_worker SET app.allowed_streams = 'b'")
        for table in TABLES:
            with pytest.raises(DENIED):
                await conn.fetch(f"SELECT * FROM {s}.{table}")
        for target in (f"{s}_owner", f"{s}_caller", w.wb.role, "postgres"):
            with pytest.raises(DENIED):
                await conn.execute(f'SET ROLE "{target}"')
        await conn.execute("RESET ROLE")
        await all_worker_attacks_refused(conn, s, "b", w)
    assert await snapshot(env) == before


async def test_hostile_stream_names_are_data(env: Env) -> None:
    w = await world(env)
    s = env.schema
    hostile = [
        "b'", "'; DROP TABLE messages; --", f"'); DROP TABLE {s}.messages; --", "a,b", "b,a", "a, b", ",a", "a,",
        "*", "%", "_", "a%", "a_", "{a,b}", '"a"', "", " a", "a ", "A", "a\n", "a\\", "ströme", "a;b", "x" * 5000,
    ]
    before = await snapshot(env)
    async with env.session(w.wa) as conn:
        for name in [*hostile, None]:
            await all_worker_attacks_refused(conn, s, name, w)
    for name in hostile:
        await refused(w.worker_a.dequeue(name, "w", 10, 1000), PermissionDenied)
        await refused(w.worker_a.publish(name, "", {}), PermissionDenied)
        await refused(w.worker_a.register_tool(name, "", TOOL), PermissionDenied)
        await refused(w.caller_a.call(name, "", {}, 1000), PermissionDenied)
    # a NUL byte cannot even be sent: the database refuses the value
    await refused(w.worker_a.dequeue("a\x00", "w", 10, 1000), InvalidInput)
    await refused(w.caller_a.call("a\x00b", "", {}, 1000), InvalidInput)
    assert await snapshot(env) == before

    # the admin (the seed's standard mode) passes the allow-list, so the name itself is checked
    admin_worker = WorkerAPI(await env.pool(), s)
    admin_caller = CallerAPI(await env.pool(), s)
    invalid = [n for n in hostile if n not in ("A", "_", "a_")]
    assert not any(re.fullmatch(r"[A-Za-z0-9._:/-]{1,200}", n) for n in invalid)
    for name in invalid:
        await refused(admin_worker.publish(name, "", {}), InvalidInput)
        await refused(admin_worker.dequeue(name, "w", 1, 1000), InvalidInput)
        await refused(admin_caller.call(name, "", {}, 1000), InvalidInput)
        await refused(admin_worker.register_tool(name, "", TOOL), InvalidInput)
    assert await snapshot(env) == before


@pytest.mark.parametrize("name", [
    "b'", "'; DROP TABLE messages; --", "a,b", "a, b", "*", "", " a", "a ", "a\n", "ströme", "x" * 5000,
    "a\x00", "{a}",
])
async def test_provisioning_refuses_hostile_stream_names(env: Env, name: str) -> None:
    before = await snapshot(env)
    kinds: tuple[Kind, ...] = ("worker", "caller")
    for kind in kinds:
        with pytest.raises(ConfigError):
            await env.provision([name], kind)
        with pytest.raises(ConfigError):
            await env.provision(["a", name], kind)
    assert await snapshot(env) == before


async def test_a_role_for_a_gets_nothing_near_a(env: Env) -> None:
    w = await world(env)
    await w.worker_a.publish("a", "", {"mine": True})
    near = ["a,b", "a,", ",a", " a", "a ", "A", "a%", "%", "_", "a*", "*", "{a}", '"a"', "a\n", "a\t", "aa", "a.",
            "a/", "a:b"]
    before = await snapshot(env)
    for name in near:
        await refused(w.worker_a.dequeue(name, "w", 10, 1000), PermissionDenied)
        await refused(w.caller_a.call(name, "", {}, 1000), PermissionDenied)
    assert await snapshot(env) == before
    [got] = await w.worker_a.dequeue("a", "w", 10, 1000)
    assert got.args == {"mine": True}


async def test_allow_list_entries_that_are_not_stream_names_grant_nothing(env: Env) -> None:
    """A hand-written allow-list may hold junk ('*' meant as a wildcard, a non-ASCII name): it grants nothing."""
    wa, worker = await env.worker(["a"])
    db = env.server.database
    await env.admin.execute(
        f"ALTER ROLE \"{wa.role}\" IN DATABASE {db} SET app.allowed_streams = 'a, *,ströme,,%, b '"
    )
    before = await snapshot(env)
    for name in ("*", "ströme", "%", " b "):
        await refused(worker.publish(name, "", {}), PermissionDenied)
        await refused(worker.dequeue(name, "w", 1, 1000), PermissionDenied)
    assert await snapshot(env) == before
    assert await worker.publish("a", "", {}) and await worker.publish("b", "", {})  # spaces are trimmed


# --------------------------------------------------------------------------------------------------- leases


async def test_forged_and_foreign_leases_change_nothing(env: Env) -> None:
    w = await world(env)
    wb2, worker_b2 = await env.worker(["b"])  # another worker role on b
    before = await snapshot(env)
    held = w.held_b
    forged = uuid.uuid4()
    for api in (w.worker_b, worker_b2):
        assert not await api.respond("b", held.id, forged, {"forged": True})
        assert not await api.fail("b", held.id, forged, "forged", 0)
        assert await api.extend("b", held.id, forged, 60_000) is None
        assert not await api.progress("b", held.id, forged, 1, 1, "forged")
        assert not await api.release("b", held.id, forged)
        # the right lease with the wrong stream, or a message id that does not exist
        assert not await api.respond("b", held.id + 1000, held.lease, {})
    # worker a, allowed on a only, holding b's real lease: refused on b, and nothing matches on a
    assert not await w.worker_a.respond("a", held.id, held.lease, {"stolen": True})
    assert not await w.worker_a.fail("a", held.id, held.lease, "stolen", None)
    assert await w.worker_a.extend("a", held.id, held.lease, 60_000) is None
    assert not await w.worker_a.progress("a", held.id, held.lease, 1, 1, "stolen")
    assert not await w.worker_a.release("a", held.id, held.lease)
    await refused(w.worker_a.respond("b", held.id, held.lease, {"stolen": True}), PermissionDenied)
    await refused(w.worker_a.release("b", held.id, held.lease), PermissionDenied)
    async with env.session(w.wa) as conn:
        await all_worker_attacks_refused(conn, env.schema, "b", w)
    assert await snapshot(env) == before
    assert wb2.role != w.wb.role


async def test_a_reclaimed_lease_is_dead(env: Env) -> None:
    _, worker = await env.worker(["s"])
    _, other = await env.worker(["s"])
    await env.set("min_lease_ms", 50)
    await worker.publish("s", "", {})
    [first] = await worker.dequeue("s", "w1", 1, 50)
    await anyio.sleep(0.1)
    [second] = await other.dequeue("s", "w2", 1, 60_000)
    assert second.id == first.id and second.lease != first.lease
    before = await snapshot(env)
    assert not await worker.respond("s", first.id, first.lease, {"late": True})
    assert not await worker.fail("s", first.id, first.lease, "late", 0)
    assert await worker.extend("s", first.id, first.lease, 60_000) is None
    assert not await worker.progress("s", first.id, first.lease, 1, 1, "late")
    assert not await worker.release("s", first.id, first.lease)
    assert await snapshot(env) == before
    row = await env.message(first.id)
    assert row["lease"] == second.lease and row["consumer"] == "w2" and row["state"] == "reserved"


async def test_lease_ms_is_clamped_and_a_held_lease_is_never_stolen(env: Env) -> None:
    _, worker = await env.worker(["s"])
    _, thief = await env.worker(["s"])
    await env.set("min_lease_ms", 1_000)
    await env.set("max_lease_ms", 3_000)

    async def remaining(id: int) -> float:
        value = await env.admin.fetchval(
            f'SELECT extract(epoch FROM lease_expires_at - now()) FROM "{env.schema}".messages WHERE id = $1', id
        )
        return float(value)

    first = await worker.publish("s", "", {"n": 1})
    [held] = await worker.dequeue("s", "w1", 1, 2**31 - 1)  # huge: clamped to max_lease_ms
    assert held.id == first
    assert 2.0 < await remaining(first) <= 3.0
    row = await env.message(first)
    for lease_ms in (0, -1, -(2**31), 1, 2**31 - 1):
        assert await thief.dequeue("s", "thief", 10, lease_ms) == []
    async with env.session(await env.provision(["s"], "worker")) as conn:
        assert await conn.fetch(f"SELECT * FROM {env.schema}.worker_dequeue('s', 'thief', 10, NULL)") == []
    assert dict(await env.message(first)) == dict(row)  # still the first worker's, with the same stored expiry

    second = await worker.publish("s", "", {"n": 2})
    [short] = await worker.dequeue("s", "w1", 1, 0)  # zero: clamped to min_lease_ms
    assert short.id == second
    assert 0.5 < await remaining(second) <= 1.0
    assert await worker.extend("s", second, short.lease, -5) is False
    assert 0.5 < await remaining(second) <= 1.0
    assert await worker.extend("s", second, short.lease, 2**31 - 1) is False
    assert 2.0 < await remaining(second) <= 3.0


# -------------------------------------------------------------------------------------------------- callers


async def test_a_caller_cannot_read_or_cancel_another_callers_call(env: Env) -> None:
    _, worker = await env.worker(["s"])
    _, owner = await env.caller(["s"])
    _, other = await env.caller(["s"])  # the same stream: calls belong to a role, not to a stream
    running = await owner.call("s", "", {"secret": 2}, 60_000)
    [msg] = await worker.dequeue("s", "w", 1, 60_000)
    assert (await env.call_row(running))["id"] == msg.id
    queued = await owner.call("s", "", {"secret": 1}, 60_000, "key")
    before = await snapshot(env)
    for call_id in (queued, running, uuid.uuid4()):
        error = await refused(other.result(call_id), NotFound)
        assert str(error) == "no such call"  # the same answer as for a call that does not exist
        await refused(other.cancel(call_id), NotFound)
    assert await snapshot(env) == before
    # the same idempotency key is another call for another role
    mine = await other.call("s", "", {}, 60_000, "key")
    assert mine != queued
    assert (await owner.result(queued)).state == "ready"
    assert (await env.call_row(queued))["owner"] != (await env.call_row(mine))["owner"]


async def test_caller_tools_shows_only_the_callers_streams(env: Env) -> None:
    w = await world(env)
    assert await w.worker_a.register_tool("a", "", {**TOOL, "name": "echo_a"})
    assert [t.name for t in await w.caller_a.tools()] == ["echo_a"]
    assert [t.name for t in await w.caller_b.tools()] == ["echo_b"]


# ---------------------------------------------------------------------------------------------------- tools


async def test_tool_registration_attacks(env: Env) -> None:
    w = await world(env)
    await env.set("max_schema_bytes", 10_000)
    before = await snapshot(env)
    wa = w.worker_a
    # a stream it may not use
    await refused(wa.register_tool("b", "", {**TOOL, "name": "mine"}), PermissionDenied)
    await refused(wa.unregister_tool("b", ""), PermissionDenied)
    # a name another stream already serves (a takeover of b's tool)
    error = await refused(wa.register_tool("a", "", TOOL), InvalidInput)
    assert "another stream" in str(error)
    await refused(w.worker_b.register_tool("b", "other_workflow", TOOL), InvalidInput)
    # invalid names and shapes
    for bad in ["", "a b", "a.b", "x" * 65, "ünïcode", "a\n", "'; DROP TABLE tools; --", None, 7]:
        await refused(wa.register_tool("a", "", {**TOOL, "name": bad}), InvalidInput)
    bad_tools: list[dict[str, Any]] = [
        {**TOOL, "description": None},
        {**TOOL, "input_schema": {"type": "string"}},
        {**TOOL, "input_schema": "{}"},
        {**TOOL, "output_schema": {"type": "array"}},
        {"name": "x"},
    ]
    for bad_tool in bad_tools:
        await refused(wa.register_tool("a", "", bad_tool), InvalidInput)
    await refused(wa.register_tool("a", "x" * 201, {**TOOL, "name": "ok"}), InvalidInput)
    # a huge schema
    huge = {**TOOL, "name": "huge", "input_schema": {"type": "object", "description": "x" * 20_000}}
    await refused(wa.register_tool("a", "", huge), PayloadTooLarge)
    assert await snapshot(env) == before


async def test_notify_is_a_hint_that_carries_no_data_and_grants_nothing(env: Env) -> None:
    """What NOTIFY can do: any role may LISTEN on any channel and NOTIFY any channel; PostgreSQL has no ACL
    for either. What it cannot do: payloads carry only ids (``r:``/``p:`` + call id, ``c:`` + message id, or
    nothing), never arguments or results, and ids grant nothing: every read goes through a function that
    checks the allow-list or the call's owner. A spoofed NOTIFY only makes a listener look again."""
    w = await world(env)
    s = env.schema
    heard: list[tuple[str, str]] = []
    awaited: list[str] = []
    answered = anyio.Event()

    def hear(_conn: object, _pid: int, channel: str, payload: object) -> None:
        heard.append((channel, str(payload)))
        if str(payload) in awaited:
            answered.set()

    channels = [worker_channel(s, "b"), caller_channel(s, w.cb.role), tools_channel(s)]
    async with env.session(w.wa) as spy, env.session(w.ca) as caller_spy:
        for channel in channels:
            await spy.add_listener(channel, hear)
        # activity on b, by b's roles
        call_id = await w.caller_b.call("b", "notify", {"secret": "s3cr3t-args"}, 60_000)
        awaited.append(f"r:{call_id}")
        [msg] = await w.worker_b.dequeue("b", "wb2", 1, 60_000, workflows=["notify"])
        assert await w.worker_b.progress("b", msg.id, msg.lease, 1, 2, "s3cr3t-progress")
        assert await w.worker_b.respond("b", msg.id, msg.lease, {"secret": "s3cr3t-result"})
        assert await w.caller_b.cancel(w.queued_b) == "ready"
        await w.worker_b.register_tool("b", "", {**TOOL, "description": "changed"})
        with anyio.fail_after(5):
            await answered.wait()
        for _channel, payload in heard:
            assert "s3cr3t" not in payload
            assert re.fullmatch(r"|[rpc]:[0-9a-f-]+", payload), payload
        before = await snapshot(env)
        # what the spy learnt grants nothing: caller a, holding b's call ids, is told "no such call"
        for heard_id in {p[2:] for _, p in heard if p[:2] in ("r:", "p:")}:
            for sql in (f"SELECT * FROM {s}.caller_result($1::uuid)", f"SELECT {s}.caller_cancel($1::uuid)"):
                with pytest.raises(asyncpg.PostgresError, match="no such call") as info:
                    await caller_spy.fetch(sql, heard_id)
                assert info.value.sqlstate == "HM005"
        # spoofed notifications change nothing
        for channel, payload in [
            (caller_channel(s, w.cb.role), f"r:{w.held_call_b}"),
            (worker_channel(s, "b"), f"c:{w.held_b.id}"),
            (tools_channel(s), ""),
        ]:
            await spy.execute("SELECT pg_notify($1, $2)", channel, payload)
    assert await snapshot(env) == before
    assert (await w.caller_b.result(w.held_call_b)).state == "reserved"


async def test_a_worker_cannot_speak_for_another_roles_consumer(env: Env) -> None:
    w = await world(env)  # worker b's role heartbeats as consumer "wb1" on b
    _, intruder = await env.worker(["b"])  # another role on the same stream
    before = await snapshot(env)
    await intruder.heartbeat(["b"], "wb1", 600_000)  # refreshes nothing it does not own
    assert await intruder.goodbye("wb1") == 0  # and removes nothing it does not own
    assert await snapshot(env) == before
    assert await w.worker_b.goodbye("wb1") == 1


async def test_roles_of_one_schema_have_nothing_in_another(env: Env) -> None:
    w = await world(env)
    other = env.schema + "_x"
    await migrate(env.admin, other)
    try:
        await env.admin.execute(f"INSERT INTO {other}.messages (stream, args) VALUES ('a', '{{}}')")
        async with env.session(w.wa) as conn:
            for sql in [
                f"SELECT * FROM {other}.worker_dequeue('a', 'w', 10, 60000)",
                f"SELECT {other}.worker_publish('a', '', '{{}}')",
                f"SELECT * FROM {other}.messages",
                f"SELECT * FROM {other}.caller_tools()",
            ]:
                with pytest.raises(DENIED, match=f"permission denied for schema {other}"):
                    await conn.fetch(sql)
        assert await env.admin.fetchval(f"SELECT state FROM {other}.messages") == "ready"
    finally:
        await drop_schema(env.admin, other)


async def test_a_spoofed_cancel_notify_does_not_stop_a_running_handler(env: Env) -> None:
    """The real worker treats ``c:<id>`` as a hint: it asks worker_extend, which says the call was not cancelled."""
    from mcp_hotmesh._tools import ToolSet
    from mcp_hotmesh._worker import Worker

    started, release = anyio.Event(), anyio.Event()
    tools = ToolSet()

    @tools.tool(topic="slow")
    async def slow() -> dict[str, Any]:
        """Waits to be released."""
        started.set()
        await release.wait()
        return {"finished": True}

    role = await env.provision(["slow"], "worker")
    owner_role, owner = await env.caller(["slow"])
    intruder = await env.provision(["other"], "caller")  # another caller, on another stream
    async with Worker.from_toolset(tools, connection=env.dsn(role), schema=env.schema, poll_interval=0.2,
                                   heartbeat_interval=1.0, shutdown_grace=0.5):
        call_id = await owner.call("slow", "", {}, 60_000)
        with anyio.fail_after(10):
            await started.wait()
        id_ = (await env.call_row(call_id))["id"]  # message ids are sequential: an attacker can guess them
        async with env.session(intruder) as conn:
            for _ in range(3):
                await conn.execute("SELECT pg_notify($1, $2)", worker_channel(env.schema, "slow"), f"c:{id_}")
                await conn.execute("SELECT pg_notify($1, $2)", caller_channel(env.schema, owner_role.role),
                                   f"r:{call_id}")
                await anyio.sleep(0.1)
        assert (await owner.result(call_id)).state == "reserved"
        release.set()
        for _ in range(200):
            if (result := await owner.result(call_id)).finished:
                break
            await anyio.sleep(0.05)
    assert result.state == "done" and result.result == {"finished": True} and not result.is_error


# ------------------------------------------------------------------------------------- logins and sessions


async def test_wrong_password_is_refused(env: Env) -> None:
    role, _ = await env.worker(["a"])
    for password in ("wrong", "", role.password + "x", role.password.upper()):
        forged = ProvisionedRole(role.role, password, role.kind, role.streams)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await env.connect(forged)
    for name in (f"{env.schema}_owner", f"{env.schema}_worker", f"{env.schema}_caller"):
        with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
            await env.connect(ProvisionedRole(name, role.password, "worker", []))


async def test_rotated_password_old_refused_new_works(env: Env) -> None:
    role, _ = await env.worker(["a"])
    rotated = await rotate(env.admin, role.role, schema=env.schema)
    assert rotated.password != role.password
    with pytest.raises(asyncpg.InvalidPasswordError):
        await env.connect(role)
    async with env.session(rotated) as conn:
        assert await conn.fetchval("SELECT session_user") == role.role
    given = await rotate(env.admin, role.role, "a chosen password", schema=env.schema)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await env.connect(rotated)
    async with env.session(given) as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {env.schema}.worker_dequeue('a', 'w', 1, 1000)") == 0


async def test_a_role_cannot_rotate_its_own_password_into_a_takeover(env: Env) -> None:
    """A role may change its own password (PostgreSQL allows that to every role, and nothing can forbid it):
    the attacker can lock the real worker out, but gains nothing, and the admin's rotate takes it back."""
    role, _ = await env.worker(["a"])
    async with env.session(role) as conn:
        await conn.execute("ALTER ROLE current_user PASSWORD 'attacker'")
        for statement in [
            "ALTER ROLE current_user SUPERUSER",
            "ALTER ROLE current_user CREATEROLE",
            "ALTER ROLE current_user BYPASSRLS",
            "ALTER ROLE current_user CONNECTION LIMIT 1000",
            "ALTER ROLE current_user VALID UNTIL 'infinity'",
            f"GRANT {env.schema}_owner TO current_user",
            f"GRANT {env.schema}_caller TO current_user",
            f'GRANT "{role.role}" TO {env.schema}_caller',
        ]:
            with pytest.raises(DENIED):
                await conn.execute(statement)
    rotated = await rotate(env.admin, role.role, schema=env.schema)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await env.connect(ProvisionedRole(role.role, "attacker", "worker", ["a"]))
    async with env.session(rotated) as conn:
        assert await conn.fetchval("SELECT session_user") == role.role


async def test_revoke_refuses_logins_ends_open_sessions_and_removes_everything(env: Env) -> None:
    role, worker = await env.worker(["a"])
    await worker.heartbeat(["a"], "w1", 60_000)
    await env.admin.execute(f'GRANT USAGE ON SCHEMA {env.schema} TO "{role.role}"')  # a direct grant too
    await env.admin.execute(
        f'GRANT EXECUTE ON FUNCTION {env.schema}.worker_publish(text, text, jsonb) TO "{role.role}"'
    )
    await env.admin.execute(f"ALTER ROLE \"{role.role}\" SET app.allowed_streams = 'a'")  # role-wide too
    conn = await env.connect(role)
    listener = await env.connect(role)
    await listener.add_listener(worker_channel(env.schema, "a"), lambda *_: None)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        ended = await revoke(env.admin, role.role, schema=env.schema)
        assert ended >= 3  # the raw session, the LISTEN session and the pool's connection
        assert await env.admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role.role) == 0
        for _ in range(500):  # the client sees the server hang up a moment later
            if conn.is_closed():
                break
            await anyio.sleep(0.01)
        assert conn.is_closed()
        with pytest.raises(asyncpg.InterfaceError):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
        listener.terminate()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="not permitted to log in"):
        await env.connect(role)
    admin = env.admin
    assert not await admin.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role.role)
    assert await admin.fetch(
        "SELECT * FROM pg_db_role_setting WHERE setrole = $1::regrole AND array_to_string(setconfig, ',') "
        "LIKE '%allowed_streams%'", role.role
    ) == []
    assert await admin.fetch("SELECT * FROM pg_auth_members WHERE member = $1::regrole", role.role) == []
    for fn, call in await functions_of(env, "."):
        assert not await admin.fetchval(
            "SELECT has_function_privilege($1, p.oid, 'EXECUTE') FROM pg_proc p "
            "WHERE p.pronamespace = $2::regnamespace AND p.proname = $3", role.role, env.schema, fn
        ), call
    assert not await admin.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", role.role, env.schema)
    assert await admin.fetchval(f'SELECT revoked_at IS NOT NULL FROM "{env.schema}".roles WHERE role_name = $1',
                                role.role)
    assert await admin.fetchval(f'SELECT count(*) FROM "{env.schema}".workers WHERE role_name = $1', role.role) == 0
    with pytest.raises(ConnectionFailed):
        await worker.dequeue("a", "w", 1, 1000)  # the pool cannot get back in either


async def test_a_worker_cannot_end_or_spy_on_other_sessions(env: Env) -> None:
    w = await world(env)
    async with env.session(w.ca) as victim, env.session(w.wa) as attacker:
        pid = victim.get_server_pid()
        await victim.fetchval("SELECT 'a query with a secret in it'")
        with pytest.raises(DENIED):
            await attacker.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(DENIED):
            await attacker.fetchval("SELECT pg_cancel_backend($1)", pid)
        seen = await attacker.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        assert seen == "<insufficient privilege>"
        assert await victim.fetchval("SELECT 1") == 1


# ------------------------------------------------------------------------------ the seed's manual provisioning


async def test_manual_provisioning_path(env: Env) -> None:
    """CREATE ROLE, GRANT USAGE and EXECUTE directly (no group), ALTER ROLE ... SET app.allowed_streams."""
    s, admin, db = env.schema, env.admin, env.server.database
    name = f"{s}_byhand"
    await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'hand-made-pw'")
    await admin.execute(f"GRANT USAGE ON SCHEMA {s} TO {name}")
    await admin.execute(
        f"GRANT EXECUTE ON FUNCTION {s}.worker_dequeue(text, text, integer, integer, text[], integer), "
        f"{s}.worker_respond(text, bigint, uuid, jsonb, boolean), {s}.worker_publish(text, text, jsonb) TO {name}"
    )
    await admin.execute(f"ALTER ROLE {name} SET app.allowed_streams = 'a'")
    role = ProvisionedRole(name, "hand-made-pw", "worker", ["a"])
    hand = WorkerAPI(await env.pool(role), s)
    _, caller = await env.caller(["a", "b"])
    call_id = await caller.call("a", "", {"n": 1}, 60_000)
    other = await caller.call("b", "", {"n": 2}, 60_000)

    [msg] = await hand.dequeue("a", "hand", 10, 60_000)
    assert await hand.respond("a", msg.id, msg.lease, {"ok": True})
    assert (await caller.result(call_id)).result == {"ok": True}
    before = await snapshot(env)
    await refused(hand.dequeue("b", "hand", 10, 60_000), PermissionDenied)
    await refused(hand.publish("b", "", {}), PermissionDenied)
    await refused(hand.extend("a", msg.id, msg.lease, 1000), PermissionDenied)  # not granted
    async with env.session(role) as conn:
        await conn.execute("SET app.allowed_streams = 'a,b'")
        with pytest.raises(DENIED):
            await conn.fetch(f"SELECT * FROM {s}.worker_dequeue('b', 'x', 1, 1000)")
        with pytest.raises(DENIED):
            await conn.fetch(f"SELECT * FROM {s}.messages")
    assert await snapshot(env) == before

    # a database-specific setting wins over the role-wide one: now b, and no longer a
    await admin.execute(f"ALTER ROLE {name} IN DATABASE {db} SET app.allowed_streams = 'b'")
    await refused(hand.dequeue("a", "hand", 10, 60_000), PermissionDenied)
    [got] = await hand.dequeue("b", "hand", 10, 60_000)
    assert (await env.call_row(other))["id"] == got.id
    # an empty database-specific setting also wins: nothing at all
    await admin.execute(f"ALTER ROLE {name} IN DATABASE {db} SET app.allowed_streams = ''")
    await refused(hand.publish("a", "", {}), PermissionDenied)
    await refused(hand.publish("b", "", {}), PermissionDenied)
    # a setting for another database counts for nothing
    await admin.execute(f"ALTER ROLE {name} IN DATABASE {db} RESET app.allowed_streams")
    await admin.execute(f"ALTER ROLE {name} IN DATABASE template1 SET app.allowed_streams = 'b'")
    await refused(hand.publish("b", "", {}), PermissionDenied)
    assert await hand.publish("a", "", {})
    await admin.execute(f"ALTER ROLE {name} IN DATABASE template1 RESET app.allowed_streams")


# ------------------------------------------------------------------------------------------------ migrations


async def test_a_worker_cannot_stall_migrations_with_an_advisory_lock(env: Env) -> None:
    """Any role may take any advisory lock, so migrate() must not wait on one (it locks the migrations table)."""
    role, _ = await env.worker(["a"])
    fresh = env.schema + "_m"
    async with env.session(role) as conn:
        for schema in (env.schema, fresh):  # the key migrate() used to wait on
            # (the embedded server refuses advisory locks to scoped roles outright; another server allows them)
            with contextlib.suppress(DENIED):
                await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"mcp-hotmesh:migrate:{schema}")
        with pytest.raises(DENIED):
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {env.schema}.migrations IN ACCESS SHARE MODE")
        admin = await asyncpg.connect(env.server.admin_dsn)
        try:
            with anyio.fail_after(20):
                assert await migrate(admin, env.schema) == []
                assert await migrate(admin, fresh) == [m.version for m in migrations()]
        finally:
            await drop_schema(admin, fresh)
            await admin.close()


async def _swallow(attempt: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):
        await attempt


async def test_a_worker_cannot_stall_a_pending_migration_with_a_plan_time_lock(env: Env) -> None:
    role, _ = await env.worker(["a"])
    s = env.schema
    await env.admin.execute(f'DELETE FROM "{s}".migrations WHERE version = 1')  # an upgrade is pending
    async with env.session(role) as conn:
        pid = conn.get_server_pid()
        try:
            await conn.execute(
                "CREATE FUNCTION pg_temp.stall() RETURNS int IMMUTABLE LANGUAGE plpgsql "
                "AS $$BEGIN PERFORM pg_sleep(60); RETURN 1; END$$"
            )
        except DENIED:  # the embedded database gives roles no temporary objects: the attack cannot start
            assert not os.environ.get("HOTMESH_TEST_DSN")
            return
        admin = await asyncpg.connect(env.server.admin_dsn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    _swallow, conn.execute(f"INSERT INTO {s}.migrations (version, name) VALUES (pg_temp.stall(), '')")
                )
                for _ in range(200):
                    if await env.admin.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND relation = $2::regclass AND granted",
                        pid, f"{s}.migrations",
                    ):
                        break
                    await anyio.sleep(0.01)
                try:
                    # clearly, and soon: after the lock timeout (shortened here from migrate's 3 s), not the 60 s
                    with anyio.fail_after(20), pytest.raises(DatabaseError) as failed:
                        await migrate(admin, s, lock_timeout="300ms")
                    assert role.role in str(failed.value) and "gave up after 300ms" in str(failed.value)
                finally:
                    await env.admin.execute("SELECT pg_terminate_backend($1, 5000)", pid)
        finally:
            admin.terminate()
