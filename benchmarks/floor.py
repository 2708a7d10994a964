"""The floor: one call's round trip as bare SQL with asyncpg, no API, no roles' checks, no NOTIFY.

Per round trip, on one connection (autocommit, every commit durable): insert a request; claim one with
``FOR UPDATE SKIP LOCKED``; mark it done and insert its response (one statement); read the response.
"""

from __future__ import annotations

import json
import secrets

import asyncpg

from .common import closed_loop
from .db import Database

SCHEMA = "bench_floor"

SETUP = f"""
CREATE TABLE {SCHEMA}.requests (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream text NOT NULL,
    args jsonb NOT NULL,
    state text NOT NULL DEFAULT 'ready',
    created_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);
CREATE INDEX ON {SCHEMA}.requests (stream, id) WHERE state = 'ready';
CREATE TABLE {SCHEMA}.responses (id bigint PRIMARY KEY, result jsonb NOT NULL);
"""

INSERT = f"INSERT INTO {SCHEMA}.requests (stream, args) VALUES ($1, $2) RETURNING id"
CLAIM = f"""
WITH c AS (SELECT id FROM {SCHEMA}.requests WHERE stream = $1 AND state = 'ready' ORDER BY id LIMIT 1
           FOR UPDATE SKIP LOCKED)
UPDATE {SCHEMA}.requests r SET state = 'reserved' FROM c WHERE r.id = c.id RETURNING r.id, r.args
"""
ANSWER = f"""
WITH d AS (UPDATE {SCHEMA}.requests SET state = 'done' WHERE id = $1)
INSERT INTO {SCHEMA}.responses (id, result) VALUES ($1, $2)
"""
READ = f"SELECT result FROM {SCHEMA}.responses WHERE id = $1"


async def setup(db: Database) -> str:
    """The floor's tables and a login role that owns them; returns its DSN (TCP, password)."""
    password = secrets.token_urlsafe(18)
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.execute("DROP ROLE IF EXISTS bench_floor")
        await admin.execute(f"CREATE ROLE bench_floor LOGIN PASSWORD '{password}'")
        await admin.execute(f"CREATE SCHEMA {SCHEMA} AUTHORIZATION bench_floor")
    finally:
        await admin.close()
    dsn = db.role_dsn("bench_floor", password)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SETUP)
    finally:
        await conn.close()
    return dsn


async def run(dsn: str, concurrency: int, *, seconds: float, warmup: float) -> tuple[int, float, list[float]]:
    """``concurrency`` lanes, one connection each, on the tables ``setup`` made (its DSN); ``closed_loop``'s
    outcome."""
    conns = [await asyncpg.connect(dsn) for _ in range(concurrency)]
    args = json.dumps({})
    try:
        for c in conns:
            await c.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")

        async def op(lane: int) -> None:
            conn = conns[lane]
            await conn.fetchval(INSERT, "bench", args)
            row = await conn.fetchrow(CLAIM, "bench")
            while row is None:  # rare: the row it saw was taken meanwhile (the others are locked); look again
                row = await conn.fetchrow(CLAIM, "bench")
            await conn.execute(ANSWER, row[0], "{}")
            await conn.fetchval(READ, row[0])

        return await closed_loop(op, concurrency, seconds=seconds, warmup=warmup)
    finally:
        for c in conns:
            await c.close()
