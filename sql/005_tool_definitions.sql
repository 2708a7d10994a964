-- mcp-hotmesh SQL API v1, migration 005: tool definitions an admin approves, tool names a stream owns, and the
-- metadata hosts read (title, annotations, icons, _meta, a per-tool timeout).
--
-- Runs as hotmesh_owner, like the others. What agents see is what an admin approved: a worker's new or changed
-- definition waits in tool_pending until `mcp-hotmesh tools approve`, and `tools` keeps the approved one (a
-- "rug pull", a description rewritten after the user trusted the tool, reaches nobody). A tool name, once
-- approved, belongs to its stream in tool_names, also after the tool is removed, until the admin releases it:
-- no worker of another stream can take it over. The functions are in functions.sql ("tool definitions").

INSERT INTO hotmesh.settings (key, value) VALUES
    ('approve_tools',       1),         -- 1: new and changed definitions wait for an admin; 0: live at once
    ('max_tool_timeout_ms', 3600000)    -- a tool's own timeout is capped at this
ON CONFLICT (key) DO NOTHING;

-- The approved definition's metadata; approved_by is NULL for a definition that went live without an approval
-- (approval off, or registered before approvals existed).
ALTER TABLE hotmesh.tools
    ADD COLUMN IF NOT EXISTS title        text,
    ADD COLUMN IF NOT EXISTS annotations  jsonb,
    ADD COLUMN IF NOT EXISTS icons        jsonb,
    ADD COLUMN IF NOT EXISTS meta         jsonb,
    ADD COLUMN IF NOT EXISTS timeout_ms   integer,
    ADD COLUMN IF NOT EXISTS approved_by  name,
    ADD COLUMN IF NOT EXISTS approved_at  timestamptz;

-- A definition a worker registered that differs from the approved one (or has none yet): one per tool.
CREATE TABLE IF NOT EXISTS hotmesh.tool_pending (
    stream         text NOT NULL,
    workflow_name  text NOT NULL DEFAULT '',
    name           text NOT NULL,
    definition     jsonb NOT NULL,   -- as registered, checked like any registration
    registered_by  name NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, workflow_name)
);
REVOKE ALL ON hotmesh.tool_pending FROM PUBLIC;

-- Tool names and the stream each belongs to, by the folded name (case, and - against _, do not tell names apart).
CREATE TABLE IF NOT EXISTS hotmesh.tool_names (
    folded       text PRIMARY KEY,
    name         text NOT NULL,
    stream       text NOT NULL,
    reserved_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON hotmesh.tool_names FROM PUBLIC;

-- The tools live before this migration are approved as they are, and their names belong to their streams.
INSERT INTO hotmesh.tool_names (folded, name, stream)
SELECT DISTINCT ON (lower(replace(t.name, '-', '_'))) lower(replace(t.name, '-', '_')), t.name, t.stream
FROM hotmesh.tools t
ORDER BY lower(replace(t.name, '-', '_')), t.updated_at
ON CONFLICT (folded) DO NOTHING;
