"""A store's folder on disk, and the one way every store is built.

A store is a folder: ``store.json`` (``key``: what the draws depend on,
:mod:`cadis.draws.keys`; then what the kind of store records of itself: labels, build time,
size, per-draw costs) and ``denoised.npy`` (the draws in float32, memory-mapped, read
without unpickling). :func:`build_once` writes it whole or not at all, under a lock, so
builders of one store at once (a sweep's shards, two sweeps sharing a ``draws_dir``) take
turns: one denoises, the others wait and then find its store.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np

from cadis.errors import CadisError
from cadis.files import atomic_directory, atomic_write_text, exclusive_lock

STORE_ARRAY: Final = "denoised.npy"
STORE_META: Final = "store.json"
STORE_DTYPE: Final = np.float32
# Disk left free beyond the store itself, for everything else the sweep writes.
DISK_MARGIN_BYTES: Final = 256 * 2 ** 20

#: Denoises a store's draws into ``STORE_ARRAY`` of the staging folder it is given, and
#: returns what the store records of itself beside its key.
WriteDraws = Callable[[Path], dict[str, Any]]


def read_store_meta(folder: Path, key: Mapping[str, Any]) -> dict[str, Any]:
    """``store.json`` of the store in ``folder``, which must have been made with ``key``;
    otherwise :class:`CadisError` naming what differs (the folder is left untouched)."""
    meta_path = folder / STORE_META
    if not meta_path.is_file() or not (folder / STORE_ARRAY).is_file():
        raise CadisError(f"{folder} is not a store of denoised draws (no {STORE_META})")
    meta = json.loads(meta_path.read_text())
    differing = sorted(name for name in set(key) | set(meta["key"])
                       if key.get(name) != meta["key"].get(name))
    if differing:
        raise CadisError(f"the denoised draws in {folder} were made with other settings "
                         f"({', '.join(differing)} differ); use another folder")
    return meta


def check_free_space(folder: Path, size: int) -> None:
    """:class:`CadisError` with the size needed when a store of ``size`` bytes (plus a margin
    for everything else) would not fit beside ``folder``; creates its parent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if size + DISK_MARGIN_BYTES > free:
        raise CadisError(f"the denoised draws need {size / 2 ** 30:.2f} GiB in "
                         f"{folder.parent} but {free / 2 ** 30:.2f} GiB are free: fewer images "
                         "or draws, or another folder (results_dir, draws_dir)")


def build_once(folder: Path, key: Mapping[str, Any], size: int, write: WriteDraws) -> None:
    """Make ``folder`` a store of ``key`` (``size`` bytes of draws, which ``write`` denoises
    into a staging folder that becomes ``folder`` whole) unless a folder is there already;
    whoever opens it then checks that it holds ``key``'s store.

    Raises :class:`CadisError` before any work when the store would not fit on the disk.
    Builders of one folder at once take turns on a lock beside it: the first builds, the
    others wait for it and build nothing.
    """
    if folder.exists():
        return
    check_free_space(folder, size)
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if folder.exists():  # built while this one waited
            return
        with atomic_directory(folder) as staging:
            meta = {"key": dict(key), **write(staging)}
            atomic_write_text(staging / STORE_META, json.dumps(meta, indent=2) + "\n")
