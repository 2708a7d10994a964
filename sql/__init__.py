"""The SQL contract (SQL API v1), shipped inside the wheel as package data; see mcp_hotmesh._migrate."""
