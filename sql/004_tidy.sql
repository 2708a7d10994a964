-- mcp-hotmesh SQL API v1, migration 004: tidier definitions, same behaviour.
--
-- Runs as hotmesh_owner. Nothing a caller of the API sees changes:
--   * the hot functions (worker_dequeue, worker_respond_and_dequeue, caller_results) plan with enable_seqscan
--     off through their own SET clause, which PostgreSQL restores on return and on error, instead of the
--     _plan_with_indexes() / _plan_restore() pair, which had to be called in the right order on every path.
--     Why they plan so: 001, before _plan_with_indexes (a generic plan cached while the table was small stays a
--     sequential scan as it grows);
--   * worker_purge and caller_purge share the one definition of "the streams this role may purge";
--   * dead helpers are dropped.
-- CREATE OR REPLACE drops a function's SET clauses, so each function below sets lock_timeout again (003).

-- The streams of session_user's stored allow-list; NULL for the admin (every stream).
CREATE OR REPLACE FUNCTION hotmesh._own_streams() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN hotmesh._is_admin() THEN NULL ELSE hotmesh._allowed_streams() END $$;

CREATE OR REPLACE FUNCTION hotmesh.worker_purge()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$ BEGIN RETURN hotmesh._purge(hotmesh._own_streams()); END $$;

CREATE OR REPLACE FUNCTION hotmesh.caller_purge()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$ BEGIN RETURN hotmesh._purge(hotmesh._own_streams()); END $$;

CREATE OR REPLACE FUNCTION hotmesh.worker_dequeue(
    stream text, consumer text, batch integer, lease_ms integer,
    workflows text[] DEFAULT NULL, reclaim_count integer DEFAULT 3)
RETURNS TABLE (id bigint, lease uuid, workflow_name text, args jsonb, attempt integer, reclaims integer,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    PERFORM hotmesh._authorize(worker_dequeue.stream);
    SET LOCAL synchronous_commit = off;  -- a claim alone may be lost in a crash: see 001
    RETURN QUERY SELECT * FROM hotmesh._claim(worker_dequeue.stream, worker_dequeue.consumer, worker_dequeue.batch,
                                              worker_dequeue.lease_ms, worker_dequeue.workflows,
                                              worker_dequeue.reclaim_count);
END
$$;

-- As in 003, planned with enable_seqscan off by the function's own setting.
CREATE OR REPLACE FUNCTION hotmesh.worker_respond_and_dequeue(
    stream text, consumer text, ids bigint[], leases uuid[], results jsonb[], is_errors boolean[],
    batch integer, lease_ms integer, workflows text[] DEFAULT NULL, reclaim_count integer DEFAULT 3)
RETURNS TABLE (kind text, id bigint, lease uuid, workflow_name text, args jsonb, attempt integer, reclaims integer,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_count integer := coalesce(cardinality(worker_respond_and_dequeue.ids), 0);
    v_result jsonb;
BEGIN
    PERFORM hotmesh._authorize(worker_respond_and_dequeue.stream);
    IF v_count > hotmesh._setting('max_batch')
       OR coalesce(cardinality(worker_respond_and_dequeue.leases), 0) <> v_count
       OR coalesce(cardinality(worker_respond_and_dequeue.results), 0) <> v_count
       OR coalesce(cardinality(worker_respond_and_dequeue.is_errors), 0) <> v_count THEN
        RAISE EXCEPTION 'ids, leases, results and is_errors must be arrays of one length, at most max_batch'
            USING ERRCODE = 'HM002';
    END IF;
    IF v_count = 0 THEN
        SET LOCAL synchronous_commit = off;  -- a claim alone: see worker_dequeue
    END IF;
    FOREACH v_result IN ARRAY coalesce(worker_respond_and_dequeue.results, '{}') LOOP
        PERFORM hotmesh._check_size(v_result, 'result');
    END LOOP;
    IF v_count > 0 THEN
        RETURN QUERY
        WITH answers AS (
            SELECT a.id, a.lease, a.result, coalesce(a.is_error, false) AS is_error
            FROM unnest(worker_respond_and_dequeue.ids, worker_respond_and_dequeue.leases,
                        worker_respond_and_dequeue.results, worker_respond_and_dequeue.is_errors)
                 AS a(id, lease, result, is_error)
        ), done AS (
            UPDATE hotmesh.messages m SET
                state = 'done', result = a.result, is_error = a.is_error,
                error = NULL, lease = NULL, lease_expires_at = NULL, finished_at = now()
            FROM answers a
            WHERE m.id = a.id AND m.stream = worker_respond_and_dequeue.stream
              AND m.state = 'reserved' AND m.lease = a.lease
            RETURNING m.id, m.owner, m.call_id
        ), told AS (  -- one row, so the join below runs it
            SELECT count(pg_catalog.pg_notify(hotmesh._caller_channel(d.owner), 'r:' || d.call_id::text)) AS n
            FROM done d WHERE d.owner IS NOT NULL AND d.call_id IS NOT NULL
        )
        SELECT CASE WHEN d.id IS NULL THEN 'lost' ELSE 'answered' END, a.id, NULL::uuid, NULL::text, NULL::jsonb,
               NULL::integer, NULL::integer, NULL::timestamptz
        FROM (SELECT DISTINCT answers.id FROM answers) a LEFT JOIN done d ON d.id = a.id CROSS JOIN told;
    END IF;
    IF coalesce(worker_respond_and_dequeue.batch, 0) > 0 THEN
        RETURN QUERY
        SELECT 'claimed', c.id, c.lease, c.workflow_name, c.args, c.attempt, c.reclaims, c.deadline
        FROM hotmesh._claim(worker_respond_and_dequeue.stream, worker_respond_and_dequeue.consumer,
                            worker_respond_and_dequeue.batch, worker_respond_and_dequeue.lease_ms,
                            worker_respond_and_dequeue.workflows, worker_respond_and_dequeue.reclaim_count) c;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION hotmesh.caller_results(call_ids uuid[])
RETURNS TABLE (call_id uuid, state text, result jsonb, is_error boolean, error text, attempt integer,
               progress double precision, progress_total double precision, progress_message text,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_admin boolean := hotmesh._is_admin();
BEGIN
    IF coalesce(cardinality(caller_results.call_ids), 0) > hotmesh._setting('max_batch') THEN
        RAISE EXCEPTION 'at most max_batch call ids' USING ERRCODE = 'HM002';
    END IF;
    RETURN QUERY
    SELECT m.call_id, m.state, m.result, m.is_error, m.error, m.attempt, m.progress, m.progress_total,
           m.progress_message, m.deadline
    FROM hotmesh.messages m
    WHERE m.call_id = ANY (caller_results.call_ids) AND (m.owner = session_user OR v_admin);
END
$$;

DROP FUNCTION IF EXISTS hotmesh._plan_with_indexes();
DROP FUNCTION IF EXISTS hotmesh._plan_restore(text);
DROP FUNCTION IF EXISTS hotmesh._valid_stream(text);

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA hotmesh FROM PUBLIC;
