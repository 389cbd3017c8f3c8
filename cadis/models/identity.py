"""Which model files made something: sha256 of a models folder's files and of each model.

Records name the off-the-shelf pair they were certified with by these hashes (settings key
:data:`MODEL_HASHES`), so two records made on different models are refused as a pair
however the folders were named, and a models folder's ``manifest.json`` lists the sha256 of
every model file (``files``), so a changed model file shows.

Torch-free: `cadis analyze` reads these names without loading any model.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cadis.models.sources import CLASSIFIER_DIR, DENOISER_DIR, ModelSources

#: The settings key under which records name their models' hashes.
MODEL_HASHES: Final = "model_hashes"
#: The models a record's settings name by hash, in the order they are compared.
MODEL_ROLES: Final = ("classifier", "denoiser")
#: Bytes read at a time while hashing: model weights need not fit in memory twice.
READ_CHUNK: Final = 1 << 20


def file_sha256(path: Path) -> str:
    """The sha256 of one file's bytes, as hex."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed(root: Path) -> list[Path]:
    """The regular files under ``root``, sorted. Hidden files and folders are left out: no
    loader reads them, and they are a staging folder's or an editor's, not the model's."""
    return sorted(path for path in root.rglob("*") if path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(root).parts))


def file_hashes(root: str | Path) -> dict[str, str]:
    """``{path relative to root (POSIX): sha256}`` of every file under ``root``; a single
    file gives ``{its name: sha256}``."""
    root = Path(root)
    if root.is_file():
        return {root.name: file_sha256(root)}
    return {path.relative_to(root).as_posix(): file_sha256(path) for path in _listed(root)}


def models_folder_hashes(folder: str | Path) -> dict[str, str]:
    """``{"classifier/...": sha256, "denoiser/...": sha256}``: every file of a models
    folder's pair (as `cadis pretrain` lays it out), what its manifest lists under ``files``."""
    folder = Path(folder)
    return {f"{part}/{path}": sha256 for part in (CLASSIFIER_DIR, DENOISER_DIR)
            for path, sha256 in file_hashes(folder / part).items()}


def tree_sha256(hashes: Mapping[str, str]) -> str:
    """One sha256 for a set of files: of their sorted ``path<TAB>sha256`` lines. Equal
    exactly when the same relative paths hold the same bytes."""
    lines = "".join(f"{path}\t{hashes[path]}\n" for path in sorted(hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_sha256(name: str) -> str | None:
    """The sha256 (:func:`tree_sha256` of :func:`file_hashes`) of a model given as a local
    folder or file; None for a name cadis holds no files of (a timm architecture, a hub id),
    whose identity is its name. Cached per process while no file's size or modification time
    changes, so certifying many times in one process hashes each model once."""
    path = Path(name).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    files = [path] if path.is_file() else _listed(path)
    signature = tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns)
                      for file in files)
    return _cached_sha256(str(path), signature)


@functools.lru_cache(maxsize=None)
def _cached_sha256(path: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    # ``signature`` is only the cache key: a file rewritten in place is hashed again.
    return tree_sha256(file_hashes(path))


def model_hashes(sources: ModelSources) -> dict[str, str | None]:
    """``{"classifier": sha256, "denoiser": sha256}`` of the off-the-shelf pair
    (:func:`model_sha256`; None for a model named, not held as files): what records' settings
    name under :data:`MODEL_HASHES`."""
    return {role: model_sha256(getattr(sources, role)) for role in MODEL_ROLES}
