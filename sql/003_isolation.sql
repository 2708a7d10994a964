-- mcp-hotmesh SQL API v1, migration 003: a scoped role cannot hurt anyone else's availability.
--
-- Runs as hotmesh_owner, like 001 and 002. A worker or caller role is an adversary for availability too:
-- everything it can write is hostile input to whoever reads it, and everything it can lock or keep open is a
-- hostile lock. This migration:
--   * bounds tool registrations (depth, node count, description, numbers, references outside the document,
--     tools per stream) and refuses tool names that only differ from another stream's by case or - and _;
--   * bounds the depth of arguments and results (a value deeper than a reader's JSON encoder can write stops
--     its delivery), and refuses progress that is no finite number (NaN is not JSON);
--   * makes shared housekeeping (the heartbeat's cleanup of old worker rows, retention) skip rows and locks a
--     scoped role holds instead of waiting for them, and gives every scoped function a lock_timeout, so a lock
--     left open by a stranger costs a bounded wait, never a hang;
--   * a watchdog (worker_watchdog / caller_watchdog) that ends scoped-role sessions whose transaction stayed
--     open or idle too long: what frees row locks, the NOTIFY queue and connection slots held by a stranger;
--   * quotas on queued messages and bytes, per role and stream (role_limits overrides the settings);
--   * _ops_roles(): sessions, oldest open transaction and queued bytes per role, for `mcp-hotmesh status`.
--
-- Our own SQLSTATEs, added here: HM006 quota exceeded.

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

-- ------------------------------------------------------------------------------------ internal helpers

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

-- ---------------------------------------------------------------------------------- worker functions

CREATE OR REPLACE FUNCTION hotmesh.worker_register_tool(stream text, workflow_name text, tool jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_name text;
    v_workflow text := coalesce(worker_register_tool.workflow_name, '');
BEGIN
    PERFORM hotmesh._authorize(worker_register_tool.stream);
    PERFORM hotmesh._check_tool(worker_register_tool.tool);
    v_name := tool ->> 'name';
    IF length(v_workflow) > 200 THEN
        RAISE EXCEPTION 'workflow name longer than 200 characters' USING ERRCODE = 'HM002';
    END IF;
    IF EXISTS (SELECT 1 FROM hotmesh.tools t
               WHERE lower(replace(t.name, '-', '_')) = lower(replace(v_name, '-', '_'))
                 AND (t.stream, t.workflow_name) IS DISTINCT FROM (worker_register_tool.stream, v_workflow)) THEN
        RAISE EXCEPTION 'another stream already serves a tool with this name, or one differing from it only by case or - and _'
            USING ERRCODE = 'HM004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM hotmesh.tools t
                   WHERE t.stream = worker_register_tool.stream AND t.workflow_name = v_workflow)
       AND (SELECT count(*) FROM hotmesh.tools t WHERE t.stream = worker_register_tool.stream)
           >= hotmesh._setting('max_tools_per_stream') THEN
        RAISE EXCEPTION 'this stream already has % tools, the most one stream may register',
            hotmesh._setting('max_tools_per_stream') USING ERRCODE = 'HM004';
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

-- As in 001, with the cleanup of long-expired rows (any role's) skipping rows another session holds: a stranger
-- who keeps a heartbeat's transaction open must not stall every other worker's heartbeat.
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
    DELETE FROM hotmesh.workers w
    WHERE (w.stream, w.consumer) IN (
        SELECT o.stream, o.consumer FROM hotmesh.workers o
        WHERE o.expires_at < now() - interval '1 hour'
        LIMIT 100
        FOR UPDATE SKIP LOCKED);
    RETURN coalesce(cardinality(streams), 0);
END
$$;

-- As in 001, and the progress is a finite number: NaN or infinity is no JSON, and a client that reads it may
-- drop its whole connection.
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

-- As in 001, within the quota for fire-and-forget messages on the stream.
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

-- As in 001, with results no deeper than max_json_depth.
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
    v_result jsonb;
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
    END IF;
    FOREACH v_result IN ARRAY coalesce(worker_respond_and_dequeue.results, '{}') LOOP
        PERFORM hotmesh._check_size(v_result, 'result');
    END LOOP;
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

-- ---------------------------------------------------------------------------------- caller functions

-- As in 001, within the caller's quota on the stream and with arguments no deeper than max_json_depth.
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
    SET LOCAL synchronous_commit = off;  -- see 001
    PERFORM hotmesh._check_call(caller_call.args, caller_call.workflow_name, caller_call.idempotency_key);
    PERFORM hotmesh._check_quota(caller_call.stream, session_user, 1, pg_catalog.pg_column_size(caller_call.args));
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

-- As in 001, within the caller's quota on each stream and with arguments no deeper than max_json_depth.
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
        RETURNING 1
    )
    SELECT array_agg(input.call_id ORDER BY input.ord) INTO v_ids FROM input;
    FOR v_stream IN SELECT DISTINCT s.stream FROM unnest(caller_call_many.streams) AS s(stream) LOOP
        PERFORM pg_catalog.pg_notify(hotmesh._worker_channel(v_stream.stream), '');
    END LOOP;
    RETURN coalesce(v_ids, '{}');
END
$$;

-- ------------------------------------------------------------------------------------------- retention

-- As in 002, without a lock that a scoped role could hold: purges of different processes split the rows
-- between them (SKIP LOCKED), and a stranger keeping a purge's transaction open holds only its own streams'
-- rows. The time of the last purge is recorded when its row is free.
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
        WHERE m.state IN ('done', 'dead')
          AND (p_streams IS NULL OR m.stream = ANY (p_streams))
          AND ((m.state = 'done' AND m.finished_at < v_done_before AND coalesce(m.deadline < now(), true))
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

-- ------------------------------------------------------------------------------------------ admin: dlq

-- As in 002, skipping rows another session holds: a caller can lock its own dead call (an uncommitted
-- caller_cancel), and the admin's purge must not wait for it. A row skipped now goes with the next purge.
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

-- ---------------------------------------------------------------------------------------------- watchdog

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

-- ------------------------------------------------------------------------------------- admin: roles

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

-- ---------------------------------------------------------------------------------------------- grants

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA hotmesh FROM PUBLIC;

GRANT EXECUTE ON FUNCTION hotmesh.worker_watchdog() TO hotmesh_worker;
GRANT EXECUTE ON FUNCTION hotmesh.caller_watchdog() TO hotmesh_caller;

-- Every scoped function waits for a lock 2 s at most: a row another session holds (a caller's own call it keeps
-- locked, say) costs the waiting statement an error it can retry, never a hang. Set here, after the functions
-- are (re)defined: CREATE OR REPLACE drops a function's SET clauses, so a later migration that redefines a
-- function must set it again (the catalog test checks every function).
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
