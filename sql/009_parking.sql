-- mcp-hotmesh SQL API v1, migration 009: worker processes that stop listening while others serve their streams.
--
-- Runs as hotmesh_owner, like 001-008. PostgreSQL (18 and earlier) signals every session of the database that
-- LISTENs at each commit that sent a NOTIFY, whatever the channel, and each signalled session runs a
-- transaction to read the notification queue: every listening worker process taxed every call of every stream.
-- What functions.sql's "parking" section reads:
--   * workers.parked: the process stopped listening (worker_park); new calls do not wake it, it polls instead;
--   * workers.capacity: the handlers the process runs at once (its concurrency), as it said in worker_park;
--   * the setting park_backlog_ms: a call that waited this long without a worker makes the parked processes of
--     its stream listen again.

ALTER TABLE hotmesh.workers ADD COLUMN IF NOT EXISTS parked boolean NOT NULL DEFAULT false;
ALTER TABLE hotmesh.workers ADD COLUMN IF NOT EXISTS capacity integer;

INSERT INTO hotmesh.settings (key, value) VALUES
    ('park_backlog_ms', 1000)  -- a call waiting this long wakes the parked processes of its stream
ON CONFLICT (key) DO NOTHING;
