-- mcp-hotmesh SQL API v1, migration 004: helpers no longer used are dropped.
--
-- Runs as hotmesh_owner. The hot functions (worker_dequeue, worker_respond_and_dequeue, caller_results) plan
-- with enable_seqscan off through their own SET clause (functions.sql), which PostgreSQL restores on return and
-- on error, instead of the _plan_with_indexes() / _plan_restore() pair of 001, which had to be called in the
-- right order on every path; _authorize checks a stream name inline, without _valid_stream().

DROP FUNCTION IF EXISTS hotmesh._plan_with_indexes();
DROP FUNCTION IF EXISTS hotmesh._plan_restore(text);
DROP FUNCTION IF EXISTS hotmesh._valid_stream(text);
