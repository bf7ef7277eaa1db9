"""The Triton-layout model repository on disk: which models exist, their configs, which version
directories the version policy selects, and which model file each version loads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapidserve.common.errors import shown
from rapidserve.engines.registry import BACKENDS, DEFAULT_FILENAMES, PLATFORM_OF_BACKEND, PLATFORMS, backend_for_file
from rapidserve.server.config import read_config
from rapidserve.server.errors import ModelLoadError
from rapidserve.server.overrides import OverrideLimits
from rapidserve.server.paths import confined_file

__all__ = [
    "ModelSource",
    "choose_files",
    "fingerprint",
    "list_models",
    "read_source",
    "upload_listing",
    "upload_model_files",
]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Everything needed to load one model: its config and the file of each selected version."""

    name: str
    directory: Path
    config: Any  # ModelConfig, backend/platform filled in
    backend: str
    files: dict[int, Path]  # version -> model file, only the versions the policy selects
    limits: OverrideLimits | None = None  # a caller's config is held to these; None: the operator's config


def list_models(repositories: list[Path]) -> dict[str, Path]:
    """Model name -> directory, across every repository. A name in two repositories is an error."""
    models: dict[str, Path] = {}
    for repo in repositories:
        if not repo.is_dir():
            raise ModelLoadError(f"model repository {repo} is not a directory")
        for child in sorted(repo.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if child.name in models:
                raise ModelLoadError(f"model '{child.name}' is in two repositories: {models[child.name]} and {child}")
            models[child.name] = child
    return models


def fingerprint(directory: Path) -> str:
    """A digest of every file's path, size and mtime under a model directory (for poll mode)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_source(directory: Path, config: Any | None = None, limits: OverrideLimits | None = None) -> ModelSource:
    """Read a model directory; ``config`` replaces config.pbtxt when given (a load request's override),
    and ``limits`` then bound what loading it may cost. Every file it names is checked to lie inside the
    model's folder before anything opens it."""
    if config is None:
        config = read_config(directory)
    elif not config.name:
        config.name = directory.name
    versions = _version_dirs(directory, config.name)
    backend, names = choose_files(config, {version: _names(path) for version, path in versions.items()})
    named = bool(config.default_model_filename)
    files = {v: _model_file(directory, versions[v], name, config.name, named) for v, name in names.items()}
    if backend == "onnxruntime":
        for version, path in files.items():
            _check_external_data(directory, path, f"model '{config.name}' version {version}")
    return ModelSource(config.name, directory, config, backend, files, limits)


def choose_files(config: Any, listing: Mapping[int, Collection[str]]) -> tuple[str, dict[int, str]]:
    """The backend and, per version the policy selects, the model file's name, from the names in each
    version folder (``listing``: version -> names). Fills the config's backend and platform.

    The load path and the check of an upload (before its files are written) both decide here, so an
    upload is judged by the backend that would really load it."""
    if config.default_model_filename and not _plain_name(config.default_model_filename):
        raise ModelLoadError(
            f"model '{config.name}': default_model_filename '{shown(config.default_model_filename)}' must be "
            "a plain file name inside each version folder, like 'model.onnx'"
        )
    if not listing:
        raise ModelLoadError(f"model '{config.name}' has no version directories (e.g. {config.name}/1/)")
    selected = _apply_policy(config, sorted(listing))
    backend = _backend(config, {version: listing[version] for version in selected})
    config.backend = backend
    if not config.platform:
        config.platform = PLATFORM_OF_BACKEND.get(backend, backend)
    return backend, {version: _file_name(config, backend, version, listing[version]) for version in selected}


def upload_listing(model: str, paths: Iterable[str]) -> dict[int, set[str]]:
    """What ``read_source`` will list in a model folder holding exactly these files (relative paths,
    already checked): version -> the names in that version folder."""
    listing: dict[int, set[str]] = {}
    folders: dict[int, str] = {}
    for path in paths:
        folder, _, rest = path.partition("/")
        version = _version_number(folder, folders, model) if rest else None
        if version is not None:
            listing.setdefault(version, set()).add(rest.partition("/")[0])
    return listing


def upload_model_files(model: str, paths: Iterable[str], chosen: Mapping[int, str]) -> list[str]:
    """The uploaded paths a load opens as model files: for each version of ``chosen`` (version -> file
    name, from ``choose_files``) the path of that file in the version's folder."""
    folders: dict[int, str] = {}
    found = []
    for path in paths:
        folder, _, rest = path.partition("/")
        version = _version_number(folder, folders, model) if rest else None
        if version is not None and rest == chosen.get(version):
            found.append(path)
    return found


MAX_VERSION = 2**63 - 1  # versions are int64 on the wire


def _version_number(folder: str, seen: dict[int, str], model: str) -> int | None:
    """The version a folder name stands for (ASCII digits only), or None; records it in ``seen``."""
    if not (folder.isascii() and folder.isdigit()):
        return None
    version = int(folder)  # a file name: at most 255 digits, within int()'s limit
    if version > MAX_VERSION:
        raise ModelLoadError(f"model '{model}': version folder '{shown(folder)}' is over {MAX_VERSION}")
    if seen.setdefault(version, folder) != folder:
        first, second = shown(seen[version]), shown(folder)
        raise ModelLoadError(f"model '{model}': folders '{first}' and '{second}' are both version {version}")
    return version


def _version_dirs(directory: Path, model: str) -> dict[int, Path]:
    seen: dict[int, str] = {}
    versions: dict[int, Path] = {}
    for path in directory.iterdir():
        if path.is_dir():
            version = _version_number(path.name, seen, model)
            if version is not None:
                versions[version] = path
    return versions


def _names(version_dir: Path) -> set[str]:
    with os.scandir(version_dir) as entries:
        return {entry.name for entry in entries}


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _apply_policy(config: Any, available: list[int]) -> list[int]:
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        missing = [v for v in policy.specific.versions if v not in available]
        if missing:
            raise ModelLoadError(
                f"model '{config.name}': version_policy asks for versions {missing}, which have no directory"
            )
        return sorted(policy.specific.versions)
    count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return available[-count:]


def _backend(config: Any, listing: Mapping[int, Collection[str]]) -> str:
    if config.backend:
        if config.backend not in BACKENDS:
            raise ModelLoadError(
                f"model '{config.name}': backend '{shown(config.backend)}' is not available; "
                f"expected one of {', '.join(BACKENDS)}"
            )
        return str(config.backend)
    if config.platform:
        if config.platform not in PLATFORMS:
            raise ModelLoadError(
                f"model '{config.name}': platform '{shown(config.platform)}' is not supported; "
                f"expected one of {', '.join(PLATFORMS)}"
            )
        return PLATFORMS[str(config.platform)]
    if config.default_model_filename:
        backend = backend_for_file(config.default_model_filename)
        if backend is None:
            raise ModelLoadError(
                f"model '{config.name}': cannot tell the backend of '{shown(config.default_model_filename)}' "
                f"from its name; set backend or platform in the config"
            )
        return backend
    for name in (name for group in DEFAULT_FILENAMES.values() for name in group):
        if any(name in names for names in listing.values()):
            return backend_for_file(name) or ""
    first = min(listing)
    raise ModelLoadError(
        f"model '{config.name}': no model file found in {config.name}/{first}/ "
        f"(expected one of {', '.join(n for g in DEFAULT_FILENAMES.values() for n in g)}) and no backend in config"
    )


def _file_name(config: Any, backend: str, version: int, names: Collection[str]) -> str:
    candidates = [config.default_model_filename] if config.default_model_filename else DEFAULT_FILENAMES[backend]
    for name in candidates:
        if name in names:
            return str(name)
    expected = ", ".join(shown(name) for name in candidates)
    raise ModelLoadError(f"model '{config.name}': {config.name}/{version}/ has none of {expected}")


def _model_file(directory: Path, version_dir: Path, name: str, model: str, named_by_config: bool) -> Path:
    """The model file: a regular file. One the config names (``default_model_filename``, which a caller
    may set) must also resolve inside the model's folder, and its real path, the one checked, is what
    loads (a link swapped after the check cannot redirect the load); the default names are the
    operator's own files, whose links (to a shared model store, say) are followed."""
    what = f"model '{model}': model file '{shown(name)}' of version {version_dir.name}"
    if named_by_config:
        rule = "must be a regular file inside the model's folder"
        return confined_file(version_dir, name, (directory,), what, rule, plain=True)
    if not (version_dir / name).is_file():
        raise ModelLoadError(f"{what} is not a regular file")
    return version_dir / name


_EXTERNAL_RULE = "must be a relative path to a regular file in the model file's folder"
_ORT_MEMORY_TAG = "_ORT_MEM_ADDR_"  # ONNX Runtime's marker for data at a memory address: never from a file


def _check_external_data(directory: Path, path: Path, what: str) -> None:
    """ONNX external data must be files in the model file's own folder (where ONNX Runtime looks)."""
    from rapidserve.engines.onnx_runtime import external_data_locations

    try:
        locations = external_data_locations(path)
    except ImportError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{what}: the model file is not a valid ONNX model ({type(exc).__name__})") from None
    for location in locations:
        subject = f"{what}: external data '{shown(location)}'"
        if _ORT_MEMORY_TAG in location:
            raise ModelLoadError(f"{subject} {_EXTERNAL_RULE}")
        confined_file(path.parent, location, (path.parent, directory), subject, _EXTERNAL_RULE)
