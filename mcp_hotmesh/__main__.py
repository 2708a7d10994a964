"""``python -m mcp_hotmesh``: the ``mcp-hotmesh`` command."""

from ._cli import main

if __name__ == "__main__":
    main()
