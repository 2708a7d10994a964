"""The one database every part runs on: the embedded server in a temporary directory, or HOTMESH_BENCH_DSN."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from mcp_hotmesh import _embedded as embedded


@dataclass
class Database:
    admin_dsn: str
    host: str
    port: int
    database: str
    description: str

    def role_dsn(self, role: str, password: str) -> str:
        """A TCP DSN with a password: how every non-admin role logs in, as from another machine."""
        return f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{self.database}"

    @property
    def base_dsn(self) -> str:
        return f"postgresql://{self.host}:{self.port}/{self.database}"


@contextlib.contextmanager
def database() -> Iterator[Database]:
    dsn = os.environ.get("HOTMESH_BENCH_DSN")
    if dsn:
        # Roles log in over TCP: the DSN's host, or 127.0.0.1 when the admin's DSN names a Unix socket.
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        port = parts.port or int(query.get("port", ["5432"])[0])
        host = parts.hostname if parts.hostname and not parts.hostname.startswith("/") else "127.0.0.1"
        yield Database(dsn, host, port, parts.path.lstrip("/") or "postgres", "HOTMESH_BENCH_DSN")
        return
    root = Path(tempfile.mkdtemp(prefix="hotmesh-bench-"))
    root.chmod(0o755)
    server = embedded.start(root / "data")
    try:
        yield Database(server.admin_dsn, "127.0.0.1", server.port, embedded.DATABASE,
                       f"embedded PostgreSQL in {root} (default settings: fsync on, synchronous_commit on)")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
