"""The Triton-layout model repository on disk: which models exist, their configs, which version
directories the version policy selects, and which model file each version loads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapidserve.engines.registry import DEFAULT_FILENAMES, PLATFORM_OF_BACKEND, PLATFORMS, backend_for_file
from rapidserve.server.config import read_config
from rapidserve.server.errors import ModelLoadError

__all__ = ["ModelSource", "fingerprint", "list_models", "read_source"]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Everything needed to load one model: its config and the file of each selected version."""

    name: str
    directory: Path
    config: Any  # ModelConfig, backend/platform filled in
    backend: str
    files: dict[int, Path]  # version -> model file, only the versions the policy selects


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


def read_source(directory: Path, config: Any | None = None) -> ModelSource:
    """Read a model directory; ``config`` replaces config.pbtxt when given (a load request's override)."""
    if config is None:
        config = read_config(directory)
    elif not config.name:
        config.name = directory.name
    versions = _version_dirs(directory)
    if not versions:
        raise ModelLoadError(f"model '{config.name}' has no version directories (e.g. {directory}/1/)")
    selected = _apply_policy(config, sorted(versions))
    backend = _backend(config, [versions[v] for v in selected])
    config.backend = backend
    if not config.platform:
        config.platform = PLATFORM_OF_BACKEND.get(backend, backend)
    files = {version: _model_file(config, backend, versions[version]) for version in selected}
    return ModelSource(config.name, directory, config, backend, files)


def _version_dirs(directory: Path) -> dict[int, Path]:
    return {int(p.name): p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()}


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


def _backend(config: Any, version_dirs: list[Path]) -> str:
    if config.backend:
        return str(config.backend)
    if config.platform:
        if config.platform not in PLATFORMS:
            raise ModelLoadError(
                f"model '{config.name}': platform '{config.platform}' is not supported; "
                f"expected one of {', '.join(PLATFORMS)}"
            )
        return PLATFORMS[str(config.platform)]
    names: list[str] = [str(config.default_model_filename)] if config.default_model_filename else []
    names += [name for group in DEFAULT_FILENAMES.values() for name in group]
    for name in names:
        if any((d / name).exists() for d in version_dirs):
            backend = backend_for_file(name)
            if backend:
                return backend
    raise ModelLoadError(
        f"model '{config.name}': no model file found in {version_dirs[0]} "
        f"(expected one of {', '.join(n for g in DEFAULT_FILENAMES.values() for n in g)}) and no backend in config"
    )


def _model_file(config: Any, backend: str, version_dir: Path) -> Path:
    names: list[str] = [str(config.default_model_filename)] if config.default_model_filename else []
    names += list(DEFAULT_FILENAMES.get(backend, ()))
    for name in names:
        if (version_dir / name).exists():
            return version_dir / name
    raise ModelLoadError(f"model '{config.name}': {version_dir} has none of {', '.join(names)}")
