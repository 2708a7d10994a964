"""``mcp-hotmesh worker`` with its statements timed, for ``benchmarks.profile``: SIGUSR1 writes the timings since
the last signal to ``$HOTMESH_PROFILE_WORKER_STATS`` (JSON) and starts over."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.profile import Timings
from mcp_hotmesh._cli import main
from mcp_hotmesh._streams import WorkerAPI

timings = Timings()
timings.wrap(WorkerAPI, "dequeue", lambda a, v: len(v))
timings.wrap(WorkerAPI, "respond_and_dequeue", lambda a, v: len(a[2]))
since = time.perf_counter()


def dump(*_: Any) -> None:
    global since
    now = time.perf_counter()
    Path(os.environ["HOTMESH_PROFILE_WORKER_STATS"]).write_text(json.dumps(timings.summary(now - since)))
    timings.rows.clear()
    since = now


signal.signal(signal.SIGUSR1, dump)
main()
