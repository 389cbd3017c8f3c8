"""Result files written whole or not at all: a reader never sees half a summary or plot.

Torch-free, so that commands that only read MLflow (``cadis compare``) can write too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Final

# mkstemp makes files only their owner can read; results get ordinary permissions.
RESULT_FILE_MODE: Final = 0o644


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
