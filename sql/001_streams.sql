-- mcp-hotmesh SQL API v1: tables, authorization and the SECURITY DEFINER functions.
--
-- Runs as hotmesh_owner (mcp_hotmesh.migrate sets the role). Every function:
--   * is SECURITY DEFINER with search_path pinned to pg_catalog, pg_temp, every object schema-qualified;
--   * checks its stream against the allow-list of SESSION_USER, read from the role's *stored* setting
--     app.allowed_streams in pg_db_role_setting (never current_setting(): any session can SET it);
--   * is executable only by the group role of its kind (hotmesh_worker / hotmesh_caller), never PUBLIC.
-- A denied call raises SQLSTATE 42501 and says nothing about whether the stream exists.
--
-- Our own SQLSTATEs (class HM):
--   HM001 lease lost    HM002 invalid name    HM003 payload too large
--   HM004 tool refused  HM005 not found
--
-- Message life: ready -> reserved (lease) -> done
--               reserved -> ready again (worker_fail with a retry, or lease expired: reclaims + 1)
--               any -> dead (attempts or reclaims used up, deadline passed, cancelled); the caller's
--               error answer is written in the same statement and the caller is notified.
-- NOTIFY payloads carry ids only; channels are named by hashes of stream or owner, so any stream name fits.

-- ------------------------------------------------------------------------------------------------ tables

CREATE TABLE IF NOT EXISTS hotmesh.settings (
    key    text PRIMARY KEY,
    value  bigint NOT NULL
);
INSERT INTO hotmesh.settings (key, value) VALUES
    ('min_lease_ms',        1000),      -- a worker's lease_ms is clamped to [min_lease_ms, max_lease_ms]
    ('max_lease_ms',        3600000),
    ('max_batch',           1000),      -- most messages one worker_dequeue claims
    ('max_payload_bytes',   1048576),   -- arguments and results, as JSON text
    ('max_schema_bytes',    262144),    -- one tool's registration
    ('max_error_chars',     8000),
    ('max_timeout_ms',      86400000),  -- a call's deadline is at most this far away
    ('max_attempts',        1000),      -- worker_fail dead-letters past this, whatever the worker asks
    ('max_worker_ttl_ms',   600000)     -- a worker heartbeat counts for at most this long
ON CONFLICT (key) DO NOTHING;

CREATE TABLE IF NOT EXISTS hotmesh.messages (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream            text NOT NULL,
    workflow_name     text NOT NULL DEFAULT '',
    args              jsonb NOT NULL,
    state             text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'reserved', 'done', 'dead')),
    call_id           uuid UNIQUE,                -- null for fire-and-forget messages (worker_publish)
    owner             name,                       -- session_user of the caller who made the call
    idempotency_key   text,
    attempt           integer NOT NULL DEFAULT 0, -- failed attempts so far
    reclaims          integer NOT NULL DEFAULT 0, -- leases that expired without an answer
    visible_at        timestamptz NOT NULL DEFAULT now(),
    deadline          timestamptz,
    lease             uuid,
    consumer          text,
    lease_expires_at  timestamptz,
    cancel_requested  boolean NOT NULL DEFAULT false,
    result            jsonb,
    is_error          boolean NOT NULL DEFAULT false,
    error             text,
    progress          double precision,
    progress_total    double precision,
    progress_message  text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
) WITH (fillfactor = 70);

-- The claim reads this index in id order; only ready rows are in it.
CREATE INDEX IF NOT EXISTS messages_ready ON hotmesh.messages (stream, id) WHERE state = 'ready';
-- Reclaim looks for stored lease expiries in the past.
CREATE INDEX IF NOT EXISTS messages_leased ON hotmesh.messages (stream, lease_expires_at) WHERE state = 'reserved';
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON hotmesh.messages (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_finished ON hotmesh.messages (stream, finished_at) WHERE state IN ('done', 'dead');

CREATE TABLE IF NOT EXISTS hotmesh.tools (
    stream          text NOT NULL,
    workflow_name   text NOT NULL DEFAULT '',
    name            text NOT NULL UNIQUE,
    description     text NOT NULL,
    input_schema    jsonb NOT NULL,
    output_schema   jsonb,
    registered_by   name NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, workflow_name)
);

CREATE TABLE IF NOT EXISTS hotmesh.workers (
    stream      text NOT NULL,
    consumer    text NOT NULL,
    role_name   name NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (stream, consumer)
);

-- Roles provisioned by mcp-hotmesh, for `mcp-hotmesh roles`. Authorization never reads it: the allow-list
-- is the role's stored app.allowed_streams, so roles made by hand work the same.
CREATE TABLE IF NOT EXISTS hotmesh.roles (
    role_name   name PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('worker', 'caller')),
    streams     text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    rotated_at  timestamptz,
    revoked_at  timestamptz
);

-- ------------------------------------------------------------------------------------ internal helpers
-- Not SECURITY DEFINER, not executable by anyone but the owner: only the API functions below call them.

CREATE OR REPLACE FUNCTION hotmesh._setting(p_key text) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT value FROM hotmesh.settings WHERE key = p_key $$;

CREATE OR REPLACE FUNCTION hotmesh._is_admin() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.rolsuper OR pg_catalog.pg_has_role(session_user, 'hotmesh_owner', 'MEMBER')
    FROM pg_catalog.pg_roles r WHERE r.rolname = session_user
$$;

-- The stored allow-list of session_user: a database-specific setting wins over a role-wide one.
CREATE OR REPLACE FUNCTION hotmesh._allowed_streams() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(btrim(item)) FILTER (WHERE btrim(item) <> ''), '{}')
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
$$;

CREATE OR REPLACE FUNCTION hotmesh._valid_stream(p_stream text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
-- '+' and a length test, not '{1,200}': the bounded repetition costs ~20 us per match, on every call.
AS $$ SELECT p_stream IS NOT NULL AND length(p_stream) <= 200 AND p_stream ~ '^[A-Za-z0-9._:/-]+$' $$;

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

CREATE OR REPLACE FUNCTION hotmesh._check_size(p_value jsonb, p_what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF octet_length(p_value::text) > hotmesh._setting('max_payload_bytes') THEN
        RAISE EXCEPTION '% larger than % bytes', p_what, hotmesh._setting('max_payload_bytes')
            USING ERRCODE = 'HM003';
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

-- ---------------------------------------------------------------------------------- worker functions

-- Plans of statements inside functions are cached per session, and a generic plan made while the table was
-- small (a fresh install, the first minute before autovacuum's first ANALYZE) is a sequential scan that stays
-- in use while the table grows: measured, a 16-call read took 1.6 ms at 3,300 rows and kept growing. The hot
-- functions therefore plan with enable_seqscan off (every lookup they make has an index), set for the
-- transaction by _plan_with_indexes() and given back by _plan_restore() before they return.
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
            state = CASE WHEN expired.dies THEN 'dead' ELSE 'ready' END,
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
    FROM moved WHERE moved.state = 'dead' AND moved.owner IS NOT NULL AND moved.call_id IS NOT NULL;

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
            state = CASE WHEN c.late THEN 'dead' ELSE 'reserved' END,
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
        FROM claimed d WHERE d.state = 'dead' AND d.owner IS NOT NULL AND d.call_id IS NOT NULL
    )
    SELECT c.id, c.lease, c.workflow_name, c.args, c.attempt, c.reclaims, c.deadline
    FROM claimed c CROSS JOIN told
    WHERE c.state = 'reserved'
    ORDER BY c.id;
END
$$;

CREATE OR REPLACE FUNCTION hotmesh.worker_dequeue(
    stream text, consumer text, batch integer, lease_ms integer,
    workflows text[] DEFAULT NULL, reclaim_count integer DEFAULT 3)
RETURNS TABLE (id bigint, lease uuid, workflow_name text, args jsonb, attempt integer, reclaims integer,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_seqscan text;
BEGIN
    PERFORM hotmesh._authorize(worker_dequeue.stream);
    -- A claim alone may be lost in a server crash: the message is then simply ready again (at least once, as
    -- with an expired lease), and the claimant's connection is gone with the crash anyway. So its commit does
    -- not wait for the WAL flush; the answer's commit (worker_respond), which flushes everything before it,
    -- does. Claims are the step every call takes with nothing to lose.
    SET LOCAL synchronous_commit = off;
    v_seqscan := hotmesh._plan_with_indexes();
    RETURN QUERY SELECT * FROM hotmesh._claim(worker_dequeue.stream, worker_dequeue.consumer, worker_dequeue.batch,
                                              worker_dequeue.lease_ms, worker_dequeue.workflows,
                                              worker_dequeue.reclaim_count);
    PERFORM hotmesh._plan_restore(v_seqscan);
END
$$;

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
    IF NOT FOUND THEN
        RETURN false;
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
-- is durable.
CREATE OR REPLACE FUNCTION hotmesh.worker_respond_and_dequeue(
    stream text, consumer text, ids bigint[], leases uuid[], results jsonb[], is_errors boolean[],
    batch integer, lease_ms integer, workflows text[] DEFAULT NULL, reclaim_count integer DEFAULT 3)
RETURNS TABLE (kind text, id bigint, lease uuid, workflow_name text, args jsonb, attempt integer, reclaims integer,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_count integer := coalesce(cardinality(worker_respond_and_dequeue.ids), 0);
    v_max_bytes bigint := hotmesh._setting('max_payload_bytes');
    v_seqscan text;
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
    ELSIF EXISTS (SELECT 1 FROM unnest(worker_respond_and_dequeue.results) AS a(result)
                  WHERE octet_length(a.result::text) > v_max_bytes) THEN
        RAISE EXCEPTION 'result larger than % bytes', v_max_bytes USING ERRCODE = 'HM003';
    END IF;
    v_seqscan := hotmesh._plan_with_indexes();
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
    PERFORM hotmesh._plan_restore(v_seqscan);
END
$$;

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
        state = CASE WHEN worker_fail.retry_in_ms IS NULL OR m.cancel_requested
                          OR m.attempt + 1 >= hotmesh._setting('max_attempts')
                          OR v_retry_at >= m.deadline
                     THEN 'dead' ELSE 'ready' END,
        attempt = m.attempt + 1,
        visible_at = v_retry_at,
        lease = NULL, consumer = NULL, lease_expires_at = NULL,
        is_error = true,
        error = CASE WHEN m.cancel_requested THEN 'cancelled by the caller' ELSE v_error END
    WHERE m.id = worker_fail.id AND m.stream = worker_fail.stream
      AND m.state = 'reserved' AND m.lease = worker_fail.lease
    RETURNING m.state, m.owner, m.call_id INTO r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF r.state = 'dead' THEN
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
    RETURN v_cancel;  -- NULL when no row matched: the lease is lost
END
$$;

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

-- A new fire-and-forget message on an allowed stream (readonly workers publish but never consume).
CREATE OR REPLACE FUNCTION hotmesh.worker_publish(stream text, workflow_name text, args jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    PERFORM hotmesh._authorize(worker_publish.stream);
    PERFORM hotmesh._check_size(worker_publish.args, 'arguments');
    IF worker_publish.args IS NULL THEN
        RAISE EXCEPTION 'arguments must not be null' USING ERRCODE = 'HM002';
    END IF;
    INSERT INTO hotmesh.messages (stream, workflow_name, args)
    VALUES (worker_publish.stream, left(coalesce(worker_publish.workflow_name, ''), 200), worker_publish.args)
    RETURNING messages.id INTO v_id;
    PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(worker_publish.stream), '');
    RETURN v_id;
END
$$;

-- Upsert the tool served on (stream, workflow_name): {"name", "description", "input_schema", "output_schema"}.
CREATE OR REPLACE FUNCTION hotmesh.worker_register_tool(stream text, workflow_name text, tool jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_name text := CASE WHEN jsonb_typeof(tool -> 'name') = 'string' THEN tool ->> 'name' END;  -- not 7 -> '7'
    v_workflow text := coalesce(worker_register_tool.workflow_name, '');
BEGIN
    PERFORM hotmesh._authorize(worker_register_tool.stream);
    IF tool IS NULL OR jsonb_typeof(tool) <> 'object' THEN
        RAISE EXCEPTION 'tool must be a JSON object' USING ERRCODE = 'HM004';
    END IF;
    IF octet_length(tool::text) > hotmesh._setting('max_schema_bytes') THEN
        RAISE EXCEPTION 'tool registration larger than % bytes', hotmesh._setting('max_schema_bytes')
            USING ERRCODE = 'HM003';
    END IF;
    IF v_name IS NULL OR v_name !~ '^[A-Za-z0-9_-]{1,64}$' THEN
        RAISE EXCEPTION 'tool name must match ^[A-Za-z0-9_-]{1,64}$' USING ERRCODE = 'HM004';
    END IF;
    IF length(v_workflow) > 200 THEN
        RAISE EXCEPTION 'workflow name longer than 200 characters' USING ERRCODE = 'HM002';
    END IF;
    IF jsonb_typeof(tool -> 'description') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'tool description must be a string' USING ERRCODE = 'HM004';
    END IF;
    IF jsonb_typeof(tool -> 'input_schema') IS DISTINCT FROM 'object'
       OR tool -> 'input_schema' ->> 'type' IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'input_schema must be a JSON Schema object with "type": "object"' USING ERRCODE = 'HM004';
    END IF;
    IF tool ? 'output_schema' AND jsonb_typeof(tool -> 'output_schema') <> 'null'
       AND (jsonb_typeof(tool -> 'output_schema') <> 'object'
            OR tool -> 'output_schema' ->> 'type' IS DISTINCT FROM 'object') THEN
        RAISE EXCEPTION 'output_schema must be a JSON Schema object with "type": "object"' USING ERRCODE = 'HM004';
    END IF;
    IF EXISTS (SELECT 1 FROM hotmesh.tools t WHERE t.name = v_name
               AND (t.stream, t.workflow_name) IS DISTINCT FROM (worker_register_tool.stream, v_workflow)) THEN
        RAISE EXCEPTION 'another stream already serves a tool with this name' USING ERRCODE = 'HM004';
    END IF;
    INSERT INTO hotmesh.tools AS t (stream, workflow_name, name, description, input_schema, output_schema,
                                    registered_by)
    VALUES (worker_register_tool.stream, v_workflow, v_name, tool ->> 'description', tool -> 'input_schema',
            nullif(tool -> 'output_schema', 'null'::jsonb), session_user)
    ON CONFLICT (stream, workflow_name) DO UPDATE SET
        name = excluded.name, description = excluded.description, input_schema = excluded.input_schema,
        output_schema = excluded.output_schema, registered_by = excluded.registered_by, updated_at = now()
    WHERE (t.name, t.description, t.input_schema, t.output_schema)
          IS DISTINCT FROM (excluded.name, excluded.description, excluded.input_schema, excluded.output_schema);
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
    END IF;
    RETURN FOUND;
END
$$;

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

-- A live worker says so for each stream it consumes; gateways count live workers per stream.
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
            PERFORM pg_catalog.pg_notify('hotmesh_tools', '');
        END IF;
    END LOOP;
    DELETE FROM hotmesh.workers w WHERE w.expires_at < now() - interval '1 hour';
    RETURN cardinality(streams);
END
$$;

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

-- ---------------------------------------------------------------------------------- caller functions

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

CREATE OR REPLACE FUNCTION hotmesh.caller_call(
    stream text, workflow_name text, args jsonb, timeout_ms integer, idempotency_key text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_call_id uuid;
    v_timeout bigint := least(greatest(coalesce(timeout_ms, 0), 1), hotmesh._setting('max_timeout_ms'));
BEGIN
    PERFORM hotmesh._authorize(caller_call.stream);
    -- The enqueue's commit does not wait for the WAL flush: nothing has been promised to anyone yet. A crash
    -- in the next few hundred ms may lose the call, and its caller then learns so ("no such call", or a lost
    -- connection) instead of an answer; an answer is only ever read after worker_respond's durable commit,
    -- which flushes the WAL up to it, call included. Without it every enqueue holds NOTIFY's global lock
    -- (which serialises all NOTIFYing commits in the database) for the length of an fsync.
    SET LOCAL synchronous_commit = off;
    IF caller_call.args IS NULL OR jsonb_typeof(caller_call.args) <> 'object' THEN
        RAISE EXCEPTION 'arguments must be a JSON object' USING ERRCODE = 'HM002';
    END IF;
    PERFORM hotmesh._check_size(caller_call.args, 'arguments');
    IF length(caller_call.idempotency_key) > 200 OR length(caller_call.workflow_name) > 200 THEN
        RAISE EXCEPTION 'idempotency key and workflow name are at most 200 characters' USING ERRCODE = 'HM002';
    END IF;
    INSERT INTO hotmesh.messages (stream, workflow_name, args, call_id, owner, idempotency_key, deadline)
    VALUES (caller_call.stream, coalesce(caller_call.workflow_name, ''), caller_call.args, gen_random_uuid(),
            session_user, caller_call.idempotency_key, now() + make_interval(secs => v_timeout / 1000.0))
    ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING call_id INTO v_call_id;
    IF v_call_id IS NULL THEN  -- the same idempotency key was used before: that call is this call
        SELECT m.call_id INTO v_call_id FROM hotmesh.messages m
        WHERE m.owner = session_user AND m.idempotency_key = caller_call.idempotency_key;
        RETURN v_call_id;
    END IF;
    PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(caller_call.stream), '');
    RETURN v_call_id;
END
$$;

-- Several calls in one statement and one commit: what a gateway sends when calls arrive together. The arrays
-- are one call each (as caller_call's arguments, with no idempotency key); returns the call ids in the same
-- order. Each distinct stream is authorized; one NOTIFY per stream. Any refused call refuses them all, and
-- nothing is written.
CREATE OR REPLACE FUNCTION hotmesh.caller_call_many(
    streams text[], workflow_names text[], args jsonb[], timeout_ms integer[])
RETURNS uuid[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_count integer := coalesce(cardinality(caller_call_many.streams), 0);
    v_max_timeout bigint := hotmesh._setting('max_timeout_ms');
    v_max_bytes bigint := hotmesh._setting('max_payload_bytes');
    v_stream text;
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
        PERFORM hotmesh._authorize(v_stream);
    END LOOP;
    SET LOCAL synchronous_commit = off;  -- as caller_call's
    IF EXISTS (SELECT 1 FROM unnest(caller_call_many.args) AS a(args)
               WHERE a.args IS NULL OR jsonb_typeof(a.args) <> 'object') THEN
        RAISE EXCEPTION 'arguments must be a JSON object' USING ERRCODE = 'HM002';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(caller_call_many.args) AS a(args) WHERE octet_length(a.args::text) > v_max_bytes) THEN
        RAISE EXCEPTION 'arguments larger than % bytes', v_max_bytes USING ERRCODE = 'HM003';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(caller_call_many.workflow_names) AS w(name) WHERE length(w.name) > 200) THEN
        RAISE EXCEPTION 'idempotency key and workflow name are at most 200 characters' USING ERRCODE = 'HM002';
    END IF;
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
        RETURNING 1
    )
    SELECT array_agg(input.call_id ORDER BY input.ord) INTO v_ids FROM input;
    FOR v_stream IN SELECT DISTINCT s.stream FROM unnest(caller_call_many.streams) AS s(stream) LOOP
        PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(v_stream), '');
    END LOOP;
    RETURN coalesce(v_ids, '{}');
END
$$;

-- The state of several of the caller's own calls, one row per call found (calls of other roles, and unknown
-- ids, are left out: the same answer as caller_result's "not found").
CREATE OR REPLACE FUNCTION hotmesh.caller_results(call_ids uuid[])
RETURNS TABLE (call_id uuid, state text, result jsonb, is_error boolean, error text, attempt integer,
               progress double precision, progress_total double precision, progress_message text,
               deadline timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_admin boolean := hotmesh._is_admin();
    v_seqscan text;
BEGIN
    IF coalesce(cardinality(caller_results.call_ids), 0) > hotmesh._setting('max_batch') THEN
        RAISE EXCEPTION 'at most max_batch call ids' USING ERRCODE = 'HM002';
    END IF;
    v_seqscan := hotmesh._plan_with_indexes();
    RETURN QUERY
    SELECT m.call_id, m.state, m.result, m.is_error, m.error, m.attempt, m.progress, m.progress_total,
           m.progress_message, m.deadline
    FROM hotmesh.messages m
    WHERE m.call_id = ANY (caller_results.call_ids) AND (m.owner = session_user OR v_admin);
    PERFORM hotmesh._plan_restore(v_seqscan);
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
    IF r.state = 'ready' THEN
        UPDATE hotmesh.messages m SET state = 'dead', cancel_requested = true, is_error = true,
            error = 'cancelled by the caller', finished_at = now()
        WHERE m.id = r.id;
        PERFORM hotmesh._notify_caller(r.owner, caller_cancel.call_id, 'r');
    ELSIF r.state = 'reserved' THEN
        UPDATE hotmesh.messages m SET cancel_requested = true WHERE m.id = r.id;
        PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(r.stream), 'c:' || r.id::text);
    END IF;
    RETURN r.state;
END
$$;

-- ---------------------------------------------------------------------------------------------- grants

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA hotmesh FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA hotmesh FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA hotmesh FROM PUBLIC;

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
    hotmesh.worker_goodbye(text)
TO hotmesh_worker;

GRANT EXECUTE ON FUNCTION
    hotmesh.caller_tools(),
    hotmesh.caller_call(text, text, jsonb, integer, text),
    hotmesh.caller_call_many(text[], text[], jsonb[], integer[]),
    hotmesh.caller_result(uuid),
    hotmesh.caller_results(uuid[]),
    hotmesh.caller_cancel(uuid)
TO hotmesh_caller;
