"""What a hostile file or name can do to cadis: nothing. No load path unpickles (a malicious
pickle where a checkpoint, an optimizer state or a model is read does not run), and no sweep,
experiment or trial name climbs out of its folder. What the cluster script binds is in
tests/test_cluster.py (test_script_binds_loopback_only, and the listening sockets of a real
cluster in test_local_cluster_runs_a_job_serves_mlflow_and_stops_clean)."""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cadis.errors import CadisError

PACKAGE = Path(__file__).resolve().parents[1] / "cadis"


class Payload:
    """Unpickling this runs ``touch MARKER``: the proof that a loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    """A torch.save file whose unpickling touches a marker file, shown to be live: loading it
    the unsafe way does run it (so its not running below means the loader refused it)."""
    marker = tmp_path / "unpickled"
    path = tmp_path / "payload.bin"
    torch.save({"weight": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


# ------------------------------------------------------------------------ what loads files


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


# The calls that may unpickle, and the keyword that makes each safe (None: never allowed).
UNPICKLING_CALLS = {"torch.load": ("weights_only", True), "np.load": ("allow_pickle", False),
                    "numpy.load": ("allow_pickle", False), "pickle.load": None,
                    "pickle.loads": None, "dill.load": None, "joblib.load": None}


def test_no_load_call_in_cadis_can_unpickle():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text())):
            name = _dotted(call.func)
            if name not in UNPICKLING_CALLS:
                continue
            rule = UNPICKLING_CALLS[name]
            safe = rule is not None and any(
                keyword.arg == rule[0] and isinstance(keyword.value, ast.Constant)
                and keyword.value.value is rule[1] for keyword in call.keywords)
            found.append((f"{path.relative_to(PACKAGE.parent)}:{call.lineno} {name}", safe))
    assert [where for where, safe in found if not safe] == []
    assert found  # the scan sees the store loaders (np.load ... allow_pickle=False)
    assert "import pickle" not in "".join(p.read_text() for p in PACKAGE.rglob("*.py"))


def _checkpoint(tmp_path: Path, tiny_classifier_dir: Path) -> Path:
    from cadis.finetuning.checkpoint import save_trained
    from cadis.finetuning.lora import FinetuneConfig, apply_finetuning
    from cadis.models.classifier import load_classifier

    folder = tmp_path / "checkpoint"
    classifier = apply_finetuning(load_classifier(str(tiny_classifier_dir)), FinetuneConfig())
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad])
    save_trained(classifier, folder, FinetuneConfig(), {"epoch": 1}, optimizer=optimizer)
    return folder


@pytest.mark.parametrize("replaced", ["trained.safetensors", "optimizer.safetensors"])
def test_a_pickle_in_a_checkpoint_does_not_run(malicious, tmp_path, tiny_classifier_dir,
                                               replaced):
    from cadis.finetuning.checkpoint import load_trained, restore_training_state
    from cadis.finetuning.lora import FinetuneConfig, apply_finetuning
    from cadis.models.classifier import load_classifier

    payload, marker = malicious
    folder = _checkpoint(tmp_path, tiny_classifier_dir)
    shutil.copyfile(payload, folder / replaced)
    classifier = apply_finetuning(load_classifier(str(tiny_classifier_dir)), FinetuneConfig())
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad])
    with pytest.raises(CadisError, match=f"has no readable {replaced}"):
        restore_training_state(folder, classifier, optimizer)
    if replaced == "trained.safetensors":
        with pytest.raises(CadisError, match=f"has no readable {replaced}"):
            load_trained(load_classifier(str(tiny_classifier_dir)), folder)
    assert not marker.exists()


def test_a_pickled_classifier_does_not_run(malicious, tmp_path, tiny_classifier_dir):
    from cadis.models.classifier import CLASSIFIER_WEIGHTS, load_classifier

    payload, marker = malicious
    folder = tmp_path / "classifier"
    shutil.copytree(tiny_classifier_dir, folder)
    (folder / CLASSIFIER_WEIGHTS).unlink()            # timm then looks for pytorch_model.bin
    shutil.copyfile(payload, folder / "pytorch_model.bin")
    # timm reads it with weights_only=True, which refuses the payload's global.
    with pytest.raises(CadisError, match="could not be loaded: weights_only=True blocked"):
        load_classifier(str(folder))
    assert not marker.exists()


def test_a_pickled_denoiser_does_not_run(malicious, tmp_path, tiny_denoiser_dir):
    from cadis.models.denoiser import load_denoiser

    payload, marker = malicious
    folder = tmp_path / "denoiser"
    shutil.copytree(tiny_denoiser_dir, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()                              # diffusers then looks for the .bin
    shutil.copyfile(payload, folder / "unet" / "diffusion_pytorch_model.bin")
    # diffusers falls back to the .bin, read with weights_only=True, which refuses it.
    with pytest.raises(CadisError, match="could not be loaded: .*diffusion_pytorch_model.bin"):
        load_denoiser(str(folder))
    assert not marker.exists()


def test_the_payload_is_a_pickle_that_runs_when_unpickled(tmp_path):
    # The marker mechanism itself, without torch: what the tests above would see.
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ----------------------------------------------------------------- names that name paths


@pytest.mark.parametrize("changes, key", [
    ({"name": "../escape"}, "name"),
    ({"name": "/tmp/escape"}, "name"),
    ({"name": ".."}, "name"),
    ({"mlflow": {"experiment": "../escape"}}, "mlflow.experiment"),
    ({"mlflow": {"experiment": "/Users/someone/escape"}}, "mlflow.experiment"),
    ({"mlflow": {"experiment": ".hidden"}}, "mlflow.experiment"),
])
def test_a_sweep_or_experiment_name_that_is_a_path_is_refused(changes, key):
    from cadis.sweeps.parse import sweep_from_mapping
    from tests.test_sweep_config import with_changes

    with pytest.raises(CadisError, match=f"^{key} must be letters"):
        sweep_from_mapping(with_changes(**changes))


@pytest.mark.parametrize("trial_id", ["../escape", "/tmp/escape", "..", "a/../../b", "", ".x"])
def test_a_trial_id_that_is_a_path_names_no_folder(tmp_path, trial_id):
    from cadis.sweeps.layout import trained_file, trial_certify_dir, trial_rank_dir

    for folder_of in (trained_file, trial_certify_dir, trial_rank_dir):
        with pytest.raises(CadisError, match="is not a plain folder name"):
            folder_of(tmp_path, trial_id)


def test_tunes_trial_ids_name_folders_inside_the_results(tmp_path):
    from cadis.sweeps.layout import trial_certify_dir

    folder = trial_certify_dir(tmp_path, "run_trial_5b3c1_00003")
    assert folder.resolve().is_relative_to(tmp_path.resolve())

