"""The model manager: which models and versions are served, and their lifecycle.

Control modes follow Triton: ``none`` loads everything at start and refuses load/unload calls;
``explicit`` loads the ``--load-model`` names at start and takes load/unload calls; ``poll`` rescans
the repository every ``poll_secs`` and loads, reloads or unloads what changed. A (re)load builds the
new versions completely (engines and warm-up) before they replace the old ones, which finish their
queued and running requests before their engines are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidserve.server.cache import PredictionCache
from rapidserve.server.config import parse_config_json
from rapidserve.server.errors import ModelLoadError, ModelNotFound, NotAllowed, Unavailable
from rapidserve.server.model import ModelVersion, build_version
from rapidserve.server.repository import fingerprint, read_source
from rapidserve.server.repository import list_models as _list_models
from rapidserve.server.settings import UploadPolicy

__all__ = ["ControlMode", "IndexEntry", "ModelManager"]

log = logging.getLogger(__name__)

ControlMode = str  # "none" | "explicit" | "poll"
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(slots=True)
class _Model:
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    state: str = UNAVAILABLE
    reason: str = ""
    fingerprint: str = ""
    upload: Path | None = None  # the folder of uploaded files the current versions were loaded from
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelManager:
    def __init__(
        self,
        repositories: list[Path],
        *,
        control_mode: ControlMode = "none",
        load_models: tuple[str, ...] = (),
        poll_secs: float = 15.0,
        load_threads: int = 4,
        batching_mode: str = "adaptive",
        cache: PredictionCache | None = None,
        on_change: Callable[[], None] | None = None,
        uploads: UploadPolicy | None = None,
    ) -> None:
        if control_mode not in ("none", "explicit", "poll"):
            raise ValueError(f"model control mode must be none, explicit or poll, not {control_mode!r}")
        self.repositories = repositories
        self.control_mode = control_mode
        self._load_models = load_models
        self._poll_secs = poll_secs
        self._batching_mode = batching_mode
        self.cache = cache
        self._on_change = on_change  # called after every load, reload and unload (health follows readiness)
        self._uploads_policy = uploads or UploadPolicy()
        self._models: dict[str, _Model] = {}
        self._startup: set[str] = set()
        self._started = False
        self._loader = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="rs-load")
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._uploads = tempfile.TemporaryDirectory(prefix="rapidserve-uploads-")
        self._listed: frozenset[str] = frozenset()  # the repositories' models when last listed

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the startup models (all of them unless explicit), then start polling if asked."""
        available = self._list()
        if self.control_mode == "explicit":
            names = list(available) if "*" in self._load_models else list(self._load_models)
        else:
            names = list(available)
        self._startup = set(names)
        await asyncio.gather(*(self._load_quietly(name) for name in names))
        self._started = True
        if self.control_mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="rapidserve-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.gather(*(self._unload(name, "server stopping") for name in list(self._models)))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loader.shutdown(wait=True)
        self._uploads.cleanup()

    @property
    def ready(self) -> bool:
        """True once every model loaded at startup is ready (strict readiness, like Triton)."""
        return self._started and all(self._is_ready(name) for name in self._startup)

    # -- lookups -------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves a request; ``""`` picks the highest loaded version."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model '{name}'")
        if not model.versions:
            if model.state == LOADING:
                raise Unavailable(f"model '{name}' is loading")
            raise ModelNotFound(f"model '{name}' is not loaded ({model.reason or 'not loaded'})")
        if not version:
            return model.versions[max(model.versions)]
        if not version.isdigit() or int(version) not in model.versions:
            raise ModelNotFound(
                f"model '{name}' has no version '{version}'; loaded: {', '.join(map(str, sorted(model.versions)))}"
            )
        return model.versions[int(version)]

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, Unavailable):
            return False
        return True

    def loaded(self) -> list[ModelVersion]:
        return [v for model in self._models.values() for _, v in sorted(model.versions.items())]

    def _list(self) -> dict[str, Path]:
        available = _list_models(self.repositories)
        self._listed = frozenset(available)
        return available

    def states(self) -> list[tuple[str, str, bool]]:
        """(model, version, ready): every loaded version, and every model of the repositories (as last
        listed) or known to the manager that has none; version "" for those. No file system access."""
        states: list[tuple[str, str, bool]] = []
        for name in sorted(self._listed | {n for n, m in self._models.items() if m.versions}):
            model = self._models.get(name)
            if model is not None and model.versions:
                states += [(name, str(v), model.state == READY) for v in sorted(model.versions)]
            else:
                states.append((name, "", False))
        return states

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model in the repositories and every loaded one, with its state (RepositoryIndex)."""
        names = set(self._models)
        with contextlib.suppress(ModelLoadError):
            names |= set(self._list())
        entries: list[IndexEntry] = []
        for name in sorted(names):
            model = self._models.get(name)
            if model is not None and model.versions:
                entries += [IndexEntry(name, str(v), model.state) for v in sorted(model.versions)]
            elif not ready_only:
                state = model.state if model is not None else UNAVAILABLE
                reason = model.reason if model is not None else "not loaded"
                entries.append(IndexEntry(name, "", state, reason))
        return [e for e in entries if e.state == READY] if ready_only else entries

    # -- control -------------------------------------------------------------------------------

    async def load(self, name: str, *, config_json: str = "", files: Mapping[str, bytes] | None = None) -> None:
        """Load or reload a model (RepositoryModelLoad); ``files`` maps ``<version>/<file>`` to bytes."""
        if self.control_mode != "explicit":
            raise NotAllowed(
                f"loading models is not allowed in model control mode '{self.control_mode}'; "
                "start the server with --model-control-mode explicit"
            )
        _check_name(name)
        config = parse_config_json(config_json, f"config for '{name}'") if config_json else None
        if files and config is None:
            raise ModelLoadError("loading model files requires the 'config' parameter too")
        # The load goes on if the caller goes away (a cancelled load would leave engines half-built).
        task = asyncio.create_task(self._load(name, config=config, files=files or None), name=f"load-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def unload(self, name: str) -> None:
        if self.control_mode != "explicit":
            raise NotAllowed(f"unloading models is not allowed in model control mode '{self.control_mode}'")
        if name not in self._models or not self._models[name].versions:
            raise ModelNotFound(f"model '{name}' is not loaded")
        await self._unload(name, "unloaded")

    # -- internals -----------------------------------------------------------------------------

    def _is_ready(self, name: str) -> bool:
        model = self._models.get(name)
        return model is not None and model.state == READY and bool(model.versions)

    async def _load_quietly(self, name: str) -> None:
        try:
            await self._load(name)
        except (ModelLoadError, ModelNotFound) as exc:
            log.error("%s", exc)

    async def _load(self, name: str, *, config: Any = None, files: Mapping[str, bytes] | None = None) -> None:
        model = self._models.setdefault(name, _Model())
        async with model.lock:
            previous_state = model.state
            model.state = LOADING if not model.versions else model.state
            directory = upload = self._write_upload(name, files) if files else None
            try:
                if directory is None:
                    available = self._list()
                    if name not in available:
                        raise ModelNotFound(f"model '{name}' is not in the model repository")
                    directory = available[name]
                loop = asyncio.get_running_loop()
                stamp = fingerprint(directory)
                source = await loop.run_in_executor(self._loader, read_source, directory, config)
                loaded = await asyncio.gather(
                    *(loop.run_in_executor(self._loader, build_version, source, v) for v in source.files)
                )
            except BaseException as exc:
                model.reason = str(exc) or type(exc).__name__
                model.state = previous_state if model.versions else UNAVAILABLE
                if upload is not None:
                    shutil.rmtree(upload.parent, ignore_errors=True)
                self._changed()
                if isinstance(exc, (ModelLoadError, ModelNotFound)) or not isinstance(exc, Exception):
                    raise
                raise ModelLoadError(f"model '{name}' failed to load: {type(exc).__name__}: {exc}") from exc
            old, old_upload = model.versions, model.upload
            model.upload = upload
            if self.cache is not None:
                self.cache.drop_model(name)  # a reload of the same version must not serve old answers
            model.versions = {lv.version: ModelVersion(name, lv, self._batching_mode, self.cache) for lv in loaded}
            model.state, model.reason, model.fingerprint = READY, "", stamp
            versions = ", ".join(str(v) for v in sorted(model.versions))
            log.info("model '%s' ready (versions %s, backend %s)", name, versions, source.backend)
        self._changed()
        self._retire(old.values(), old_upload)

    async def _unload(self, name: str, reason: str) -> None:
        model = self._models.get(name)
        if model is None:
            return
        async with model.lock:
            old, old_upload = model.versions, model.upload
            model.versions, model.upload = {}, None
            model.state, model.reason = UNAVAILABLE, reason
            if self.cache is not None:
                self.cache.drop_model(name)
        self._changed()
        await self._close(list(old.values()), old_upload)
        log.info("model '%s' unloaded", name)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _retire(self, versions: Any, upload: Path | None) -> None:
        """Close replaced versions in the background once their in-flight requests are done."""
        task = asyncio.create_task(self._close(list(versions), upload), name="retire")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _close(versions: list[ModelVersion], upload: Path | None) -> None:
        await asyncio.gather(*(version.close() for version in versions))
        if upload is not None:
            shutil.rmtree(upload.parent, ignore_errors=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_secs)
            try:
                await self._rescan()
            except Exception:
                log.exception("repository poll failed")

    async def _rescan(self) -> None:
        available = self._list()
        for name in [n for n, m in self._models.items() if m.versions and n not in available]:
            await self._unload(name, "removed from the repository")
        for name, directory in available.items():
            model = self._models.get(name)
            if model is None or fingerprint(directory) != model.fingerprint:
                await self._load_quietly(name)
                model = self._models[name]
                model.fingerprint = fingerprint(directory)  # a failed load is not retried until edited

    def _write_upload(self, name: str, files: Mapping[str, bytes]) -> Path:
        """Write uploaded model files into a fresh folder of their own (removed when retired)."""
        directory = Path(tempfile.mkdtemp(dir=self._uploads.name)) / name
        root = directory.resolve()
        for relative, data in files.items():
            target = (directory / relative).resolve()
            if root not in target.parents:
                shutil.rmtree(directory.parent, ignore_errors=True)
                raise ModelLoadError(f"file parameter 'file:{relative}' escapes the model directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return directory


def _check_name(name: str) -> None:
    """Model names become folder names: one plain path component only."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ModelLoadError(f"invalid model name {name!r}: it must be a plain folder name")
