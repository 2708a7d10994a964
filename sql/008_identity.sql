-- mcp-hotmesh SQL API v1, migration 008: who calls through a gateway (bearer tokens) and what they called (audit).
--
-- Runs as hotmesh_owner, like 001-003. A gateway serving several people logs in as one caller role per identity;
-- the database already scopes each call to its caller role. This migration adds what ties a person to a role:
--   * tokens: bearer tokens the admin issues (`mcp-hotmesh tokens add NAME --role ROLE`), stored as the sha256 of
--     a 256-bit random token (the token itself is printed once and kept nowhere); revoked ones keep their row;
--   * audit: one row per call a gateway served (identity, caller role, tool, call id, outcome, duration, sizes),
--     written through caller_audit() as the identity's own caller role, kept audit_retention_ms.
-- Nobody but the owner reads or writes them directly: the functions are in functions.sql (identity section).

CREATE TABLE IF NOT EXISTS hotmesh.tokens (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$'),
    role_name   name NOT NULL,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
REVOKE ALL ON hotmesh.tokens FROM PUBLIC;

CREATE TABLE IF NOT EXISTS hotmesh.audit (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL,          -- when the call started
    identity      text NOT NULL,                 -- a token's name, or a JWT's mapped identity
    role_name     name NOT NULL,                 -- the caller role that made the call (the writer's session_user)
    tool          text NOT NULL,
    call_id       uuid,                          -- NULL: refused before anything was queued
    outcome       text NOT NULL,                 -- ok, error, invalid_arguments, offline, timeout, quota, ...
    duration_ms   double precision NOT NULL,
    args_bytes    integer NOT NULL,
    result_bytes  integer NOT NULL,
    arguments     jsonb                          -- only when the gateway's configuration says so
);
REVOKE ALL ON hotmesh.audit FROM PUBLIC;
CREATE INDEX IF NOT EXISTS audit_at ON hotmesh.audit (at);
CREATE INDEX IF NOT EXISTS audit_identity ON hotmesh.audit (identity, at);

INSERT INTO hotmesh.settings (key, value) VALUES
    ('audit_retention_ms', 2592000000),   -- audit rows are kept 30 days
    ('max_audit_batch',    1000)          -- most rows one caller_audit call writes
ON CONFLICT (key) DO NOTHING;
