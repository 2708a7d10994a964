-- mcp-hotmesh SQL API v1, migration 003: what a scoped role cannot do to others' availability, in tables.
--
-- Runs as hotmesh_owner, like 001 and 002. A worker or caller role is an adversary for availability too:
-- everything it can write is hostile input to whoever reads it, and everything it can lock or keep open is a
-- hostile lock. The functions that enforce it are in functions.sql (bounded tool registrations, depth of
-- arguments and results, housekeeping that skips what a stranger holds, lock_timeout on every scoped function,
-- the watchdog, queue quotas, _ops_roles); this migration adds what they read:
--   * the settings that bound registrations, arguments, consumers, queues and open transactions;
--   * role_limits: per-role quotas set by the admin (`mcp-hotmesh limits`);
--   * an index for the quota checks, and one that refuses tool names differing only by case or - and _.

INSERT INTO hotmesh.settings (key, value) VALUES
    ('max_schema_depth',        32),         -- nesting of a tool's registration (objects and arrays)
    ('max_schema_nodes',        10000),      -- values in one tool's registration, all levels
    ('max_description_chars',   10000),      -- a tool's description
    ('max_tools_per_stream',    100),        -- tools one stream may register (one per workflow name)
    ('max_consumers_per_stream', 1000),      -- live consumers one role may announce per stream (heartbeats)
    ('max_json_depth',          128),        -- nesting of arguments and results (the MCP SDK writes ~250 at most)
    ('max_queued_messages',     100000),     -- ready messages per role and stream (role_limits overrides)
    ('max_queued_bytes',        1073741824), -- their stored size, likewise
    ('watchdog_idle_ms',        5000),       -- a scoped session idle inside a transaction this long is ended
    ('watchdog_transaction_ms', 30000)       -- a scoped session whose transaction is open this long is ended
ON CONFLICT (key) DO NOTHING;

-- Per-role quotas set by the admin (`mcp-hotmesh limits`); NULL keeps the setting's default.
CREATE TABLE IF NOT EXISTS hotmesh.role_limits (
    role_name            name PRIMARY KEY,
    max_queued_messages  bigint CHECK (max_queued_messages >= 0),
    max_queued_bytes     bigint CHECK (max_queued_bytes >= 0)
);
REVOKE ALL ON hotmesh.role_limits FROM PUBLIC;

-- A quota check counts the role's own ready messages on a stream: this index keeps that to the rows counted.
CREATE INDEX IF NOT EXISTS messages_queued ON hotmesh.messages (stream, owner) WHERE state = 'ready';

-- Tool names are owned: one that differs from another stream's only by case or by - and _ is refused (an agent,
-- or a person approving a call, would not tell them apart). Made only where no two existing names collide; the
-- registration refuses a collision either way.
DO $names$
BEGIN
    CREATE UNIQUE INDEX IF NOT EXISTS tools_folded_name
        ON hotmesh.tools ((lower(replace(name, '-', '_'))));
EXCEPTION WHEN unique_violation THEN
    RAISE NOTICE 'tool names that differ only by case or - and _ exist; new ones are refused at registration';
END
$names$;
