"""The gateway's counters, in Prometheus text format (``GET /metrics`` on the HTTP transport).

Counted in the gateway process: tool calls by tool and outcome, and their latency. Read from the database at
each scrape, through ``caller_stats()`` (counts only, for the gateway role's streams): queue depth, in flight,
retrying, dead, the oldest ready message's age. Live workers per stream come from the gateway's tool catalog.

Outcomes: ``ok``; ``error`` (the tool failed, or its call was dead-lettered); ``invalid_arguments`` (refused
before anything was queued); ``offline`` (no live worker); ``timeout``; ``unavailable`` (the database could
not be reached); ``unknown_tool``; ``cancelled`` (the client gave up). A tool name the catalog does not know
is counted as ``(unknown)``: names sent by clients never become labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._caller import Outcome
from ._streams import QueueStats, ToolRecord

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNKNOWN = "(unknown)"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def classify(outcome: Outcome) -> str:
    """The outcome label of a finished call: its kind, decided where the call ended."""
    return outcome.kind


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: int = 0
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1


@dataclass
class GatewayMetrics:
    """What one gateway process counted since it started."""

    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    latency: dict[str, _Histogram] = field(default_factory=dict)

    def observe(self, tool: str, outcome: str, seconds: float) -> None:
        self.calls[(tool, outcome)] = self.calls.get((tool, outcome), 0) + 1
        self.latency.setdefault(tool, _Histogram()).observe(max(seconds, 0.0))

    def render(
        self,
        *,
        tools: Iterable[ToolRecord],
        queues: list[QueueStats] | None,
        listen_reconnects: int = 0,
    ) -> str:
        """The Prometheus text exposition. ``queues`` None: the database did not answer (``hotmesh_database_up``
        is 0 and the queue gauges are left out, rather than reported as zero)."""
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("hotmesh_tool_calls_total", "counter", "Tool calls this gateway answered, by tool and outcome.",
               [(_labels(tool=t, outcome=o), n) for (t, o), n in sorted(self.calls.items())])
        out.append("# HELP hotmesh_tool_call_duration_seconds Time from a tools/call request to its answer.")
        out.append("# TYPE hotmesh_tool_call_duration_seconds histogram")
        for tool, h in sorted(self.latency.items()):
            for bound, count in zip(BUCKETS, h.counts, strict=True):
                out.append(f"hotmesh_tool_call_duration_seconds_bucket{_labels(tool=tool, le=_number(bound))} {count}")
            out.append(f"hotmesh_tool_call_duration_seconds_bucket{_labels(tool=tool, le='+Inf')} {h.total}")
            out.append(f"hotmesh_tool_call_duration_seconds_sum{_labels(tool=tool)} {_number(h.sum)}")
            out.append(f"hotmesh_tool_call_duration_seconds_count{_labels(tool=tool)} {h.total}")
        live: dict[str, int] = {}
        for record in tools:
            live[record.stream] = max(live.get(record.stream, 0), record.live_workers)
        family("hotmesh_live_workers", "gauge", "Workers with a recent heartbeat, by stream.",
               [(_labels(stream=s), n) for s, n in sorted(live.items())])
        family("hotmesh_database_up", "gauge", "Whether the database answered this scrape (1) or not (0).",
               [("", 1 if queues is not None else 0)])
        family("hotmesh_listen_reconnects_total", "counter",
               "Times the gateway's LISTEN connection was lost and re-established.", [("", listen_reconnects)])
        if queues is not None:
            by_stream = {q.stream: q for q in queues}
            for stream in live:
                by_stream.setdefault(stream, QueueStats(stream, 0, 0, 0, 0, None))
            rows = sorted(by_stream.values(), key=lambda q: q.stream)
            family("hotmesh_queue_ready", "gauge", "Messages waiting to be claimed, by stream.",
                   [(_labels(stream=q.stream), q.ready) for q in rows])
            family("hotmesh_queue_in_flight", "gauge", "Messages claimed by a worker, by stream.",
                   [(_labels(stream=q.stream), q.in_flight) for q in rows])
            family("hotmesh_queue_retrying", "gauge", "Messages waiting out a retry backoff, by stream.",
                   [(_labels(stream=q.stream), q.retrying) for q in rows])
            family("hotmesh_queue_oldest_ready_seconds", "gauge",
                   "Age of the oldest message waiting to be claimed (0 when none waits), by stream.",
                   [(_labels(stream=q.stream), round(q.oldest_ready_seconds or 0.0, 3)) for q in rows])
            family("hotmesh_dead_letters", "gauge", "Messages in the dead-letter queue, by stream.",
                   [(_labels(stream=q.stream), q.dead) for q in rows])
        return "\n".join(out) + "\n"
