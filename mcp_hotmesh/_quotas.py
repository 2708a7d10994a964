"""Per-identity quotas of a gateway serving identities: calls per second (a token bucket) and calls at once, per
identity and per tool, as the ``[[quotas]]`` rules of the identity configuration say.

Every rule that matches a call (its identity and tool patterns) must admit it; a rule whose ``tool`` is ``*``
counts all of an identity's calls together, any other counts that tool's calls. The counters live in this
process: a client spread over several gateways gets each gateway's quota. Names a client sends for a tool the
catalog does not know are counted as one ``(unknown)`` tool, so clients cannot grow the tables.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections import Counter
from dataclasses import dataclass

from ._identity import QuotaRule


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass(frozen=True)
class Refusal:
    """Why a call was refused, in words for the model, and when to try again (seconds; None: when one ends)."""

    message: str
    retry_after: float | None


class Admission:
    """An admitted call's hold on the concurrency counters; ``release`` when the call ends."""

    def __init__(self, quotas: Quotas, keys: list[tuple[int, str, str]]) -> None:
        self._quotas = quotas
        self._keys = keys

    def release(self) -> None:
        for key in self._keys:
            left = self._quotas._active[key] - 1
            if left:
                self._quotas._active[key] = left
            else:
                del self._quotas._active[key]
        self._keys = []


class Quotas:
    def __init__(self, rules: tuple[QuotaRule, ...]) -> None:
        self.rules = rules
        self._buckets: dict[tuple[int, str, str], _Bucket] = {}
        self._active: Counter[tuple[int, str, str]] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()  # (identity, tool) -> calls refused

    def admit(self, identity: str, tool: str) -> Admission | Refusal:
        """Take one call of ``identity`` to ``tool`` from every matching rule, or refuse it (taking nothing)."""
        now = time.monotonic()
        rate_keys: list[tuple[int, str, str, QuotaRule]] = []
        held: list[tuple[int, str, str]] = []
        for i, rule in enumerate(self.rules):
            if not (fnmatch.fnmatchcase(identity, rule.identity) and fnmatch.fnmatchcase(tool, rule.tool)):
                continue
            key = (i, identity, tool if rule.tool != "*" else "*")
            what = f"tool {tool!r}" if rule.tool != "*" else "the tools of this server"
            if rule.concurrent is not None and self._active[key] >= rule.concurrent:
                return self._refused(identity, tool, Refusal(
                    f"Quota reached: at most {rule.concurrent} call(s) at once to {what} for this user. Wait for a "
                    "running call to finish, then call again.", None))
            if rule.rate is not None:
                burst = rule.burst or rule.rate
                bucket = self._buckets.get(key)
                if bucket is None:
                    bucket = self._buckets[key] = _Bucket(burst, now)
                bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rule.rate)
                bucket.at = now
                if bucket.tokens < 1:
                    wait = (1 - bucket.tokens) / rule.rate
                    return self._refused(identity, tool, Refusal(
                        f"Quota reached: at most {rule.rate:g} call(s) per second to {what} for this user. Try again "
                        f"in {math.ceil(wait * 10) / 10:g} s.", wait))
                rate_keys.append((*key, rule))
            if rule.concurrent is not None:
                held.append(key)
        for i, who, what_key, _ in rate_keys:
            self._buckets[(i, who, what_key)].tokens -= 1
        for key in held:
            self._active[key] += 1
        return Admission(self, held)

    def _refused(self, identity: str, tool: str, refusal: Refusal) -> Refusal:
        self.refusals[(identity, tool)] += 1
        return refusal

    def render(self) -> str:
        """``/metrics`` lines: refused calls by identity and tool."""
        if not self.refusals:
            return ""

        def esc(value: str) -> str:
            return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

        lines = ["# HELP hotmesh_gateway_quota_refusals_total Tool calls refused by a quota, by identity and tool.",
                 "# TYPE hotmesh_gateway_quota_refusals_total counter"]
        for (identity, tool), n in sorted(self.refusals.items()):
            lines.append(f'hotmesh_gateway_quota_refusals_total{{identity="{esc(identity)}",tool="{esc(tool)}"}} {n}')
        return "\n".join(lines) + "\n"
