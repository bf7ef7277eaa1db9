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
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidserve.common.errors import shown
from rapidserve.engines.registry import DEFAULT_FILENAMES
from rapidserve.server.cache import PredictionCache
from rapidserve.server.errors import ModelLoadError, ModelNotFound, NotAllowed, RapidServeError, TooLarge, Unavailable
from rapidserve.server.loading import build_version
from rapidserve.server.model import ModelVersion
from rapidserve.server.overrides import OverrideLimits, check_config_size, parse_override
from rapidserve.server.paths import MAX_NAME_BYTES, check_upload_path
from rapidserve.server.repository import choose_files, fingerprint, read_source, upload_listing, upload_model_files
from rapidserve.server.repository import list_models as _list_models
from rapidserve.server.settings import UploadPolicy
from rapidserve.server.statistics import model_statistics

__all__ = ["ControlMode", "IndexEntry", "ModelManager", "load_refusal"]

log = logging.getLogger(__name__)

ControlMode = str  # "none" | "explicit" | "poll"
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
# backends whose model files are data only: an upload for any other needs --allow-code-models-upload
DATA_ONLY_BACKENDS = frozenset({"onnxruntime"})
MAX_UPLOAD_FILES = 10_000  # a model with external data may have many files; each costs a write and an inode


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
    users: int = 0  # coroutines holding or waiting for the lock (an entry is dropped only with none)


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
        max_message_bytes: int = 64 * 2**20,
        name_loaded_models: bool = True,
    ) -> None:
        """``max_message_bytes`` is the server's ``--grpc-max-message-bytes``: no warm-up request a
        caller's config asks for may be larger. ``name_loaded_models``: an unknown model's error lists
        the loaded ones (not where the calls that list them are restricted)."""
        if control_mode not in ("none", "explicit", "poll"):
            raise ValueError(f"model control mode must be none, explicit or poll, not {control_mode!r}")
        self.repositories = repositories
        self.control_mode = control_mode
        self._name_loaded_models = name_loaded_models
        self._load_models = load_models
        self._poll_secs = poll_secs
        self._batching_mode = batching_mode
        self.cache = cache
        self._on_change = on_change  # called after every load, reload and unload (health follows readiness)
        self._uploads_policy = uploads or UploadPolicy()
        self._limits = OverrideLimits(max_request_bytes=max_message_bytes)
        self._models: dict[str, _Model] = {}
        self._startup: set[str] = set()
        self._started = False
        self._stopping = False
        self._loader = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="rs-load")
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._uploads = tempfile.TemporaryDirectory(prefix="rapidserve-uploads-")
        self._listed: frozenset[str] = frozenset()  # the repositories' models when last listed

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the startup models (all of them unless explicit), then start polling if asked."""
        if self.cache is not None and self.cache.shared is not None:
            self.cache.shared.start()  # connects in the background
        available = self._list()
        if self.control_mode == "explicit":
            names = list(available) if "*" in self._load_models else list(self._load_models)
        else:
            names = list(available)
        self._startup = set(names)
        await asyncio.gather(*(self._load_quietly(name) for name in names))
        self._started = True
        self._warn_if_empty(available, names)
        if self.control_mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="rapidserve-poll")

    async def stop(self, timeout_s: float = 30.0) -> list[str]:
        """Stop polling and unload every model, waiting at most ``timeout_s`` for the loads, unloads and
        retirements under way. What is still running then is logged and abandoned: its tasks are
        cancelled and loader threads are not waited for, so a load that never ends cannot hold the
        server's exit. Returns the models whose loads were abandoned (their threads may still run)."""
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        unloads = [
            asyncio.create_task(self._unload(name, "server stopping"), name=f"unload-{name}")
            for name in list(self._models)
        ]
        late = {*unloads, *self._tasks}
        while late and (remaining := deadline - loop.time()) > 0:
            _, late = await asyncio.wait(late, timeout=remaining)
            late |= {task for task in self._tasks if not task.done()}  # a load that ended retires versions
        loading = sorted(name for name, model in self._models.items() if model.lock.locked())
        if late:
            log.warning(
                "stopping without waiting longer than %.1f s for: %s; model loads still running: %s",
                timeout_s,
                ", ".join(sorted(task.get_name() for task in late)),
                ", ".join(loading) or "none",
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._uploads.cleanup()
        if self.cache is not None and self.cache.shared is not None:
            await self.cache.shared.close()
        return loading

    def startup_failures(self) -> list[tuple[str, str]]:
        """(model, reason) for each model loaded at start that is not ready, by name: what
        ``--exit-on-error`` reports before the server exits."""
        failed = []
        for name in sorted(self._startup):
            if not self._is_ready(name):
                model = self._models.get(name)
                failed.append((name, (model.reason if model is not None else "") or "not in the model repository"))
        return failed

    def _warn_if_empty(self, available: Mapping[str, Path], loading: list[str]) -> None:
        """A repository that gives the server nothing to serve is worth a line: the server answers every
        request NOT_FOUND, which alone does not say why."""
        where = ", ".join(str(repo) for repo in self.repositories)
        if not available:
            log.warning(
                "no models in %s: a model is a folder <repository>/<model>/ holding a version folder such as "
                "<model>/1/ with one of %s (and optionally <model>/config.pbtxt)",
                where,
                ", ".join(name for names in DEFAULT_FILENAMES.values() for name in names),
            )
        elif loading and not any(self._is_ready(name) for name in loading):
            log.warning("none of the %d models in %s loaded: the server serves nothing (see the errors above)",
                        len(loading), where)  # fmt: skip

    @property
    def ready(self) -> bool:
        """True once every model loaded at startup is ready (strict readiness, like Triton)."""
        return self._started and all(self._is_ready(name) for name in self._startup)

    # -- lookups -------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves a request; ``""`` picks the highest loaded version."""
        model = self._models.get(name)
        if model is None:
            raise self.unknown(name)
        if not model.versions:
            if model.state == LOADING:
                raise Unavailable(f"model '{name}' is loading")
            raise ModelNotFound(f"model '{name}' is not loaded ({model.reason or 'not loaded'})")
        if not version:
            return model.versions[max(model.versions)]
        # ASCII digits only (isdigit() takes "²" and other scripts' digits), and few enough for int()
        if not (version.isascii() and version.isdigit() and len(version) <= 19) or int(version) not in model.versions:
            raise ModelNotFound(
                f"model '{name}' has no version '{shown(version, 24)}'; "
                f"loaded: {', '.join(map(str, sorted(model.versions)))}"
            )
        return model.versions[int(version)]

    def unknown(self, name: str) -> ModelNotFound:
        """The error for a request naming a model the server does not have: it lists the loaded ones."""
        if not self._name_loaded_models:
            return ModelNotFound(f"unknown model '{shown(name)}'")
        loaded = loaded_names(n for n, m in self._models.items() if m.versions)
        return ModelNotFound(f"unknown model '{shown(name)}'; {loaded}")

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

    def mirror(self) -> dict[str, Any]:
        """The table a front-end process mirrors (``frontend.remote.RemoteManager``): each model's state
        and its versions (number, identity, serialized config, spec, whether it caches)."""
        models = {
            name: (
                model.state,
                model.reason,
                [(n, id(v), v.config.SerializeToString(), v.spec, v.caches) for n, v in sorted(model.versions.items())],
            )
            for name, model in self._models.items()
        }
        return {
            "models": models,
            "ready": self.ready,
            "control_mode": self.control_mode,
            "stopping": self._stopping,
            "name_loaded_models": self._name_loaded_models,
        }

    # -- control -------------------------------------------------------------------------------

    def check_load_allowed(self) -> None:
        """Raise unless a load call would be taken now (explicit mode, not stopping)."""
        refusal = load_refusal(self.control_mode, self._stopping)
        if refusal is not None:
            raise refusal

    async def listing(self, ready_only: bool = False) -> list[IndexEntry]:
        """RepositoryIndex's entries (``index``; a coroutine, as where the table lives in another process)."""
        return self.index(ready_only)

    async def statistics(self, name: str, version: str) -> Any:
        """The ModelStatistics answer for one version, one model or (``name`` empty) every model."""
        return model_statistics(self, name, version)

    async def load(self, name: str, *, config_json: str = "", files: Mapping[str, bytes] | None = None) -> None:
        """Load or reload a model (RepositoryModelLoad); ``files`` maps ``<version>/<file>`` to bytes."""
        self.check_load_allowed()
        _check_name(name)
        if files:
            self._check_upload_policy(files)
            if not config_json:
                raise ModelLoadError("loading model files requires the 'config' parameter too")
        elif name not in self._list():
            raise ModelNotFound(f"model '{name}' is not in the model repository")
        config = None
        if config_json:
            check_config_size(config_json, f"config for '{name}'")
            loop = asyncio.get_running_loop()  # parsing a large config would stall the event loop
            config = await loop.run_in_executor(self._loader, self._vet, name, config_json, files)
        # Every refusal above comes before the load touches any state: no entry, no LOADING, no folder.
        # The load goes on if the caller goes away (a cancelled load would leave engines half-built).
        task = asyncio.create_task(self._load(name, config=config, files=files or None), name=f"load-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._stopping and task.cancelled():  # stop() abandoned it
                raise Unavailable(f"the server is stopping: the load of model '{name}' was abandoned") from None
            raise

    async def unload(self, name: str) -> None:
        if self.control_mode != "explicit":
            raise NotAllowed(f"unloading models is not allowed in model control mode '{self.control_mode}'")
        if name not in self._models or not self._models[name].versions:
            raise ModelNotFound(f"model '{shown(name)}' is not loaded")
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

    def _check_upload_policy(self, files: Mapping[str, bytes]) -> None:
        policy = self._uploads_policy
        if not policy.allow_files:
            raise NotAllowed(
                "loading model files through the API is not allowed on this server; "
                "start it with --allow-model-upload to allow it"
            )
        if len(files) > MAX_UPLOAD_FILES:
            raise TooLarge(f"the upload has {len(files)} files; at most {MAX_UPLOAD_FILES} are taken per load")
        size = sum(len(data) for data in files.values())
        if size > policy.max_bytes:
            raise TooLarge(
                f"the uploaded files total {size} bytes, over this server's limit of {policy.max_bytes} "
                "bytes per load; raise it with --max-upload-bytes"
            )

    def _vet(self, name: str, config_json: str, files: Mapping[str, bytes] | None) -> Any:
        """A caller's config, parsed and held to the server's limits, and the upload it comes with
        checked. Runs in a loader thread, before the load touches any state."""
        config = parse_override(config_json, name, self._limits)
        if files:
            self._check_upload(name, config, files)
        return config

    def _check_upload(self, name: str, config: Any, files: Mapping[str, bytes]) -> None:
        """Refuse an upload before anything is written: bad paths, and models whose backend would run
        code (decided as the load would decide it, config override included) unless allowed."""
        for path in files:
            check_upload_path(path)
        folders = {path.rsplit("/", 1)[0] for path in files if "/" in path}
        clash = next((path for path in files if path in folders), None)
        if clash is not None:
            raise ModelLoadError(f"file parameter 'file:{shown(clash)}' is also the folder of another file")
        probe = type(config)()
        probe.CopyFrom(config)
        if not probe.name:
            probe.name = name
        backend, chosen = choose_files(probe, upload_listing(name, files))
        if self._uploads_policy.allow_code_models:
            return
        if backend not in DATA_ONLY_BACKENDS:
            raise NotAllowed(
                f"model '{name}': the uploaded model would load with the '{backend}' backend, whose formats "
                "(TorchScript, torch.export programs, TensorRT plans, Python model.py files) run code when loaded; "
                "this server takes only ONNX models through the API unless started with --allow-code-models-upload"
            )
        _refuse_compiled_engines(name, probe, [(path, files[path]) for path in upload_model_files(name, files, chosen)])

    @contextlib.asynccontextmanager
    async def _hold(self, name: str) -> AsyncIterator[_Model]:
        """The model's entry, locked. An entry left without versions for a name the repository did not
        have when last listed (an unknown name, a failed upload, an unloaded upload) is dropped once
        nobody waits on it, so callers cannot fill the index with names."""
        model = self._models.setdefault(name, _Model())
        model.users += 1
        try:
            async with model.lock:
                yield model
        finally:
            model.users -= 1
            if not model.users and not model.versions and name not in self._listed and self._models.get(name) is model:
                del self._models[name]

    async def _load(self, name: str, *, config: Any = None, files: Mapping[str, bytes] | None = None) -> None:
        loop = asyncio.get_running_loop()
        async with self._hold(name) as model:
            previous_state = model.state
            model.state = LOADING if not model.versions else model.state
            if model.state != previous_state:
                self._changed()  # (front-end processes' mirrors say "loading" too)
            directory = upload = None
            try:
                if files:
                    directory = upload = await loop.run_in_executor(self._loader, self._write_upload, name, files)
                else:
                    available = self._list()
                    if name not in available:
                        raise ModelNotFound(f"model '{name}' is not in the model repository")
                    directory = available[name]
                if upload is None:  # taken before reading, kept if the load fails: poll mode reloads on an edit
                    model.fingerprint = await loop.run_in_executor(self._loader, fingerprint, directory)
                limits = self._limits if config is not None else None  # config.pbtxt is the operator's
                source = await loop.run_in_executor(self._loader, read_source, directory, config, limits)
                loaded = await asyncio.gather(
                    *(loop.run_in_executor(self._loader, build_version, source, v) for v in source.files)
                )
            except BaseException as exc:
                error = _public(exc, name, directory)
                model.reason = str(error) or type(error).__name__
                model.state = previous_state if model.versions else UNAVAILABLE
                if upload is not None:
                    shutil.rmtree(upload.parent, ignore_errors=True)
                self._changed()
                if error is exc:
                    raise
                raise error from exc  # the cause stays for the log; callers see the message only
            old, old_upload = model.versions, model.upload
            model.upload = upload
            if self.cache is not None:
                self.cache.drop_model(name)  # a reload of the same version must not serve old answers
                if self.cache.shared is not None and self._started:  # nor, from the shared level, on any
                    await self.cache.shared.bump(name)  # replica (a replica's start shares what others stored)
            model.versions = {lv.version: ModelVersion(name, lv, self._batching_mode, self.cache) for lv in loaded}
            model.state, model.reason = READY, ""
            versions = ", ".join(str(v) for v in sorted(model.versions))
            log.info("model '%s' ready (versions %s, backend %s)", name, versions, source.backend)
        self._changed()
        self._retire(old.values(), old_upload)

    async def _unload(self, name: str, reason: str) -> None:
        if name not in self._models:
            return
        async with self._hold(name) as model:
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
            # _load records the fingerprint it takes before reading, failed or not: a failed load is
            # retried once edited, and an edit made while a load runs is seen at the next poll
            if model is None or fingerprint(directory) != model.fingerprint:
                await self._load_quietly(name)

    def _write_upload(self, name: str, files: Mapping[str, bytes]) -> Path:
        """Write uploaded model files (paths already checked) into a fresh folder of their own, removed
        when the versions loaded from it retire. Runs in a loader thread."""
        directory = Path(tempfile.mkdtemp(dir=self._uploads.name)) / name
        try:
            for relative, data in files.items():
                target = directory / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        except OSError as exc:
            shutil.rmtree(directory.parent, ignore_errors=True)
            raise ModelLoadError(f"model '{name}': the uploaded files could not be stored: {exc.strerror}") from None
        return directory


MAX_LISTED = 20  # names an unknown-model message lists; the message stays under the status-message bound
_LISTED_CHARS = 600


def load_refusal(control_mode: str, stopping: bool) -> RapidServeError | None:
    """Why a load call would be refused now, or None where it is taken (explicit mode, not stopping)."""
    if control_mode != "explicit":
        return NotAllowed(
            f"loading models is not allowed in model control mode '{control_mode}'; "
            "start the server with --model-control-mode explicit"
        )
    if stopping:
        return Unavailable("the server is stopping: no model loads are taken")
    return None


def loaded_names(names: Iterable[str]) -> str:
    """``loaded models: a, b, ...`` for a message, at most MAX_LISTED names in about _LISTED_CHARS
    characters (each name cut to 40), then ``and N more``."""
    ordered = sorted(names)
    if not ordered:
        return "no models are loaded"
    shown_names: list[str] = []
    length = 0
    for name in ordered[:MAX_LISTED]:
        text = f"'{shown(name, 40)}'"
        if length + len(text) > _LISTED_CHARS:
            break
        shown_names.append(text)
        length += len(text) + 2
    rest = len(ordered) - len(shown_names)
    return "loaded models: " + ", ".join(shown_names) + (f" and {rest} more" if rest else "")


def _public(exc: BaseException, name: str, directory: Path | None) -> BaseException:
    """The error a caller may see: the model folder's location (a repository's path, or the temp folder
    of an upload) shown as the model's name; anything unexpected becomes ModelLoadError."""
    if not isinstance(exc, Exception):
        return exc
    text = (
        str(exc) if isinstance(exc, RapidServeError) else f"model '{name}' failed to load: {type(exc).__name__}: {exc}"
    )
    if directory is not None:
        for parent in {str(directory.parent), os.path.realpath(directory.parent)}:
            text = text.replace(parent + os.sep, "")
    if isinstance(exc, RapidServeError):
        return exc if text == str(exc) else type(exc)(text)
    return ModelLoadError(text)


def _refuse_compiled_engines(name: str, config: Any, models: list[tuple[str, bytes]]) -> None:
    """Refuse an uploaded ONNX model that could bring a compiled engine: a config asking for execution
    accelerators (ONNX Runtime's TensorRT provider loads engines and their plugins, which run code), or
    a model file (``models``: path and bytes) with EPContext nodes, which embed such engines."""
    from rapidserve.engines.onnx_runtime import has_ep_context_nodes

    accelerators = config.optimization.execution_accelerators
    asked = [a.name for a in (*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator)]
    if asked:
        raise NotAllowed(
            f"model '{name}': the config asks for optimization.execution_accelerators "
            f"({', '.join(repr(shown(a, 24)) for a in asked)}), which can load compiled engines whose plugins "
            "run code; this server takes them with uploaded models only when started with --allow-code-models-upload"
        )
    for path, data in models:
        try:
            compiled = has_ep_context_nodes(data)
        except ImportError:
            raise
        except Exception:
            raise ModelLoadError(f"model '{name}': 'file:{shown(path)}' is not a valid ONNX model") from None
        if compiled:
            raise NotAllowed(
                f"model '{name}': the uploaded ONNX model 'file:{shown(path)}' has EPContext nodes, which carry "
                "compiled engines (a TensorRT engine's plugins run code); this server takes such models through "
                "the API only when started with --allow-code-models-upload"
            )


def _check_name(name: str) -> None:
    """Model names become folder names: one plain file name of at most MAX_NAME_BYTES bytes (UTF-8), not
    hidden (the repository skips those), without separators or control characters."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if (
        not name
        or size > MAX_NAME_BYTES
        or name.startswith(".")
        or not name.isprintable()
        or "/" in name
        or "\\" in name
    ):
        raise ModelLoadError(
            f"invalid model name '{shown(name, 40)}' ({size} bytes): it must be a plain folder name of 1 to "
            f"{MAX_NAME_BYTES} bytes, printable, without '/' or '\\' and not starting with '.'"
        )
