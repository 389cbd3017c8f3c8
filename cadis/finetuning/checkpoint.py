"""The one checkpoint format of fine-tuning: trained weights, optimizer state and metadata.

A checkpoint folder holds ``trained.safetensors`` (only what training can change: see
:func:`trained_state_dict`), optionally ``optimizer.safetensors`` (the optimizer's state per
trained parameter and the CPU random state, so that a resumed run continues exactly), and
``finetune.json`` (the fine-tuning config that shapes the weights, and the caller's metadata:
epoch, step, the training config, the epoch's metrics). ``finetune.json`` is written last and
marks the checkpoint complete. Tensors are safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from cadis.errors import CadisError
from cadis.files import atomic_write_bytes, atomic_write_text
from cadis.finetuning.lora import FinetuneConfig, apply_finetuning
from cadis.models.classifier import Classifier

TRAINED_WEIGHTS: Final = "trained.safetensors"
OPTIMIZER_STATE: Final = "optimizer.safetensors"
FINETUNE_CONFIG: Final = "finetune.json"
# The CPU generator's state, stored beside the optimizer's tensors.
RNG_STATE_KEY: Final = "rng::cpu"
# Optimizer tensors are keyed "<parameter name>::<state field>".
STATE_SEPARATOR: Final = "::"


def trained_state_dict(classifier: Classifier) -> dict[str, torch.Tensor]:
    """What training can change: every parameter that requires grad and every persistent buffer.

    Buffers are included because training in train mode updates them even in a frozen
    backbone (batch-norm running statistics of a CNN under LoRA); without them a reloaded
    classifier would not reproduce the trained one. ViTs have none, so for them this is
    exactly the adapters and the head. Values are detached contiguous clones on the CPU.
    """
    return {name: value.detach().to("cpu", copy=True).contiguous()
            for name, value in classifier.state_dict(keep_vars=True).items()
            if not isinstance(value, nn.Parameter) or value.requires_grad}


def _optimizer_tensors(classifier: Classifier,
                       optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): name for name, p in classifier.named_parameters() if p.requires_grad}
    tensors = {f"{names[id(parameter)]}{STATE_SEPARATOR}{key}":
               torch.as_tensor(value).detach().cpu()
               for parameter, values in optimizer.state.items() for key, value in values.items()}
    tensors[RNG_STATE_KEY] = torch.get_rng_state()
    return tensors


def save_trained(classifier: Classifier, directory: Path, config: FinetuneConfig,
                 metadata: dict[str, Any],
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write a checkpoint of ``classifier`` (and of ``optimizer``, to resume training).

    ``finetune.json`` (``{"finetune": config, "metadata": metadata}``) marks the checkpoint
    complete: an existing one is removed first and the new one is written last, each file
    atomically, so a crash at any point leaves either a complete checkpoint or none that
    loads, never the tensors of one save with the description of another.
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    description = json.dumps({"finetune": asdict(config), "metadata": metadata}, indent=2)
    (directory / FINETUNE_CONFIG).unlink(missing_ok=True)
    if optimizer is not None:
        atomic_write_bytes(directory / OPTIMIZER_STATE,
                           save(_optimizer_tensors(classifier, optimizer)))
    atomic_write_bytes(directory / TRAINED_WEIGHTS, save(trained_state_dict(classifier)))
    atomic_write_text(directory / FINETUNE_CONFIG, description)


def _description(directory: Path) -> tuple[FinetuneConfig, dict[str, Any]]:
    path = Path(directory) / FINETUNE_CONFIG
    if not path.is_file():
        raise CadisError(f"{directory} is not a cadis checkpoint (no {FINETUNE_CONFIG})")
    try:
        description = json.loads(path.read_text())
        return FinetuneConfig(**description["finetune"]), description["metadata"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CadisError(f"{path} is not a valid cadis checkpoint description "
                         f"({type(error).__name__}: {error})") from None


def read_metadata(directory: Path) -> dict[str, Any]:
    """The metadata a checkpoint was saved with (epoch, step, config, metrics)."""
    return _description(directory)[1]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise CadisError(f"checkpoint {path.parent} has no readable {path.name} "
                         f"({type(error).__name__}: {error})") from None


def load_trained(classifier: Classifier, directory: Path) -> tuple[Classifier, dict[str, Any]]:
    """Apply a :func:`save_trained` checkpoint to a freshly loaded off-the-shelf ``classifier``.

    The saved fine-tuning config is applied first, then every saved tensor is loaded; the
    checkpoint must hold exactly the tensors that config trains on this classifier, with the
    same shapes, otherwise :class:`CadisError` (one line) says how it differs. Returns the
    same classifier and the saved metadata.
    """
    directory = Path(directory)
    config, metadata = _description(directory)
    saved = _read_tensors(directory / TRAINED_WEIGHTS)
    apply_finetuning(classifier, config)
    expected = trained_state_dict(classifier)
    missing = expected.keys() - saved.keys()
    unexpected = saved.keys() - expected.keys()
    reshaped = [name for name in expected.keys() & saved.keys()
                if expected[name].shape != saved[name].shape]
    if missing or unexpected or reshaped:
        raise CadisError(f"checkpoint {directory} does not fit this classifier: "
                         f"{len(missing)} keys missing, {len(unexpected)} unexpected, "
                         f"{len(reshaped)} of another shape (a checkpoint of another "
                         "architecture?)")
    # Not strict: the frozen base weights are absent on purpose; the exact key match above is
    # the strict check for everything the checkpoint is meant to hold.
    classifier.load_state_dict(saved, strict=False)
    return classifier, metadata


def restore_training_state(directory: Path, classifier: Classifier,
                           optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Continue training from a checkpoint saved with its optimizer: load the trained weights
    into ``classifier`` (already prepared for fine-tuning), the optimizer's state into
    ``optimizer`` and the CPU random state; returns the checkpoint's metadata.

    In one process a resumed run then trains exactly as an uninterrupted one (the noise and
    the augmentation continue where they stopped).
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    # Not strict: the checkpoint holds only what training changes (the frozen base is absent).
    classifier.load_state_dict(_read_tensors(directory / TRAINED_WEIGHTS), strict=False)
    parameters = dict(classifier.named_parameters())
    saved = _read_tensors(directory / OPTIMIZER_STATE)
    torch.set_rng_state(saved.pop(RNG_STATE_KEY))
    for key, value in saved.items():
        name, _, field_name = key.rpartition(STATE_SEPARATOR)
        optimizer.state[parameters[name]][field_name] = value.to(parameters[name].device)
    return metadata
