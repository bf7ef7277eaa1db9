"""The engine process with ``--frontends N`` (N > 1): models, batchers, cache, statistics and /metrics
here; the gRPC and HTTP edge in N front-end processes sharing the ports (SO_REUSEPORT).

The engine holds the ports from the start (bound with SO_REUSEPORT, never listening), so a busy port
fails at once and the front ends can share them. A front end that dies is started again; its own
in-flight requests fail with its connections. On stop, every front end drains (its accepted requests
are answered by the engine meanwhile), then the models are unloaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import sys
import time
from typing import Any

from rapidserve.server.app import InferenceServer, build_manager
from rapidserve.server.errors import RapidServeError
from rapidserve.server.frontend.channel import Channel, ChannelClosed
from rapidserve.server.frontend.handler import FrontendHandler
from rapidserve.server.frontend.shm import Arena
from rapidserve.server.ports import bare_host, check_bindable, host_port
from rapidserve.server.settings import ServerSettings
from rapidserve.server.stats import ServerStats

__all__ = ["EngineServer", "make_server"]

log = logging.getLogger("rapidserve.server.app")

START_TIMEOUT_S = 120.0  # a front end imports, connects and binds within this
STATS_TIMEOUT_S = 2.0
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # after quick deaths in a row
STABLE_AFTER_S = 30.0  # a front end that lived this long died "once", not in a loop


def make_server(settings: ServerSettings) -> Any:
    """The server the settings ask for: everything in this process, or an engine with front ends."""
    return EngineServer(settings) if settings.frontends > 1 else InferenceServer(settings)


class EngineServer:
    """Same lifecycle as ``InferenceServer`` (``start``, ``stop``, ``reload_certificates``, the ports)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.manager = build_manager(settings, self._push_table)
        self.stats = ServerStats()  # what the /metrics shows: the front ends' records added up
        self._own = ServerStats()  # failures seen here (a model gone between a front end's lookup and ours)
        self._retired = ServerStats()  # the last records of front ends that exited
        self.frontends: list[Frontend] = []
        self._reserved: list[socket.socket] = []
        self._metrics: Any = None
        self._stopping = False
        self.abandoned_loads: list[str] = []
        self.port = self.http_port = self.metrics_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        self.port = self._reserve(settings.host, settings.grpc_port, "gRPC", "--grpc-port", "--host")
        if settings.http_enabled:
            host = settings.http_host or settings.host
            self.http_port = self._reserve(host, settings.http_port, "HTTP", "--http-port", "--http-address")
        if settings.metrics_enabled:
            from rapidserve.server.metrics import MetricsServer

            self._metrics = MetricsServer(self.manager, self.stats, refresh=self._gather_stats)
            metrics_host = bare_host(settings.metrics_host or settings.host)
            self.metrics_port = await self._metrics.start(metrics_host, settings.metrics_port)
        shared = _with_ports(settings, self.port, self.http_port)
        self.frontends = [Frontend(self, index, shared) for index in range(settings.frontends)]
        await asyncio.gather(*(frontend.start() for frontend in self.frontends))
        log.info(
            "gRPC server listening on %s%s (%d front-end processes)",
            host_port(settings.host, self.port),
            " (TLS)" if settings.tls else "",
            settings.frontends,
        )
        if self.http_port:
            log.info("HTTP server listening on %s", host_port(settings.http_host or settings.host, self.http_port))
        if self._metrics is not None:
            log.info("Prometheus metrics at http://%s/metrics", host_port(metrics_host, self.metrics_port))
        await self.manager.start()
        self._push_table()
        await self.synced()  # every front end answers ready from here on, as one process would
        if self.manager.ready:
            log.info("server ready")
        else:
            log.error("not every startup model loaded: the server stays live but not ready")

    async def stop(self, grace_s: float | None = None) -> None:
        """Every front end drains (accepted requests are answered meanwhile), then the models unload."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self._stopping = True
        await asyncio.gather(*(frontend.stop(grace + 5.0) for frontend in self.frontends))
        self.abandoned_loads = await self.manager.stop(max(deadline - time.monotonic(), 1.0))
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)
        for reservation in self._reserved:
            reservation.close()

    def reload_certificates(self) -> concurrent.futures.Future[None]:
        """SIGHUP: every front end re-reads the TLS files (each logs what it did). Callable from any
        thread; the future is done once every front end has reloaded."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def reload() -> None:
            await asyncio.gather(*(frontend.ask("reload_certificates") for frontend in self.frontends))
            done.set_result(None)

        self._loop.call_soon_threadsafe(lambda: self._tasks.add(asyncio.ensure_future(reload())))
        return done

    def _reserve(self, host: str, port: int, what: str, port_flag: str, host_flag: str) -> int:
        """Check the port is free, then hold it (SO_REUSEPORT, not listening) for the front ends."""
        check_bindable(host, port, what, port_flag, host_flag)
        family, kind, proto, _, address = socket.getaddrinfo(
            bare_host(host) or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reservation = socket.socket(family, kind, proto)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
        self._reserved.append(reservation)
        return int(reservation.getsockname()[1])

    async def synced(self) -> None:
        """Returns once every front end has handled the model tables pushed so far (each answers in order)."""
        await asyncio.gather(*(frontend.ask("sync") for frontend in self.frontends))

    def _push_table(self) -> None:
        table = self.manager.mirror()
        for frontend in self.frontends:
            frontend.send(("models", table))

    async def _gather_stats(self) -> None:
        """Ask every front end for its records and add them up into ``self.stats`` (before a scrape)."""
        snapshots = await asyncio.gather(*(frontend.records() for frontend in self.frontends))
        total = ServerStats()
        for stats in (self._own, self._retired):
            total.add(stats.snapshot())
        for snapshot in snapshots:
            if snapshot is not None:
                total.add(snapshot)
        self.stats.failures, self.stats.calls, self.stats.call_seconds = total.failures, total.calls, total.call_seconds


class Frontend:
    """One front-end process, from the engine's side: started, served, and started again if it dies."""

    def __init__(self, engine: EngineServer, index: int, settings: ServerSettings) -> None:
        self._engine = engine
        self._manager = engine.manager
        self.index = index
        self._settings = settings
        self.process: asyncio.subprocess.Process | None = None
        self._channel: Channel | None = None
        self._requests: Arena | None = None  # the front end writes, we read
        self._answers: Arena | None = None  # we write, the front end reads
        self._serving: asyncio.Future[None] | None = None
        self._asked: dict[int, asyncio.Future[Any]] = {}
        self._tokens = itertools.count()
        self._last_records: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._deaths = 0
        self._started_at = 0.0
        self.restarts = 0

    async def start(self) -> None:
        """Start the process and wait until it serves; its death from then on starts it again."""
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch())

    def send(self, message: Any) -> None:
        if self._channel is not None:
            self._channel.send(message)

    async def ask(self, op: str, timeout_s: float = STATS_TIMEOUT_S) -> Any:
        """The front end's answer to ``op`` ("stats", "reload_certificates"); None if it has none in time."""
        if self._channel is None or self._channel.closed:
            return None
        token = next(self._tokens)
        future = self._asked[token] = asyncio.get_running_loop().create_future()
        self._channel.send(("ask", token, op))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            self._asked.pop(token, None)

    async def records(self) -> Any:
        """The front end's own records (calls at its edge, failures naming no model), or None."""
        records = await self.ask("stats")
        if records is not None:
            self._last_records = records
        return self._last_records  # (a busy front end: its last records stand in)

    async def stop(self, timeout_s: float) -> None:
        """Drain the process and wait for it to exit (killed if it does not within ``timeout_s``)."""
        if self._watcher is not None:
            self._watcher.cancel()
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.send(("drain",))
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.error("front end %d did not stop in %.0f s; killing it", self.index, timeout_s)
            process.kill()
            await process.wait()

    async def _spawn(self) -> None:
        size = self._settings.frontend_shm_bytes
        self._requests = Arena.create(f"rapidserve-requests-{self.index}", size)
        self._answers = Arena.create(f"rapidserve-answers-{self.index}", size)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (theirs.fileno(), self._requests.fd, self._answers.fd)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rapidserve.server.frontend.process", *map(str, fds), str(self.index),
            pass_fds=fds, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._started_at = time.monotonic()
        theirs.close()
        for fd in (self._requests.fd, self._answers.fd):
            os.close(fd)  # (the maps stay; the child has its own descriptors)
        self._channel = channel = await Channel.open(ours)
        self._serving = asyncio.get_running_loop().create_future()
        level = logging.getLogger().getEffectiveLevel()
        channel.send(("setup", self._settings, size, level))
        channel.send(("models", self._manager.mirror()))
        reader = asyncio.create_task(self._serve(channel, self._requests, self._answers))
        self._tasks.add(reader)
        reader.add_done_callback(self._tasks.discard)
        waiting = asyncio.ensure_future(self._serving)
        done, _ = await asyncio.wait((waiting, reader), timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            raise RapidServeError(f"front end {self.index} did not start (exit status {await self.process.wait()})")

    async def _watch(self) -> None:
        """Start the process again whenever it exits while the server is not stopping."""
        while True:
            assert self.process is not None
            code = await self.process.wait()
            if self._engine._stopping:
                return
            lived = time.monotonic() - self._started_at
            self._deaths = self._deaths + 1 if lived < STABLE_AFTER_S else 1
            delay = RESTART_BACKOFF_S[min(self._deaths - 1, len(RESTART_BACKOFF_S) - 1)]
            log.error(
                "front end %d (pid %d) exited with status %s; its in-flight requests failed; starting it again%s",
                self.index, self.process.pid, code, f" in {delay:.0f} s" if delay else "",
            )  # fmt: skip
            if self._last_records is not None:
                self._engine._retired.add(self._last_records)
                self._last_records = None
            await asyncio.sleep(delay)
            try:
                await self._spawn()
                self.restarts += 1
            except Exception as exc:  # (the watcher must go on: the next exit is tried again)
                log.error("front end %d could not be started again: %s", self.index, exc)

    async def _serve(self, channel: Channel, requests: Arena, answers: Arena) -> None:
        handler = FrontendHandler(
            self._manager, channel, requests, answers, self.index, self._engine._own, frontend=self,
            synced=self._engine.synced,
        )  # fmt: skip
        try:
            await channel.serve(handler.handle)
        except ChannelClosed:
            pass
        finally:
            channel.close()

    def serving(self) -> None:
        if self._serving is not None and not self._serving.done():
            self._serving.set_result(None)

    def answered(self, token: int, value: Any) -> None:
        future = self._asked.get(token)
        if future is not None and not future.done():
            future.set_result(value)


def _with_ports(settings: ServerSettings, grpc_port: int, http_port: int) -> ServerSettings:
    """The front ends' settings: the ports the engine holds (a port given as 0 has been picked now), and
    each its share of the in-flight budget (at least two messages), so that together they hold about
    what the budget says."""
    budget = settings.max_inflight_bytes
    if budget:
        budget = max(budget // settings.frontends, 2 * settings.grpc_max_message_bytes)
    return dataclasses.replace(
        settings, grpc_port=grpc_port, http_port=http_port or settings.http_port, max_inflight_bytes=budget
    )
