"""The benchmark itself runs: ``python -m benchmarks.run --quick`` against the session's server, tiny sizes.

It proves the command works from a checkout and prints all five parts with their ratios; the numbers of a
quick run mean nothing. The PGQueuer parts run only when ``pgqueuer`` is installed (``pip install -e
".[bench]"``); CI installs ``.[dev]`` only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, PgServer

pytestmark = pytest.mark.slow  # a benchmark run in a subprocess


def test_the_benchmark_runs_and_reports_every_part(pg_server: PgServer, tmp_path: Path) -> None:
    env = {**os.environ, "HOTMESH_BENCH_DSN": pg_server.admin_dsn}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    parts = {r["part"] for r in data["results"]}
    with_pgqueuer = importlib.util.find_spec("pgqueuer") is not None
    assert parts == {"1 e2e", "2 floor", "4 drain", "5 scale"} | ({"3 pgqueuer"} if with_pgqueuer else set())
    by = {(r["part"], r["concurrency"]): r for r in data["results"]}
    for c in (1, 16):
        assert by[("1 e2e", c)]["count"] > 0 and by[("2 floor", c)]["count"] > 0
        assert by[("1 e2e", c)]["ratios"]["floor"]["rate"] > 0
    assert [r for r in data["results"] if r["name"].startswith("claim")]
    assert any(r["name"].startswith("memory") for r in data["results"])
    assert len(data["targets"]) == 5
    for line in ("1 e2e", "2 floor", "4 drain", "5 scale", "vs floor", "targets:"):
        assert line in done.stdout
