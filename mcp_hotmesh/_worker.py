"""The secured worker: serves a ``ToolSet`` (or a list of ``WorkerConfig``) from PostgreSQL streams.

    async with Worker.from_toolset(toolset, connection="postgresql://db.internal/app",
                                   credentials=WorkerCredentials(user=role, password=password)):
        await anyio.sleep_forever()

On start a worker connects (one pool per process and DSN, shared by all its topics, unless a
``WorkerConfig.task_queue`` asks for one of its own), registers each tool (``worker_register_tools``: each
definition live, or waiting for an admin's approval), LISTENs on its topics' channels (one connection per DSN,
re-established with backoff), sends a first heartbeat, and starts one ``Consumer`` per topic (see
``mcp_hotmesh._consumer``: claim batches, dispatch by workflow name, extend leases, cancel, answer). A consumer
claims when a NOTIFY wakes it (a new call wakes one consumer of its stream, not all: ``_wake_workers`` in
sql/functions.sql), when a retry it scheduled comes due, when a handler slot frees up, and when the process's
fallback poll (``poll_interval``) finds work on its stream: a missed NOTIFY, a restarted server or another
worker's expired lease is seen there. One heartbeat and one poll per process cover all its topics (``_pulse``):
connections and idle statements do not grow with the number of topics.

Stopping is graceful: stop claiming, let running handlers finish for ``shutdown_grace`` seconds, cancel the
rest and release their messages (``worker_release``: another worker takes them at once, no reclaim counted),
``worker_goodbye`` (``drain``, callable from any task), then disconnect (``stop``, from the task that started
the worker). ``run_worker`` (the CLI's ``mcp-hotmesh worker``) does that on SIGTERM or SIGINT; a second signal
skips what is left of the grace period.

Everything goes through the worker_* functions, so a worker role's login is all a worker ever needs.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pydantic

from ._config import (
    DEFAULT_SCHEMA,
    Connection,
    Pooler,
    RetryPolicy,
    WorkerConfig,
    WorkerCredentials,
    check_pooler,
    check_schema,
    connection_dsn,
)
from ._consumer import ANSWER_TIMEOUT, Consumer, Slots
from ._housekeeping import retention_loop, watchdog_loop
from ._listener import Listener
from ._postgres import pools
from ._pulse import Pulse
from ._streams import WorkerAPI, consumer_channel, worker_channel
from ._tools import Tool, ToolSet
from .errors import ConfigError, Conflict, HotMeshError, LoginRefused, SchemaOutdated

log = logging.getLogger(__name__)

__all__ = ["RetryPolicy", "Worker", "WorkerConfig", "run_worker"]


@dataclass(eq=False)
class _Group:
    """The configs that share one pool and, unless readonly, one consumer: same topic, DSN and mode."""

    topic: str
    dsn: str
    readonly: bool
    configs: list[WorkerConfig] = field(default_factory=list)
    api: WorkerAPI | None = None
    consumer: Consumer | None = None


class Worker:
    """Serves callbacks on PostgreSQL streams; an async context manager (or ``start``/``stop`` in one task).

    ``configs``: one ``WorkerConfig`` per (topic, workflow name). ``tools``: the ``ToolSet`` whose tools are
    registered on start (``from_toolset`` builds both). ``concurrency``: handlers run at once, over all
    topics (default 10). ``poll_interval``: seconds between fallback claims when no NOTIFY comes (default 5).
    ``heartbeat_interval``: seconds between heartbeats; each counts for three intervals (default 5).
    ``shutdown_grace``: seconds running handlers get to finish on stop (default 10).
    ``purge_interval``: seconds between purges of the finished calls of its streams (retention; default 60,
    0: none). The watchdog runs beside it (``_housekeeping``), on the worker's own pool.
    ``pool_size``: most connections of the process's pool for a DSN (default 10; it holds one while idle). The
    pool is shared by every topic and by every ``Worker`` of the process on that DSN that names no task queue;
    the first to start sizes it. A worker process holds the pool's connections and one for LISTEN.
    ``park_after``: seconds a process listens (after it starts, or listens again) before it may stop listening
    while processes of its role before it have handlers enough for its streams' calls (default 5; ``None``:
    never). PostgreSQL 18 and earlier wake every listening session at each call, so idle listeners cost every
    call (``_pulse``); a parked process asks each second whether it is needed, and takes calls that waited.
    ``listen_dsn``: where the LISTEN connection goes instead of the configs' connection (default: the same), for a
    connection through a transaction pooler: PostgreSQL's own address, or a session-mode pool's; each config's
    ``worker_credentials`` replace its login too. ``pooler``: ``"transaction"`` when the configs' connection goes
    through a transaction pooler (PgBouncer's ``pool_mode = transaction``): the pool then keeps no prepared
    statements; it needs ``listen_dsn``.
    """

    def __init__(
        self,
        configs: Sequence[WorkerConfig],
        *,
        tools: ToolSet | None = None,
        schema: str = DEFAULT_SCHEMA,
        concurrency: int = 10,
        poll_interval: float = 5.0,
        heartbeat_interval: float = 5.0,
        shutdown_grace: float = 10.0,
        purge_interval: float = 60.0,
        pool_size: int = 10,
        park_after: float | None = 5.0,
        listen_dsn: Connection | None = None,
        pooler: Pooler | None = None,
    ) -> None:
        if not configs:
            raise ConfigError("a worker needs at least one WorkerConfig")
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if pool_size < 1:
            raise ConfigError("pool_size must be at least 1")
        if min(poll_interval, heartbeat_interval) <= 0 or shutdown_grace < 0:
            raise ConfigError("poll_interval and heartbeat_interval must be positive, shutdown_grace not negative")
        if park_after is not None and park_after < 0:
            raise ConfigError("park_after must not be negative (None: never park)")
        self.schema = check_schema(schema)
        self.tools = tools
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_grace = shutdown_grace
        self.purge_interval = purge_interval
        self.pool_size = pool_size
        self.park_after = park_after
        self.pooler = check_pooler(pooler, listen_dsn)
        self.consumer_id = f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._groups = _group(configs)
        # by the pool's DSN: the DSN its LISTEN connection logs in with
        self._listen_dsns = {g.dsn: g.dsn if listen_dsn is None else
                             connection_dsn(listen_dsn, g.configs[0].worker_credentials) for g in self._groups}
        self._registrations = self._match_tools(tools)
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._hurry: anyio.Event | None = None
        self._pulses: dict[str, Pulse] = {}  # by DSN
        self._drained: anyio.Event | None = None  # set once drain() is done
        self.failed = anyio.Event()  # the worker cannot go on (error says why); run_worker then stops it
        self.error: HotMeshError | None = None

    @classmethod
    def from_toolset(
        cls,
        tools: ToolSet,
        *,
        connection: Connection,
        credentials: WorkerCredentials | None = None,
        readonly: bool = False,
        reclaim_delay: int | None = None,
        reclaim_count: int | None = None,
        retry: RetryPolicy | None = None,
        task_queue: str | None = None,
        **options: Any,
    ) -> Worker:
        """A worker for every tool of ``tools``: one ``WorkerConfig`` each (its topic, workflow name and
        ``Tool.invoke`` as the callback, the tool's own ``retry`` and ``retry_on`` over the worker's); the options
        left out keep ``WorkerConfig``'s defaults. ``options``
        go to ``Worker`` (``schema``, ``concurrency``, ``poll_interval``, ...)."""
        if not tools.tools:
            raise ConfigError("the tool set has no tools to serve")
        given: dict[str, Any] = dict(reclaim_delay=reclaim_delay, reclaim_count=reclaim_count, retry=retry,
                                     task_queue=task_queue)
        common = {k: v for k, v in given.items() if v is not None}
        try:
            configs = [
                WorkerConfig(topic=t.topic, workflow_name=t.workflow_name, callback=t.invoke, connection=connection,
                             worker_credentials=credentials, readonly=readonly, retry_on=t.retry_on,
                             **{**common, **({"retry": t.retry} if t.retry is not None else {})})
                for t in tools.tools
            ]
        except pydantic.ValidationError as exc:  # one line, the option and what is wrong with it
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ConfigError(f"invalid worker option {where}: {error['msg']}") from None
        return cls(configs, tools=tools, **options)

    def _match_tools(self, tools: ToolSet | None) -> list[tuple[Tool, _Group]]:
        found = []
        for tool in tools.tools if tools else []:
            group = next((g for g in self._groups if g.topic == tool.topic and any(
                c.workflow_name == tool.workflow_name for c in g.configs)), None)
            if group is None:
                raise ConfigError(f"tool {tool.name!r} has no WorkerConfig for its topic and workflow name")
            found.append((tool, group))
        return found

    @property
    def consumers(self) -> list[Consumer]:
        """The running consumers: one per topic (and DSN), however many workflow names it serves."""
        return [g.consumer for g in self._groups if g.consumer is not None]

    # --------------------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, then stop gracefully: ``await task_group.start(worker.run)``."""
        async with self:
            task_status.started()
            await anyio.sleep_forever()

    async def start(self) -> None:
        """Connect, register the tools, listen, heartbeat and start claiming. Errors (a refused login, a stream
        the role may not use) are raised here, before anything is claimed."""
        if self._stack is not None:
            raise Conflict("this worker is already started")
        stack = AsyncExitStack()
        self._hurry, self._drained = anyio.Event(), None
        try:
            for group in self._groups:
                pool = await pools.acquire(group.configs[0].task_queue, group.dsn, max_size=self.pool_size,
                                           pooler=self.pooler)
                stack.push_async_callback(_release, pool)
                group.api = WorkerAPI(pool, self.schema)
            await self._register()
            slots = Slots(self.concurrency)
            by_dsn: dict[str, tuple[WorkerAPI, list[Consumer]]] = {}
            for group in self._groups:
                if not group.readonly:
                    assert group.api is not None
                    group.consumer = Consumer(
                        group.api, group.configs, consumer_id=self.consumer_id, slots=slots,
                        poll_interval=self.poll_interval, heartbeat_interval=self.heartbeat_interval,
                    )
                    by_dsn.setdefault(group.dsn, (group.api, []))[1].append(group.consumer)
            self._pulses = {dsn: Pulse(api, consumers, consumer_id=self.consumer_id, poll_interval=self.poll_interval,
                                       heartbeat_interval=self.heartbeat_interval, park_after=self.park_after,
                                       capacity=self.concurrency)
                            for dsn, (api, consumers) in by_dsn.items()}
            for pulse in self._pulses.values():
                await pulse.heartbeat()
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._listen(self._tg)
            for consumer in self.consumers:
                self._tg.start_soon(self._consume, consumer)
            for pulse in self._pulses.values():
                self._tg.start_soon(pulse.run_heartbeats)
                self._tg.start_soon(self._poll, pulse)
            housekeeper = self._groups[0].api
            assert housekeeper is not None
            self._tg.start_soon(lambda: watchdog_loop(housekeeper))
            self._tg.start_soon(lambda: retention_loop(housekeeper, interval=self.purge_interval))
        except BaseException:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await stack.aclose()
            self._tg = None
            for group in self._groups:
                group.consumer = None
            raise
        self._stack = stack
        log.info("worker %s serving %s", self.consumer_id,
                 ", ".join(f"{c.topic} {c.workflows}" for c in self.consumers) or "nothing (readonly)")

    async def _register(self) -> None:
        """Register the tools, 500 to a statement per pool (one by one on a schema migrated before
        ``worker_register_tools``)."""
        by_api: dict[int, tuple[WorkerAPI, list[Tool]]] = {}
        for tool, group in self._registrations:
            assert group.api is not None
            by_api.setdefault(id(group.api.pool), (group.api, []))[1].append(tool)
        for api, tools in by_api.values():
            for start in range(0, len(tools), 500):
                chunk = tools[start:start + 500]
                try:
                    states = await api.register_tools([(t.topic, t.workflow_name, t.registration()) for t in chunk])
                except SchemaOutdated:
                    states = [await api.register_definition(t.topic, t.workflow_name, t.registration()) for t in chunk]
                for tool, state in zip(chunk, states, strict=True):
                    if state == "pending":
                        log.warning("tool %r (stream %r): this definition waits for an admin's approval; agents see "
                                    "the approved one, or no tool yet, until then (mcp-hotmesh tools approve %s)",
                                    tool.name, tool.topic, tool.name)

    async def _consume(self, consumer: Consumer) -> None:
        """Run a consumer until it stops; a refused login (revoked, rotated) ends the worker's service: ``failed``
        is set, and ``error`` says why."""
        try:
            await consumer.run()
        except LoginRefused as exc:
            self._refused(exc)

    async def _poll(self, pulse: Pulse) -> None:
        """The fallback poll, which an idle worker sends alone: it is what sees a refused login first."""
        try:
            await pulse.run_polls()
        except LoginRefused as exc:
            self._refused(exc)

    def _refused(self, exc: LoginRefused) -> None:
        if self.error is None:
            self.error = exc
            log.error("PostgreSQL refuses this worker's login (revoked, or its password rotated): stopping")
        self.failed.set()

    async def _listen(self, tg: anyio.abc.TaskGroup) -> None:
        """One LISTEN connection per DSN for its consumers' channels; wait (briefly) until it is up."""
        by_dsn: dict[str, dict[str, Consumer]] = {}
        for group in self._groups:
            if group.consumer is not None:
                by_dsn.setdefault(group.dsn, {})[worker_channel(self.schema, group.topic)] = group.consumer
        listeners = []
        own = consumer_channel(self.schema, self.consumer_id)  # a new call for one of ours: payload, its stream's
        for dsn, by_channel in by_dsn.items():
            def dispatch(channel: str, payload: str, by_channel: dict[str, Consumer] = by_channel) -> None:
                if channel == own:
                    woken = by_channel.get(payload)
                    if woken is not None:
                        woken.wake()
                    return
                consumer = by_channel.get(channel)
                if consumer is not None:
                    consumer.notify(payload)

            async def wake_all(by_channel: dict[str, Consumer] = by_channel, pulse: Pulse = self._pulses[dsn]) -> None:
                # notifications sent while disconnected are lost: poll for them (one statement, not a claim per
                # topic), or, if that fails, let every consumer look
                try:
                    await pulse.poll()
                except HotMeshError:
                    for consumer in by_channel.values():
                        consumer.wake()

            listener = self._pulses[dsn].listener = Listener(self._listen_dsns[dsn], [own, *sorted(by_channel)],
                                                             dispatch, on_reconnect=wake_all,
                                                             on_refused=self._refused)
            tg.start_soon(listener.run)
            listeners.append(listener)
        with anyio.move_on_after(5):
            for listener in listeners:
                await listener.connected.wait()

    def hurry(self) -> None:
        """Cut the grace period short: a stop in progress cancels its handlers (and releases their messages)."""
        if self._hurry is not None:
            self._hurry.set()

    async def drain(self, grace: float | None = None) -> None:
        """The graceful part of stopping, callable from any task: stop claiming, give running handlers ``grace``
        seconds (default ``shutdown_grace``; ``hurry()`` cuts it short), cancel the rest and release their
        messages, say goodbye. The worker stays connected until ``stop``."""
        if self._stack is None:
            return
        if self._drained is not None:
            await self._drained.wait()
            return
        self._drained = anyio.Event()
        grace = self.shutdown_grace if grace is None else grace
        try:
            with anyio.CancelScope(shield=True):
                consumers = self.consumers
                for consumer in consumers:
                    consumer.stop_claiming()
                await self._wait_idle(consumers, grace, hurry=True)
                for consumer in consumers:
                    consumer.abandon()
                await self._wait_idle(consumers, ANSWER_TIMEOUT + 5, hurry=False)
                for pulse in self._pulses.values():
                    try:
                        with anyio.fail_after(5):
                            await pulse.goodbye()
                    except (HotMeshError, TimeoutError) as exc:
                        log.warning("goodbye failed: %s", exc)
        finally:
            self._drained.set()

    async def stop(self, grace: float | None = None) -> None:
        """``drain``, then disconnect. Call it from the task that called ``start`` (anyio's task groups and
        cancel scopes are left in the task that entered them)."""
        if self._stack is None:
            return
        await self.drain(grace)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()  # listeners, heartbeats, idle claim loops
        stack, self._stack, self._tg = self._stack, None, None
        await stack.aclose()  # leaves the task group (the scope start() entered), then the pools
        for group in self._groups:
            group.consumer = None
        log.info("worker %s stopped", self.consumer_id)

    async def _wait_idle(self, consumers: list[Consumer], seconds: float, *, hurry: bool) -> None:
        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as tg:
                async def idle() -> None:
                    for consumer in consumers:
                        await consumer.wait_idle()
                    tg.cancel_scope.cancel()

                async def hurried() -> None:
                    assert self._hurry is not None
                    await self._hurry.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(idle)
                if hurry:
                    tg.start_soon(hurried)

    # ------------------------------------------------------------------------------------------ publish

    async def publish(self, topic: str, workflow_name: str, args: Any) -> int:
        """A new fire-and-forget message on ``topic`` (readonly workers publish too); returns its id."""
        if self._stack is None:
            raise Conflict("start the worker before publishing")
        group = next((g for g in self._groups if g.topic == topic), self._groups[0])
        assert group.api is not None
        return await group.api.publish(topic, workflow_name, args)


async def _release(pool: Any) -> None:
    with anyio.CancelScope(shield=True):
        await pools.release(pool)


def _group(configs: Sequence[WorkerConfig]) -> list[_Group]:
    groups: dict[tuple[str, str, bool], _Group] = {}
    for config in configs:
        key = (config.topic, config.dsn, config.readonly)
        group = groups.setdefault(key, _Group(*key))
        first = group.configs[0] if group.configs else config
        if any(c.workflow_name == config.workflow_name for c in group.configs):
            raise ConfigError(f"two workers serve topic {config.topic!r} with workflow name "
                              f"{config.workflow_name!r}; give each its own workflow_name")
        for option in ("reclaim_delay", "reclaim_count", "task_queue"):
            if getattr(config, option) != getattr(first, option):
                raise ConfigError(f"workers on topic {config.topic!r} share one consumer and must agree on "
                                  f"{option}")
        group.configs.append(config)
    return list(groups.values())


async def run_worker(
    *,
    tools: ToolSet,
    connection: Connection,
    credentials: WorkerCredentials | None = None,
    schema: str = DEFAULT_SCHEMA,
    concurrency: int = 10,
    **options: Any,
) -> None:
    """Serve ``tools`` until SIGTERM or SIGINT, then stop gracefully (a second signal: at once).

    ``options`` go to ``Worker.from_toolset`` (``reclaim_delay``, ``retry``, ``task_queue``, ``shutdown_grace``,
    ``poll_interval``, ...).
    """
    worker = Worker.from_toolset(
        tools, connection=connection, credentials=credentials, schema=schema, concurrency=concurrency, **options
    )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with worker:  # a start error (refused login, stream not allowed) is raised as it is
            async with anyio.create_task_group() as until:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: stopping (a second signal stops at once)", signal.Signals(signum).name)
                        break
                    until.cancel_scope.cancel()

                async def on_failure() -> None:
                    await worker.failed.wait()
                    worker.hurry()  # the database refuses us: nothing running can be answered anyway
                    until.cancel_scope.cancel()

                until.start_soon(on_signal)
                until.start_soon(on_failure)

            async def second_signal() -> None:
                async for _ in signals:
                    worker.hurry()
                    return

            async with anyio.create_task_group() as tg:
                tg.start_soon(second_signal)
                await worker.drain()
                tg.cancel_scope.cancel()
    if worker.error is not None:
        raise worker.error
