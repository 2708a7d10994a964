-- mcp-hotmesh SQL API v1: every function of the schema, as this version of mcp-hotmesh needs it.
--
-- Replaceable. The numbered migrations (NNN_*.sql) hold tables, indexes and data; each runs once, and once
-- landed it is never edited. This file holds the definitions, and `migrate` runs it after any numbered
-- migration and again whenever its checksum (sha256 of the file) differs from the one recorded in
-- hotmesh.definitions: to change a function, change it here. It runs on any schema an earlier version of this
-- file (or of 001 and 002, which defined the functions before this file existed) left behind, while workers and
-- gateways go on calling the functions, so:
--   * every definition is a CREATE OR REPLACE, which keeps a function's owner, its grants (the seed's manual
--     path included) and its oid, and replaces its SET clauses: the lock_timeout of the scoped functions is set
--     again at the end, every time, and the grants are given again;
--   * nothing is dropped. A call that started before migrate committed runs the earlier definition to its end,
--     and the functions that definition calls must still be there: the helpers no definition here calls any
--     more stay, defined at the end ("kept for earlier definitions"), owner-only and harmless.
--     A new signature of an API function is a new function beside the old one; redefine the old one here as a
--     call of the new (or revoke its EXECUTE here), so that no earlier behaviour stays callable.
-- A numbered migration runs before this file and must not rely on a definition here.
--
-- Runs as hotmesh_owner, in the transaction of the numbered migrations it follows. Every API function:
--   * is SECURITY DEFINER with search_path pinned to pg_catalog, pg_temp, every object schema-qualified;
--   * checks its stream against the allow-list of SESSION_USER, read from the role's *stored* setting
--     app.allowed_streams in pg_db_role_setting (never current_setting(): any session can SET it);
--   * is executable only by the group role of its kind (hotmesh_worker / hotmesh_caller), never PUBLIC;
--   * waits for a lock 2 s at most (lock_timeout, set at the end of this file).
-- A denied call raises SQLSTATE 42501 and says nothing about whether the stream exists.
--
-- Our own SQLSTATEs (class HM):
--   HM001 lease lost    HM002 invalid name    HM003 payload too large
--   HM004 tool refused  HM005 not found       HM006 quota exceeded
--
-- Message life: ready -> reserved (lease) -> done
--               reserved -> ready again (worker_fail with a retry, or lease expired: reclaims + 1)
--               ready or reserved -> dead (attempts or reclaims used up: the dead-letter queue),
--                                     -> cancelled (by its caller), -> expired (past its deadline); the caller's
--               error answer is written in the same statement and the caller is notified.
-- NOTIFY payloads carry ids only; channels are named by hashes of stream or owner, so any stream name fits.

-- -------------------------------------------------------------------------------------------- internal helpers

-- Not SECURITY DEFINER, not executable by anyone but the owner: only the API functions and the admin's
-- commands call them.

CREATE OR REPLACE FUNCTION hotmesh._setting(p_key text) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT value FROM hotmesh.settings WHERE key = p_key $$;

CREATE OR REPLACE FUNCTION hotmesh._is_admin() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.rolsuper OR pg_catalog.pg_has_role(session_user, 'hotmesh_owner', 'MEMBER')
    FROM pg_catalog.pg_roles r WHERE r.rolname = session_user
$$;

-- The stored allow-list of session_user: a database-specific setting wins over a role-wide one; and the streams
-- the admin granted it in stream_grants (any number of them, see 004).
CREATE OR REPLACE FUNCTION hotmesh._allowed_streams() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(DISTINCT a.stream), '{}') FROM (
    SELECT btrim(item) AS stream
    FROM (
        SELECT substr(cfg, length('app.allowed_streams=') + 1) AS value
        FROM pg_catalog.pg_db_role_setting s
        CROSS JOIN LATERAL unnest(s.setconfig) AS cfg
        WHERE s.setrole = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = session_user)
          AND s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))
          -- starts_with, not LIKE 'app.allowed\_streams=%': a backslash in a literal means something else
          -- under SET standard_conforming_strings = off, and every session may set that.
          AND pg_catalog.starts_with(cfg, 'app.allowed_streams=')
        ORDER BY s.setdatabase DESC
        LIMIT 1
    ) AS setting
    CROSS JOIN LATERAL unnest(string_to_array(setting.value, ',')) AS item
    WHERE btrim(item) <> ''
    UNION ALL
    SELECT g.stream FROM hotmesh.stream_grants g WHERE g.role_name = session_user
    ) AS a
$$;

-- The streams of session_user's stored allow-list; NULL for the admin (every stream).
CREATE OR REPLACE FUNCTION hotmesh._own_streams() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN hotmesh._is_admin() THEN NULL ELSE hotmesh._allowed_streams() END $$;

-- The check every API function makes on a stream argument. One query (the admin test and the stored allow-list
-- of session_user, as _is_admin() and _allowed_streams() read them): it runs on every call, and each nested
-- helper call would cost a search_path switch of its own.
CREATE OR REPLACE FUNCTION hotmesh._authorize(p_stream text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- as _valid_stream(), inline
    v_valid boolean := p_stream IS NOT NULL AND length(p_stream) <= 200 AND p_stream ~ '^[A-Za-z0-9._:/-]+$';
    v_admin boolean;
    v_allowed boolean;
BEGIN
    SELECT r.rolsuper OR pg_catalog.pg_has_role(r.oid, 'hotmesh_owner', 'MEMBER'),
           coalesce((
               SELECT p_stream = ANY (SELECT btrim(item) FROM unnest(string_to_array(
                          substr(cfg, length('app.allowed_streams=') + 1), ',')) AS item)
               FROM pg_catalog.pg_db_role_setting s
               CROSS JOIN LATERAL unnest(s.setconfig) AS cfg
               WHERE s.setrole = r.oid
                 AND s.setdatabase IN (0, (SELECT d.oid FROM pg_catalog.pg_database d
                                           WHERE d.datname = current_database()))
                 -- starts_with, not LIKE: see _allowed_streams()
                 AND pg_catalog.starts_with(cfg, 'app.allowed_streams=')
               ORDER BY s.setdatabase DESC
               LIMIT 1), false)
    INTO v_admin, v_allowed
    FROM pg_catalog.pg_roles r WHERE r.rolname = session_user;
    IF NOT coalesce(v_admin, false) AND NOT coalesce(v_allowed, false) THEN  -- granted in stream_grants (004)?
        v_allowed := EXISTS (SELECT 1 FROM hotmesh.stream_grants g
                             WHERE g.role_name = session_user AND g.stream = p_stream);
    END IF;
    IF coalesce(v_admin, false) THEN
        IF NOT v_valid THEN
            RAISE EXCEPTION 'invalid stream name' USING ERRCODE = 'HM002';
        END IF;
        RETURN;
    END IF;
    -- An allow-list written by hand may hold entries that are no stream names ('*' meant as a wildcard,
    -- 'ströme'): such an entry grants nothing, so no message is ever written under an invalid name.
    IF NOT v_valid OR NOT coalesce(v_allowed, false) THEN
        RAISE EXCEPTION 'permission denied for this stream' USING ERRCODE = '42501';
    END IF;
END
$$;

-- The depth of a JSON value is at least p_depth: a value at level p_depth exists (the root is level 0).
-- jsonpath walks the value in C and stops at the first hit.
CREATE OR REPLACE FUNCTION hotmesh._deeper_than(p_value jsonb, p_depth bigint) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.jsonb_path_exists(p_value, ('strict $.**{' || (p_depth + 1)::text || '}')::jsonpath) $$;

-- Arguments and results: no larger than max_payload_bytes, no deeper than max_json_depth.
CREATE OR REPLACE FUNCTION hotmesh._check_size(p_value jsonb, p_what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF octet_length(p_value::text) > hotmesh._setting('max_payload_bytes') THEN
        RAISE EXCEPTION '% larger than % bytes', p_what, hotmesh._setting('max_payload_bytes')
            USING ERRCODE = 'HM003';
    END IF;
    IF hotmesh._deeper_than(p_value, hotmesh._setting('max_json_depth')) THEN
        RAISE EXCEPTION '% nested deeper than % levels', p_what, hotmesh._setting('max_json_depth')
            USING ERRCODE = 'HM003';
    END IF;
END
$$;

-- One call's arguments, workflow name and idempotency key, as caller_call and caller_call_many take them.
CREATE OR REPLACE FUNCTION hotmesh._check_call(p_args jsonb, p_workflow text, p_key text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_args IS NULL OR jsonb_typeof(p_args) <> 'object' THEN
        RAISE EXCEPTION 'arguments must be a JSON object' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._check_size(p_args, 'arguments');
    IF length(p_key) > 200 OR length(p_workflow) > 200 THEN
        RAISE EXCEPTION 'idempotency key and workflow name are at most 200 characters' USING ERRCODE = 'HM002';
    END IF;
END
$$;

-- A tool registration, checked as untrusted input for every gateway that will read it. Each refusal names the
-- rule it broke.
CREATE OR REPLACE FUNCTION hotmesh._check_tool(p_tool jsonb) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := CASE WHEN jsonb_typeof(p_tool -> 'name') = 'string' THEN p_tool ->> 'name' END;  -- not 7 -> '7'
BEGIN
    IF p_tool IS NULL OR jsonb_typeof(p_tool) <> 'object' THEN
        RAISE EXCEPTION 'tool must be a JSON object' USING ERRCODE = 'HM004';
    END IF;
    IF octet_length(p_tool::text) > hotmesh._setting('max_schema_bytes') THEN
        RAISE EXCEPTION 'tool registration larger than % bytes', hotmesh._setting('max_schema_bytes')
            USING ERRCODE = 'HM003';
    END IF;
    IF hotmesh._deeper_than(p_tool, hotmesh._setting('max_schema_depth')) THEN
        RAISE EXCEPTION 'tool registration nested deeper than % levels', hotmesh._setting('max_schema_depth')
            USING ERRCODE = 'HM003';
    END IF;
    IF (SELECT count(*) FROM pg_catalog.jsonb_path_query(p_tool, 'strict $.**')) > hotmesh._setting('max_schema_nodes') THEN
        RAISE EXCEPTION 'tool registration has more than % values', hotmesh._setting('max_schema_nodes')
            USING ERRCODE = 'HM003';
    END IF;
    IF v_name IS NULL OR v_name !~ '^[A-Za-z0-9_-]{1,64}$' THEN
        RAISE EXCEPTION 'tool name must match ^[A-Za-z0-9_-]{1,64}$' USING ERRCODE = 'HM004';
    END IF;
    IF jsonb_typeof(p_tool -> 'description') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'tool description must be a string' USING ERRCODE = 'HM004';
    END IF;
    IF length(p_tool ->> 'description') > hotmesh._setting('max_description_chars') THEN
        RAISE EXCEPTION 'tool description longer than % characters', hotmesh._setting('max_description_chars')
            USING ERRCODE = 'HM004';
    END IF;
    IF jsonb_typeof(p_tool -> 'input_schema') IS DISTINCT FROM 'object'
       OR p_tool -> 'input_schema' ->> 'type' IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'input_schema must be a JSON Schema object with "type": "object"' USING ERRCODE = 'HM004';
    END IF;
    IF p_tool ? 'output_schema' AND jsonb_typeof(p_tool -> 'output_schema') <> 'null'
       AND (jsonb_typeof(p_tool -> 'output_schema') <> 'object'
            OR p_tool -> 'output_schema' ->> 'type' IS DISTINCT FROM 'object') THEN
        RAISE EXCEPTION 'output_schema must be a JSON Schema object with "type": "object"' USING ERRCODE = 'HM004';
    END IF;
    -- A reader's JSON library may refuse a number this long (Python's int() stops at 4,300 digits).
    IF EXISTS (SELECT 1 FROM pg_catalog.jsonb_path_query(p_tool, 'strict $.** ? (@.type() == "number")') AS n(v)
               WHERE length(n.v::text) > 100) THEN
        RAISE EXCEPTION 'tool registration holds a number longer than 100 characters' USING ERRCODE = 'HM004';
    END IF;
    -- Nothing outside the registration: a gateway never fetches a URL or reads a file a schema points to.
    IF EXISTS (SELECT 1 FROM pg_catalog.jsonb_path_query(p_tool, 'strict $.**."$ref"') AS r(v)
               WHERE jsonb_typeof(r.v) <> 'string' OR NOT pg_catalog.starts_with(r.v #>> '{}', '#'))
       OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_path_query(p_tool, 'strict $.**."$dynamicRef"') AS r(v)
                  WHERE jsonb_typeof(r.v) <> 'string' OR NOT pg_catalog.starts_with(r.v #>> '{}', '#')) THEN
        RAISE EXCEPTION 'a $ref in a tool''s schema must point inside it (start with #)' USING ERRCODE = 'HM004';
    END IF;
END
$$;

-- The quota of p_owner (NULL: fire-and-forget messages, with the limits of session_user) on p_stream, before
-- p_count more messages of p_bytes in all are queued.
CREATE OR REPLACE FUNCTION hotmesh._check_quota(p_stream text, p_owner name, p_count bigint, p_bytes bigint)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_max_messages bigint := hotmesh._setting('max_queued_messages');
    v_max_bytes bigint := hotmesh._setting('max_queued_bytes');
    v_messages bigint;
    v_bytes bigint;
BEGIN
    -- (no row: the settings stand; SELECT INTO would set both to NULL)
    SELECT coalesce(l.max_queued_messages, v_max_messages), coalesce(l.max_queued_bytes, v_max_bytes)
    INTO v_max_messages, v_max_bytes
    FROM (SELECT 1) AS one LEFT JOIN hotmesh.role_limits l ON l.role_name = coalesce(p_owner, session_user);
    -- counted up to the limit: the cost is bounded by the quota, whatever the queue holds
    IF p_owner IS NULL THEN
        SELECT count(*), coalesce(sum(pg_catalog.pg_column_size(q.args)), 0) INTO v_messages, v_bytes
        FROM (SELECT m.args FROM hotmesh.messages m
              WHERE m.stream = p_stream AND m.state = 'ready' AND m.owner IS NULL LIMIT v_max_messages + 1) q;
    ELSE
        SELECT count(*), coalesce(sum(pg_catalog.pg_column_size(q.args)), 0) INTO v_messages, v_bytes
        FROM (SELECT m.args FROM hotmesh.messages m
              WHERE m.stream = p_stream AND m.state = 'ready' AND m.owner = p_owner LIMIT v_max_messages + 1) q;
    END IF;
    IF v_messages + p_count > v_max_messages THEN
        RAISE EXCEPTION 'queue quota reached: at most % messages may wait on this stream', v_max_messages
            USING ERRCODE = 'HM006';
    END IF;
    IF v_bytes + p_bytes > v_max_bytes THEN
        RAISE EXCEPTION 'queue quota reached: at most % bytes may wait on this stream', v_max_bytes
            USING ERRCODE = 'HM006';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION hotmesh._clamp_lease(p_lease_ms integer) RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT least(greatest(coalesce(p_lease_ms, 0)::bigint, hotmesh._setting('min_lease_ms')),
                 hotmesh._setting('max_lease_ms'))::integer
$$;

CREATE OR REPLACE FUNCTION hotmesh._worker_channel(p_stream text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'hotmesh_w_' || left(md5(p_stream), 16) $$;

CREATE OR REPLACE FUNCTION hotmesh._caller_channel(p_owner name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'hotmesh_r_' || left(md5(p_owner::text), 16) $$;

-- Tell a caller that its call ended (r:) or made progress (p:). The payload is the call id only.
CREATE OR REPLACE FUNCTION hotmesh._notify_caller(p_owner name, p_call_id uuid, p_kind text) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.pg_notify(hotmesh._caller_channel(p_owner), p_kind || ':' || p_call_id::text)
    WHERE p_owner IS NOT NULL AND p_call_id IS NOT NULL
$$;

-- The claim, shared by worker_dequeue and worker_respond_and_dequeue (which authorize first): leases whose
-- stored expiry passed go back to ready (or dead), then up to p_batch ready messages are leased, in one
-- statement each. Callers of dead-lettered calls are told (NOTIFY) in the same statement.
CREATE OR REPLACE FUNCTION hotmesh._claim(
    p_stream text, p_consumer text, p_batch integer, p_lease_ms integer, p_workflows text[], p_reclaim_count integer)
RETURNS TABLE (id bigint, lease uuid, workflow_name text, args jsonb, attempt integer, reclaims integer,
               deadline timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_lease_ms integer := hotmesh._clamp_lease(p_lease_ms);
    v_batch integer := least(greatest(coalesce(p_batch, 1), 1), hotmesh._setting('max_batch'));
    v_max_reclaims integer := greatest(coalesce(p_reclaim_count, 3), 0);
    v_told bigint;
BEGIN
    IF p_consumer IS NULL OR length(p_consumer) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'HM002';
    END IF;

    -- Leases whose *stored* expiry passed: back to ready, or dead once reclaims are used up. The claimant's
    -- own lease_ms plays no part, so nobody can take a lease that is still held.
    WITH expired AS MATERIALIZED (
        SELECT m.id,
               m.reclaims >= v_max_reclaims OR m.cancel_requested OR coalesce(m.deadline <= now(), false) AS dies
        FROM hotmesh.messages m
        WHERE m.stream = p_stream AND m.state = 'reserved' AND m.lease_expires_at <= now()
        ORDER BY m.lease_expires_at
        LIMIT v_batch
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE hotmesh.messages m SET
            state = CASE WHEN NOT expired.dies THEN 'ready' WHEN m.cancel_requested THEN 'cancelled'
                         WHEN m.deadline <= now() THEN 'expired' ELSE 'dead' END,
            reclaims = m.reclaims + 1,
            lease = NULL, consumer = NULL, lease_expires_at = NULL,
            is_error = expired.dies,
            error = CASE
                WHEN NOT expired.dies THEN NULL
                WHEN m.cancel_requested THEN 'cancelled by the caller'
                WHEN m.deadline <= now() THEN 'the call''s deadline passed before a worker answered'
                ELSE 'the worker handling this call stopped responding ' || (m.reclaims + 1)::text || ' time(s)'
            END,
            finished_at = CASE WHEN expired.dies THEN now() END
        FROM expired WHERE m.id = expired.id
        RETURNING m.state, m.owner, m.call_id
    )
    SELECT count(pg_catalog.pg_notify(hotmesh._caller_channel(moved.owner), 'r:' || moved.call_id::text))
    INTO v_told
    FROM moved WHERE moved.state <> 'ready' AND moved.owner IS NOT NULL AND moved.call_id IS NOT NULL;

    -- Claim in one statement; calls whose deadline passed while queued are dead-lettered, never run.
    -- The stream is matched as a range of one value and ordered by (stream, id): only messages_ready gives that
    -- order, so the plan is always that index, whatever the statistics say. With "stream = p_stream ORDER BY
    -- id" the planner may walk the primary key in id order instead and filter: cheap while most rows are ready
    -- (right after a burst), then one step per done row of any stream below the first ready one (measured:
    -- 112 ms instead of 0.07 ms with 200,000 older done rows), so claim time would grow with the table's history.
    RETURN QUERY
    WITH candidates AS MATERIALIZED (
        SELECT m.id, coalesce(m.deadline <= now(), false) AS late
        FROM hotmesh.messages m
        WHERE m.stream >= p_stream AND m.stream <= p_stream AND m.state = 'ready' AND m.visible_at <= now()
          AND (p_workflows IS NULL OR m.workflow_name = ANY (p_workflows))
        ORDER BY m.stream, m.id
        LIMIT v_batch
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE hotmesh.messages m SET
            state = CASE WHEN c.late THEN 'expired' ELSE 'reserved' END,
            started_at = CASE WHEN c.late THEN m.started_at ELSE now() END,
            lease = CASE WHEN c.late THEN NULL ELSE gen_random_uuid() END,
            consumer = CASE WHEN c.late THEN NULL ELSE p_consumer END,
            lease_expires_at = CASE WHEN c.late THEN NULL
                                    ELSE now() + make_interval(secs => v_lease_ms / 1000.0) END,
            is_error = c.late,
            error = CASE WHEN c.late THEN 'the call''s deadline passed while it waited in the queue' END,
            finished_at = CASE WHEN c.late THEN now() END
        FROM candidates c WHERE m.id = c.id
        RETURNING m.id, m.lease, m.workflow_name, m.args, m.attempt, m.reclaims, m.deadline, m.state, m.owner,
                  m.call_id
    ), told AS (  -- one row, so the join below runs it
        SELECT count(pg_catalog.pg_notify(hotmesh._caller_channel(d.owner), 'r:' || d.call_id::text)) AS n
        FROM claimed d WHERE d.state = 'expired' AND d.owner IS NOT NULL AND d.call_id IS NOT NULL
    )
    SELECT c.id, c.lease, c.workflow_name, c.args, c.attempt, c.reclaims, c.deadline
    FROM claimed c CROSS JOIN told
    WHERE c.state = 'reserved'
    ORDER BY c.id;
END
$$;

-- -------------------------------------------------------------------------------------------- worker functions

-- Claim up to batch ready messages of an allowed stream (_claim). Planned with enable_seqscan off by the
-- function's own SET clause, which PostgreSQL restores on return and on error: plans of statements inside
-- functions are cached per session, and a generic plan made while the table was small (a fresh install, the
-- first minute before autovacuum's first ANALYZE) is a sequential scan that stays in use while the table grows
-- (measured: a 16-call read took 1.6 ms at 3,300 rows and kept growing). Every lookup it makes has an index.
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

-- Answer a held message: only while its lease is held (false, and nothing written, once it was lost); the
-- caller is told at once.
CREATE OR REPLACE FUNCTION hotmesh.worker_respond(
    stream text, id bigint, lease uuid, result jsonb, is_error boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    PERFORM hotmesh._authorize(worker_respond.stream);
    PERFORM hotmesh._check_size(worker_respond.result, 'result');
    UPDATE hotmesh.messages m SET
        state = 'done', result = worker_respond.result, is_error = coalesce(worker_respond.is_error, false),
        error = NULL, lease = NULL, lease_expires_at = NULL, finished_at = now()
    WHERE m.id = worker_respond.id AND m.stream = worker_respond.stream
      AND m.state = 'reserved' AND m.lease = worker_respond.lease
    RETURNING m.owner, m.call_id INTO r;
    IF NOT FOUND THEN  -- lost, or a late answer to a call that was cancelled or expired meanwhile (dropped)
        RETURN hotmesh._ended_under(worker_respond.stream, worker_respond.id, worker_respond.lease);
    END IF;
    PERFORM hotmesh._notify_caller(r.owner, r.call_id, 'r');
    RETURN true;
END
$$;

-- Answer several held messages and claim the next ones, in one round trip and one commit: what a busy worker
-- does between handlers. Each answer is worker_respond's (only while its lease is held; the caller is told at
-- once); then, when batch > 0, up to batch messages are claimed as worker_dequeue claims them. Returns a row
-- per answer, kind 'answered' or 'lost' (the lease was lost: nothing was written), and a row per claimed
-- message, kind 'claimed'. With no answers the commit is asynchronous, as worker_dequeue's; with answers it
-- is durable. Planned with indexes only, as worker_dequeue; results no deeper than max_json_depth.
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
        SELECT CASE WHEN d.id IS NOT NULL THEN 'answered'
                    -- a late answer to a call cancelled or expired meanwhile: taken, and dropped
                    WHEN hotmesh._ended_under(worker_respond_and_dequeue.stream, a.id, a.lease) THEN 'answered'
                    ELSE 'lost' END,
               a.id, NULL::uuid, NULL::text, NULL::jsonb, NULL::integer, NULL::integer, NULL::timestamptz
        FROM (SELECT DISTINCT ON (answers.id) answers.id, answers.lease FROM answers) a
        LEFT JOIN done d ON d.id = a.id CROSS JOIN told;
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

-- A handler failed: retry after retry_in_ms (attempt + 1), or, with no retry, past the deadline or with attempts
-- used up, dead-letter the message and tell its caller at once.
CREATE OR REPLACE FUNCTION hotmesh.worker_fail(
    stream text, id bigint, lease uuid, error text, retry_in_ms integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_error text := left(coalesce(worker_fail.error, 'the tool failed'), hotmesh._setting('max_error_chars')::integer);
    v_retry_at timestamptz := now() + make_interval(secs => greatest(coalesce(worker_fail.retry_in_ms, 0), 0) / 1000.0);
    r record;
BEGIN
    PERFORM hotmesh._authorize(worker_fail.stream);
    UPDATE hotmesh.messages m SET
        state = CASE WHEN m.cancel_requested THEN 'cancelled'
                     WHEN m.deadline <= now() THEN 'expired'
                     WHEN worker_fail.retry_in_ms IS NULL
                          OR m.attempt + 1 >= hotmesh._setting('max_attempts')
                          OR v_retry_at >= m.deadline
                     THEN 'dead' ELSE 'ready' END,
        attempt = m.attempt + 1,
        visible_at = v_retry_at,
        lease = NULL, consumer = NULL, lease_expires_at = NULL,
        is_error = true,
        error = CASE WHEN m.cancel_requested THEN 'cancelled by the caller'
                     WHEN m.deadline <= now() THEN 'the call''s deadline passed while the tool was running'
                     ELSE v_error END
    WHERE m.id = worker_fail.id AND m.stream = worker_fail.stream
      AND m.state = 'reserved' AND m.lease = worker_fail.lease
    RETURNING m.state, m.owner, m.call_id INTO r;
    IF NOT FOUND THEN  -- lost, or the call was cancelled or expired meanwhile (nothing more to write)
        RETURN hotmesh._ended_under(worker_fail.stream, worker_fail.id, worker_fail.lease);
    END IF;
    IF r.state <> 'ready' THEN
        UPDATE hotmesh.messages m SET finished_at = now() WHERE m.id = worker_fail.id;
        PERFORM hotmesh._notify_caller(r.owner, r.call_id, 'r');
    END IF;
    RETURN true;
END
$$;

-- Heartbeat for a long handler: extends the lease; returns true when the caller cancelled (stop work),
-- false to go on, NULL when the lease was lost.
CREATE OR REPLACE FUNCTION hotmesh.worker_extend(stream text, id bigint, lease uuid, lease_ms integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_cancel boolean;
BEGIN
    PERFORM hotmesh._authorize(worker_extend.stream);
    UPDATE hotmesh.messages m SET
        lease_expires_at = now() + make_interval(secs => hotmesh._clamp_lease(worker_extend.lease_ms) / 1000.0)
    WHERE m.id = worker_extend.id AND m.stream = worker_extend.stream
      AND m.state = 'reserved' AND m.lease = worker_extend.lease
    RETURNING m.cancel_requested OR coalesce(m.deadline <= now(), false) INTO v_cancel;
    IF v_cancel IS NULL AND hotmesh._ended_under(worker_extend.stream, worker_extend.id, worker_extend.lease) THEN
        RETURN true;  -- the call was cancelled or expired while its handler ran: stop it
    END IF;
    RETURN v_cancel;  -- NULL when no row matched: the lease is lost
END
$$;

-- Progress for the caller, forwarded to the agent. A finite number: NaN or infinity is no JSON, and a client
-- that reads it may drop its whole connection.
CREATE OR REPLACE FUNCTION hotmesh.worker_progress(
    stream text, id bigint, lease uuid, progress double precision, total double precision, message text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    PERFORM hotmesh._authorize(worker_progress.stream);
    IF worker_progress.progress IS NULL OR worker_progress.progress IN ('NaN', 'Infinity', '-Infinity')
       OR worker_progress.total IN ('NaN', 'Infinity', '-Infinity') THEN
        RAISE EXCEPTION 'progress and total must be finite numbers' USING ERRCODE = 'HM002';
    END IF;
    UPDATE hotmesh.messages m SET
        progress = worker_progress.progress, progress_total = worker_progress.total,
        progress_message = left(worker_progress.message, 1000)
    WHERE m.id = worker_progress.id AND m.stream = worker_progress.stream
      AND m.state = 'reserved' AND m.lease = worker_progress.lease
    RETURNING m.owner, m.call_id INTO r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM hotmesh._notify_caller(r.owner, r.call_id, 'p');
    RETURN true;
END
$$;

-- Give a claimed message back at once (graceful shutdown): no reclaim is counted.
CREATE OR REPLACE FUNCTION hotmesh.worker_release(stream text, id bigint, lease uuid)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM hotmesh._authorize(worker_release.stream);
    UPDATE hotmesh.messages m SET
        state = 'ready', visible_at = now(), lease = NULL, consumer = NULL, lease_expires_at = NULL
    WHERE m.id = worker_release.id AND m.stream = worker_release.stream
      AND m.state = 'reserved' AND m.lease = worker_release.lease;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(worker_release.stream), '');
    RETURN true;
END
$$;

-- A new fire-and-forget message on an allowed stream (readonly workers publish but never consume), within the
-- quota for fire-and-forget messages on the stream.
CREATE OR REPLACE FUNCTION hotmesh.worker_publish(stream text, workflow_name text, args jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    PERFORM hotmesh._authorize(worker_publish.stream);
    IF worker_publish.args IS NULL THEN
        RAISE EXCEPTION 'arguments must not be null' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._check_size(worker_publish.args, 'arguments');
    PERFORM hotmesh._check_quota(worker_publish.stream, NULL, 1, pg_catalog.pg_column_size(worker_publish.args));
    INSERT INTO hotmesh.messages (stream, workflow_name, args)
    VALUES (worker_publish.stream, left(coalesce(worker_publish.workflow_name, ''), 200), worker_publish.args)
    RETURNING messages.id INTO v_id;
    PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(worker_publish.stream), '');
    RETURN v_id;
END
$$;

-- The first form of worker_register_definition (below), for workers of earlier versions: the same checks and
-- approvals; true when the registration changed anything (went live, or now waits for an admin).
CREATE OR REPLACE FUNCTION hotmesh.worker_register_tool(stream text, workflow_name text, tool jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM hotmesh._authorize(worker_register_tool.stream);
    RETURN hotmesh.worker_register_definition(worker_register_tool.stream, worker_register_tool.workflow_name,
                                              worker_register_tool.tool) <> 'unchanged';
END
$$;

-- Take a tool of an allowed stream away; gateways refresh.
CREATE OR REPLACE FUNCTION hotmesh.worker_unregister_tool(stream text, workflow_name text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM hotmesh._authorize(worker_unregister_tool.stream);
    DELETE FROM hotmesh.tools t
    WHERE t.stream = worker_unregister_tool.stream AND t.workflow_name = coalesce(worker_unregister_tool.workflow_name, '');
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
    END IF;
    RETURN FOUND;
END
$$;

-- Rows of consumers whose heartbeat expired an hour ago, 100 at a time, skipping rows another session holds:
-- each heartbeat cleans up a little after processes that died without saying goodbye.
CREATE OR REPLACE FUNCTION hotmesh._forget_expired_workers() RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM hotmesh.workers w
    WHERE (w.stream, w.consumer) IN (
        SELECT o.stream, o.consumer FROM hotmesh.workers o
        WHERE o.expires_at < now() - interval '1 hour'
        LIMIT 100
        FOR UPDATE SKIP LOCKED)
$$;
REVOKE ALL ON FUNCTION hotmesh._forget_expired_workers() FROM PUBLIC;

-- A live worker says so for each stream it consumes; gateways count live workers per stream. A role announces
-- at most max_consumers_per_stream consumers per stream. The cleanup of long-expired rows (any role's) skips
-- rows another session holds: a stranger who keeps a heartbeat's transaction open must not stall every other
-- worker's heartbeat.
CREATE OR REPLACE FUNCTION hotmesh.worker_heartbeat(streams text[], consumer text, ttl_ms integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_stream text;
    v_ttl interval := make_interval(secs => least(greatest(coalesce(ttl_ms, 0), 1000),
                                                  hotmesh._setting('max_worker_ttl_ms')) / 1000.0);
    v_new boolean := false;
BEGIN
    IF consumer IS NULL OR length(consumer) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'HM002';
    END IF;
    IF cardinality(streams) > 1000 THEN
        RAISE EXCEPTION 'too many streams' USING ERRCODE = 'HM002';
    END IF;
    FOREACH v_stream IN ARRAY coalesce(streams, '{}') LOOP
        PERFORM hotmesh._authorize(v_stream);
        INSERT INTO hotmesh.workers AS w (stream, consumer, role_name, expires_at)
        VALUES (v_stream, worker_heartbeat.consumer, session_user, now() + v_ttl)
        ON CONFLICT (stream, consumer) DO UPDATE SET expires_at = excluded.expires_at
        WHERE w.role_name = session_user
        RETURNING (xmax = 0) INTO v_new;
        IF v_new THEN
            -- a new consumer: within the role's bound on this stream (a flood of made-up consumers would make
            -- every gateway's live-worker count, and the table, grow without end)
            IF (SELECT count(*) FROM (SELECT 1 FROM hotmesh.workers o
                                      WHERE o.stream = v_stream AND o.role_name = session_user
                                      LIMIT hotmesh._setting('max_consumers_per_stream') + 1) n)
               > hotmesh._setting('max_consumers_per_stream') THEN
                RAISE EXCEPTION 'at most % consumers of one role per stream', hotmesh._setting('max_consumers_per_stream')
                    USING ERRCODE = 'HM006';
            END IF;
            PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
        END IF;
    END LOOP;
    PERFORM hotmesh._forget_expired_workers();
    RETURN coalesce(cardinality(streams), 0);
END
$$;

-- A worker stopping: its consumer's rows go, so gateways stop counting it at once.
CREATE OR REPLACE FUNCTION hotmesh.worker_goodbye(consumer text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_count integer;
BEGIN
    DELETE FROM hotmesh.workers w WHERE w.consumer = worker_goodbye.consumer AND w.role_name = session_user;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
    END IF;
    RETURN v_count;
END
$$;

-- -------------------------------------------------------------------------------------------- caller functions

-- The registered tools on the caller's allowed streams, with how many live workers serve each.
CREATE OR REPLACE FUNCTION hotmesh.caller_tools()
RETURNS TABLE (stream text, workflow_name text, name text, description text, input_schema jsonb,
               output_schema jsonb, live_workers integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_admin boolean := hotmesh._is_admin();
    v_allowed text[] := hotmesh._allowed_streams();
BEGIN
    RETURN QUERY
    SELECT t.stream, t.workflow_name, t.name, t.description, t.input_schema, t.output_schema,
           (SELECT count(*) FROM hotmesh.workers w WHERE w.stream = t.stream AND w.expires_at > now())::integer
    FROM hotmesh.tools t
    WHERE v_admin OR t.stream = ANY (v_allowed)
    ORDER BY t.name;
END
$$;

-- Enqueue one call on an allowed stream; returns its call id. session_user owns it. Within the caller's quota on
-- the stream; the arguments are checked by _check_call. A repeated idempotency key returns the first call (the
-- same stream, workflow and arguments; a key reused for another call is refused).
CREATE OR REPLACE FUNCTION hotmesh.caller_call(
    stream text, workflow_name text, args jsonb, timeout_ms integer, idempotency_key text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_call_id uuid;
    v_id bigint;
    v_timeout bigint := least(greatest(coalesce(timeout_ms, 0), 1), hotmesh._setting('max_timeout_ms'));
BEGIN
    PERFORM hotmesh._authorize(caller_call.stream);
    SET LOCAL synchronous_commit = off;  -- see 001
    PERFORM hotmesh._check_call(caller_call.args, caller_call.workflow_name, caller_call.idempotency_key);
    PERFORM hotmesh._check_quota(caller_call.stream, session_user, 1, pg_catalog.pg_column_size(caller_call.args));
    INSERT INTO hotmesh.messages (stream, workflow_name, args, call_id, owner, idempotency_key, deadline)
    VALUES (caller_call.stream, coalesce(caller_call.workflow_name, ''), caller_call.args, gen_random_uuid(),
            session_user, caller_call.idempotency_key, now() + make_interval(secs => v_timeout / 1000.0))
    ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING call_id, id INTO v_call_id, v_id;
    IF v_call_id IS NULL THEN  -- the same idempotency key was used before: that call is this call
        SELECT m.call_id INTO v_call_id FROM hotmesh.messages m
        WHERE m.owner = session_user AND m.idempotency_key = caller_call.idempotency_key
          AND m.stream = caller_call.stream AND m.workflow_name = coalesce(caller_call.workflow_name, '')
          AND m.args = caller_call.args;
        IF v_call_id IS NULL THEN  -- never another call's answer for a key reused by mistake
            RAISE EXCEPTION 'this idempotency key was already used for another call (another tool or other arguments)'
                USING ERRCODE = 'HM002';
        END IF;
        RETURN v_call_id;
    END IF;
    PERFORM hotmesh._wake_workers(caller_call.stream, ARRAY[coalesce(caller_call.workflow_name, '')], 1, v_id);
    RETURN v_call_id;
END
$$;

-- Several calls in one statement and one commit: what a gateway sends when calls arrive together. The arrays
-- are one call each (as caller_call's arguments, with no idempotency key); returns the call ids in the same
-- order. Each distinct stream is authorized and its quota checked; one NOTIFY per stream. Any refused call
-- refuses them all, and nothing is written.
CREATE OR REPLACE FUNCTION hotmesh.caller_call_many(
    streams text[], workflow_names text[], args jsonb[], timeout_ms integer[])
RETURNS uuid[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_count integer := coalesce(cardinality(caller_call_many.streams), 0);
    v_max_timeout bigint := hotmesh._setting('max_timeout_ms');
    v_stream record;
    v_ids uuid[];
BEGIN
    IF v_count > hotmesh._setting('max_batch')
       OR coalesce(cardinality(caller_call_many.workflow_names), 0) <> v_count
       OR coalesce(cardinality(caller_call_many.args), 0) <> v_count
       OR coalesce(cardinality(caller_call_many.timeout_ms), 0) <> v_count THEN
        RAISE EXCEPTION 'streams, workflow_names, args and timeout_ms must be arrays of one length, at most max_batch'
            USING ERRCODE = 'HM002';
    END IF;
    FOR v_stream IN SELECT DISTINCT s.stream FROM unnest(caller_call_many.streams) AS s(stream) LOOP
        PERFORM hotmesh._authorize(v_stream.stream);
    END LOOP;
    SET LOCAL synchronous_commit = off;  -- as caller_call's
    PERFORM hotmesh._check_call(c.args, c.workflow_name, NULL)
    FROM unnest(caller_call_many.args, caller_call_many.workflow_names) AS c(args, workflow_name);
    FOR v_stream IN
        SELECT s.stream, count(*) AS n, sum(pg_catalog.pg_column_size(s.args)) AS bytes
        FROM unnest(caller_call_many.streams, caller_call_many.args) AS s(stream, args) GROUP BY s.stream
    LOOP
        PERFORM hotmesh._check_quota(v_stream.stream, session_user, v_stream.n, v_stream.bytes);
    END LOOP;
    WITH input AS MATERIALIZED (
        SELECT i.stream, coalesce(i.workflow_name, '') AS workflow_name, i.args, gen_random_uuid() AS call_id,
               now() + make_interval(secs => least(greatest(coalesce(i.timeout_ms, 0), 1), v_max_timeout) / 1000.0)
                   AS deadline,
               i.ord
        FROM unnest(caller_call_many.streams, caller_call_many.workflow_names, caller_call_many.args,
                    caller_call_many.timeout_ms) WITH ORDINALITY AS i(stream, workflow_name, args, timeout_ms, ord)
    ), inserted AS (
        INSERT INTO hotmesh.messages (stream, workflow_name, args, call_id, owner, deadline)
        SELECT input.stream, input.workflow_name, input.args, input.call_id, session_user, input.deadline
        FROM input ORDER BY input.ord
        RETURNING stream, workflow_name, id
    ), woken AS (  -- each stream's calls wake as many of its consumers (see _wake_workers)
        SELECT hotmesh._wake_workers(i.stream, array_agg(DISTINCT i.workflow_name), count(*), min(i.id))
        FROM inserted i GROUP BY i.stream
    )
    SELECT array_agg(input.call_id ORDER BY input.ord) INTO v_ids FROM input CROSS JOIN (SELECT count(*) FROM woken) w;
    RETURN coalesce(v_ids, '{}');
END
$$;

-- The state of several of the caller's own calls, one row per call found (calls of other roles, and unknown
-- ids, are left out: the same answer as caller_result's "not found"). Planned with indexes only, as
-- worker_dequeue.
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

-- The state of one of the caller's own calls. Another role's call, or none, is "not found": the same answer.
CREATE OR REPLACE FUNCTION hotmesh.caller_result(call_id uuid)
RETURNS TABLE (state text, result jsonb, is_error boolean, error text, attempt integer,
               progress double precision, progress_total double precision, progress_message text,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT m.state, m.result, m.is_error, m.error, m.attempt, m.progress, m.progress_total, m.progress_message,
           m.deadline
    FROM hotmesh.messages m
    WHERE m.call_id = caller_result.call_id AND (m.owner = session_user OR hotmesh._is_admin());
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such call' USING ERRCODE = 'HM005';
    END IF;
END
$$;

-- Cancel one of the caller's calls: a queued call is dead at once; a running one is flagged, and its
-- worker is woken to see the flag through worker_extend. Returns the state the call was in.
CREATE OR REPLACE FUNCTION hotmesh.caller_cancel(call_id uuid)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT m.id, m.state, m.stream, m.owner INTO r FROM hotmesh.messages m
    WHERE m.call_id = caller_cancel.call_id AND (m.owner = session_user OR hotmesh._is_admin())
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such call' USING ERRCODE = 'HM005';
    END IF;
    -- The call ends now, queued or running: 'expired' once its deadline passed (a gateway gives up on it then),
    -- else 'cancelled'. Neither is a failure (not the dead-letter queue). A running call keeps its lease, so its
    -- worker learns through worker_extend that it ended, and its late answer is taken and dropped.
    IF r.state IN ('ready', 'reserved') THEN
        UPDATE hotmesh.messages m SET
            state = CASE WHEN m.deadline <= now() THEN 'expired' ELSE 'cancelled' END,
            cancel_requested = true, is_error = true, finished_at = now(),
            error = CASE WHEN m.deadline <= now() THEN 'the call''s deadline passed' ELSE 'cancelled by the caller' END
        WHERE m.id = r.id;
        PERFORM hotmesh._notify_caller(r.owner, caller_cancel.call_id, 'r');
        IF r.state = 'reserved' THEN
            PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(r.stream), 'c:' || r.id::text);
        END IF;
    END IF;
    RETURN r.state;
END
$$;

-- --------------------------------------------------------------------------------------------------- retention

-- Done calls are deleted `retention_ms` after they finished, once their deadline has passed too (a caller may
-- still read an answer until then). Dead calls stay for the dlq command unless `dead_retention_ms` is set above
-- 0. Any running gateway or worker purges its own streams now and then, `purge_batch` rows per call at most.

-- Delete at most purge_batch finished calls past retention on p_streams (NULL: every stream); returns how many.
-- No lock a scoped role could hold: purges of different processes split the rows between them (SKIP LOCKED),
-- and a stranger keeping a purge's transaction open holds only its own streams' rows. The time of the last
-- purge is recorded when its row is free.
CREATE OR REPLACE FUNCTION hotmesh._purge(p_streams text[]) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_done_before timestamptz := now() - make_interval(secs => hotmesh._setting('retention_ms') / 1000.0);
    v_dead_ms bigint := coalesce(hotmesh._setting('dead_retention_ms'), 0);
    v_dead_before timestamptz := now() - make_interval(secs => greatest(v_dead_ms, 0) / 1000.0);
    v_count integer;
BEGIN
    WITH doomed AS MATERIALIZED (
        SELECT m.id FROM hotmesh.messages m
        WHERE m.state IN ('done', 'dead', 'cancelled', 'expired')
          AND (p_streams IS NULL OR m.stream = ANY (p_streams))
          AND ((m.state IN ('done', 'cancelled', 'expired') AND m.finished_at < v_done_before
                AND coalesce(m.deadline < now(), true))
               OR (m.state = 'dead' AND v_dead_ms > 0 AND m.finished_at < v_dead_before))
        LIMIT greatest(coalesce(hotmesh._setting('purge_batch'), 5000), 1)
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM hotmesh.messages m USING doomed WHERE m.id = doomed.id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    UPDATE hotmesh.settings s SET value = extract(epoch FROM now())::bigint
    WHERE s.key IN (SELECT l.key FROM hotmesh.settings l WHERE l.key = 'purge_lock' FOR UPDATE SKIP LOCKED);
    RETURN v_count;
END
$$;

-- A worker purges the finished calls of its own streams: what the admin's retention settings say, no more.
CREATE OR REPLACE FUNCTION hotmesh.worker_purge()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$ BEGIN RETURN hotmesh._purge(hotmesh._own_streams()); END $$;

-- A gateway (caller role) purges the finished calls of its own streams, the same way.
CREATE OR REPLACE FUNCTION hotmesh.caller_purge()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$ BEGIN RETURN hotmesh._purge(hotmesh._own_streams()); END $$;

-- -------------------------------------------------------------------------------------------- queue statistics

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

-- ----------------------------------------------------------------------------------------------- admin: status

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
               count(*) FILTER (WHERE m.state IN ('done', 'dead', 'cancelled', 'expired')
                                  AND m.finished_at > now() - interval '60 seconds')
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

-- -------------------------------------------------------------------------------------------------- admin: dlq

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

-- Delete dead messages for good; returns how many. Rows another session holds are skipped: a caller can lock
-- its own dead call (an uncommitted caller_cancel), and the admin's purge must not wait for it. A row skipped
-- now goes with the next purge.
CREATE OR REPLACE FUNCTION hotmesh._dlq_purge(
    p_ids bigint[], p_stream text, p_older_than interval, p_newer_than interval, p_limit integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    DELETE FROM hotmesh.messages m
    WHERE m.id IN (SELECT d.id FROM hotmesh.messages d
                   WHERE d.id IN (SELECT hotmesh._dlq_ids(p_ids, p_stream, p_older_than, p_newer_than, p_limit))
                     AND d.state = 'dead'
                   FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- ---------------------------------------------------------------------------------------------------- watchdog

-- End the sessions of scoped roles (members of hotmesh_worker or hotmesh_caller, never an admin) whose
-- transaction sat idle longer than watchdog_idle_ms or stayed open longer than watchdog_transaction_ms, or that
-- hold an advisory lock. No API
-- function takes that long, so only a session that holds a transaction open on purpose (or a broken client) is
-- ended: what frees the row locks, the NOTIFY queue (a listener inside a transaction holds it) and the
-- connection slot it kept. Returns the sessions ended. The owner sees and signals a role's sessions through its
-- membership in that role, granted when the role is provisioned.
CREATE OR REPLACE FUNCTION hotmesh._watchdog()
RETURNS TABLE (role_name name, pid integer, reason text, seconds double precision)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_idle interval := make_interval(secs => hotmesh._setting('watchdog_idle_ms') / 1000.0);
    v_open interval := make_interval(secs => hotmesh._setting('watchdog_transaction_ms') / 1000.0);
    r record;
BEGIN
    FOR r IN
        SELECT a.usename, a.pid,
               CASE WHEN a.state LIKE 'idle in transaction%' AND a.state_change < pg_catalog.clock_timestamp() - v_idle
                        THEN 'idle in a transaction'
                    WHEN a.xact_start < pg_catalog.clock_timestamp() - v_open THEN 'a transaction open too long'
                    ELSE 'an advisory lock held' END AS reason,
               coalesce(extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start), 0) AS age
        FROM pg_catalog.pg_stat_activity a
        JOIN pg_catalog.pg_roles o ON o.oid = a.usesysid
        WHERE a.pid <> pg_catalog.pg_backend_pid()
          AND a.backend_type = 'client backend'
          AND NOT o.rolsuper
          AND NOT pg_catalog.pg_has_role(o.oid, 'hotmesh_owner', 'MEMBER')
          AND (pg_catalog.pg_has_role(o.oid, 'hotmesh_worker', 'MEMBER')
               OR pg_catalog.pg_has_role(o.oid, 'hotmesh_caller', 'MEMBER'))
          AND ((a.state LIKE 'idle in transaction%' AND a.state_change < pg_catalog.clock_timestamp() - v_idle)
               OR a.xact_start < pg_catalog.clock_timestamp() - v_open
               -- an advisory lock: no API function takes one, and enough of them fill the server's lock table
               -- (one statement can take thousands), after which every session's next lock fails
               OR EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'))
    LOOP
        IF pg_catalog.pg_terminate_backend(r.pid) THEN
            role_name := r.usename; pid := r.pid; reason := r.reason; seconds := r.age;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION hotmesh.worker_watchdog()
RETURNS TABLE (role_name name, pid integer, reason text, seconds double precision)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- any live worker role may run it; it ends only sessions that break the rule above, whoever runs it
    IF NOT hotmesh._is_admin() AND cardinality(hotmesh._allowed_streams()) = 0 THEN
        RAISE EXCEPTION 'permission denied for this stream' USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT * FROM hotmesh._watchdog();
END
$$;

CREATE OR REPLACE FUNCTION hotmesh.caller_watchdog()
RETURNS TABLE (role_name name, pid integer, reason text, seconds double precision)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- any live caller role may run it; it ends only sessions that break the rule above, whoever runs it
    IF NOT hotmesh._is_admin() AND cardinality(hotmesh._allowed_streams()) = 0 THEN
        RAISE EXCEPTION 'permission denied for this stream' USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT * FROM hotmesh._watchdog();
END
$$;

-- ------------------------------------------------------------------------------------------------ admin: roles

-- One row per role that uses this schema (a member of hotmesh_worker or hotmesh_caller, or provisioned here):
-- its sessions, its oldest open transaction, and its queued messages and their stored bytes (calls it made,
-- waiting to be claimed).
CREATE OR REPLACE FUNCTION hotmesh._ops_roles()
RETURNS TABLE (role_name name, kind text, can_login boolean, connection_limit integer, sessions bigint,
               oldest_transaction_seconds double precision, queued bigint, queued_bytes bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    WITH scoped AS (
        SELECT r.oid, r.rolname, r.rolcanlogin, r.rolconnlimit,
               CASE WHEN pg_catalog.pg_has_role(r.oid, 'hotmesh_worker', 'MEMBER') THEN 'worker' ELSE 'caller' END
                   AS kind
        FROM pg_catalog.pg_roles r
        WHERE NOT r.rolsuper AND NOT pg_catalog.pg_has_role(r.oid, 'hotmesh_owner', 'MEMBER')
          AND (pg_catalog.pg_has_role(r.oid, 'hotmesh_worker', 'MEMBER')
               OR pg_catalog.pg_has_role(r.oid, 'hotmesh_caller', 'MEMBER'))
          AND r.rolname NOT IN ('hotmesh_worker', 'hotmesh_caller')
    ), queued AS (
        SELECT m.owner, count(*) AS n, sum(pg_catalog.pg_column_size(m.args)) AS bytes
        FROM hotmesh.messages m WHERE m.state = 'ready' AND m.owner IS NOT NULL GROUP BY m.owner
    )
    SELECT s.rolname, s.kind, s.rolcanlogin, s.rolconnlimit,
           (SELECT count(*) FROM pg_catalog.pg_stat_activity a WHERE a.usesysid = s.oid),
           (SELECT extract(epoch FROM now() - min(a.xact_start))::double precision
            FROM pg_catalog.pg_stat_activity a WHERE a.usesysid = s.oid),
           coalesce(q.n, 0), coalesce(q.bytes, 0)
    FROM scoped s LEFT JOIN queued q ON q.owner = s.rolname
    ORDER BY s.rolname
$$;
-- ------------------------------------------------------------------------------ kept for earlier definitions

-- Helpers of 001 that no definition here calls any more. A call that started before an upgrade committed runs the
-- earlier definition, which may call them (see the header), so they stay, as 001 last defined them: owner-only,
-- neither SECURITY DEFINER nor granted to anyone.

CREATE OR REPLACE FUNCTION hotmesh._valid_stream(p_stream text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
-- '+' and a length test, not '{1,200}': the bounded repetition costs ~20 us per match, on every call.
AS $$ SELECT p_stream IS NOT NULL AND length(p_stream) <= 200 AND p_stream ~ '^[A-Za-z0-9._:/-]+$' $$;

CREATE OR REPLACE FUNCTION hotmesh._plan_with_indexes() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_old text := pg_catalog.current_setting('enable_seqscan');  -- read first, then changed: in that order
BEGIN
    PERFORM pg_catalog.set_config('enable_seqscan', 'off', true);
    RETURN v_old;
END
$$;

CREATE OR REPLACE FUNCTION hotmesh._plan_restore(p_old text) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT FROM pg_catalog.set_config('enable_seqscan', p_old, true) $$;

-- ---------------------------------------------------------------------------------------------------- grants

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA hotmesh FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    hotmesh.worker_dequeue(text, text, integer, integer, text[], integer),
    hotmesh.worker_respond(text, bigint, uuid, jsonb, boolean),
    hotmesh.worker_respond_and_dequeue(text, text, bigint[], uuid[], jsonb[], boolean[], integer, integer, text[],
                                       integer),
    hotmesh.worker_fail(text, bigint, uuid, text, integer),
    hotmesh.worker_extend(text, bigint, uuid, integer),
    hotmesh.worker_progress(text, bigint, uuid, double precision, double precision, text),
    hotmesh.worker_release(text, bigint, uuid),
    hotmesh.worker_publish(text, text, jsonb),
    hotmesh.worker_register_tool(text, text, jsonb),
    hotmesh.worker_unregister_tool(text, text),
    hotmesh.worker_heartbeat(text[], text, integer),
    hotmesh.worker_goodbye(text),
    hotmesh.worker_purge(),
    hotmesh.worker_watchdog()
TO hotmesh_worker;

GRANT EXECUTE ON FUNCTION
    hotmesh.caller_tools(),
    hotmesh.caller_call(text, text, jsonb, integer, text),
    hotmesh.caller_call_many(text[], text[], jsonb[], integer[]),
    hotmesh.caller_result(uuid),
    hotmesh.caller_results(uuid[]),
    hotmesh.caller_cancel(uuid),
    hotmesh.caller_purge(),
    hotmesh.caller_stats(),
    hotmesh.caller_watchdog()
TO hotmesh_caller;

-- Every scoped function waits for a lock 2 s at most: a row another session holds (a caller's own call it keeps
-- locked, say) costs the waiting statement an error it can retry, never a hang. Set here, after every function
-- is (re)defined, each time this file runs: CREATE OR REPLACE drops a function's SET clauses (the catalog test
-- checks every function).
DO $timeouts$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'hotmesh'::regnamespace AND p.proname ~ '^(worker|caller)_'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET lock_timeout = %L', f.sig, '2s');
    END LOOP;
END
$timeouts$;

-- ------------------------------------------------------------------------------------------- tool definitions
-- What agents see is what an admin approved (tables in 005_tool_definitions.sql). A worker registers a definition
-- with worker_register_definition: the approved one again changes nothing; another one waits in tool_pending
-- for `mcp-hotmesh tools approve` while agents keep the approved one, unless the admin's setting approve_tools
-- is 0 (then it is live at once, as before approvals existed). A tool name belongs to one stream (tool_names):
-- a registration of a name another stream owns is refused at once, pending or not.

-- The metadata of a registration (title, annotations, icons, meta, timeout_ms), checked as untrusted input
-- after _check_tool (which bounds the size, depth and values of the whole registration).
CREATE OR REPLACE FUNCTION hotmesh._check_tool_metadata(p_tool jsonb) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb;
BEGIN
    v := p_tool -> 'title';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' AND (jsonb_typeof(v) <> 'string' OR length(v #>> '{}') > 200) THEN
        RAISE EXCEPTION 'tool title must be a string of at most 200 characters' USING ERRCODE = 'HM004';
    END IF;
    v := p_tool -> 'annotations';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
        IF jsonb_typeof(v) <> 'object'
           OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_each(v) e
                      WHERE NOT (e.key IN ('readOnlyHint', 'destructiveHint', 'idempotentHint', 'openWorldHint')
                                 AND jsonb_typeof(e.value) = 'boolean')
                        AND NOT (e.key = 'title' AND jsonb_typeof(e.value) = 'string'
                                 AND length(e.value #>> '{}') <= 200)) THEN
            RAISE EXCEPTION 'tool annotations must be an object of readOnlyHint, destructiveHint, idempotentHint, openWorldHint (true or false) and title'
                USING ERRCODE = 'HM004';
        END IF;
    END IF;
    v := p_tool -> 'icons';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' THEN
        IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) > 8
           OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(v) i(icon)
                      WHERE jsonb_typeof(i.icon) <> 'object'
                         OR jsonb_typeof(i.icon -> 'src') IS DISTINCT FROM 'string'
                         OR NOT (pg_catalog.starts_with(i.icon ->> 'src', 'https://')
                                 OR pg_catalog.starts_with(i.icon ->> 'src', 'data:image/'))
                         OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_object_keys(i.icon) k(key)
                                    WHERE k.key NOT IN ('src', 'mimeType', 'sizes', 'theme'))
                         OR (i.icon ? 'mimeType' AND (jsonb_typeof(i.icon -> 'mimeType') <> 'string'
                                                      OR length(i.icon ->> 'mimeType') > 100))
                         OR (i.icon ? 'theme' AND i.icon -> 'theme' NOT IN ('"light"', '"dark"'))
                         OR (i.icon ? 'sizes' AND (jsonb_typeof(i.icon -> 'sizes') <> 'array'
                             OR jsonb_array_length(i.icon -> 'sizes') > 8
                             OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(i.icon -> 'sizes') s(size)
                                        WHERE jsonb_typeof(s.size) <> 'string' OR length(s.size #>> '{}') > 20)))) THEN
            RAISE EXCEPTION 'tool icons must be at most 8 objects {src, mimeType, sizes, theme}, each src an https: URL or a data:image/ URI'
                USING ERRCODE = 'HM004';
        END IF;
    END IF;
    v := p_tool -> 'meta';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' AND jsonb_typeof(v) <> 'object' THEN
        RAISE EXCEPTION 'tool meta must be a JSON object' USING ERRCODE = 'HM004';
    END IF;
    v := p_tool -> 'timeout_ms';
    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null'
       AND (jsonb_typeof(v) <> 'number' OR (v #>> '{}') !~ '^[0-9]{1,10}$'
            OR (v #>> '{}')::bigint NOT BETWEEN 1 AND hotmesh._setting('max_timeout_ms')) THEN
        RAISE EXCEPTION 'tool timeout_ms must be a whole number of milliseconds from 1 to %',
            hotmesh._setting('max_timeout_ms') USING ERRCODE = 'HM004';
    END IF;
END
$$;

-- A registration in the one form definitions are compared and stored in: the keys agents see, nulls left out.
CREATE OR REPLACE FUNCTION hotmesh._tool_definition(p_tool jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
        'name', p_tool -> 'name', 'description', p_tool -> 'description', 'input_schema', p_tool -> 'input_schema',
        'output_schema', nullif(p_tool -> 'output_schema', 'null'::jsonb), 'title', nullif(p_tool -> 'title', 'null'::jsonb),
        'annotations', nullif(p_tool -> 'annotations', 'null'::jsonb), 'icons', nullif(p_tool -> 'icons', 'null'::jsonb),
        'meta', nullif(p_tool -> 'meta', 'null'::jsonb), 'timeout_ms', nullif(p_tool -> 'timeout_ms', 'null'::jsonb)))
$$;

-- The approved definition of (stream, workflow_name), in _tool_definition's form; NULL when there is none.
CREATE OR REPLACE FUNCTION hotmesh._tool_approved(p_stream text, p_workflow text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT hotmesh._tool_definition(pg_catalog.jsonb_build_object(
        'name', t.name, 'description', t.description, 'input_schema', t.input_schema, 'output_schema', t.output_schema,
        'title', t.title, 'annotations', t.annotations, 'icons', t.icons, 'meta', t.meta, 'timeout_ms', t.timeout_ms))
    FROM hotmesh.tools t WHERE t.stream = p_stream AND t.workflow_name = p_workflow
$$;

-- Refuses a name that belongs to another stream (reserved, or served by another tool), or that another tool of the
-- same stream serves: folded, so that case and - against _ tell no names apart.
CREATE OR REPLACE FUNCTION hotmesh._check_tool_name(p_stream text, p_workflow text, p_name text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_folded text := lower(replace(p_name, '-', '_'));
BEGIN
    IF EXISTS (SELECT 1 FROM hotmesh.tool_names n WHERE n.folded = v_folded AND n.stream <> p_stream)
       OR EXISTS (SELECT 1 FROM hotmesh.tools t
                  WHERE lower(replace(t.name, '-', '_')) = v_folded
                    AND (t.stream, t.workflow_name) IS DISTINCT FROM (p_stream, p_workflow)) THEN
        RAISE EXCEPTION 'another stream already serves a tool with this name or holds it reserved, or another tool of this stream has it (names differing only by case or - and _ count as one)'
            USING ERRCODE = 'HM004';
    END IF;
END
$$;

-- Make p_definition (checked, in _tool_definition's form) the live definition of (stream, workflow): its name
-- then belongs to the stream. p_approved_by: the admin who approved it, NULL when approval is off.
CREATE OR REPLACE FUNCTION hotmesh._tool_go_live(p_stream text, p_workflow text, p_definition jsonb,
                                                 p_registered_by name, p_approved_by name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := p_definition ->> 'name';
BEGIN
    PERFORM hotmesh._check_tool_name(p_stream, p_workflow, v_name);
    INSERT INTO hotmesh.tool_names (folded, name, stream) VALUES (lower(replace(v_name, '-', '_')), v_name, p_stream)
    ON CONFLICT (folded) DO NOTHING;
    INSERT INTO hotmesh.tools AS t (stream, workflow_name, name, description, input_schema, output_schema,
                                    registered_by, title, annotations, icons, meta, timeout_ms, approved_by, approved_at)
    VALUES (p_stream, p_workflow, v_name, p_definition ->> 'description', p_definition -> 'input_schema',
            p_definition -> 'output_schema', p_registered_by, p_definition ->> 'title', p_definition -> 'annotations',
            p_definition -> 'icons', p_definition -> 'meta', (p_definition ->> 'timeout_ms')::integer, p_approved_by,
            CASE WHEN p_approved_by IS NOT NULL THEN now() END)
    ON CONFLICT (stream, workflow_name) DO UPDATE SET
        name = excluded.name, description = excluded.description, input_schema = excluded.input_schema,
        output_schema = excluded.output_schema, registered_by = excluded.registered_by, title = excluded.title,
        annotations = excluded.annotations, icons = excluded.icons, meta = excluded.meta,
        timeout_ms = excluded.timeout_ms, approved_by = excluded.approved_by, approved_at = excluded.approved_at,
        updated_at = now();
    DELETE FROM hotmesh.tool_pending p WHERE p.stream = p_stream AND p.workflow_name = p_workflow;
    PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
END
$$;

-- Register the tool served on (stream, workflow_name): {"name", "description", "input_schema", "output_schema",
-- and optionally "title", "annotations", "icons", "meta", "timeout_ms"}, checked as untrusted input. Returns
-- 'unchanged' (the live definition), 'live' (approval is off: agents see it now) or 'pending' (it waits for an
-- admin; agents keep the approved definition, or see no tool yet).
CREATE OR REPLACE FUNCTION hotmesh.worker_register_definition(stream text, workflow_name text, tool jsonb)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
#variable_conflict use_column
DECLARE
    v_stream text := worker_register_definition.stream;
    v_workflow text := coalesce(worker_register_definition.workflow_name, '');
    v_definition jsonb;
BEGIN
    PERFORM hotmesh._authorize(v_stream);
    PERFORM hotmesh._check_tool(worker_register_definition.tool);
    PERFORM hotmesh._check_tool_metadata(worker_register_definition.tool);
    IF length(v_workflow) > 200 THEN
        RAISE EXCEPTION 'workflow name longer than 200 characters' USING ERRCODE = 'HM002';
    END IF;
    v_definition := hotmesh._tool_definition(worker_register_definition.tool);
    PERFORM hotmesh._check_tool_name(v_stream, v_workflow, v_definition ->> 'name');
    IF v_definition = hotmesh._tool_approved(v_stream, v_workflow) THEN
        DELETE FROM hotmesh.tool_pending p WHERE p.stream = v_stream AND p.workflow_name = v_workflow;
        RETURN 'unchanged';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM hotmesh.tools t WHERE t.stream = v_stream AND t.workflow_name = v_workflow)
       AND NOT EXISTS (SELECT 1 FROM hotmesh.tool_pending p WHERE p.stream = v_stream AND p.workflow_name = v_workflow)
       AND (SELECT count(*) FROM (SELECT t.workflow_name FROM hotmesh.tools t WHERE t.stream = v_stream
                                  UNION SELECT p.workflow_name FROM hotmesh.tool_pending p WHERE p.stream = v_stream) s)
           >= hotmesh._setting('max_tools_per_stream') THEN
        RAISE EXCEPTION 'this stream already has % tools, the most one stream may register',
            hotmesh._setting('max_tools_per_stream') USING ERRCODE = 'HM004';
    END IF;
    IF hotmesh._setting('approve_tools') = 0 THEN
        PERFORM hotmesh._tool_go_live(v_stream, v_workflow, v_definition, session_user, NULL);
        RETURN 'live';
    END IF;
    INSERT INTO hotmesh.tool_pending AS p (stream, workflow_name, name, definition, registered_by)
    VALUES (v_stream, v_workflow, v_definition ->> 'name', v_definition, session_user)
    ON CONFLICT (stream, workflow_name) DO UPDATE SET
        name = excluded.name, definition = excluded.definition, registered_by = excluded.registered_by,
        registered_at = now()
    WHERE p.definition IS DISTINCT FROM excluded.definition;
    RETURN 'pending';
END
$$;

-- The approved tools on the caller's allowed streams with their metadata (caller_tools' columns and more), with
-- how many live workers serve each; a tool's timeout capped by max_tool_timeout_ms.
CREATE OR REPLACE FUNCTION hotmesh.caller_tool_definitions()
RETURNS TABLE (stream text, workflow_name text, name text, description text, input_schema jsonb,
               output_schema jsonb, live_workers integer, title text, annotations jsonb, icons jsonb, meta jsonb,
               timeout_ms integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
#variable_conflict use_column
DECLARE
    v_admin boolean := hotmesh._is_admin();
    v_allowed text[] := hotmesh._allowed_streams();
    v_cap bigint := hotmesh._setting('max_tool_timeout_ms');
BEGIN
    RETURN QUERY
    SELECT t.stream, t.workflow_name, t.name, t.description, t.input_schema, t.output_schema,
           (SELECT count(*) FROM hotmesh.workers w WHERE w.stream = t.stream AND w.expires_at > now())::integer,
           t.title, t.annotations, t.icons, t.meta,
           CASE WHEN t.timeout_ms IS NOT NULL THEN least(t.timeout_ms, v_cap)::integer END  -- least() skips NULL
    FROM hotmesh.tools t
    WHERE v_admin OR t.stream = ANY (v_allowed)
    ORDER BY t.name;
END
$$;

-- Admin: approve what waits for (stream, workflow_name); returns the approved definition. An admin's own
-- definition (serve approves the tool set it was started with) goes the same way with p_definition given.
CREATE OR REPLACE FUNCTION hotmesh._tool_approve(p_stream text, p_workflow text, p_definition jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_definition jsonb;
    v_by name;
BEGIN
    IF p_definition IS NOT NULL THEN
        PERFORM hotmesh._check_tool(p_definition);
        PERFORM hotmesh._check_tool_metadata(p_definition);
        v_definition := hotmesh._tool_definition(p_definition);
        v_by := session_user;
        IF v_definition = hotmesh._tool_approved(p_stream, p_workflow) THEN
            RETURN v_definition;
        END IF;
    ELSE
        SELECT p.definition, p.registered_by INTO v_definition, v_by FROM hotmesh.tool_pending p
        WHERE p.stream = p_stream AND p.workflow_name = p_workflow FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no definition waits for approval on stream % (workflow %)', p_stream, p_workflow
                USING ERRCODE = 'HM005';
        END IF;
    END IF;
    PERFORM hotmesh._tool_go_live(p_stream, p_workflow, v_definition, v_by, session_user);
    RETURN v_definition;
END
$$;

REVOKE ALL ON FUNCTION hotmesh._check_tool_metadata(jsonb), hotmesh._tool_definition(jsonb),
    hotmesh._tool_approved(text, text), hotmesh._check_tool_name(text, text, text),
    hotmesh._tool_go_live(text, text, jsonb, name, name), hotmesh._tool_approve(text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hotmesh.worker_register_definition(text, text, jsonb) TO hotmesh_worker;
GRANT EXECUTE ON FUNCTION hotmesh.caller_tool_definitions() TO hotmesh_caller;

-- ---------------------------------------------------------------------------------- questions to the caller
-- A running handler asks the calling client a question: an elicitation (a form for the user) or a sampling
-- request (a completion from the client's model). The table is 006's `requests`: one row per call, the latest
-- question. The worker posts it while it holds the lease (worker_request) and reads the answer
-- (worker_request_answer); the gateway of the call's owner reads it (caller_request) and answers
-- (caller_answer). A question and its answer are hostile input to whoever reads them: bounded by
-- max_request_bytes and 16 levels here; what each kind may hold is checked by the gateway and by the worker.

-- The question or answer p_value: a JSON object no larger than max_request_bytes and no deeper than 16 levels.
CREATE OR REPLACE FUNCTION hotmesh._check_request(p_value jsonb, p_what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) <> 'object' THEN
        RAISE EXCEPTION '% must be a JSON object', p_what USING ERRCODE = 'HM002';
    END IF;
    IF octet_length(p_value::text) > coalesce(hotmesh._setting('max_request_bytes'), 65536) THEN
        RAISE EXCEPTION '% larger than % bytes', p_what, coalesce(hotmesh._setting('max_request_bytes'), 65536)
            USING ERRCODE = 'HM003';
    END IF;
    IF hotmesh._deeper_than(p_value, 16) THEN
        RAISE EXCEPTION '% nested deeper than 16 levels', p_what USING ERRCODE = 'HM003';
    END IF;
END
$$;

-- Post a question on a held message's call: only while the lease is held (NULL, and nothing written, once it was
-- lost), and only when no earlier question of the call waits for its answer (one pending question per call).
-- Returns the question's number; the caller is told (q:<call id>).
CREATE OR REPLACE FUNCTION hotmesh.worker_request(stream text, id bigint, lease uuid, kind text, request jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    m record;
    v_seq integer;
BEGIN
    PERFORM hotmesh._authorize(worker_request.stream);
    IF worker_request.kind IS NULL OR worker_request.kind NOT IN ('elicit', 'sample') THEN
        RAISE EXCEPTION 'a question is of kind elicit or sample' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._check_request(worker_request.request, 'question');
    SELECT msg.call_id, msg.owner INTO m FROM hotmesh.messages msg
    WHERE msg.id = worker_request.id AND msg.stream = worker_request.stream
      AND msg.state = 'reserved' AND msg.lease = worker_request.lease;
    IF NOT FOUND THEN
        RETURN NULL;  -- the lease is lost
    END IF;
    IF m.call_id IS NULL THEN
        RAISE EXCEPTION 'this message has no caller to ask (it was published, not called)' USING ERRCODE = 'HM002';
    END IF;
    INSERT INTO hotmesh.requests AS r (call_id, lease, kind, request)
    VALUES (m.call_id, worker_request.lease, worker_request.kind, worker_request.request)
    ON CONFLICT (call_id) DO UPDATE SET
        seq = r.seq + 1, lease = excluded.lease, kind = excluded.kind, request = excluded.request, response = NULL,
        asked_at = now(), answered_at = NULL
    WHERE r.response IS NOT NULL OR r.lease <> excluded.lease
    RETURNING r.seq INTO v_seq;
    IF v_seq IS NULL THEN
        RAISE EXCEPTION 'a question of this call is still waiting for its answer' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._notify_caller(m.owner, m.call_id, 'q');
    RETURN v_seq;
END
$$;

-- The answer to question seq of a held message's call: NULL while it is pending; HM001 once the lease is lost.
CREATE OR REPLACE FUNCTION hotmesh.worker_request_answer(stream text, id bigint, lease uuid, seq integer)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_call uuid;
    v_response jsonb;
BEGIN
    PERFORM hotmesh._authorize(worker_request_answer.stream);
    SELECT msg.call_id INTO v_call FROM hotmesh.messages msg
    WHERE msg.id = worker_request_answer.id AND msg.stream = worker_request_answer.stream
      AND msg.state = 'reserved' AND msg.lease = worker_request_answer.lease;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease lost' USING ERRCODE = 'HM001';
    END IF;
    SELECT r.response INTO v_response FROM hotmesh.requests r
    WHERE r.call_id = v_call AND r.seq = worker_request_answer.seq AND r.lease = worker_request_answer.lease;
    RETURN v_response;
END
$$;

-- The pending question of one of the caller's own running calls (no row: none, or not the caller's call).
CREATE OR REPLACE FUNCTION hotmesh.caller_request(call_id uuid)
RETURNS TABLE (seq integer, kind text, request jsonb, deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT r.seq, r.kind, r.request, m.deadline
    FROM hotmesh.requests r JOIN hotmesh.messages m ON m.call_id = r.call_id
    WHERE r.call_id = caller_request.call_id AND r.response IS NULL AND m.state = 'reserved' AND r.lease = m.lease
      AND (m.owner = session_user OR hotmesh._is_admin());
END
$$;

-- Which of several of the caller's own running calls have a pending question, in one statement: the gateway's
-- slow look for a NOTIFY it missed. Calls of other roles, and unknown ids, are left out.
CREATE OR REPLACE FUNCTION hotmesh.caller_requests(call_ids uuid[])
RETURNS TABLE (call_id uuid, seq integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_admin boolean := hotmesh._is_admin();
BEGIN
    IF coalesce(cardinality(caller_requests.call_ids), 0) > hotmesh._setting('max_batch') THEN
        RAISE EXCEPTION 'at most max_batch call ids' USING ERRCODE = 'HM002';
    END IF;
    RETURN QUERY
    SELECT r.call_id, r.seq
    FROM hotmesh.requests r JOIN hotmesh.messages m ON m.call_id = r.call_id
    WHERE r.call_id = ANY (caller_requests.call_ids) AND r.response IS NULL AND m.state = 'reserved'
      AND r.lease = m.lease AND (m.owner = session_user OR v_admin);
END
$$;

-- Answer question seq of one of the caller's own running calls; the worker is told (e:<message id> on the
-- stream's channel). False, and nothing written, when that question is not pending (answered, replaced, the call
-- ended) or the call is another role's.
CREATE OR REPLACE FUNCTION hotmesh.caller_answer(call_id uuid, seq integer, response jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    m record;
BEGIN
    PERFORM hotmesh._check_request(caller_answer.response, 'answer');
    SELECT msg.id, msg.stream, msg.lease INTO m FROM hotmesh.messages msg
    WHERE msg.call_id = caller_answer.call_id AND msg.state = 'reserved'
      AND (msg.owner = session_user OR hotmesh._is_admin());
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE hotmesh.requests r SET response = caller_answer.response, answered_at = now()
    WHERE r.call_id = caller_answer.call_id AND r.seq = caller_answer.seq AND r.response IS NULL
      AND r.lease = m.lease;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(m.stream), 'e:' || m.id::text);
    RETURN true;
END
$$;

REVOKE ALL ON FUNCTION
    hotmesh._check_request(jsonb, text),
    hotmesh.worker_request(text, bigint, uuid, text, jsonb),
    hotmesh.worker_request_answer(text, bigint, uuid, integer),
    hotmesh.caller_request(uuid),
    hotmesh.caller_requests(uuid[]),
    hotmesh.caller_answer(uuid, integer, jsonb)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    hotmesh.worker_request(text, bigint, uuid, text, jsonb),
    hotmesh.worker_request_answer(text, bigint, uuid, integer)
TO hotmesh_worker;
GRANT EXECUTE ON FUNCTION
    hotmesh.caller_request(uuid),
    hotmesh.caller_requests(uuid[]),
    hotmesh.caller_answer(uuid, integer, jsonb)
TO hotmesh_caller;
-- as every scoped function (the loop above ran before these were defined)
ALTER FUNCTION hotmesh.worker_request(text, bigint, uuid, text, jsonb) SET lock_timeout = '2s';
ALTER FUNCTION hotmesh.worker_request_answer(text, bigint, uuid, integer) SET lock_timeout = '2s';
ALTER FUNCTION hotmesh.caller_request(uuid) SET lock_timeout = '2s';
ALTER FUNCTION hotmesh.caller_requests(uuid[]) SET lock_timeout = '2s';
ALTER FUNCTION hotmesh.caller_answer(uuid, integer, jsonb) SET lock_timeout = '2s';

-- ------------------------------------------------------------------------------ identity: tokens and audit
-- A gateway serving several identities (`serve --identity-config`) asks, for each request, which identity a
-- bearer token is (by its sha256) and writes one audit row per call as the identity's own caller role. Granted to
-- every caller role: looking a token up needs the token itself (only its hash is stored), so a role learns nothing
-- it could not learn by using the token; an audit row names the role that wrote it (session_user, never the
-- writer's word), so a role can write rows only about itself. Defined after the grants above: revoked from
-- PUBLIC and given their lock_timeout here.

-- The name and caller role of an unrevoked token; no row for an unknown or revoked one. Any live caller role.
CREATE OR REPLACE FUNCTION hotmesh.caller_identity(token_hash bytea)
RETURNS TABLE (name text, role_name name)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
BEGIN
    IF NOT hotmesh._is_admin() AND cardinality(hotmesh._allowed_streams()) = 0 THEN
        RAISE EXCEPTION 'permission denied for this stream' USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT t.name, t.role_name FROM hotmesh.tokens t
        WHERE t.token_hash = caller_identity.token_hash AND t.revoked_at IS NULL;
END
$$;

-- Audit rows of calls session_user made (a JSON array of objects; at most max_audit_batch), then a bounded purge
-- of rows past audit_retention_ms. Returns the number written.
CREATE OR REPLACE FUNCTION hotmesh.caller_audit(records jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
DECLARE
    v_count integer;
BEGIN
    IF records IS NULL OR jsonb_typeof(records) <> 'array' THEN
        RAISE EXCEPTION 'audit records must be a JSON array' USING ERRCODE = 'HM002';
    END IF;
    IF jsonb_array_length(records) > hotmesh._setting('max_audit_batch') THEN
        RAISE EXCEPTION 'at most % audit records at once', hotmesh._setting('max_audit_batch') USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._check_size(records, 'audit records');
    INSERT INTO hotmesh.audit (at, identity, role_name, tool, call_id, outcome, duration_ms, args_bytes,
                               result_bytes, arguments)
    SELECT least(coalesce((r ->> 'at')::timestamptz, now()), now()),
           left(coalesce(r ->> 'identity', ''), 200), session_user, left(coalesce(r ->> 'tool', ''), 200),
           (r ->> 'call_id')::uuid, left(coalesce(r ->> 'outcome', ''), 40),
           greatest(coalesce((r ->> 'duration_ms')::double precision, 0), 0),
           greatest(coalesce((r ->> 'args_bytes')::integer, 0), 0),
           greatest(coalesce((r ->> 'result_bytes')::integer, 0), 0),
           r -> 'arguments'
    FROM jsonb_array_elements(records) AS r
    WHERE jsonb_typeof(r) = 'object';
    GET DIAGNOSTICS v_count = ROW_COUNT;
    DELETE FROM hotmesh.audit a WHERE a.id IN (
        SELECT o.id FROM hotmesh.audit o
        WHERE o.at < now() - make_interval(secs => hotmesh._setting('audit_retention_ms') / 1000.0)
        ORDER BY o.at LIMIT 1000 FOR UPDATE SKIP LOCKED);
    RETURN v_count;
EXCEPTION WHEN invalid_text_representation OR numeric_value_out_of_range OR datetime_field_overflow
          OR invalid_datetime_format THEN
    RAISE EXCEPTION 'invalid audit record' USING ERRCODE = 'HM002';
END
$$;

REVOKE ALL ON FUNCTION hotmesh.caller_identity(bytea), hotmesh.caller_audit(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hotmesh.caller_identity(bytea), hotmesh.caller_audit(jsonb) TO hotmesh_caller;

-- ---------------------------------------------------------------------- scaling out: wake one worker, not all
--
-- A worker process announces all its streams in one statement (worker_alive) and looks for work missed by
-- NOTIFY in one statement (worker_pending), whatever the number of its topics. A new call wakes, of each role
-- serving its stream and workflow, one live consumer that listens (not parked: see the parking section), in
-- turn, on the channel of that consumer's process (_consumer_channel); the payload names the stream's channel.
-- Only that process hears it. Before, every worker on a stream heard every call and raced to claim it
-- (measured: 4.7 claims per call with 16 processes). Consumers that heartbeat the earlier way
-- (worker_heartbeat: no workflows recorded) listen on the stream's channel only, and are woken there, as before.

-- The channel one worker process (one consumer id) listens on for its wake-ups: a hash, as the id names a host.
CREATE OR REPLACE FUNCTION hotmesh._wake_token(p_consumer text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT left(md5(p_consumer), 16) $$;

CREATE OR REPLACE FUNCTION hotmesh._consumer_channel(p_consumer text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'hotmesh_c_' || hotmesh._wake_token(p_consumer) $$;

-- Wake the live listening consumers of p_stream that serve one of p_workflows for p_count new calls whose first
-- id is p_seed: the consumers of each role take turns, each woken for wake_batch consecutive calls (4), so that
-- a busy stream's calls spread over its workers while each still claims, and answers, several in one statement
-- (one consumer per call cost a claim and an answer each: 0.65x the calls per second of one process with 16
-- processes on two cores). Each role's own turns: another role allowed the same stream cannot draw this role's
-- wake-ups to a process that never claims. With none known, every listener is woken ('').
-- A consumer woken for work it cannot take at once (all its handlers busy) claims it when one is free; one that
-- died without saying goodbye is woken until its heartbeat expires, and the fallback poll of the others
-- (worker_pending) finds its calls meanwhile.
CREATE OR REPLACE FUNCTION hotmesh._wake_workers(p_stream text, p_workflows text[], p_count bigint, p_seed bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_channel text := hotmesh._worker_channel(p_stream);
    v_batch bigint := greatest(coalesce(hotmesh._setting('wake_batch'), 1), 1);
    v_first bigint := coalesce(p_seed, 0) / v_batch;
    v_turns bigint := greatest((coalesce(p_seed, 0) + greatest(coalesce(p_count, 1), 1) - 1) / v_batch - v_first + 1, 1);
    v_woken bigint;
BEGIN
    WITH live AS (
        SELECT w.consumer, w.workflows IS NULL AS earlier,
               row_number() OVER (PARTITION BY w.role_name ORDER BY w.consumer) - 1 AS i,
               count(*) OVER (PARTITION BY w.role_name) AS n
        FROM hotmesh.workers w
        WHERE w.stream = p_stream AND w.expires_at > now() AND NOT w.parked
          AND (w.workflows IS NULL OR w.workflows && p_workflows)
    )
    SELECT count(CASE WHEN l.earlier THEN pg_catalog.pg_notify(v_channel, '')
                      ELSE pg_catalog.pg_notify(hotmesh._consumer_channel(l.consumer), v_channel) END)
    INTO v_woken
    FROM live l
    WHERE (l.i - v_first % l.n + l.n) % l.n < v_turns;
    IF v_woken = 0 THEN
        PERFORM pg_catalog.pg_notify(v_channel, '');
    END IF;
END
$$;

-- Raise unless session_user may use every stream of p_streams (as _authorize, for many streams in one query:
-- the allow-list is read once and matched by hash, not once per stream).
CREATE OR REPLACE FUNCTION hotmesh._authorize_all(p_streams text[]) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_invalid boolean := EXISTS (SELECT 1 FROM unnest(p_streams) AS s(stream)
                                 WHERE s.stream IS NULL OR length(s.stream) > 200
                                    OR s.stream !~ '^[A-Za-z0-9._:/-]+$');
BEGIN
    IF hotmesh._is_admin() THEN
        IF v_invalid THEN
            RAISE EXCEPTION 'invalid stream name' USING ERRCODE = 'HM002';
        END IF;
        RETURN;
    END IF;
    IF v_invalid OR EXISTS (
        SELECT 1 FROM unnest(p_streams) AS s(stream)
        WHERE NOT EXISTS (SELECT 1 FROM unnest(hotmesh._allowed_streams()) AS a(stream) WHERE a.stream = s.stream))
    THEN
        RAISE EXCEPTION 'permission denied for this stream' USING ERRCODE = '42501';
    END IF;
END
$$;

-- What a worker process names itself by in one statement for all its streams: a consumer id of 1 to 200
-- characters and at most 10,000 streams.
CREATE OR REPLACE FUNCTION hotmesh._check_process(p_consumer text, p_streams text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_consumer IS NULL OR length(p_consumer) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'HM002';
    END IF;
    IF coalesce(cardinality(p_streams), 0) > 10000 THEN
        RAISE EXCEPTION 'too many streams' USING ERRCODE = 'HM002';
    END IF;
END
$$;

-- A worker process says it is live, for every stream it consumes, in one statement: streams[i] served with the
-- workflow names workflows[i] (a JSON array of arrays of strings; NULL: any). Otherwise as worker_heartbeat:
-- gateways count live workers per stream, a role announces at most max_consumers_per_stream consumers per
-- stream, long-expired rows are cleaned up skipping rows another session holds.
CREATE OR REPLACE FUNCTION hotmesh.worker_alive(consumer text, ttl_ms integer, streams text[], workflows jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
#variable_conflict use_column
DECLARE
    v_ttl interval := make_interval(secs => least(greatest(coalesce(ttl_ms, 0), 1000),
                                                  hotmesh._setting('max_worker_ttl_ms')) / 1000.0);
    v_max bigint := hotmesh._setting('max_consumers_per_stream');
    v_new text[];
BEGIN
    PERFORM hotmesh._check_process(consumer, streams);
    IF workflows IS NOT NULL AND (jsonb_typeof(workflows) <> 'array'
                                  OR jsonb_array_length(workflows) <> coalesce(cardinality(streams), 0)
                                  OR octet_length(workflows::text) > hotmesh._setting('max_payload_bytes')) THEN
        RAISE EXCEPTION 'workflows must be one array of names per stream' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._authorize_all(streams);
    WITH given AS (
        SELECT DISTINCT ON (s.stream) s.stream,
               CASE WHEN worker_alive.workflows IS NULL THEN NULL
                    ELSE ARRAY(SELECT jsonb_array_elements_text(worker_alive.workflows -> (s.ord::integer - 1)))
               END AS names
        FROM unnest(streams) WITH ORDINALITY AS s(stream, ord)
        ORDER BY s.stream, s.ord
    ), upserted AS (
        INSERT INTO hotmesh.workers AS w (stream, consumer, role_name, expires_at, workflows)
        SELECT g.stream, worker_alive.consumer, session_user, now() + v_ttl, g.names FROM given g
        ON CONFLICT (stream, consumer) DO UPDATE SET expires_at = excluded.expires_at, workflows = excluded.workflows
        WHERE w.role_name = session_user
        RETURNING w.stream, (xmax = 0) AS new
    )
    SELECT array_agg(u.stream) FILTER (WHERE u.new) INTO v_new FROM upserted u;
    IF v_new IS NOT NULL THEN
        -- new consumers: within the role's bound on each stream (see worker_heartbeat)
        IF EXISTS (SELECT 1 FROM unnest(v_new) AS n(stream)
                   WHERE (SELECT count(*) FROM (SELECT 1 FROM hotmesh.workers o
                                               WHERE o.stream = n.stream AND o.role_name = session_user
                                               LIMIT v_max + 1) c) > v_max) THEN
            RAISE EXCEPTION 'at most % consumers of one role per stream', v_max USING ERRCODE = 'HM006';
        END IF;
        PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
    END IF;
    PERFORM hotmesh._forget_expired_workers();
    RETURN coalesce(cardinality(streams), 0);
END
$$;

-- The fallback poll of a worker process: which of its streams have work now (a ready message that is due, or a
-- lease that expired), in one statement whatever their number. Only names come back, never a message; the
-- worker then claims on those streams as usual. Planned with indexes only, as worker_dequeue.
CREATE OR REPLACE FUNCTION hotmesh.worker_pending(streams text[])
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' SET enable_seqscan = off
AS $$
BEGIN
    IF coalesce(cardinality(streams), 0) > 10000 THEN
        RAISE EXCEPTION 'too many streams' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._authorize_all(streams);
    RETURN QUERY
    SELECT DISTINCT s.stream FROM unnest(streams) AS s(stream)
    WHERE EXISTS (SELECT 1 FROM hotmesh.messages m
                  WHERE m.stream = s.stream AND m.state = 'ready' AND m.visible_at <= now())
       OR EXISTS (SELECT 1 FROM hotmesh.messages m
                  WHERE m.stream = s.stream AND m.state = 'reserved' AND m.lease_expires_at <= now());
END
$$;

-- Register many tools in one statement and one commit, each as worker_register_definition registers it (a
-- worker process of 1,000 topics starting: one commit, not 1,000; measured 11.8 s to start before, one by one).
-- Any refused tool refuses them all, and nothing is written. Returns each tool's state, in order: 'unchanged',
-- 'live' or 'pending' (it waits for an admin's approval).
CREATE OR REPLACE FUNCTION hotmesh.worker_register_tools(streams text[], workflow_names text[], tools jsonb[])
RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
DECLARE
    v_count integer := coalesce(cardinality(streams), 0);
    v_states text[] := '{}';
BEGIN
    IF v_count > 10000 OR coalesce(cardinality(workflow_names), 0) <> v_count
       OR coalesce(cardinality(tools), 0) <> v_count THEN
        RAISE EXCEPTION 'streams, workflow_names and tools must be arrays of one length, at most 10000'
            USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._authorize_all(streams);
    FOR i IN 1 .. v_count LOOP
        v_states := v_states || hotmesh.worker_register_definition(streams[i], workflow_names[i], tools[i]);
    END LOOP;
    RETURN v_states;
END
$$;

REVOKE ALL ON FUNCTION
    hotmesh._check_process(text, text[]),
    hotmesh._wake_token(text),
    hotmesh._consumer_channel(text),
    hotmesh._wake_workers(text, text[], bigint, bigint),
    hotmesh._authorize_all(text[]),
    hotmesh.worker_alive(text, integer, text[], jsonb),
    hotmesh.worker_pending(text[]),
    hotmesh.worker_register_tools(text[], text[], jsonb[])
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    hotmesh.worker_alive(text, integer, text[], jsonb),
    hotmesh.worker_pending(text[]),
    hotmesh.worker_register_tools(text[], text[], jsonb[])
TO hotmesh_worker;

-- ------------------------------------------------------------------------------------------ long-running calls
-- A call ends 'cancelled' or 'expired' (007) rather than dead: stopping a call is no failure. A task is a call:
-- its id is the call id, its state the call's row, visible only to the role that made it.

-- Whether message p_id of p_stream ended (cancelled or expired) while held under p_lease: the worker holding it
-- is told to stop, and its late answer is taken and dropped instead of counting as a lost lease.
CREATE OR REPLACE FUNCTION hotmesh._ended_under(p_stream text, p_id bigint, p_lease uuid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM hotmesh.messages m
                   WHERE m.id = p_id AND m.stream = p_stream AND m.lease = p_lease
                     AND m.state IN ('cancelled', 'expired'))
$$;

-- caller_call for a call that outlives its request (an MCP task): the same enqueue, committed durably, so the
-- call exists before its id is handed out (caller_call commits asynchronously: a crash may lose a call nobody
-- was told about yet, never one a client holds the id of).
CREATE OR REPLACE FUNCTION hotmesh.caller_call_durable(
    stream text, workflow_name text, args jsonb, timeout_ms integer)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
DECLARE
    v_call_id uuid;
BEGIN
    PERFORM hotmesh._authorize(caller_call_durable.stream);  -- caller_call checks it again, as session_user
    v_call_id := hotmesh.caller_call(caller_call_durable.stream, caller_call_durable.workflow_name,
                                     caller_call_durable.args, caller_call_durable.timeout_ms, NULL);
    SET LOCAL synchronous_commit = on;  -- after caller_call's SET LOCAL off: the commit waits for the WAL flush
    RETURN v_call_id;
END
$$;

-- One of the caller's own calls as a task or a keep-alive sees it: its state and answer, when it was made,
-- started and last changed, its deadline, and while queued how many calls of its stream are ahead of it
-- (counted up to 1000: the count costs what it counts). Another role's call, or none: no row.
CREATE OR REPLACE FUNCTION hotmesh.caller_call_status(call_id uuid)
RETURNS TABLE (state text, result jsonb, is_error boolean, error text, progress double precision,
               progress_total double precision, progress_message text, created_at timestamptz,
               started_at timestamptz, finished_at timestamptz, deadline timestamptz, ahead integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
#variable_conflict use_column
DECLARE
    r hotmesh.messages%ROWTYPE;
BEGIN
    SELECT m.* INTO r FROM hotmesh.messages m
    WHERE m.call_id = caller_call_status.call_id AND (m.owner = session_user OR hotmesh._is_admin());
    IF NOT FOUND THEN
        RETURN;
    END IF;
    state := r.state; result := r.result; is_error := r.is_error; error := r.error; progress := r.progress;
    progress_total := r.progress_total; progress_message := r.progress_message; created_at := r.created_at;
    started_at := r.started_at; finished_at := r.finished_at; deadline := r.deadline;
    IF r.state = 'ready' THEN
        SELECT count(*)::integer INTO ahead FROM (
            SELECT 1 FROM hotmesh.messages q
            WHERE q.stream >= r.stream AND q.stream <= r.stream AND q.state = 'ready' AND q.id < r.id
            LIMIT 1000) AS q;
    END IF;
    RETURN NEXT;
END
$$;

REVOKE ALL ON FUNCTION hotmesh._ended_under(text, bigint, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION hotmesh.caller_call_durable(text, text, jsonb, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION hotmesh.caller_call_status(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    hotmesh.caller_call_durable(text, text, jsonb, integer),
    hotmesh.caller_call_status(uuid)
TO hotmesh_caller;

-- ------------------------------------------------------------------- parking: idle processes stop listening
--
-- PostgreSQL 18 and earlier signal every session of the database that LISTENs at each commit that sent a
-- NOTIFY, whatever the channel, and each signalled session runs a transaction to read the notification queue
-- (PostgreSQL 19 signals only the sessions listening on the channel). Measured on 2 cores: 16 worker processes
-- on one stream ran 5.9 transactions per call instead of 1.6 with one process, and 15 idle sessions listening
-- on an unrelated channel alone cost a stream 0.62x of its calls per second. So a worker process that is not
-- needed stops listening ("parks", worker_park, migration 009): new calls do not wake it (_wake_workers), and it
-- asks again about every second whether it is needed. On each of its streams, a process is needed while the
-- live listening consumers of its role with lower ids (serving every workflow it serves there) have fewer
-- handlers (capacity) than twice the stream's calls waiting or running (once, for a parked one: it listens
-- again when they have fewer than the calls), or none; and while a call has waited park_backlog_ms (1 s)
-- without a worker, or a lease expired (a consumer that died without saying goodbye). So the first live
-- consumer of each role always listens, and the processes that listen are the first ones, as many as the load
-- needs twice over: a process woken in its turn while its handlers are all busy keeps that call waiting (1.5
-- times the load left 2 of 4 processes listening, and 0.7x the calls per second of 4 listening).

-- A worker process parks (park: it stops listening) or listens again (not park), for all its streams at once,
-- and says how many handlers it runs at once (capacity). Only its own rows change. Returns whether it is parked
-- now: asked to park while it is needed (see above), it is told to listen.
CREATE OR REPLACE FUNCTION hotmesh.worker_park(consumer text, streams text[], park boolean, capacity integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_backlog interval := make_interval(
        secs => greatest(coalesce(hotmesh._setting('park_backlog_ms'), 1000), 0) / 1000.0);
    v_capacity integer := least(greatest(coalesce(worker_park.capacity, 1), 1), 100000);
    v_parked boolean := coalesce(worker_park.park, false);
BEGIN
    PERFORM hotmesh._check_process(consumer, streams);
    PERFORM hotmesh._authorize_all(streams);
    IF v_parked THEN
        v_parked := EXISTS (
            SELECT 1 FROM hotmesh.workers me
            WHERE me.stream = ANY (worker_park.streams) AND me.consumer = worker_park.consumer
              AND me.role_name = session_user
        ) AND NOT EXISTS (
            SELECT 1
            FROM hotmesh.workers me
            CROSS JOIN LATERAL (  -- calls counted up to 1,000 each way: a role's statement stays bounded
                SELECT (SELECT coalesce(sum(coalesce(o.capacity, 1)), 0) FROM hotmesh.workers o
                        WHERE o.stream = me.stream AND o.role_name = session_user AND o.consumer < me.consumer
                          AND o.expires_at > now() AND NOT o.parked AND o.workflows @> me.workflows) AS lower,
                       (SELECT count(*) FROM (SELECT 1 FROM hotmesh.messages m
                                              WHERE m.stream >= me.stream AND m.stream <= me.stream
                                                AND m.state = 'ready' AND m.visible_at <= now()
                                              LIMIT 1000) q)
                     + (SELECT count(*) FROM (SELECT 1 FROM hotmesh.messages m
                                              WHERE m.stream = me.stream AND m.state = 'reserved'
                                              LIMIT 1000) q) AS load
            ) x
            WHERE me.stream = ANY (worker_park.streams) AND me.consumer = worker_park.consumer
              AND me.role_name = session_user
              AND (x.lower = 0 OR x.lower < x.load * CASE WHEN me.parked THEN 1 ELSE 2 END
                   OR me.workflows IS NULL
                   OR EXISTS (SELECT 1 FROM hotmesh.messages m
                              WHERE m.stream >= me.stream AND m.stream <= me.stream AND m.state = 'ready'
                                AND m.visible_at <= now() - v_backlog
                                AND m.workflow_name = ANY (me.workflows))
                   OR EXISTS (SELECT 1 FROM hotmesh.messages m
                              WHERE m.stream = me.stream AND m.state = 'reserved' AND m.lease_expires_at <= now())));
    END IF;
    UPDATE hotmesh.workers w SET parked = v_parked, capacity = v_capacity
    WHERE w.stream = ANY (worker_park.streams) AND w.consumer = worker_park.consumer
      AND w.role_name = session_user
      AND (w.parked <> v_parked OR w.capacity IS DISTINCT FROM v_capacity);
    RETURN v_parked;
END
$$;

REVOKE ALL ON FUNCTION hotmesh.worker_park(text, text[], boolean, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hotmesh.worker_park(text, text[], boolean, integer) TO hotmesh_worker;
