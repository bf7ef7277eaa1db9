"""The engine's side of one front end's channel: its requests served through the model manager (the
cache, the batchers, the statistics), their answers written back to shared memory, its control calls.
One per process start, with that start's memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from rapidserve.server.errors import RapidServeError
from rapidserve.server.frontend.channel import Channel
from rapidserve.server.frontend.remote import error_of
from rapidserve.server.frontend.shm import Arena, no_room, views
from rapidserve.server.manager import ModelManager
from rapidserve.server.stats import ServerStats
from rapidserve.server.types import InferRequest

__all__ = ["FrontendHandler"]

log = logging.getLogger("rapidserve.server.app")


class FrontendHandler:
    """The engine's side of one front end's channel (one per process start, with its own memory)."""

    def __init__(
        self,
        manager: ModelManager,
        channel: Channel,
        requests: Arena,
        answers: Arena,
        index: int,
        stats: ServerStats,
        *,
        frontend: Any,
        synced: Callable[[], Awaitable[None]],
    ) -> None:
        """``stats`` counts failures naming no model found here; ``frontend`` hears of its process's
        notices (``serving()``, ``answered(token, value)``); ``synced()`` returns once every front end
        has the model table as it is now (a load or unload is answered after that, so that a client
        sees the model on any front end once the call returns)."""
        self._frontend = frontend
        self._synced = synced
        self._manager = manager
        self._index = index
        self._stats = stats
        self._channel = channel
        self._requests = requests
        self._answers = answers
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started: dict[int, tuple[Any, Any]] = {}  # requests in a batcher, by the front end's number
        self._left: set[int] = set()  # those of them running when their client left
        self._in_cache: dict[int, asyncio.Task[None]] = {}  # cached models' requests, by the same number

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "infer":
            self._infer(*message[1:])
        elif kind == "cancel":
            self._cancel(message[1])
        elif kind == "free":
            for block in message[1]:
                self._answers.free(block)
        elif kind == "rejected":
            _, name, version, error_kind, text = message
            with contextlib.suppress(RapidServeError):
                self._manager.get(name, str(version)).rejected(error_of(error_kind, text))
        elif kind == "call":
            self._spawn(self._call(*message[1:]))
        elif kind == "answer":
            self._frontend.answered(message[1], message[2])
        elif kind == "serving":
            self._frontend.serving()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _infer(
        self, seq: int, name: str, version: int, identity: int, asked: str, request_id: str,
        parameters: dict[str, Any], deadline: float | None, headers: Any, outputs: tuple[str, ...], key: bytes | None,
    ) -> None:  # fmt: skip
        """Serve one request: the version the client asked for (the one the front end checked the request
        against, unless a reload replaced it meanwhile), through the cache or straight to the batcher."""
        try:
            model = self._manager.get(name, asked)
        except RapidServeError as exc:
            self._stats.failed(exc.reason)
            self._error(seq, exc)
            return
        same = id(model) == identity  # the version the front end checked it against (not a reload of it)
        request = InferRequest(
            name, asked, views(self._requests, headers), outputs, request_id, parameters, deadline, checked=same
        )
        if model.caches:
            task = self._in_cache[seq] = asyncio.create_task(self._cached(seq, model, request, key if same else None))
            task.add_done_callback(lambda _: self._in_cache.pop(seq, None))  # (the table holds it until then)
            return
        try:
            started = model.start(request)
        except RapidServeError as exc:
            self._error(seq, exc)
            return
        self._started[seq] = (model, started)
        started.future.add_done_callback(lambda _: self._finished(seq, model, started))

    async def _cached(self, seq: int, model: Any, request: InferRequest, key: bytes | None) -> None:
        try:
            response = await model.infer(request, key)
            self._answer(seq, response)
        except asyncio.CancelledError:  # its client left (the model counted it): the front end frees
            left = asyncio.CancelledError()  # its inputs once no run reads them
            model.when_released(request, lambda: self._error(seq, left))
        except Exception as exc:
            self._error(seq, exc)

    def _cancel(self, seq: int) -> None:
        """The client left: its request is counted as cancelled now, as in a front end's own process, and
        leaves the queue if it is still there. A running one finishes, as its inputs are in use, and its
        answer is dropped. A cached model's request is cancelled as its caller would be in one process
        (its computation with it, if it led one), on the next turn of the loop: by then its task has
        started, so it answers the front end in any case."""
        task = self._in_cache.get(seq)
        if task is not None:
            asyncio.get_running_loop().call_soon(task.cancel)
            return
        entry = self._started.get(seq)
        if entry is not None:
            model, started = entry
            if not model.withdraw(started):
                self._left.add(seq)

    def _finished(self, seq: int, model: Any, started: Any) -> None:
        self._started.pop(seq, None)
        if seq in self._left:  # (counted when its client left)
            self._left.discard(seq)
            self._error(seq, asyncio.CancelledError())  # the front end frees its inputs' block now
            return
        try:
            self._answer(seq, model.finish(started))
        except (Exception, asyncio.CancelledError) as exc:
            self._error(seq, exc)

    def _answer(self, seq: int, response: Any) -> None:
        """Write the answer into shared memory and say where; raises where it does not fit."""
        if self._channel.closed:
            return  # the front end is gone, and its client with it
        written = self._answers.write(response.outputs)
        if written is None:
            raise no_room(self._answers, f"an answer to front end {self._index}")
        self._channel.send(("result", seq, response.model_version, *written))

    def _error(self, seq: int, error: BaseException) -> None:
        """Send the error for the front end to raise (anything not ours is INTERNAL there, and logged here)."""
        if isinstance(error, RapidServeError):
            self._channel.send(("error", seq, type(error).__name__, str(error)))
            return
        if not isinstance(error, asyncio.CancelledError):
            log.error("request of front end %d failed unexpectedly", self._index, exc_info=error)
        self._channel.send(("error", seq, "RapidServeError", f"the engine failed: {type(error).__name__}"))

    async def _call(self, seq: int, op: str, args: tuple[Any, ...]) -> None:
        manager = self._manager
        try:
            if op == "load":
                name, config_json, files = args
                value: Any = await manager.load(name, config_json=config_json, files=files)
                await self._synced()
            elif op == "unload":
                value = await manager.unload(*args)
                await self._synced()
            elif op == "index":
                value = await manager.listing(*args)
            elif op == "statistics":
                value = (await manager.statistics(*args)).SerializeToString()
            else:
                raise RapidServeError(f"unknown call {op!r}")
        except RapidServeError as exc:
            self._channel.send(("reply", seq, False, (type(exc).__name__, str(exc))))
        except Exception as exc:
            log.exception("front end call %s failed", op)
            self._channel.send(("reply", seq, False, ("RapidServeError", f"{op} failed: {type(exc).__name__}")))
        else:
            self._channel.send(("reply", seq, True, value))
