-- mcp-hotmesh SQL operations: status, the dead-letter queue, retention, queue statistics for metrics.
--
-- Runs as hotmesh_owner, like 001. Two kinds of function here:
--   * admin-only helpers (`_ops_*`, `_dlq_*`, `_purge`): not SECURITY DEFINER, executable by nobody but the
--     owner and its members (the default privileges revoke EXECUTE from PUBLIC), so only the admin runs them;
--     the status and dlq commands call them over the admin's connection;
--   * API functions a scoped role may call (worker_purge, caller_purge, caller_stats): SECURITY DEFINER,
--     search_path pinned, everything schema-qualified, scoped to the allow-list of session_user, EXECUTE
--     granted only to their kind, and bounded in the work one call does.
--
-- Retention: done calls are deleted `retention_ms` after they finished, once their deadline has passed too (a
-- caller may still read an answer until then). Dead calls stay for the dlq command unless
-- `dead_retention_ms` is set above 0. Any running gateway or worker purges its own streams now and then,
-- `purge_batch` rows per call at most. The lock that keeps two purges from doing the same work is the row
-- lock on the settings row `purge_lock`: a row lock needs UPDATE on the table, which no scoped role has, so no
-- stranger can hold it (an advisory lock, which any role can take, would let a stranger stop every purge).

INSERT INTO hotmesh.settings (key, value) VALUES
    ('retention_ms',       3600000),   -- done calls are kept this long after they finished (and their deadline)
    ('dead_retention_ms',  0),         -- dead calls: 0 keeps them until the dlq command purges them
    ('purge_batch',        5000),      -- most rows one purge call deletes
    ('purge_lock',         0)          -- its row lock serialises purges; the value is the last purge (epoch s)
ON CONFLICT (key) DO NOTHING;

-- ------------------------------------------------------------------------------------------- retention

-- Delete at most purge_batch finished calls past retention on p_streams (NULL: every stream). Returns the
-- number deleted, or -1 when another purge holds the lock (it is doing the same work right now).
CREATE OR REPLACE FUNCTION hotmesh._purge(p_streams text[]) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_done_before timestamptz := now() - make_interval(secs => hotmesh._setting('retention_ms') / 1000.0);
    v_dead_ms bigint := coalesce(hotmesh._setting('dead_retention_ms'), 0);
    v_dead_before timestamptz := now() - make_interval(secs => greatest(v_dead_ms, 0) / 1000.0);
    v_count integer;
BEGIN
    PERFORM 1 FROM hotmesh.settings s WHERE s.key = 'purge_lock' FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN -1;
    END IF;
    WITH doomed AS MATERIALIZED (
        SELECT m.id FROM hotmesh.messages m
        WHERE m.state IN ('done', 'dead')
          AND (p_streams IS NULL OR m.stream = ANY (p_streams))
          AND ((m.state = 'done' AND m.finished_at < v_done_before AND coalesce(m.deadline < now(), true))
               OR (m.state = 'dead' AND v_dead_ms > 0 AND m.finished_at < v_dead_before))
        LIMIT greatest(coalesce(hotmesh._setting('purge_batch'), 5000), 1)
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM hotmesh.messages m USING doomed WHERE m.id = doomed.id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    UPDATE hotmesh.settings s SET value = extract(epoch FROM now())::bigint WHERE s.key = 'purge_lock';
    RETURN v_count;
END
$$;

-- A worker purges the finished calls of its own streams: what the admin's retention settings say, no more.
CREATE OR REPLACE FUNCTION hotmesh.worker_purge()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- the streams of session_user's stored allow-list (the admin: every stream)
    RETURN hotmesh._purge(CASE WHEN hotmesh._is_admin() THEN NULL ELSE hotmesh._allowed_streams() END);
END
$$;

-- A gateway (caller role) purges the finished calls of its own streams, the same way.
CREATE OR REPLACE FUNCTION hotmesh.caller_purge()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- the streams of session_user's stored allow-list (the admin: every stream)
    RETURN hotmesh._purge(CASE WHEN hotmesh._is_admin() THEN NULL ELSE hotmesh._allowed_streams() END);
END
$$;

-- ------------------------------------------------------------------------------------ queue statistics

-- Per stream of the caller's allow-list (every stream for the admin): what waits, runs, retries and died.
-- For a gateway's /metrics. Counts only, never a message's data.
CREATE OR REPLACE FUNCTION hotmesh.caller_stats()
RETURNS TABLE (stream text, ready bigint, in_flight bigint, retrying bigint, dead bigint,
               oldest_ready_seconds double precision)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_admin boolean := hotmesh._is_admin();
    v_allowed text[] := hotmesh._allowed_streams();
BEGIN
    RETURN QUERY
    SELECT m.stream,
           count(*) FILTER (WHERE m.state = 'ready' AND m.visible_at <= now()),
           count(*) FILTER (WHERE m.state = 'reserved'),
           count(*) FILTER (WHERE m.state = 'ready' AND m.visible_at > now()),
           count(*) FILTER (WHERE m.state = 'dead'),
           extract(epoch FROM now() - min(m.visible_at) FILTER (WHERE m.state = 'ready' AND m.visible_at <= now()))::double precision
    FROM hotmesh.messages m
    WHERE m.state IN ('ready', 'reserved', 'dead') AND (v_admin OR m.stream = ANY (v_allowed))
    GROUP BY m.stream
    ORDER BY m.stream;
END
$$;

-- ------------------------------------------------------------------------------------- admin: status

-- One row per stream that has messages, tools or live workers.
--   ready     waiting to be claimed now          retrying  waiting out a retry's backoff
--   in_flight claimed, lease held                stalled   claimed, lease expired: its worker is gone
--   dead      in the dead-letter queue           done      answered, kept until retention purges it
--   oldest_ready_seconds  how long the oldest ready message has waited to be claimed
--   finished_last_minute  calls that ended (done or dead) in the last 60 s
CREATE OR REPLACE FUNCTION hotmesh._ops_status()
RETURNS TABLE (stream text, tools text[], ready bigint, in_flight bigint, stalled bigint, retrying bigint,
               dead bigint, done bigint, oldest_ready_seconds double precision, live_workers bigint,
               finished_last_minute bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    WITH q AS (
        SELECT m.stream,
               count(*) FILTER (WHERE m.state = 'ready' AND m.visible_at <= now()) AS ready,
               count(*) FILTER (WHERE m.state = 'reserved' AND m.lease_expires_at > now()) AS in_flight,
               count(*) FILTER (WHERE m.state = 'reserved' AND m.lease_expires_at <= now()) AS stalled,
               count(*) FILTER (WHERE m.state = 'ready' AND m.visible_at > now()) AS retrying,
               count(*) FILTER (WHERE m.state = 'dead') AS dead,
               count(*) FILTER (WHERE m.state = 'done') AS done,
               extract(epoch FROM now() - min(m.visible_at)
                   FILTER (WHERE m.state = 'ready' AND m.visible_at <= now()))::double precision AS oldest,
               count(*) FILTER (WHERE m.state IN ('done', 'dead') AND m.finished_at > now() - interval '60 seconds')
                   AS recent
        FROM hotmesh.messages m
        GROUP BY m.stream
    ),
    w AS (
        SELECT w.stream, count(*) AS live FROM hotmesh.workers w WHERE w.expires_at > now() GROUP BY w.stream
    ),
    t AS (
        SELECT t.stream, array_agg(t.name ORDER BY t.name) AS names FROM hotmesh.tools t GROUP BY t.stream
    ),
    s AS (
        SELECT q.stream FROM q UNION SELECT w.stream FROM w UNION SELECT t.stream FROM t
    )
    SELECT s.stream, coalesce(t.names, '{}'), coalesce(q.ready, 0), coalesce(q.in_flight, 0),
           coalesce(q.stalled, 0), coalesce(q.retrying, 0), coalesce(q.dead, 0), coalesce(q.done, 0), q.oldest,
           coalesce(w.live, 0), coalesce(q.recent, 0)
    FROM s
    LEFT JOIN q ON q.stream = s.stream
    LEFT JOIN w ON w.stream = s.stream
    LEFT JOIN t ON t.stream = s.stream
    ORDER BY s.stream
$$;

-- ---------------------------------------------------------------------------------------- admin: dlq

-- The dead messages that match every given filter (NULL: no filter): ids, stream, died at least p_older_than
-- ago, died at most p_newer_than ago. Oldest first.
CREATE OR REPLACE FUNCTION hotmesh._dlq_ids(
    p_ids bigint[], p_stream text, p_older_than interval, p_newer_than interval, p_limit integer)
RETURNS SETOF bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.id FROM hotmesh.messages m
    WHERE m.state = 'dead'
      AND (p_ids IS NULL OR m.id = ANY (p_ids))
      AND (p_stream IS NULL OR m.stream = p_stream)
      AND (p_older_than IS NULL OR m.finished_at <= now() - p_older_than)
      AND (p_newer_than IS NULL OR m.finished_at >= now() - p_newer_than)
    ORDER BY m.finished_at, m.id
    LIMIT p_limit
$$;

CREATE OR REPLACE FUNCTION hotmesh._dlq_list(
    p_ids bigint[], p_stream text, p_older_than interval, p_newer_than interval, p_limit integer)
RETURNS SETOF hotmesh.messages
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.* FROM hotmesh.messages m
    WHERE m.id IN (SELECT hotmesh._dlq_ids(p_ids, p_stream, p_older_than, p_newer_than, p_limit))
    ORDER BY m.finished_at, m.id
$$;

-- Put dead messages back in their queue.
--   * a call (it has a call_id) keeps its call_id and gets a fresh deadline, now + p_timeout_ms (NULL: the
--     time it was given at first, at most max_timeout_ms), so a caller still asking for it gets the answer;
--   * p_publish: a new fire-and-forget message with the same stream, workflow and arguments, and the dead
--     one is deleted (nobody waits for an answer);
--   * a fire-and-forget message is simply queued again.
-- Attempts and reclaims start again from 0. Returns each message retried and the id it runs under now.
CREATE OR REPLACE FUNCTION hotmesh._dlq_retry(
    p_ids bigint[], p_stream text, p_older_than interval, p_newer_than interval, p_limit integer,
    p_timeout_ms bigint, p_publish boolean)
RETURNS TABLE (id bigint, stream text, call_id uuid, new_id bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r record;
    v_new bigint;
    v_ms bigint;
BEGIN
    FOR r IN
        SELECT m.* FROM hotmesh.messages m
        WHERE m.id IN (SELECT hotmesh._dlq_ids(p_ids, p_stream, p_older_than, p_newer_than, p_limit))
          AND m.state = 'dead'
        ORDER BY m.id
        FOR UPDATE SKIP LOCKED
    LOOP
        IF coalesce(p_publish, false) THEN
            INSERT INTO hotmesh.messages (stream, workflow_name, args)
            VALUES (r.stream, r.workflow_name, r.args)
            RETURNING messages.id INTO v_new;
            DELETE FROM hotmesh.messages m WHERE m.id = r.id;
        ELSE
            v_ms := least(greatest(coalesce(p_timeout_ms,
                                            (extract(epoch FROM r.deadline - r.created_at) * 1000)::bigint,
                                            60000), 1000),
                          hotmesh._setting('max_timeout_ms'));
            UPDATE hotmesh.messages m SET
                state = 'ready', attempt = 0, reclaims = 0, visible_at = now(),
                deadline = CASE WHEN m.call_id IS NULL AND m.deadline IS NULL AND p_timeout_ms IS NULL THEN NULL
                                ELSE now() + make_interval(secs => v_ms / 1000.0) END,
                lease = NULL, consumer = NULL, lease_expires_at = NULL, cancel_requested = false,
                result = NULL, is_error = false, error = NULL,
                progress = NULL, progress_total = NULL, progress_message = NULL, finished_at = NULL
            WHERE m.id = r.id;
            v_new := r.id;
        END IF;
        PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(r.stream), '');
        id := r.id; stream := r.stream; call_id := r.call_id; new_id := v_new;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Delete dead messages for good. Returns how many.
CREATE OR REPLACE FUNCTION hotmesh._dlq_purge(
    p_ids bigint[], p_stream text, p_older_than interval, p_newer_than interval, p_limit integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    DELETE FROM hotmesh.messages m
    WHERE m.id IN (SELECT hotmesh._dlq_ids(p_ids, p_stream, p_older_than, p_newer_than, p_limit))
      AND m.state = 'dead';
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- ---------------------------------------------------------------------------------------------- grants

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA hotmesh FROM PUBLIC;

GRANT EXECUTE ON FUNCTION hotmesh.worker_purge() TO hotmesh_worker;
GRANT EXECUTE ON FUNCTION hotmesh.caller_purge(), hotmesh.caller_stats() TO hotmesh_caller;
