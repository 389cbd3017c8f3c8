"""Results written whole or not at all: a reader never sees half a summary, plot, model or
checkpoint. The one place that writes atomically: files through a temporary sibling and
``os.replace``, folders through a staging sibling swapped in when complete.

Torch-free, so that commands that only read MLflow (``cadis compare``) can write too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from cadis.errors import CadisError

# mkstemp makes files only their owner can read; results get ordinary permissions.
RESULT_FILE_MODE: Final = 0o644
RESULT_FOLDER_MODE: Final = 0o755


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of it."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, RESULT_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; when the block ends without an error,
    the staging folder replaces ``path`` (an older one is removed first), else it is removed.

    So ``path`` never holds a half-written model or checkpoint: a crash leaves the old
    folder, or none, and at worst a hidden staging folder beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", suffix=".partial",
                                    dir=path.parent))
    staging.chmod(RESULT_FOLDER_MODE)  # mkdtemp makes it private; results are meant to be shared
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (made if missing) for the block: a
    second process (or thread) asking for it waits until the first lets go. Local and most
    shared file systems honour it; one that does not only loses the wait, never a result
    (what the lock guards is written whole by :func:`atomic_directory`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_creatable_folder(path: str | os.PathLike, key: str) -> None:
    """Raise :class:`CadisError` (one line naming ``key``) unless ``path`` is a writable folder
    or one that can be made: its nearest existing ancestor is a writable folder. Creates
    nothing, so a check that fails (or a dry run) leaves no trace."""
    path = Path(path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, a file"
        raise CadisError(f"{key}: {path} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CadisError(f"{key}: cannot create {path}: {existing} is not writable")
