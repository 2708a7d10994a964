-- mcp-hotmesh SQL API v1, migration 006: questions a running handler asks the calling client, through the queue.
--
-- Runs as hotmesh_owner, like 001 to 003. A handler may ask the agent's client something mid-call (an elicitation:
-- a form the user fills in; or a sampling request: a completion from the client's model). The worker, holding the
-- call's lease, posts the question on its call (worker_request); the gateway that waits for the call hears of it
-- on the caller's channel (NOTIFY q:<call id>), reads it (caller_request), asks its client and posts the answer
-- (caller_answer), which wakes the worker (NOTIFY e:<message id> on the stream's channel). The functions are in
-- functions.sql ("questions to the caller"); this migration adds what they keep:
--   * requests: at most one question per call, the latest; seq counts them, so an answer meant for an earlier
--     question is never taken for a later one; lease is the attempt that asked (a question left pending by an
--     attempt that ended is neither served nor in the way of the next attempt's);
--   * the setting that bounds a question and its answer.

INSERT INTO hotmesh.settings (key, value) VALUES
    ('max_request_bytes', 65536)   -- one question or answer, as JSON text
ON CONFLICT (key) DO NOTHING;

CREATE TABLE IF NOT EXISTS hotmesh.requests (
    call_id      uuid PRIMARY KEY REFERENCES hotmesh.messages (call_id) ON DELETE CASCADE,
    seq          integer NOT NULL DEFAULT 1,
    lease        uuid NOT NULL,               -- the lease it was asked under: an earlier attempt's is stale
    kind         text NOT NULL CHECK (kind IN ('elicit', 'sample')),
    request      jsonb NOT NULL,
    response     jsonb,                       -- NULL while the question is pending
    asked_at     timestamptz NOT NULL DEFAULT now(),
    answered_at  timestamptz
);
REVOKE ALL ON hotmesh.requests FROM PUBLIC;
