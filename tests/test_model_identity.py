"""What identifies a model (cadis/models/identity.py), and the committed pair's manifest."""

import json
import shutil
from pathlib import Path

from cadis.models.identity import (
    MODEL_ROLES,
    model_hashes,
    model_sha256,
    models_folder_hashes,
    tree_sha256,
)
from cadis.models.sources import MANIFEST, ModelSources

COMMITTED_PAIR = Path(__file__).resolve().parents[1] / "models" / "fashion-mnist"


def test_the_committed_manifest_hashes_every_model_file_as_it_is():
    # Fails when a model file changes, appears or goes without its manifest saying so.
    manifest = json.loads((COMMITTED_PAIR / MANIFEST).read_text())
    assert manifest["files"] == models_folder_hashes(COMMITTED_PAIR)
    assert {path.split("/")[0] for path in manifest["files"]} == set(MODEL_ROLES)


def test_the_committed_manifest_names_no_path_of_the_machine_it_was_made_on():
    manifest = json.loads((COMMITTED_PAIR / MANIFEST).read_text())
    # A named dataset is found through $CADIS_DATA or its default place on any machine.
    assert manifest["config"]["data_root"] is None
    assert not any(str(value).startswith("/") for value in manifest.values())


def test_records_name_hashes_a_reader_can_check_against_the_manifest():
    manifest = json.loads((COMMITTED_PAIR / MANIFEST).read_text())
    from_manifest = {role: tree_sha256({path.removeprefix(f"{role}/"): sha256
                                        for path, sha256 in manifest["files"].items()
                                        if path.startswith(f"{role}/")})
                     for role in MODEL_ROLES}
    assert model_hashes(ModelSources.resolve(str(COMMITTED_PAIR))) == from_manifest


def test_a_model_is_its_bytes_wherever_it_lies(tiny_classifier_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_classifier_dir, copy)
    original = model_sha256(str(tiny_classifier_dir))
    assert model_sha256(str(copy)) == original and len(original) == 64
    # Hidden files are no part of a model (a staging folder's, an editor's).
    (copy / ".staging").mkdir()
    (copy / ".staging" / "config.json").write_text("not the model")
    assert model_sha256(str(copy)) == original
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")
    assert model_sha256(str(copy)) != original  # rewritten in place: hashed again


def test_a_named_model_has_no_hash(tiny_denoiser_dir):
    sources = ModelSources("vit_tiny_patch16_224", str(tiny_denoiser_dir), "digits")
    hashes = model_hashes(sources)
    assert hashes["classifier"] is None and hashes["denoiser"] == model_sha256(
        str(tiny_denoiser_dir))
