import pytest
import torch

from cadis.errors import CadisError
from cadis.models.classifier import (Classifier, classifier_source, load_classifier,
                                    save_classifier)
from cadis.models.denoiser import load_denoiser
from tests.conftest import TINY_VIT_ARGS


def test_classifier_checkpoint_round_trips_through_the_hub_loader(tiny_classifier_dir):
    assert (tiny_classifier_dir / "model.safetensors").is_file()
    first = load_classifier(str(tiny_classifier_dir)).eval()
    # local-dir: is the very branch of timm.create_model that reads hf-hub: ids.
    second = load_classifier(f"local-dir:{tiny_classifier_dir}").eval()
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(first(images), second(images))
    assert first.in_chans == 1 and first.input_size == (8, 8) and first.num_classes == 10
    assert first.mean.flatten().tolist() == [0.5] and first.std.flatten().tolist() == [0.5]


def test_saved_weights_are_the_trained_ones(tmp_path):
    torch.manual_seed(1)
    classifier = load_classifier("vit_tiny_patch16_224", num_classes=3, **TINY_VIT_ARGS).eval()
    classifier.input_size = (8, 8)
    save_classifier(classifier, tmp_path, TINY_VIT_ARGS, mean=(0.5,), std=(0.5,))
    loaded = load_classifier(str(tmp_path)).eval()
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(classifier(images), loaded(images), atol=1e-6)


def test_reset_head_of_a_checkpoint(tiny_classifier_dir):
    classifier = load_classifier(str(tiny_classifier_dir), num_classes=4)
    assert classifier.num_classes == 4


def test_adapter_repeats_grey_resizes_and_normalises():
    classifier = load_classifier("resnet18", num_classes=2, pretrained=False)
    classifier.input_size = (16, 16)
    assert classifier.in_chans == 3
    grey = torch.full((2, 1, 8, 8), 0.25)
    adapted = classifier.adapt(grey)
    assert adapted.shape == (2, 3, 16, 16)
    expected = (0.25 - classifier.mean) / classifier.std
    assert torch.allclose(adapted, expected.expand_as(adapted), atol=1e-5)
    # ImageNet statistics of resnet18's config, one per channel.
    assert classifier.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_adapter_rejects_channels_it_cannot_take(tiny_classifier_dir):
    classifier = load_classifier(str(tiny_classifier_dir))
    classifier.check_input(1)
    with pytest.raises(CadisError, match="takes 1-channel images, the data has 3"):
        classifier.check_input(3)


@pytest.mark.parametrize("name,match", [
    ("not_a_timm_model", "unknown classifier 'not_a_timm_model': allowed are timm"),
    ("./missing/checkpoint", "does not exist"),
])
def test_bad_classifier_names(name, match):
    with pytest.raises(CadisError, match=match):
        classifier_source(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(CadisError, match="has no config.json"):
        load_classifier(str(tmp_path))


def test_image_size_the_model_cannot_take():
    with pytest.raises(CadisError, match="cannot take 10x10 images with patch size 4"):
        load_classifier("vit_tiny_patch16_224", num_classes=2, img_size=10, patch_size=4,
                        embed_dim=16, depth=1, num_heads=2)


def test_denoiser_round_trips_through_from_pretrained(tiny_denoiser_dir):
    from tests.conftest import make_tiny_unet

    torch.manual_seed(0)
    reference = make_tiny_unet().eval()
    unet, scheduler = load_denoiser(str(tiny_denoiser_dir))
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    sample, timesteps = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(reference(sample, timesteps).sample, unet(sample, timesteps).sample,
                              atol=1e-6)
    assert any(p.name.endswith(".safetensors") for p in (tiny_denoiser_dir / "unet").iterdir())


def test_missing_denoiser_directory(tmp_path):
    with pytest.raises(CadisError, match="has no model_index.json"):
        load_denoiser(str(tmp_path))


def test_unreachable_hub_denoiser_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CadisError, match="could not be loaded") as error:
        load_denoiser("cadis-tests/no-such-model")
    assert "\n" not in str(error.value)


def test_classifier_wraps_any_module_with_config():
    model = torch.nn.Conv2d(1, 2, 3)
    model.pretrained_cfg = {"input_size": (1, 5, 5), "mean": (0.5,), "std": (0.25,),
                            "first_conv": ""}
    classifier = Classifier(model)
    assert classifier.input_size == (5, 5)
    assert classifier(torch.ones(1, 1, 5, 5)).shape == (1, 2, 3, 3)


def test_a_models_folder_gives_its_data_only_to_its_own_dataset(tmp_path):
    import json

    from cadis.models.sources import ModelSources

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"dataset": "imagefolder", "config": {"data_root": "/data/mine", "image_size": 16}}))
    own = ModelSources.resolve(str(tmp_path))
    assert (own.dataset, own.data_root, own.image_size) == ("imagefolder", "/data/mine", 16)
    assert ModelSources.resolve(str(tmp_path), image_size=32).image_size == 32
    other = ModelSources.resolve(str(tmp_path), dataset="digits")
    assert (other.data_root, other.image_size) == (None, None)
