-- mcp-hotmesh SQL API v1, migration 004: scaling out on one PostgreSQL.
--
-- Runs as hotmesh_owner, like 001 to 003. What the functions of functions.sql's "scaling out" section read:
--   * workers.workflows: the workflow names a live consumer serves on its stream (NULL: any, as the heartbeats
--     of earlier versions say), so that a new call wakes one consumer that can run it instead of all of them;
--   * the setting wake_batch: consecutive calls of a stream wake the same consumer this many at a time;
--   * stream_grants: allow-lists of any length, written by the admin (`provision`), one row per stream. A role's
--     streams are those of its stored app.allowed_streams and those granted here; no scoped role can write
--     either (no table privilege; the setting only a superuser or the admin may store).

ALTER TABLE hotmesh.workers ADD COLUMN IF NOT EXISTS workflows text[];

CREATE TABLE IF NOT EXISTS hotmesh.stream_grants (
    role_name   name NOT NULL,
    stream      text NOT NULL,
    PRIMARY KEY (role_name, stream)
);
REVOKE ALL ON hotmesh.stream_grants FROM PUBLIC;

INSERT INTO hotmesh.settings (key, value) VALUES
    ('wake_batch', 4)  -- consecutive calls of a stream that wake the same consumer, which claims them together
ON CONFLICT (key) DO NOTHING;
