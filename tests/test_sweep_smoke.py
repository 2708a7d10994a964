"""The scale-out sweep runs: ``python -m benchmarks.sweep --quick`` against the session's server, tiny sizes.

It proves the command works from a checkout and reports both axes with their numbers; the numbers of a quick run
mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, PgServer

pytestmark = pytest.mark.slow  # worker subprocesses


def test_the_sweep_runs_and_reports_both_axes(pg_server: PgServer, tmp_path: Path) -> None:
    env = {**os.environ, "HOTMESH_BENCH_DSN": pg_server.admin_dsn}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["topics"] for r in data["topics"]] == [3, 12]
    assert all(r["connections"] >= 1 and r["start_s"] > 0 for r in data["topics"])
    assert [r["processes"] for r in data["processes"]] == [1, 2]
    assert all(r["calls"] > 0 and r["claims_per_call"] > 0 for r in data["processes"])
    assert data["tools_list"]["tools"] == 12
    for line in ("topics in one worker process", "tools/list with 12 tools", "worker processes on one stream"):
        assert line in done.stdout
