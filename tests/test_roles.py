"""Role lifecycle: provision, rotate, revoke, list_roles, ensure_role (mcp_hotmesh._roles), as the admin runs them."""

from __future__ import annotations

import asyncpg
import pytest

from mcp_hotmesh._roles import (
    ProvisionedRole,
    _role_name,
    ensure_role,
    list_roles,
    provision_caller_role,
    provision_role,
    provision_worker_role,
    revoke,
    rotate,
)
from mcp_hotmesh._streams import CallerAPI, WorkerAPI
from mcp_hotmesh.errors import ConfigError, Conflict, NotFound, PermissionDenied
from tests.helpers import Env

pytestmark = pytest.mark.anyio


async def can_login(env: Env, role: ProvisionedRole) -> bool:
    try:
        conn = await env.connect(role)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return False
    await conn.close()
    return True


async def groups_of(env: Env, role: str) -> set[str]:
    rows = await env.admin.fetch(
        "SELECT roleid::regrole::text AS g FROM pg_auth_members WHERE member = $1::regrole", role
    )
    return {r["g"] for r in rows}


async def stored_setting(env: Env, role: str) -> list[tuple[int, list[str]]]:
    rows = await env.admin.fetch(
        "SELECT setdatabase, setconfig FROM pg_db_role_setting WHERE setrole = $1::regrole ORDER BY 1", role
    )
    return [(r["setdatabase"], list(r["setconfig"])) for r in rows]


# ---------------------------------------------------------------------------------------------- provision


def test_role_names_fit_in_63_bytes() -> None:
    for schema in ("h", "hotmesh", "s" * 40):
        for stream in ("a", "Orders.Process:v2/eu-west", "x" * 200, "..."):
            for kind in ("worker", "caller"):
                name = _role_name(schema, kind, [stream])
                assert len(name.encode()) <= 63, name
                assert name.startswith(f"{schema}_{kind[0]}_")
                assert name == name.lower() and name.isascii()


async def test_provision_creates_a_login_of_one_kind_with_its_streams(env: Env) -> None:
    s = env.schema
    worker = await env.provision(["orders", "Orders.EU", "orders"], "worker")
    caller = await env.provision(["orders"], "caller")
    assert worker.streams == ["orders", "Orders.EU"]  # duplicates dropped, order kept
    assert worker.kind == "worker" and caller.kind == "caller"
    assert await groups_of(env, worker.role) == {f"{s}_worker"}
    assert await groups_of(env, caller.role) == {f"{s}_caller"}
    db_oid = await env.admin.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
    assert await stored_setting(env, worker.role) == [(db_oid, ["app.allowed_streams=orders,Orders.EU"])]
    row = await env.admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", worker.role)
    assert row is not None and row["rolcanlogin"] and row["rolinherit"]
    assert not (row["rolsuper"] or row["rolcreaterole"] or row["rolcreatedb"] or row["rolreplication"]
                or row["rolbypassrls"])
    # the password reached the server as a SCRAM verifier, never as text
    assert (await env.admin.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", worker.role)).startswith(
        "SCRAM-SHA-256$4096:"
    )
    record = await env.admin.fetchrow(f'SELECT * FROM "{s}".roles WHERE role_name = $1', worker.role)
    assert record is not None
    assert (record["kind"], record["streams"], record["rotated_at"], record["revoked_at"]) == (
        "worker", ["orders", "Orders.EU"], None, None)
    # and it works: worker on its streams, caller on its stream
    w = WorkerAPI(await env.pool(worker), s)
    c = CallerAPI(await env.pool(caller), s)
    call_id = await c.call("orders", "", {}, 10_000)
    [msg] = await w.dequeue("orders", "w", 1, 10_000)
    assert await w.respond("orders", msg.id, msg.lease, {"ok": 1})
    assert (await c.result(call_id)).result == {"ok": 1}
    assert await w.publish("Orders.EU", "", {})


async def test_provisioned_names_are_unique_and_long_streams_fit(env: Env) -> None:
    one = await env.provision(["same"], "worker")
    two = await env.provision(["same"], "worker")
    assert one.role != two.role and one.password != two.password
    long = await env.provision(["x" * 200], "worker")
    assert len(long.role.encode()) <= 63
    assert await can_login(env, long)
    w = WorkerAPI(await env.pool(long), env.schema)
    assert await w.publish("x" * 200, "", {})


async def test_provision_refusals(env: Env) -> None:
    s, admin = env.schema, env.admin
    before = await admin.fetchval("SELECT count(*) FROM pg_roles")
    with pytest.raises(ConfigError):
        await provision_role(admin, [], "worker", schema=s)
    with pytest.raises(ConfigError):
        await provision_role(admin, ["a"], "admin", schema=s)  # type: ignore[arg-type]  # no such kind: refused
    with pytest.raises(ConfigError):
        await provision_role(admin, ["a"], "worker", schema="Bad-Schema")
    with pytest.raises(ConfigError):
        await provision_role(admin, [f"s{i}" for i in range(100_001)], "worker", schema=s)  # > MAX_STREAMS
    with pytest.raises(ConfigError):
        await provision_role(admin, ["a"], "worker", schema=s, role=s + "_" + "r" * 63)  # > 63 bytes
    with pytest.raises(ConfigError):
        await provision_role(admin, ["a"], "worker", schema=s, role=s + "_" + "é" * 26)  # 65 bytes in 39 characters
    for taken in ("postgres", f"{s}_owner", f"{s}_worker"):
        with pytest.raises(Conflict, match="already exists"):
            await provision_role(admin, ["a"], "worker", schema=s, role=taken)
    assert await admin.fetchval("SELECT count(*) FROM pg_roles") == before
    assert await admin.fetchval(f'SELECT count(*) FROM "{s}".roles') == 0


async def test_given_passwords_with_quotes_and_non_ascii_work(env: Env) -> None:
    for password in ("it's a \"quoted\" \\ password; DROP ROLE postgres; --", "pässwörd-ünïcode"):
        role = await env.provision(["a"], "caller", password=password)
        assert role.password == password
        assert await can_login(env, role)
        assert not await can_login(env, ProvisionedRole(role.role, password + "x", "caller", ["a"]))
        stored = await env.admin.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role.role)
        assert stored.startswith("SCRAM-SHA-256$") and password not in stored


async def test_seed_named_wrappers(env: Env) -> None:
    worker = await provision_worker_role(env.admin, ["a"], "pw-1", schema=env.schema)
    caller = await provision_caller_role(env.admin, ["a"], schema=env.schema)
    assert (worker.kind, worker.password, caller.kind) == ("worker", "pw-1", "caller")
    assert await groups_of(env, worker.role) == {f"{env.schema}_worker"}
    assert await groups_of(env, caller.role) == {f"{env.schema}_caller"}


# ------------------------------------------------------------------------------------------------- rotate


async def test_rotate(env: Env) -> None:
    role = await env.provision(["a", "b"], "worker")
    rotated = await rotate(env.admin, role.role, schema=env.schema)
    assert (rotated.role, rotated.kind, rotated.streams) == (role.role, "worker", ["a", "b"])
    assert rotated.password != role.password
    assert not await can_login(env, role)
    assert await can_login(env, rotated)
    assert await env.admin.fetchval(
        f'SELECT rotated_at IS NOT NULL FROM "{env.schema}".roles WHERE role_name = $1', role.role
    )
    chosen = await rotate(env.admin, role.role, "chosen-pw", schema=env.schema)
    assert chosen.password == "chosen-pw" and await can_login(env, chosen) and not await can_login(env, rotated)
    # the allow-list is untouched
    w = WorkerAPI(await env.pool(chosen), env.schema)
    assert await w.publish("b", "", {})


async def test_rotate_and_revoke_only_touch_roles_of_this_schema(env: Env) -> None:
    for role in ("postgres", f"{env.schema}_owner", f"{env.schema}_worker", "no_such_role"):
        with pytest.raises(NotFound):
            await rotate(env.admin, role, schema=env.schema)
        with pytest.raises(NotFound):
            await revoke(env.admin, role, schema=env.schema)
    assert await env.admin.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'postgres'")


# ------------------------------------------------------------------------------------------------- revoke


async def test_revoke(env: Env) -> None:
    s = env.schema
    role, worker = await env.worker(["a"])
    await worker.heartbeat(["a"], "w1", 60_000)
    assert await revoke(env.admin, role.role, schema=s) == 1  # the pool's one connection
    assert not await can_login(env, role)
    assert await stored_setting(env, role.role) == []
    assert await groups_of(env, role.role) == set()
    assert await env.admin.fetchval(f'SELECT count(*) FROM "{s}".workers') == 0
    [info] = [r for r in await list_roles(env.admin, schema=s) if r.role == role.role]
    assert info.managed and not info.can_login and info.revoked_at is not None
    assert await revoke(env.admin, role.role, schema=s) == 0  # again: nothing left to end
    # the role stays, so what it did remains attributable
    assert await env.admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role.role) == 1


# --------------------------------------------------------------------------------------------- list_roles


async def test_list_roles_managed_and_by_hand(env: Env) -> None:
    s, admin, db = env.schema, env.admin, env.server.database
    worker = await env.provision(["a", "b"], "worker")
    caller = await env.provision(["c"], "caller")
    # by hand, the seed's way: direct EXECUTE and a role-wide setting
    await admin.execute(f"CREATE ROLE {s}_hand_w LOGIN PASSWORD 'x'")
    await admin.execute(f"GRANT USAGE ON SCHEMA {s} TO {s}_hand_w")
    await admin.execute(
        f"GRANT EXECUTE ON FUNCTION {s}.worker_dequeue(text, text, integer, integer, text[], integer) TO {s}_hand_w"
    )
    await admin.execute(f"ALTER ROLE {s}_hand_w SET app.allowed_streams = 'x, y'")
    # by hand, through the group, with a database-specific setting that wins over a role-wide one
    await admin.execute(f"CREATE ROLE {s}_hand_c LOGIN PASSWORD 'x' IN ROLE {s}_caller")
    await admin.execute(f"ALTER ROLE {s}_hand_c SET app.allowed_streams = 'old'")
    await admin.execute(f"ALTER ROLE {s}_hand_c IN DATABASE {db} SET app.allowed_streams = 'new'")
    # not listed: a login with no grants, a superuser
    await admin.execute(f"CREATE ROLE {s}_stranger LOGIN PASSWORD 'x'")
    await admin.execute(f"CREATE ROLE {s}_su LOGIN SUPERUSER PASSWORD 'x'")

    roles = {r.role: r for r in await list_roles(admin, schema=s)}
    assert set(roles) == {worker.role, caller.role, f"{s}_hand_w", f"{s}_hand_c"}
    assert (roles[worker.role].kind, roles[worker.role].streams, roles[worker.role].managed) == (
        "worker", ["a", "b"], True)
    assert (roles[caller.role].kind, roles[caller.role].streams, roles[caller.role].managed) == (
        "caller", ["c"], True)
    assert roles[worker.role].created_at is not None and roles[worker.role].can_login
    hand_w, hand_c = roles[f"{s}_hand_w"], roles[f"{s}_hand_c"]
    assert (hand_w.kind, hand_w.streams, hand_w.managed, hand_w.created_at) == ("worker", ["x", "y"], False, None)
    assert (hand_c.kind, hand_c.streams, hand_c.managed) == ("caller", ["new"], False)
    assert hand_w.as_json()["managed"] is False and hand_w.as_json()["created_at"] is None
    # a by-hand role can be rotated and revoked like a managed one
    await rotate(admin, f"{s}_hand_w", "new-pw", schema=s)
    assert await can_login(env, ProvisionedRole(f"{s}_hand_w", "new-pw", "worker", []))
    await revoke(admin, f"{s}_hand_w", schema=s)
    assert await stored_setting(env, f"{s}_hand_w") == []
    assert not await admin.fetchval(
        f"SELECT has_function_privilege('{s}_hand_w', "
        f"'{s}.worker_dequeue(text, text, integer, integer, text[], integer)', 'EXECUTE')"
    )
    assert not await admin.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", f"{s}_hand_w", s)


# -------------------------------------------------------------------------------------------- ensure_role


async def test_ensure_role_creates_then_takes_over_with_a_new_password_and_streams(env: Env) -> None:
    s = env.schema
    name = f"{s}_gateway"
    first = await ensure_role(env.admin, name, ["a"], "caller", schema=s)
    assert first.role == name and await can_login(env, first)
    second = await ensure_role(env.admin, name, ["b", "c"], "caller", schema=s)
    assert second.password != first.password and second.streams == ["b", "c"]
    assert not await can_login(env, first) and await can_login(env, second)
    caller = CallerAPI(await env.pool(second), s)
    with pytest.raises(PermissionDenied):
        await caller.call("a", "", {}, 1000)
    assert await caller.call("c", "", {}, 1000)
    assert await env.admin.fetchval(f'SELECT rotated_at IS NOT NULL FROM "{s}".roles WHERE role_name = $1', name)
    # a revoked role comes back with ensure_role (serve restarting)
    await revoke(env.admin, name, schema=s)
    third = await ensure_role(env.admin, name, ["a"], "caller", schema=s)
    assert await can_login(env, third)
    assert await env.admin.fetchval(f'SELECT revoked_at FROM "{s}".roles WHERE role_name = $1', name) is None


async def test_ensure_role_keeps_a_role_to_one_kind(env: Env) -> None:
    s = env.schema
    name = f"{s}_switch"
    await ensure_role(env.admin, name, ["a"], "worker", schema=s)
    await env.admin.execute(f'GRANT EXECUTE ON FUNCTION {s}.worker_publish(text, text, jsonb) TO "{name}"')
    caller = await ensure_role(env.admin, name, ["a"], "caller", schema=s)
    assert await groups_of(env, name) == {f"{s}_caller"}
    pool = await env.pool(caller)
    with pytest.raises(PermissionDenied):
        await WorkerAPI(pool, s).publish("a", "", {})
    with pytest.raises(PermissionDenied):
        await WorkerAPI(pool, s).dequeue("a", "w", 1, 1000)
    assert await CallerAPI(pool, s).call("a", "", {}, 1000)
    [info] = [r for r in await list_roles(env.admin, schema=s) if r.role == name]
    assert info.kind == "caller"


async def test_ensure_role_refuses_a_role_that_keeps_the_other_kind_through_another_group(env: Env) -> None:
    s = env.schema
    name = f"{s}_sneaky"
    await ensure_role(env.admin, name, ["a"], "worker", schema=s)
    await env.admin.execute(f"CREATE ROLE {s}_more_workers NOLOGIN IN ROLE {s}_worker")
    await env.admin.execute(f'GRANT {s}_more_workers TO "{name}"')
    before = await stored_setting(env, name), await groups_of(env, name)
    with pytest.raises(ConfigError, match="can still run worker functions"):
        await ensure_role(env.admin, name, ["b"], "caller", schema=s)
    assert (await stored_setting(env, name), await groups_of(env, name)) == before  # rolled back


async def test_ensure_role_refuses_privileged_roles(env: Env) -> None:
    s, admin = env.schema, env.admin
    await admin.execute(f"CREATE ROLE {s}_su LOGIN SUPERUSER PASSWORD 'keep-me'")
    await admin.execute(f"CREATE ROLE {s}_cr LOGIN CREATEROLE PASSWORD 'keep-me'")
    await admin.execute(f"CREATE ROLE {s}_ownerish LOGIN PASSWORD 'keep-me' IN ROLE {s}_owner")
    for name in ("postgres", f"{s}_su", f"{s}_cr", f"{s}_ownerish", f"{s}_owner", f"{s}_worker", f"{s}_caller"):
        before = await admin.fetchrow(
            "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = $1", name
        ), await stored_setting(env, name), await groups_of(env, name)
        with pytest.raises(ConfigError):
            await ensure_role(admin, name, ["a"], "caller", schema=s)
        after = await admin.fetchrow(
            "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = $1", name
        ), await stored_setting(env, name), await groups_of(env, name)
        assert after == before, name
    assert await admin.fetchval(f'SELECT count(*) FROM "{s}".roles') == 0
