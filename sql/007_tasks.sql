-- mcp-hotmesh SQL API v1, migration 007: long-running, durable calls.
--
-- Runs as hotmesh_owner, like the others. The functions that use what this adds are in functions.sql
-- ("long-running calls"):
--   * two more states a call can end in: 'cancelled' (its caller cancelled it) and 'expired' (it ran past its
--     deadline). Neither is a failure: they are not in the dead-letter queue (state 'dead'), which holds the
--     calls that failed (attempts or reclaims used up). Both are purged after retention_ms, as done calls are;
--   * started_at: when the call's current claim began, so a caller can be told "running for 45 s";
--   * an index for the purge of the new end states.

ALTER TABLE hotmesh.messages DROP CONSTRAINT IF EXISTS messages_state_check;
ALTER TABLE hotmesh.messages ADD CONSTRAINT messages_state_check
    CHECK (state IN ('ready', 'reserved', 'done', 'dead', 'cancelled', 'expired')) NOT VALID;
ALTER TABLE hotmesh.messages VALIDATE CONSTRAINT messages_state_check;

ALTER TABLE hotmesh.messages ADD COLUMN IF NOT EXISTS started_at timestamptz;

CREATE INDEX IF NOT EXISTS messages_ended
    ON hotmesh.messages (stream, finished_at) WHERE state IN ('cancelled', 'expired');
