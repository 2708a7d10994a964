"""Catalog checks: what the migrations leave behind is locked down, read from the PostgreSQL catalogs.

These read the facts (ACLs, owners, function settings) instead of trying attacks; test_security.py tries them.
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from tests.helpers import Env

pytestmark = pytest.mark.anyio

# The functions of SQL API v1 (DESIGN.md); the migration may add more of each kind under the same rules.
WORKER_API = {"worker_dequeue", "worker_respond", "worker_fail", "worker_extend", "worker_progress",
              "worker_publish", "worker_register_tool"}
CALLER_API = {"caller_tools", "caller_call", "caller_result", "caller_cancel"}


async def functions(env: Env) -> list[asyncpg.Record]:
    rows = await env.admin.fetch(
        """SELECT p.oid, p.proname, p.oid::regprocedure::text AS sig, p.prosecdef, p.proconfig, p.prosrc,
                  p.proowner::regrole::text AS owner, p.proacl::text AS acl, p.prokind::text AS kind
           FROM pg_proc p WHERE p.pronamespace = $1::regnamespace ORDER BY p.proname""",
        env.schema,
    )
    assert len(rows) >= len(WORKER_API) + len(CALLER_API) + 5
    return rows


async def test_no_function_is_executable_by_public(env: Env) -> None:
    for fn in await functions(env):
        assert not await env.admin.fetchval("SELECT has_function_privilege('public', $1::oid, 'EXECUTE')", fn["oid"])
        acl = await env.admin.fetch("SELECT grantee FROM aclexplode((SELECT proacl FROM pg_proc WHERE oid = $1))",
                                    fn["oid"])
        assert acl, f"{fn['sig']} has the default ACL, which grants EXECUTE to PUBLIC"
        assert 0 not in [r["grantee"] for r in acl], fn["sig"]  # grantee 0 is PUBLIC


HOT = {"worker_dequeue", "worker_respond_and_dequeue", "worker_pending", "worker_park", "caller_results"}


async def test_functions_run_as_the_owner_with_a_pinned_search_path(env: Env) -> None:
    owner = f"{env.schema}_owner"
    definers = []
    for fn in await functions(env):
        assert fn["owner"] == owner, fn["sig"]
        assert fn["kind"] == "f", fn["sig"]
        api = fn["proname"].startswith(("worker_", "caller_"))
        # API functions wait for a lock 2 s at most: a row a stranger holds costs a bounded wait (functions.sql)
        config = ["search_path=pg_catalog, pg_temp"] + (["lock_timeout=2s"] if api else [])
        if fn["proname"] in HOT:  # planned with indexes only, whatever the statistics say (functions.sql)
            config.append("enable_seqscan=off")
        assert fn["proconfig"] == config, fn["sig"]
        assert fn["prosecdef"] == api, f"{fn['sig']}: only the API functions are SECURITY DEFINER"
        assert api or fn["proname"].startswith("_"), f"{fn['sig']}: neither API nor internal helper"
        if fn["prosecdef"]:
            definers.append(fn["proname"])
            body = fn["prosrc"]
            # no dynamic SQL in code that runs with the owner's rights
            assert not re.search(r"\bEXECUTE\b", body, re.IGNORECASE), fn["sig"]
            # every API function checks who is calling: the allow-list, the call's owner or the worker's role
            assert re.search(r"_authorize(_all)?\(|_allowed_streams\(\)|_own_streams\(\)|session_user", body), fn["sig"]
    assert set(definers) >= WORKER_API | CALLER_API


async def test_the_owner_is_a_powerless_nologin_role_that_owns_only_the_schema(env: Env) -> None:
    owner = f"{env.schema}_owner"
    row = await env.admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", owner)
    assert row is not None
    assert not row["rolsuper"] and not row["rolcanlogin"]
    assert not (row["rolcreaterole"] or row["rolcreatedb"] or row["rolreplication"] or row["rolbypassrls"])
    # it is a member only of provisioned scoped roles (so the watchdog can end their sessions), none privileged
    await env.provision(["alpha"], "worker")
    memberships = await env.admin.fetch(
        "SELECT r.* FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid WHERE m.member = $1::regrole", owner)
    assert [r["rolname"] for r in memberships] and all(r["rolname"].startswith(f"{env.schema}_w_") for r in memberships)
    assert not any(r["rolsuper"] or r["rolcreaterole"] or r["rolcreatedb"] or r["rolbypassrls"] for r in memberships)
    # its members are admins only (the superuser needs none; a CREATEROLE admin is made one to migrate)
    for member in await env.admin.fetch(
        "SELECT r.rolname, r.rolsuper FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
        "WHERE m.roleid = $1::regrole", owner
    ):
        assert not member["rolname"].startswith(env.schema + "_"), member
    assert await env.admin.fetchval("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1",
                                    env.schema) == owner
    owned = await env.admin.fetch(
        "SELECT relname, relkind::text, relowner::regrole::text AS owner FROM pg_class "
        "WHERE relnamespace = $1::regnamespace", env.schema
    )
    assert {r["relname"] for r in owned if r["relkind"] == "r"} == {
        "messages", "tools", "workers", "roles", "settings", "migrations", "definitions", "role_limits",
        "tool_pending", "tool_names", "requests", "tokens", "audit", "stream_grants",
    }
    assert {r["owner"] for r in owned} == {owner}
    assert await env.admin.fetchval(
        "SELECT count(*) FROM pg_type WHERE typnamespace = $1::regnamespace AND typowner <> $2::regrole",
        env.schema, owner,
    ) == 0
    # outside its schema the owner owns nothing (but the TOAST tables of its own tables, in pg_toast)
    for catalog, column, namespace in [("pg_class", "relowner", "relnamespace"),
                                       ("pg_proc", "proowner", "pronamespace"),
                                       ("pg_type", "typowner", "typnamespace")]:
        assert await env.admin.fetchval(
            f"SELECT count(*) FROM {catalog} WHERE {column} = $1::regrole "
            f"AND {namespace} NOT IN ($2::regnamespace, 'pg_toast'::regnamespace)",
            owner, env.schema,
        ) == 0, catalog
    assert await env.admin.fetchval(
        """SELECT count(*) FROM pg_class t
           WHERE t.relowner = $1::regrole AND t.relnamespace = 'pg_toast'::regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = $2::regnamespace
                             AND t.oid IN (c.reltoastrelid,
                                           (SELECT indexrelid FROM pg_index WHERE indrelid = c.reltoastrelid)))""",
        owner, env.schema,
    ) == 0
    assert await env.admin.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE nspowner = $1::regrole", owner
    ) == 1


async def test_no_table_or_sequence_privilege_for_anyone_but_the_owner(env: Env) -> None:
    await env.provision(["a"], "worker")
    await env.provision(["a"], "caller")
    owner = f"{env.schema}_owner"
    grantees = ["public", f"{env.schema}_worker", f"{env.schema}_caller",
                *[r["role_name"] for r in await env.admin.fetch(f'SELECT role_name FROM "{env.schema}".roles')]]
    assert len(grantees) == 5
    relations = await env.admin.fetch(
        "SELECT oid, relname, relkind::text FROM pg_class WHERE relnamespace = $1::regnamespace "
        "AND relkind IN ('r', 'p', 'S', 'v', 'm')", env.schema
    )
    assert any(r["relkind"] == "S" for r in relations)  # the identity sequence of messages
    for rel in relations:
        acl = await env.admin.fetch(
            """SELECT CASE WHEN grantee = 0 THEN 'public' ELSE grantee::regrole::text END AS grantee
               FROM aclexplode((SELECT relacl FROM pg_class WHERE oid = $1))""", rel["oid"]
        )
        assert {r["grantee"] for r in acl} <= {owner}, rel["relname"]
        privileges = ("USAGE", "SELECT", "UPDATE") if rel["relkind"] == "S" else (
            "SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        for grantee in grantees:
            for privilege in privileges:
                function = "has_sequence_privilege" if rel["relkind"] == "S" else "has_table_privilege"
                assert not await env.admin.fetchval(
                    f"SELECT {function}($1, $2::oid, $3)", grantee, rel["oid"], privilege
                ), (grantee, rel["relname"], privilege)
            if rel["relkind"] != "S":
                assert not await env.admin.fetchval(
                    "SELECT has_any_column_privilege($1, $2::oid, 'SELECT, INSERT, UPDATE, REFERENCES')",
                    grantee, rel["oid"],
                ), (grantee, rel["relname"])
    assert await env.admin.fetchval(
        "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "WHERE c.relnamespace = $1::regnamespace AND a.attacl IS NOT NULL", env.schema
    ) == 0


async def test_each_group_executes_exactly_its_kinds_functions(env: Env) -> None:
    worker = await env.provision(["a"], "worker")
    caller = await env.provision(["a"], "caller")
    rows = await functions(env)
    names = {fn["proname"] for fn in rows}
    assert names >= WORKER_API | CALLER_API
    for fn in rows:
        for role, prefix in [(f"{env.schema}_worker", "worker_"), (worker.role, "worker_"),
                             (f"{env.schema}_caller", "caller_"), (caller.role, "caller_")]:
            allowed = await env.admin.fetchval("SELECT has_function_privilege($1, $2::oid, 'EXECUTE')",
                                               role, fn["oid"])
            assert allowed == fn["proname"].startswith(prefix), (role, fn["sig"])
    # and the ACLs name no one else: the owner and the two groups
    grantees = {
        r["grantee"]
        for fn in rows
        for r in await env.admin.fetch(
            "SELECT grantee::regrole::text AS grantee FROM aclexplode((SELECT proacl FROM pg_proc WHERE oid = $1))",
            fn["oid"],
        )
    }
    assert grantees == {f"{env.schema}_owner", f"{env.schema}_worker", f"{env.schema}_caller"}
    assert all("*" not in (fn["acl"] or "") for fn in rows)  # no grant options for anyone


async def test_schema_usage_only_for_the_groups_and_no_create(env: Env) -> None:
    s = env.schema
    assert not await env.admin.fetchval("SELECT has_schema_privilege('public', $1, 'USAGE')", s)
    for role in ("public", f"{s}_worker", f"{s}_caller"):
        assert not await env.admin.fetchval("SELECT has_schema_privilege($1, $2, 'CREATE')", role, s)
    for role in (f"{s}_worker", f"{s}_caller"):
        assert await env.admin.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", role, s)
    grantees = await env.admin.fetch(
        "SELECT grantee::regrole::text AS grantee, privilege_type FROM "
        "aclexplode((SELECT nspacl FROM pg_namespace WHERE nspname = $1))", s
    )
    assert {(r["grantee"], r["privilege_type"]) for r in grantees} == {
        (f"{s}_owner", "USAGE"), (f"{s}_owner", "CREATE"), (f"{s}_worker", "USAGE"), (f"{s}_caller", "USAGE")
    }


async def test_the_groups_are_plain_nologin_roles(env: Env) -> None:
    worker = await env.provision(["a"], "worker")
    caller = await env.provision(["a"], "caller")
    s = env.schema
    for group in (f"{s}_worker", f"{s}_caller"):
        row = await env.admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", group)
        assert row is not None
        assert not (row["rolsuper"] or row["rolcanlogin"] or row["rolcreaterole"] or row["rolcreatedb"]
                    or row["rolreplication"] or row["rolbypassrls"])
        assert await env.admin.fetch("SELECT 1 FROM pg_auth_members WHERE member = $1::regrole", group) == []
    members = {
        (r["group"], r["member"])
        for r in await env.admin.fetch(
            "SELECT roleid::regrole::text AS group, member::regrole::text AS member FROM pg_auth_members "
            "WHERE roleid IN ($1::regrole, $2::regrole)", f"{s}_worker", f"{s}_caller"
        )
    }
    assert members == {(f"{s}_worker", worker.role), (f"{s}_caller", caller.role)}
    for role in (worker.role, caller.role):
        row = await env.admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", role)
        assert row is not None and row["rolcanlogin"]
        assert not (row["rolsuper"] or row["rolcreaterole"] or row["rolcreatedb"] or row["rolreplication"]
                    or row["rolbypassrls"])


async def test_nobody_but_a_superuser_may_store_an_allow_list(env: Env) -> None:
    worker = await env.provision(["a"], "worker")
    caller = await env.provision(["a"], "caller")
    s = env.schema
    for role in ("public", f"{s}_worker", f"{s}_caller", f"{s}_owner", worker.role, caller.role):
        assert not await env.admin.fetchval("SELECT has_parameter_privilege($1, 'app.allowed_streams', 'SET')", role)
    # (a row may exist once a superuser has granted SET to a non-superuser admin; PUBLIC must not be in it)
    assert await env.admin.fetch(
        "SELECT a.grantee FROM pg_parameter_acl p, aclexplode(p.paracl) a "
        "WHERE p.parname = 'app.allowed_streams' AND a.grantee = 0"
    ) == []


async def test_functions_the_owner_creates_later_are_not_executable_by_public(env: Env) -> None:
    """ALTER DEFAULT PRIVILEGES: a function a later migration adds starts with no EXECUTE for PUBLIC."""
    s = env.schema
    async with env.admin.transaction():
        await env.admin.execute(f"SET LOCAL ROLE {s}_owner")
        await env.admin.execute(f"CREATE FUNCTION {s}.later() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    assert not await env.admin.fetchval(f"SELECT has_function_privilege('public', '{s}.later()', 'EXECUTE')")
    assert not await env.admin.fetchval(
        f"SELECT has_function_privilege('{s}_worker', '{s}.later()', 'EXECUTE')"
    )
    await env.admin.execute(f"DROP FUNCTION {s}.later()")


async def test_migrate_is_recorded_and_idempotent(env: Env) -> None:
    from mcp_hotmesh._migrate import migrate, migrations

    versions = [r["version"] for r in await env.admin.fetch(f'SELECT version FROM "{env.schema}".migrations')]
    assert versions == [m.version for m in migrations()]
    before = await env.admin.fetch(
        "SELECT p.oid::regprocedure::text, p.proacl::text FROM pg_proc p "
        "WHERE p.pronamespace = $1::regnamespace ORDER BY 1", env.schema
    )
    assert await migrate(env.admin, env.schema) == []
    after = await env.admin.fetch(
        "SELECT p.oid::regprocedure::text, p.proacl::text FROM pg_proc p "
        "WHERE p.pronamespace = $1::regnamespace ORDER BY 1", env.schema
    )
    assert before == after
