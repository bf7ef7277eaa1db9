"""Paths that a model config names (the model file, warm-up data, an ONNX model's external data), and
the files of an upload, confined to the model's own folder.

A config comes from ``config.pbtxt`` or from a caller (a load request's override), so whatever it names
must resolve, symlinks followed, to a regular file inside the model's folder. A name that leads out gets
one answer whether or not its target exists, and messages show only the name as given: the server is no
oracle for the host's files and shows no host paths.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rapidserve.common.errors import shown
from rapidserve.server.errors import ModelLoadError

__all__ = ["MAX_NAME_BYTES", "check_upload_path", "confined_file", "read_exactly"]

MAX_NAME_BYTES = 255  # a file name on common file systems: model names and each part of an upload path
MAX_UPLOAD_PATH_BYTES = 1024


def _lexically_inside(relative: str, plain: bool) -> bool:
    """Whether ``relative`` names something below a folder without looking at the disk: relative, no
    ``..`` part, no NUL; with ``plain`` one name only."""
    if not relative or "\0" in relative or relative.startswith("/"):
        return False
    parts = relative.split("/")
    if plain and len(parts) > 1:
        return False
    return relative != "." and all(part not in ("..", "") for part in parts)


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def confined_file(
    folder: Path, relative: str, bounds: tuple[Path, ...], what: str, rule: str, *, plain: bool = False
) -> Path:
    """The real path of the regular file ``folder/relative``, which must resolve, symlinks followed,
    inside every folder of ``bounds`` (the model's folder, and a narrower one where the file belongs);
    ``plain``: ``relative`` must be a single file name.

    A name that leads out is refused with ``f"{what} {rule}"`` whether or not its target exists; a
    missing file or one that is not regular inside the bounds gets its own message."""
    refusal = ModelLoadError(f"{what} {rule}")
    if not _lexically_inside(relative, plain):
        raise refusal
    try:
        real = os.path.realpath(folder / relative)
        inside = all(_is_within(real, os.path.realpath(bound)) for bound in bounds)
    except (OSError, ValueError):  # a symlink loop, or a name the OS refuses
        raise refusal from None
    if not inside:
        raise refusal
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise ModelLoadError(f"{what} does not exist") from None
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{what} is not a regular file")
    return Path(real)


def read_exactly(path: Path, size: int, what: str) -> bytearray:
    """The ``size`` bytes of the regular file ``path``, which must hold exactly that many. Never reads
    more (a file that grows, or a device swapped in, cannot make it read without end)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot open it ({exc.strerror})") from None
    with open(fd, "rb", buffering=0, closefd=True) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{what} is not a regular file")
        if info.st_size != size:
            raise ModelLoadError(f"{what} holds {info.st_size} bytes; expected exactly {size}")
        data = bytearray(size)
        view, done = memoryview(data), 0
        while done < size:
            count = file.readinto(view[done:])
            if not count:
                raise ModelLoadError(f"{what} holds {done} bytes; expected exactly {size}")
            done += count
    return data


def check_upload_path(relative: str) -> None:
    """An uploaded file's path (``file:<path>``): relative to the model folder and inside it, e.g.
    ``1/model.onnx`` or ``warmup/x.bin``, each part a file name of at most ``MAX_NAME_BYTES``."""
    encoded = relative.encode("utf-8", "surrogatepass")
    parts = relative.split("/")
    if (
        not _lexically_inside(relative, plain=False)
        or len(encoded) > MAX_UPLOAD_PATH_BYTES
        or any(part == "." or len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in parts)
    ):
        raise ModelLoadError(
            f"file parameter 'file:{shown(relative)}' escapes the model directory or is not a valid path: "
            f"give a relative path like '1/model.onnx' (no '..', no leading '/', parts of at most "
            f"{MAX_NAME_BYTES} bytes, {MAX_UPLOAD_PATH_BYTES} in all)"
        )
