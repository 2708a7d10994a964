-- mcp-hotmesh bootstrap: run by the admin before the numbered migrations, every time (idempotent).
--
-- Creates the roles that own and use the schema, the schema itself and the tables that record what was
-- applied (migrations, definitions).
-- "hotmesh" stands for the schema name chosen with --schema; mcp_hotmesh.migrate writes the real one in.
--
--   hotmesh_owner   NOLOGIN; owns the schema, its tables and functions, nothing else (never a superuser),
--                   so SECURITY DEFINER code runs with no more than the schema's own rights.
--   hotmesh_worker  NOLOGIN group: EXECUTE on the worker_* functions. Provisioned worker roles are members.
--   hotmesh_caller  NOLOGIN group: EXECUTE on the caller_* functions. Provisioned caller roles are members.

DO $bootstrap$
DECLARE
    v_can_set boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'hotmesh_owner') THEN
        CREATE ROLE hotmesh_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'hotmesh_worker') THEN
        CREATE ROLE hotmesh_worker NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'hotmesh_caller') THEN
        CREATE ROLE hotmesh_caller NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    -- A non-superuser admin (one with CREATEROLE) must be able to SET ROLE to the owner to migrate.
    -- From PostgreSQL 16 the creator of a role holds only ADMIN OPTION on it (no SET, no INHERIT): 'MEMBER' is
    -- then true while SET ROLE is not, so ask for SET there; on 15 'MEMBER' means SET ROLE is possible.
    IF pg_catalog.current_setting('server_version_num')::integer >= 160000 THEN
        v_can_set := pg_catalog.pg_has_role(current_user, 'hotmesh_owner', 'SET');
    ELSE
        v_can_set := pg_catalog.pg_has_role(current_user, 'hotmesh_owner', 'MEMBER');
    END IF;
    IF NOT v_can_set AND NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        GRANT hotmesh_owner TO CURRENT_USER;
    END IF;
END
$bootstrap$;

CREATE SCHEMA IF NOT EXISTS hotmesh AUTHORIZATION hotmesh_owner;
REVOKE ALL ON SCHEMA hotmesh FROM PUBLIC;
GRANT USAGE ON SCHEMA hotmesh TO hotmesh_worker, hotmesh_caller;

SET ROLE hotmesh_owner;
-- Functions the owner creates are never executable by PUBLIC, now or in later migrations.
ALTER DEFAULT PRIVILEGES FOR ROLE hotmesh_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- The numbered migrations applied, each once.
CREATE TABLE IF NOT EXISTS hotmesh.migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
-- sha256 of the migration's file as applied; NULL for one applied before checksums were recorded. Added, and
-- only when missing, to a table made by an earlier version (no exclusive lock on every run).
DO $checksum$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                   WHERE attrelid = 'hotmesh.migrations'::regclass AND attname = 'checksum' AND NOT attisdropped) THEN
        ALTER TABLE hotmesh.migrations ADD COLUMN checksum text;
    END IF;
END
$checksum$;
-- The replaceable definitions (functions.sql) as last applied: run again whenever the shipped file's sha256
-- differs from the one here.
CREATE TABLE IF NOT EXISTS hotmesh.definitions (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON hotmesh.migrations, hotmesh.definitions FROM PUBLIC;
RESET ROLE;
