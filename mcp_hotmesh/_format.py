"""What the CLI prints and reads for operators: durations, ages, the status and dead-letter tables, settings.

Text only: the numbers come from ``_admin``; nothing here touches the database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from ._admin import DeadMessage, Status
from ._common import clip
from .errors import ConfigError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1h30m``, ``500ms``: a duration (bare numbers are seconds)."""
    compact = text.strip().lower().replace(" ", "")
    total = 0.0
    pos = 0
    for match in _DURATION.finditer(compact):
        if match.start() != pos or not match.group(0):
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact):
        raise ConfigError(f"invalid duration {text!r}: use e.g. 30s, 15m, 2h, 7d or 1h30m")
    return timedelta(seconds=total)


def _seconds(value: timedelta | None) -> str:
    return "-" if value is None else format_age(value.total_seconds())


def format_age(seconds: float | None) -> str:
    """``-``, ``400ms``, ``1.4s``, ``12s``, ``3m05s``, ``2h10m``, ``3d4h``: short and readable in a table."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows)



def format_status(st: Status) -> str:
    """The status as a terminal table, with a line saying what needs a look."""
    header = ("STREAM", "TOOLS", "READY", "IN FLIGHT", "STALLED", "RETRYING", "DEAD", "OLDEST WAITING", "WORKERS",
              "CALLS/S")
    rows = [header] + [
        (s.stream, ",".join(s.tools) or "-", str(s.ready), str(s.in_flight), str(s.stalled), str(s.retrying),
         str(s.dead), format_age(s.oldest_waiting_seconds), str(s.live_workers), f"{s.calls_per_second:.2f}")
        for s in st.streams
    ]
    out = f"schema {st.schema} at {st.time.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC\n"
    out += table(rows) if st.streams else "no streams yet: no tools registered, no messages, no workers\n"
    kept = format_age(st.retention_seconds)
    dead = "kept until purged" if st.dead_retention_seconds is None else f"kept {format_age(st.dead_retention_seconds)}"
    last = "never" if st.last_purge is None else f"{st.last_purge:%Y-%m-%d %H:%M:%S} UTC"
    out += f"retention: done calls kept {kept}, dead calls {dead}; last purge {last}\n"
    if st.roles:
        out += "\n" + table([("ROLE", "KIND", "LOGIN", "SESSIONS", "OLDEST TRANSACTION", "QUEUED", "QUEUED BYTES")] + [
            (r.role, r.kind, "yes" if r.can_login else "no",
             f"{r.sessions}/{r.connection_limit}" if r.connection_limit >= 0 else str(r.sessions),
             format_age(r.oldest_transaction_seconds), str(r.queued), str(r.queued_bytes))
            for r in st.roles
        ])
    notes = []
    for s in st.streams:
        if (s.ready or s.stalled) and not s.live_workers:
            notes.append(f"{s.stream}: {s.ready + s.stalled} message(s) waiting and no live worker")
        if s.stalled:
            notes.append(f"{s.stream}: {s.stalled} message(s) held by a worker that stopped responding "
                         "(reclaimed at the next claim)")
        if s.dead:
            notes.append(f"{s.stream}: {s.dead} dead message(s): mcp-hotmesh dlq list --stream {s.stream}")
    if st.pending_tools:
        notes.append(f"{len(st.pending_tools)} tool definition(s) wait for approval ({', '.join(st.pending_tools)}): "
                     "mcp-hotmesh tools list, then tools show NAME and tools approve NAME")
    out += "".join(f"! {n}\n" for n in notes)
    return out



def format_dlq(messages: list[DeadMessage], now: datetime) -> str:
    if not messages:
        return "the dead-letter queue is empty (for these filters)\n"
    rows = [("ID", "STREAM", "WORKFLOW", "CALL", "ATTEMPTS", "RECLAIMS", "DIED", "ERROR")]
    for m in messages:
        error = (m.error or "").replace("\n", " ")
        rows.append((str(m.id), m.stream, m.workflow_name or "-", str(m.call_id)[:8] if m.call_id else "-",
                     str(m.attempt), str(m.reclaims),
                     f"{format_age((now - m.died_at).total_seconds())} ago" if m.died_at else "-",
                     clip(error, 80)))
    return table(rows)


def format_dead(m: DeadMessage) -> str:
    lines = [f"{key}: {value}" for key, value in m.as_json().items()]
    lines.append("args: " + json.dumps(m.args, ensure_ascii=False, indent=2))
    if m.result is not None:
        lines.append("result: " + json.dumps(m.result, ensure_ascii=False, indent=2))
    return "\n".join(lines) + "\n"



def parse_setting(key: str, text: str) -> int:
    """A setting's new value: a whole number; for the ``*_ms`` keys a duration too (``2h``, ``30s``)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if key.endswith("_ms"):
        return int(parse_duration(text).total_seconds() * 1000)  # says itself what it takes
    raise ConfigError(f"{key} must be a whole number, not {text!r}")
