"""Where the off-the-shelf pair comes from: the models-folder layout and :class:`ModelSources`.

``cadis pretrain`` writes a models folder (``manifest.json``, ``classifier/``, ``denoiser/``);
every command that takes ``--models`` reads it through :meth:`ModelSources.resolve`, where
explicit names (a timm name, a hub id, another folder) override what the folder says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cadis.errors import CadisError

#: The models folder's layout, as ``cadis pretrain`` writes it.
MANIFEST: Final = "manifest.json"
CLASSIFIER_DIR: Final = "classifier"
DENOISER_DIR: Final = "denoiser"


@dataclass(frozen=True)
class ModelSources:
    """Where the off-the-shelf pair comes from and what data it was made for."""

    classifier: str
    denoiser: str
    dataset: str
    data_root: str | None = None
    image_size: int | None = None

    @classmethod
    def resolve(cls, models: str | None = None, classifier: str | None = None,
                denoiser: str | None = None, dataset: str | None = None,
                data_root: str | None = None, image_size: int | None = None) -> ModelSources:
        """A models folder (as `cadis pretrain` writes it) gives defaults: the models, their
        dataset and, for that dataset, its root and image size; explicit names win."""
        defaults: dict[str, Any] = {}
        data: dict[str, Any] = {}
        if models is not None:
            folder = Path(models).expanduser()
            if not (folder / MANIFEST).is_file():
                raise CadisError(f"models directory {folder} not found or has no {MANIFEST} "
                                 "(make one with `cadis pretrain`)")
            manifest = json.loads((folder / MANIFEST).read_text())
            defaults = {"classifier": str(folder / CLASSIFIER_DIR),
                        "denoiser": str(folder / DENOISER_DIR),
                        "dataset": manifest.get("dataset")}
            data = manifest.get("config", {})
        chosen = {"classifier": local_absolute(classifier or defaults.get("classifier")),
                  "denoiser": local_absolute(denoiser or defaults.get("denoiser")),
                  "dataset": dataset or defaults.get("dataset")}
        missing = [key for key, value in chosen.items() if not value]
        if missing:
            raise CadisError(f"no {', '.join(missing)} given: pass --models DIR or "
                             f"--{' --'.join(missing)}")
        if chosen["dataset"] != defaults.get("dataset"):
            data = {}  # another dataset than the models were made on: not its root or size
        return cls(**chosen, data_root=data_root or data.get("data_root"),
                   image_size=image_size or data.get("image_size"))


def local_absolute(name: str | None) -> str | None:
    """A name that is a local path as its absolute path, anything else (a timm name, a hub id,
    nothing) as given: the same folder reached from another working directory is the same
    model, so the stores of denoised draws keyed by it are found again, and a Ray worker
    elsewhere finds it too."""
    if not name or not Path(name).expanduser().exists():
        return name
    return str(Path(name).expanduser().resolve())
