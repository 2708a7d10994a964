"""Scoped roles: provision, rotate, revoke, list. Run with the admin's connection.

A role is a kind, worker or caller, by membership of the group role that holds EXECUTE on that kind's
functions (``<schema>_worker`` / ``<schema>_caller``); its allow-list is its stored ``app.allowed_streams``
for this database. Every identifier and literal reaches the server through ``format('%I', '%L')``, done by the
database itself; passwords are sent as SCRAM verifiers, so the plain text never reaches the server or its logs.

The seed's manual path works too, with no row here: ``CREATE ROLE r LOGIN PASSWORD '…'``,
``GRANT EXECUTE ON FUNCTION <schema>.worker_dequeue(…), … TO r`` (or ``GRANT <schema>_worker TO r``),
``GRANT USAGE ON SCHEMA <schema> TO r``, ``ALTER ROLE r SET app.allowed_streams = 'a,b'``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ._common import Kind
from ._config import check_schema, check_stream
from ._postgres import translated
from .errors import ConfigError, Conflict, DatabaseError, NotFound

log = logging.getLogger(__name__)

KINDS: tuple[Kind, ...] = ("worker", "caller")
SCRAM_ITERATIONS = 4096
CONNECTION_LIMIT = 32
"""Sessions one provisioned role may hold at once (``CONNECTION LIMIT``), so a role cannot take every slot of
the server. A worker process holds its pool (10 at most), one LISTEN connection and one for retention; a
gateway its pool and one LISTEN connection: 32 fits two or three such processes. Raise it per role
(``provision --connection-limit``) when more processes share one role."""
ALTER_LOCK_TIMEOUT = "1s"
"""How long revoke and rotate wait for a role's catalog row: a session of the role itself can hold it (an
``ALTER ROLE CURRENT_USER ...`` left uncommitted), so they wait this long, end that session, and try again."""


@dataclass(frozen=True)
class ProvisionedRole:
    """What ``provision --json`` prints: the login to hand to a worker or a gateway."""

    role: str
    password: str
    kind: Kind
    streams: list[str]

    def as_json(self) -> dict[str, object]:
        return {"role": self.role, "password": self.password, "kind": self.kind, "streams": self.streams}


@dataclass(frozen=True)
class RoleInfo:
    role: str
    kind: str
    streams: list[str]
    can_login: bool
    managed: bool  # provisioned by mcp-hotmesh (False: made by hand, found by its grants)
    created_at: datetime | None
    rotated_at: datetime | None
    revoked_at: datetime | None

    def as_json(self) -> dict[str, object]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "role": self.role,
            "kind": self.kind,
            "streams": self.streams,
            "can_login": self.can_login,
            "managed": self.managed,
            "created_at": iso(self.created_at),
            "rotated_at": iso(self.rotated_at),
            "revoked_at": iso(self.revoked_at),
        }


def scram_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 7677; ASCII passwords)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _password_literal(password: str) -> str:
    # Non-ASCII passwords need SASLprep; let the server hash those itself.
    return scram_verifier(password) if password.isascii() else password


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _role_name(schema: str, kind: Kind, streams: list[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", streams[0].lower()).strip("_") or "stream"
    prefix = f"{schema}_{kind[0]}_"
    suffix = "_" + secrets.token_hex(3)
    room = 63 - len(prefix) - len(suffix)
    return prefix + slug[: max(room, 0)].rstrip("_") + suffix


SETTING_CHARS = 8000
"""The longest allow-list stored in the role's ``app.allowed_streams`` (the seed's form, what a role made by hand
uses too). A longer one (571 names like ``svc.tool_0000`` fit) is stored in ``<schema>.stream_grants``, a row per
stream, and the setting is left empty: written by the admin only, read by the same checks (``_authorize``)."""
MAX_STREAMS = 100_000


def _check_streams(streams: list[str]) -> list[str]:
    if not streams:
        raise ConfigError("give at least one stream")
    unique = list(dict.fromkeys(check_stream(s) for s in streams))
    if len(unique) > MAX_STREAMS:
        raise ConfigError(f"too many streams for one role (at most {MAX_STREAMS:,})")
    return unique


async def _exec_format(conn: asyncpg.Connection, template: str, *args: str) -> None:
    """Run ``format(template, args…)``: the database quotes each identifier (%I) and literal (%L)."""
    statement = await conn.fetchval("SELECT format($1, VARIADIC $2::text[])", template, list(args))
    await conn.execute(statement)


def _check_connection_limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
        raise ConfigError("the connection limit must be a whole number from 1 to 10000")
    return limit


async def adopt(conn: asyncpg.Connection, role: str, schema: str) -> None:
    """Make ``<schema>_owner`` a member of ``role``, so the watchdog (``<kind>_watchdog()``, running as the
    owner) can see and end the role's sessions. The owner gains nothing by it: a scoped role can do less than
    the owner already does. From PostgreSQL 16 the grant says INHERIT itself (the owner is NOINHERIT); on 15
    membership is inherited only if the owner is INHERIT, which it then becomes."""
    owner = f"{schema}_owner"
    if await conn.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", owner, role):
        return
    if conn.get_server_version().major >= 16:
        await _exec_format(conn, "GRANT %I TO %I WITH INHERIT TRUE, SET FALSE", role, owner)
    else:
        await _exec_format(conn, "GRANT %I TO %I", role, owner)
        await _exec_format(conn, "ALTER ROLE %I INHERIT", owner)


async def adopt_all(conn: asyncpg.Connection, schema: str) -> None:
    """``adopt`` every provisioned role that is not revoked (roles made before the watchdog existed)."""
    with translated():
        for row in await conn.fetch(
            f'SELECT m.role_name FROM "{schema}".roles m JOIN pg_roles r ON r.rolname = m.role_name '
            "WHERE m.revoked_at IS NULL"
        ):
            await adopt(conn, row["role_name"], schema)


async def _check_may_store_allow_lists(conn: asyncpg.Connection) -> None:
    """From PostgreSQL 15 only a superuser, or a role granted SET on the parameter, may store another role's
    ``app.allowed_streams`` (a placeholder parameter): say so before trying, as PostgreSQL would not."""
    if not await conn.fetchval("SELECT has_parameter_privilege('app.allowed_streams', 'SET')"):
        user = await conn.fetchval("SELECT current_user")
        raise ConfigError(
            f"role {user} may not store a role's allow-list: a superuser must first run GRANT SET ON PARAMETER "
            f"app.allowed_streams TO {user} (PostgreSQL 15+; see the README, Managed PostgreSQL)"
        )


async def _scope(conn: asyncpg.Connection, role: str, kind: Kind, streams: list[str], schema: str) -> None:
    """Make ``role`` a member of its kind's group, and of that kind only; set its allow-list, record it.

    Inside a transaction. A role is one kind: re-scoping a worker as a caller (``ensure_role``) takes the worker
    group and any EXECUTE granted on worker functions by hand away, and fails if the role would still keep
    the other kind's functions through some other role.
    """
    await _check_may_store_allow_lists(conn)
    other = "caller" if kind == "worker" else "worker"
    if await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, f"{schema}_{other}"):
        await _exec_format(conn, "REVOKE %I FROM %I", f"{schema}_{other}", role)
    await _exec_format(conn, "GRANT %I TO %I", f"{schema}_{kind}", role)
    for function in await conn.fetch(
        "SELECT p.oid::regprocedure::text AS sig FROM pg_proc p "
        "WHERE p.pronamespace = $1::regnamespace AND starts_with(p.proname, $3) "
        "AND has_function_privilege($2, p.oid, 'EXECUTE')",
        schema, role, f"{other}_",
    ):
        await _exec_format(conn, "REVOKE EXECUTE ON FUNCTION %s FROM %I", function["sig"], role)
    if await conn.fetchval(
        "SELECT bool_or(has_function_privilege($2, p.oid, 'EXECUTE')) FROM pg_proc p "
        "WHERE p.pronamespace = $1::regnamespace AND starts_with(p.proname, $3)",
        schema, role, f"{other}_",
    ):
        raise ConfigError(f"role {role!r} can still run {other} functions through another role; it cannot be a {kind}")
    listed = ",".join(streams)
    granted = len(listed) > SETTING_CHARS
    await _exec_format(
        conn, "ALTER ROLE %I IN DATABASE %I SET app.allowed_streams = %L",
        role, await conn.fetchval("SELECT current_database()"), "" if granted else listed,
    )
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".stream_grants'):
        if granted:  # a schema from before stream_grants (004)
            raise ConfigError(f"an allow-list longer than {SETTING_CHARS} characters needs mcp-hotmesh migrate first")
        granted = False
    else:
        await conn.execute(f'DELETE FROM "{schema}".stream_grants WHERE role_name = $1', role)
    if granted:
        await conn.execute(f'INSERT INTO "{schema}".stream_grants (role_name, stream) SELECT $1, unnest($2::text[])',
                           role, streams)
    await conn.execute(
        f'INSERT INTO "{schema}".roles (role_name, kind, streams) VALUES ($1, $2, $3) '
        "ON CONFLICT (role_name) DO UPDATE SET kind = excluded.kind, streams = excluded.streams, "
        "rotated_at = now(), revoked_at = NULL",
        role, kind, streams,
    )
    await adopt(conn, role, schema)


async def provision_role(
    conn: asyncpg.Connection,
    streams: list[str],
    kind: Kind,
    *,
    schema: str = "hotmesh",
    password: str | None = None,
    role: str | None = None,
    connection_limit: int = CONNECTION_LIMIT,
) -> ProvisionedRole:
    """Create a login role of ``kind`` that may use ``streams`` and nothing else, with at most
    ``connection_limit`` sessions at once."""
    check_schema(schema)
    limit = _check_connection_limit(connection_limit)
    if kind not in KINDS:
        raise ConfigError("kind must be 'worker' or 'caller'")
    streams = _check_streams(streams)
    role = role or _role_name(schema, kind, streams)
    if len(role.encode()) > 63:
        raise ConfigError("role names are at most 63 bytes")
    password = password or new_password()
    with translated():
        async with conn.transaction():
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                raise Conflict(f"role {role!r} already exists")
            await _exec_format(
                conn,
                "CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT "
                "PASSWORD %L CONNECTION LIMIT %s",
                role,
                _password_literal(password),
                str(limit),
            )
            await _scope(conn, role, kind, streams, schema)
    return ProvisionedRole(role, password, kind, streams)


async def ensure_role(
    conn: asyncpg.Connection, role: str, streams: list[str], kind: Kind, *, schema: str = "hotmesh",
    connection_limit: int = CONNECTION_LIMIT,
) -> ProvisionedRole:
    """Create ``role``, or take it over again with a fresh password and exactly ``streams``.

    What ``serve`` uses for the roles it runs its gateway and attached worker as: the password is new on every
    start, so nothing has to be stored between runs.
    """
    check_schema(schema)
    if kind not in KINDS:
        raise ConfigError("kind must be 'worker' or 'caller'")
    streams = _check_streams(streams)
    with translated():
        existing = await conn.fetchrow(
            "SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls "
            "OR coalesce((SELECT pg_has_role(r.oid, o.oid, 'MEMBER') FROM pg_roles o WHERE o.rolname = $2), false) "
            "AS privileged FROM pg_roles r WHERE r.rolname = $1",
            role, f"{schema}_owner",
        )
    limit = _check_connection_limit(connection_limit)
    if existing is None:
        return await provision_role(conn, streams, kind, schema=schema, role=role, connection_limit=limit)
    # Taking over an existing role must never hand out a login that is more than a scoped role: a superuser,
    # an owner member or one of the schema's own roles would pass (or widen) every check.
    if existing["privileged"] or role in {f"{schema}_owner", f"{schema}_worker", f"{schema}_caller"}:
        raise ConfigError(f"role {role!r} is privileged or belongs to the schema; it cannot be a scoped {kind} role")
    password = new_password()
    with translated():
        async with conn.transaction():
            await _exec_format(conn, "ALTER ROLE %I LOGIN PASSWORD %L CONNECTION LIMIT %s", role,
                               _password_literal(password), str(limit))
            await _scope(conn, role, kind, streams, schema)
    return ProvisionedRole(role, password, kind, streams)


async def provision_worker_role(
    conn: asyncpg.Connection, stream_names: list[str], password: str | None = None, *, schema: str = "hotmesh"
) -> ProvisionedRole:
    """The seed's ``HotMesh.provisionWorkerRole()``: a worker role for ``stream_names``."""
    return await provision_role(conn, stream_names, "worker", schema=schema, password=password)


async def provision_caller_role(
    conn: asyncpg.Connection, stream_names: list[str], password: str | None = None, *, schema: str = "hotmesh"
) -> ProvisionedRole:
    """A caller role (what a gateway logs in as) for ``stream_names``."""
    return await provision_role(conn, stream_names, "caller", schema=schema, password=password)


async def _find(conn: asyncpg.Connection, schema: str, role: str) -> RoleInfo:
    for info in await list_roles(conn, schema=schema):
        if info.role == role:
            return info
    raise NotFound(f"no mcp-hotmesh role named {role!r}")


async def _end_sessions(conn: asyncpg.Connection, role: str, *, in_transaction_only: bool = False) -> int:
    """End ``role``'s sessions (only those inside a transaction: the ones that can hold a lock); returns how many.
    With a timeout, ``pg_terminate_backend`` waits until each has ended, so none runs another statement after."""
    ended: int = await conn.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE usename = $1 AND pid <> pg_backend_pid() AND (NOT $2 OR xact_start IS NOT NULL)",
        role, in_transaction_only,
    )
    return ended


async def _alter_role(
    conn: asyncpg.Connection, role: str, template: str, *args: str, lock_timeout: str = ALTER_LOCK_TIMEOUT
) -> int:
    """Run ``ALTER ROLE`` on ``role`` (``template`` formatted with the role and ``args``), committed, without
    waiting on the role itself: when its catalog row is locked by one of its own sessions (an uncommitted
    ``ALTER ROLE CURRENT_USER ...``), that session is ended (after ``lock_timeout``) and the change made again.
    Returns the sessions ended."""
    ended = 0
    for _ in range(5):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
                await _exec_format(conn, template, role, *args)
            return ended
        except asyncpg.LockNotAvailableError:
            ended += await _end_sessions(conn, role, in_transaction_only=True)
    raise DatabaseError(f"role {role!r} could not be changed: its catalog row stayed locked by another session")


async def rotate(
    conn: asyncpg.Connection, role: str, password: str | None = None, *, schema: str = "hotmesh",
    lock_timeout: str = ALTER_LOCK_TIMEOUT,
) -> ProvisionedRole:
    """Give ``role`` a new password; the old one stops working for new logins at once. Never waits on the role
    longer than ``lock_timeout``: a session of it that holds the role's row locked is ended (and logged)."""
    check_schema(schema)
    info = await _find(conn, schema, role)
    password = password or new_password()
    with translated():
        ended = await _alter_role(conn, role, "ALTER ROLE %I PASSWORD %L", _password_literal(password),
                                  lock_timeout=lock_timeout)
        await conn.execute(f'UPDATE "{schema}".roles SET rotated_at = now() WHERE role_name = $1', role)
    if ended:
        log.warning("rotate: ended %d session(s) of %s that held the role's row locked", ended, role)
    kind: Kind = "worker" if info.kind == "worker" else "caller"
    return ProvisionedRole(role, password, kind, info.streams)


async def revoke(
    conn: asyncpg.Connection, role: str, *, schema: str = "hotmesh", lock_timeout: str = ALTER_LOCK_TIMEOUT
) -> int:
    """Take ``role``'s login, allow-list and grants away and end its open sessions; returns how many ended.

    In bounded time whatever the role is doing: first no new logins (NOLOGIN, committed; a session of the role
    holding its row is ended after ``lock_timeout``), then every session is ended, which lets go of whatever they
    held, then the rest.
    The role itself stays (NOLOGIN), so what it did remains attributable.
    """
    check_schema(schema)
    await _find(conn, schema, role)
    with translated():
        ended = await _alter_role(conn, role, "ALTER ROLE %I NOLOGIN", lock_timeout=lock_timeout)
        ended += await _end_sessions(conn, role)
        async with conn.transaction():
            # Nothing of the role is left to hold a lock; the wait is bounded all the same.
            await conn.execute("SET LOCAL lock_timeout = '10s'")
            await _exec_format(conn, "ALTER ROLE %I RESET app.allowed_streams", role)
            await _exec_format(
                conn, "ALTER ROLE %I IN DATABASE %I RESET app.allowed_streams",
                role, await conn.fetchval("SELECT current_database()"),
            )
            for group in (f"{schema}_worker", f"{schema}_caller"):
                if await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, group):
                    await _exec_format(conn, "REVOKE %I FROM %I", group, role)
            # USAGE on the schema granted by hand (the seed's manual path): take it away as well.
            await _exec_format(conn, "REVOKE ALL ON SCHEMA %I FROM %I", schema, role)
            for function in await conn.fetch(
                "SELECT p.oid::regprocedure::text AS sig FROM pg_proc p "
                "WHERE p.pronamespace = $1::regnamespace AND has_function_privilege($2, p.oid, 'EXECUTE')",
                schema, role,
            ):
                # (regprocedure text is already quoted; the role goes through %I like every other name)
                await _exec_format(conn, "REVOKE EXECUTE ON FUNCTION %s FROM %I", function["sig"], role)
            await conn.execute(
                f'UPDATE "{schema}".roles SET revoked_at = now() WHERE role_name = $1', role
            )
            await conn.execute(f'DELETE FROM "{schema}".workers WHERE role_name = $1', role)
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".stream_grants'):
                await conn.execute(f'DELETE FROM "{schema}".stream_grants WHERE role_name = $1', role)
    return ended


@dataclass(frozen=True)
class RoleLimits:
    role: str
    connection_limit: int  # -1: none
    max_queued: int  # messages waiting per stream (the schema's default unless set for the role)
    max_queued_bytes: int

    def as_json(self) -> dict[str, object]:
        return {"role": self.role, "connection_limit": self.connection_limit, "max_queued": self.max_queued,
                "max_queued_bytes": self.max_queued_bytes}


async def set_limits(
    conn: asyncpg.Connection, role: str, *, schema: str = "hotmesh", connection_limit: int | None = None,
    max_queued: int | None = None, max_queued_bytes: int | None = None,
) -> RoleLimits:
    """Change what is given (None: unchanged; -1 for a quota: back to the schema's default) and return the limits
    in force for ``role``."""
    check_schema(schema)
    await _find(conn, schema, role)
    for name, value in (("--max-queued", max_queued), ("--max-queued-bytes", max_queued_bytes)):
        if value is not None and value < -1:
            raise ConfigError(f"{name} must be 0 or more (or -1 for the schema's default)")
    with translated():
        if connection_limit is not None:
            await _alter_role(conn, role, "ALTER ROLE %I CONNECTION LIMIT %s",
                              str(_check_connection_limit(connection_limit)))
        if max_queued is not None or max_queued_bytes is not None:
            await conn.execute(
                f'INSERT INTO "{schema}".role_limits AS l (role_name, max_queued_messages, max_queued_bytes) '
                "VALUES ($1, nullif($2::bigint, -1), nullif($3::bigint, -1)) ON CONFLICT (role_name) DO UPDATE SET "
                "max_queued_messages = CASE WHEN $2::bigint IS NULL THEN l.max_queued_messages "
                "ELSE excluded.max_queued_messages END, "
                "max_queued_bytes = CASE WHEN $3::bigint IS NULL THEN l.max_queued_bytes "
                "ELSE excluded.max_queued_bytes END",
                role, max_queued, max_queued_bytes,
            )
        row = await conn.fetchrow(
            f"""SELECT r.rolconnlimit,
                   coalesce(l.max_queued_messages, (SELECT value FROM "{schema}".settings
                                                    WHERE key = 'max_queued_messages')) AS max_queued,
                   coalesce(l.max_queued_bytes, (SELECT value FROM "{schema}".settings
                                                 WHERE key = 'max_queued_bytes')) AS max_queued_bytes
            FROM pg_roles r LEFT JOIN "{schema}".role_limits l ON l.role_name = r.rolname
            WHERE r.rolname = $1""",
            role,
        )
    assert row is not None
    return RoleLimits(role, row["rolconnlimit"], row["max_queued"], row["max_queued_bytes"])


async def list_roles(conn: asyncpg.Connection, *, schema: str = "hotmesh") -> list[RoleInfo]:
    """Every role provisioned here, and every role made by hand that can use this schema's functions."""
    check_schema(schema)
    dequeue = f"'\"{schema}\".worker_dequeue(text,text,integer,integer,text[],integer)'"
    call = f"'\"{schema}\".caller_call(text,text,jsonb,integer,text)'"
    with translated():
        rows = await conn.fetch(
            f"""
            WITH candidates AS (
                SELECT role_name AS rolname FROM "{schema}".roles
                UNION
                SELECT r.rolname FROM pg_roles r
                WHERE NOT r.rolsuper AND r.rolcanlogin
                  AND NOT pg_has_role(r.oid, '{schema}_owner', 'MEMBER')
                  AND (has_function_privilege(r.oid, {dequeue}, 'EXECUTE')
                       OR has_function_privilege(r.oid, {call}, 'EXECUTE'))
            )
            SELECT c.rolname, m.kind, m.streams, m.created_at, m.rotated_at, m.revoked_at,
                   coalesce(r.rolcanlogin, false) AS can_login, m.role_name IS NOT NULL AS managed,
                   has_function_privilege(r.oid, {dequeue}, 'EXECUTE') AS is_worker,
                   (SELECT substr(cfg, length('app.allowed_streams=') + 1)
                    FROM pg_db_role_setting s, unnest(s.setconfig) cfg
                    WHERE s.setrole = r.oid AND cfg LIKE 'app.allowed\\_streams=%%'
                      AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
                    ORDER BY s.setdatabase DESC LIMIT 1) AS setting
            FROM candidates c
            JOIN pg_roles r ON r.rolname = c.rolname
            LEFT JOIN "{schema}".roles m ON m.role_name = c.rolname
            ORDER BY c.rolname
            """.replace("%%", "%")
        )
    result = []
    for row in rows:
        setting = row["setting"]
        streams = [s.strip() for s in setting.split(",") if s.strip()] if setting else list(row["streams"] or [])
        if row["revoked_at"] is not None:
            streams = []  # revoked: it may use nothing now (what it had is in the revoked row's history, not here)
        kind = row["kind"] or ("worker" if row["is_worker"] else "caller")
        result.append(
            RoleInfo(
                role=row["rolname"],
                kind=kind,
                streams=streams,
                can_login=row["can_login"],
                managed=row["managed"],
                created_at=row["created_at"],
                rotated_at=row["rotated_at"],
                revoked_at=row["revoked_at"],
            )
        )
    return result
