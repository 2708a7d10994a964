"""The tools the MCP conformance suite calls (``tools.py``), served through the queue."""
