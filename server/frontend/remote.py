"""The front end's view of the engine process: models mirrored from it, and requests sent to it.

``RemoteManager`` answers lookups (``get``, ``is_ready``, ``loaded``...) exactly as ``ModelManager`` does,
from the table the engine pushes on every load, unload and reload; calls that change or read the
engine's state (load, unload, index, statistics) go to the engine. ``RemoteModel`` stands where a
``ModelVersion`` stands at the edge: it validates against the mirrored spec and sends each request to
the engine, whose batcher, cache and statistics serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rapidserve import protos
from rapidserve.server import errors
from rapidserve.server.errors import RapidServeError, Unavailable
from rapidserve.server.frontend.channel import Channel
from rapidserve.server.frontend.shm import Arena, no_room
from rapidserve.server.manager import IndexEntry, ModelManager, _Model, load_refusal
from rapidserve.server.model import Started
from rapidserve.server.stats import ServerStats
from rapidserve.server.types import InferRequest, InferResponse

__all__ = ["EngineLink", "RemoteManager", "RemoteModel", "error_of"]

ENGINE_GONE = "the engine process is gone; retry on another replica"


def error_of(kind: str, message: str) -> RapidServeError:
    """The engine's error, raised again here with its class (so it maps to the same status)."""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, RapidServeError)):
        cls = RapidServeError
    return cls(message)


class EngineLink:
    """One front end's connection to the engine: requests out through shared memory, answers back."""

    def __init__(self, channel: Channel, requests: Arena, answers: Arena, stats: ServerStats) -> None:
        self.channel = channel
        self._requests = requests  # this front end writes it
        self._answers = answers  # the engine writes it; views of a block are lent until encoded
        self.stats = stats  # the edge's own records, which the engine's /metrics adds up
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], int]] = {}
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self.handlers: dict[str, Callable[..., None]] = {}  # the engine's notices, by kind
        self.answers: dict[str, Callable[[], Any]] = {"stats": lambda: self.stats.snapshot()}  # its questions
        self._calls: dict[int, asyncio.Future[Any]] = {}
        answers.on_lent_free = self._answer_done

    async def run(self, early: list[Any] = ()) -> None:  # type: ignore[assignment]
        """Handle ``early`` (messages that came with the setup), then the engine's messages until it
        closes the channel."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        try:
            for message in early:
                self._handle(message)
            await self.channel.serve(self._handle)
        finally:
            self._fail_all(Unavailable(ENGINE_GONE))

    def submit(self, request: InferRequest, model: RemoteModel, outputs: tuple[str, ...], key: bytes | None) -> Any:
        """Send a request validated against ``model``; the future resolves to (the output arrays, views until
        encoded; the version that ran them)."""
        if self.channel.closed:
            raise Unavailable(ENGINE_GONE)
        written = self._requests.write(request.inputs)
        if written is None:
            raise no_room(self._requests, "a request on its way to the engine")
        headers, block = written
        seq = next(self._seq)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = (future, block)
        future.add_done_callback(functools.partial(self._settled, seq))
        self.channel.send(
            ("infer", seq, request.model_name, model.version, model.identity, request.model_version, request.id,
             request.parameters, request.deadline, headers, outputs, key)
        )  # fmt: skip
        return future

    def _settled(self, seq: int, future: asyncio.Future[Any]) -> None:
        """A request cancelled here (its client left) is withdrawn from the engine's queue. Its block
        stays taken until the engine's answer for it says the inputs are no longer read."""
        if future.cancelled() and seq in self._pending:
            self.channel.send(("cancel", seq))

    def notify(self, message: tuple[Any, ...]) -> None:
        self.channel.send(message)

    async def call(self, op: str, *args: Any) -> Any:
        """A control call answered by the engine (load, unload, index, statistics)."""
        if self.channel.closed:
            raise Unavailable(ENGINE_GONE)
        seq = next(self._seq)
        future = self._calls[seq] = asyncio.get_running_loop().create_future()
        self.channel.send(("call", seq, op, args))
        return await future

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "result":
            _, seq, version, headers, block = message
            future, request_block = self._pending.pop(seq)
            self._requests.free(request_block)
            arrays = self._answers.lend(headers, block)
            if not future.done():
                future.set_result((arrays, version))
        elif kind == "error":
            _, seq, error_kind, text = message
            future, request_block = self._pending.pop(seq)
            self._requests.free(request_block)
            if not future.done():
                future.set_exception(error_of(error_kind, text))
        elif kind == "reply":
            _, seq, ok, value = message
            call = self._calls.pop(seq, None)
            if call is not None and not call.done():
                call.set_result(value) if ok else call.set_exception(error_of(*value))
        elif kind == "ask":
            _, token, op = message
            self.channel.send(("answer", token, self.answers[op]()))
        else:
            self.handlers[kind](*message[1:])

    def _answer_done(self, block: int) -> None:
        """The last view of an answer is gone (after encoding): the engine may reuse its block. The
        notice rides with the next request's frame (or goes on its own a moment later)."""
        if threading.get_ident() == self._thread:
            self.channel.later(("free", (block,)))
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self.channel.later, ("free", (block,)))

    def _fail_all(self, error: RapidServeError) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(error)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if not call.done():
                call.set_exception(error)


class RemoteModel:
    """A model version served by the engine process, as the edge sees it."""

    def __init__(
        self, link: EngineLink, name: str, version: int, config: Any, spec: Any, caches: bool, identity: int = 0
    ) -> None:
        self._link = link
        self.identity = identity  # the engine's version object this mirrors (a reload makes a new one)
        self.name = name
        self.version = version
        self.config = config
        self.spec = spec
        self.caches = caches
        self._output_names = tuple(s.name for s in spec.outputs)
        self.pending_requests = 0
        self.executions_in_flight = 0

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    def cache_lookup(self, key: bytes) -> None:
        """Hits are the engine's to find (one cache for every front end): the key travels with the request."""
        return None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        yield  # the engine picks the version when the request arrives there

    def rejected(self, error: BaseException) -> None:
        """A request refused here (it did not decode) counts against the model in the engine."""
        if isinstance(error, RapidServeError):
            self._link.notify(("rejected", self.name, self.version, type(error).__name__, str(error)))

    def start(self, request: InferRequest) -> Started:
        start = time.monotonic_ns()
        future, outputs = self._send(request, None)
        return Started(future, outputs, start, request.id, request.deadline)

    def finish(self, started: Started, error: BaseException | None = None) -> InferResponse:
        if error is not None:
            raise error
        arrays, version = started.future.result()
        return InferResponse(self.name, version, {n: arrays[n] for n in started.outputs}, started.id)

    async def infer(self, request: InferRequest, cache_key: bytes | None = None) -> InferResponse:
        future, outputs = self._send(request, cache_key)
        arrays, version = await future
        return InferResponse(self.name, version, {n: arrays[n] for n in outputs}, request.id)

    def _send(self, request: InferRequest, cache_key: bytes | None) -> tuple[Any, tuple[str, ...]]:
        """Validate (a refusal counts against the model in the engine) and send; the answer's future."""
        try:
            if not request.checked:
                self.spec.validate(request)
            outputs = request.outputs or self._output_names
            return self._link.submit(request, self, outputs, cache_key), outputs
        except RapidServeError as exc:
            self.rejected(exc)
            raise


class RemoteManager:
    """The engine's model table, mirrored. Lookups are ``ModelManager``'s own code over the mirror."""

    get = ModelManager.get
    unknown = ModelManager.unknown
    is_ready = ModelManager.is_ready
    loaded = ModelManager.loaded
    cache = None  # the engine's, reported by its /metrics

    def __init__(self, link: EngineLink, on_change: Callable[[], None] | None = None) -> None:
        self._link = link
        self._models: dict[str, _Model] = {}
        self._name_loaded_models = True
        self._ready = False
        self._control_mode = "none"
        self._stopping = False
        self.on_change = on_change
        self._first = asyncio.Event()
        self.control_mode = "none"
        link.handlers["models"] = self.update

    @property
    def ready(self) -> bool:
        return self._ready

    def update(self, table: Mapping[str, Any]) -> None:
        """The engine's table after a change: versions still served keep their objects."""
        models: dict[str, _Model] = {}
        for name, (state, reason, versions) in table["models"].items():
            old = self._models.get(name)
            entry = models[name] = _Model(state=state, reason=reason)
            for version, identity, config_bytes, spec, caches in versions:
                kept = old.versions.get(version) if old is not None else None
                if kept is not None and kept.identity == identity:
                    entry.versions[version] = kept
                    continue
                config = protos.ModelConfig.FromString(config_bytes)
                entry.versions[version] = RemoteModel(self._link, name, version, config, spec, caches, identity)
        self._models = models
        self._ready = table["ready"]
        self.control_mode = table["control_mode"]
        self._stopping = table["stopping"]
        self._name_loaded_models = table["name_loaded_models"]
        self._first.set()
        if self.on_change is not None:
            self.on_change()

    async def start(self) -> None:
        """Wait for the engine's first table."""
        await self._first.wait()

    async def stop(self, timeout_s: float = 30.0) -> list[str]:
        return []  # the engine unloads its models itself

    def startup_failures(self) -> list[tuple[str, str]]:
        return []

    def states(self) -> list[tuple[str, str, bool]]:
        return []

    def check_load_allowed(self) -> None:
        refusal = load_refusal(self.control_mode, self._stopping)
        if refusal is not None:
            raise refusal

    async def load(self, name: str, *, config_json: str = "", files: Mapping[str, bytes] | None = None) -> None:
        await self._link.call("load", name, config_json, dict(files or {}))

    async def unload(self, name: str) -> None:
        await self._link.call("unload", name)

    async def listing(self, ready_only: bool = False) -> list[IndexEntry]:
        return list(await self._link.call("index", ready_only))

    async def statistics(self, name: str, version: str) -> Any:
        return protos.ModelStatisticsResponse.FromString(await self._link.call("statistics", name, version))
