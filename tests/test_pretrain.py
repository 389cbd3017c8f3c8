"""A tiny pretrain on scikit-learn's digits, end to end through the command line."""

import json

import pytest
import torch

from cadis.cli import main
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.models.identity import models_folder_hashes
from tests.conftest import set_flags

TINY_RECIPE = [
    "classifier.epochs=8", "classifier.augment=none", "classifier.lr=3e-3",
    "classifier.model_args={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}",
    "denoiser.steps=40", "denoiser.block_out_channels=[16, 32]", "denoiser.batch_size=32",
    "denoiser.warmup_steps=5",
]


def _pretrain(out, *extra, flags=()):
    return main(["pretrain", "--dataset", "digits", "--out", str(out), "--quiet", *flags,
                 *set_flags(*TINY_RECIPE, *extra)])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "digits"
    assert _pretrain(out) == 0
    return out


def test_pretrain_writes_loadable_models_and_a_manifest(pretrained):
    manifest = json.loads((pretrained / "manifest.json").read_text())
    assert set(manifest["denoised_accuracy"]) == {"0.25", "0.5", "1.0"}
    # Chance is 0.1: the classifier must have learned something in 8 epochs.
    assert manifest["clean_accuracy"] > 0.2
    assert all(0 <= v <= 1 for v in manifest["denoised_accuracy"].values())
    assert manifest["num_test_images"] == 359
    assert manifest["parameters"]["classifier"] > 0 and manifest["parameters"]["denoiser"] > 0
    assert manifest["denoiser_timesteps"]["focus_timesteps"] == [70, 396]
    assert set(manifest["train_seconds"]) == {"classifier", "denoiser"}
    assert manifest["files"] == models_folder_hashes(pretrained)
    assert "classifier/model.safetensors" in manifest["files"]
    classifier = load_classifier(str(pretrained / "classifier"))
    unet, scheduler = load_denoiser(str(pretrained / "denoiser"))
    assert classifier.input_size == (8, 8) and unet.config.sample_size == 8
    assert scheduler.config.prediction_type == "epsilon"
    assert not list(pretrained.glob(".*")), "no staging folders left behind"


def test_clean_accuracy_in_manifest_is_what_the_saved_model_gets(pretrained):
    from cadis.data import load_dataset

    manifest = json.loads((pretrained / "manifest.json").read_text())
    test_set = load_dataset("digits", "test")
    classifier = load_classifier(str(pretrained / "classifier")).eval()
    with torch.no_grad():
        predictions = classifier(test_set.images.float() / 255).argmax(1)
    accuracy = (predictions == test_set.labels).float().mean().item()
    assert accuracy == pytest.approx(manifest["clean_accuracy"], abs=1e-6)


def test_rerun_reuses_outputs_and_force_retrains(pretrained, capsys):
    weights = pretrained / "classifier" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert _pretrain(pretrained) == 0
    assert weights.stat().st_mtime_ns == before
    # A changed denoiser recipe retrains the denoiser only.
    denoiser_weights = next((pretrained / "denoiser" / "unet").glob("*.safetensors"))
    denoiser_before = denoiser_weights.stat().st_mtime_ns
    assert _pretrain(pretrained, "denoiser.steps=41") == 0
    assert weights.stat().st_mtime_ns == before
    assert next((pretrained / "denoiser" / "unet").glob("*.safetensors")).stat().st_mtime_ns \
        != denoiser_before
    manifest = json.loads((pretrained / "manifest.json").read_text())
    assert manifest["config"]["denoiser"]["steps"] == 41
    assert manifest["files"] == models_folder_hashes(pretrained)
    # A manifest whose hashes are not the files' describes other models: measured again.
    stale = {**manifest, "files": {}, "clean_accuracy": -1.0}
    (pretrained / "manifest.json").write_text(json.dumps(stale))
    assert _pretrain(pretrained, "denoiser.steps=41") == 0
    manifest = json.loads((pretrained / "manifest.json").read_text())
    assert manifest["files"] == models_folder_hashes(pretrained)
    assert manifest["clean_accuracy"] >= 0
    assert weights.stat().st_mtime_ns == before
    assert _pretrain(pretrained, "denoiser.steps=41", flags=["--force"]) == 0
    assert weights.stat().st_mtime_ns != before


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'; allowed: fashion-mnist"),
    (["--dataset", "imagefolder"], "dataset imagefolder needs a root"),
    (["--set", "classifier.architecture=resnet_9000"], "unknown classifier 'resnet_9000'"),
    (["--set", "classifier.nope=1"], "unknown pretrain key 'classifier.nope'"),
    (["--set", "classifier.epochs=many"], "classifier.epochs must be a number"),
    (["--set", "classifier.model_args={patch_size: 3}"], "cannot take 8x8 images with patch"),
    (["--set", "denoiser.block_out_channels=[8, 8, 8, 8, 8]",
      "--set", "classifier.model_args={patch_size: 2}"], "divisible by 16; the data is 8"),
    ([], "cannot take 8x8 images with patch size 7"),  # the default ViT is for 28 px
])
def test_bad_input_is_one_line_exit_two_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    dataset = [] if "--dataset" in args else ["--dataset", "digits"]
    code = main(["pretrain", *dataset, "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cadis: error: ") and message in err
    assert err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())
