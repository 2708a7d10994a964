-- mcp-hotmesh bootstrap: run by the admin before the numbered migrations, every time (idempotent).
--
-- Creates the roles that own and use the schema, the schema itself and the migrations table.
-- "hotmesh" stands for the schema name chosen with --schema; mcp_hotmesh.migrate writes the real one in.
--
--   hotmesh_owner   NOLOGIN; owns the schema, its tables and functions, nothing else (never a superuser),
--                   so SECURITY DEFINER code runs with no more than the schema's own rights.
--   hotmesh_worker  NOLOGIN group: EXECUTE on the worker_* functions. Provisioned worker roles are members.
--   hotmesh_caller  NOLOGIN group: EXECUTE on the caller_* functions. Provisioned caller roles are members.

DO $bootstrap$
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
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
       AND NOT pg_catalog.pg_has_role(current_user, 'hotmesh_owner', 'MEMBER') THEN
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

CREATE TABLE IF NOT EXISTS hotmesh.migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
RESET ROLE;
