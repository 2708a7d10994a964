"""Examples of mcp-hotmesh tool sets (not part of the package)."""
