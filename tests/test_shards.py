"""Certification in shards: each image has its own noise, so the parts of a certification,
joined, are the records one run makes (but for the seconds each took), in Ray tasks too."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cadis.certify_models import certify_models, shard_of
from cadis.errors import CadisError
from cadis.smoothing.record_folder import merge_records
from cadis.smoothing.records import (
    NOISE_PER_IMAGE,
    RECORDS_FILENAME,
    SETTINGS_FILENAME,
    read_records,
)
from cadis.sweeps.shards import join_shards, shard_dirs

CERTIFY = {"sigma": 0.25, "n": 60, "n0": 10, "alpha": 0.01, "skip": 7, "max_images": 9,
           "batch_size": 25}
RADII = (0.0, 0.1, 0.2)
HEAD_SCALE = 100.0


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models_dir):
    """The tiny models with a classifier whose answer moves with its input (the untrained
    one answers one class everywhere): its head, centred on the mean feature of random
    images and scaled up, reads what varies. So records differ from image to image."""
    import shutil

    import torch

    from cadis.models.classifier import load_classifier, save_classifier
    from tests.conftest import TINY_VIT_ARGS

    folder = tmp_path_factory.mktemp("varied") / "models"
    shutil.copytree(tiny_models_dir, folder)
    classifier = load_classifier(str(folder / "classifier")).eval()
    head = classifier.model.head
    features = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        classifier(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
        hook.remove()
        head.weight.mul_(HEAD_SCALE)
        head.bias.copy_(-head.weight @ features[0].mean(0))
    shutil.rmtree(folder / "classifier")
    save_classifier(classifier, folder / "classifier", TINY_VIT_ARGS, mean=(0.5,), std=(0.5,))
    return folder


def without_seconds(path):
    return [dataclasses.replace(record, seconds=0.0) for record in read_records(path)]


def certify(models, out, sequential=False, **changes):
    settings = {**CERTIFY, **changes}
    sigma = settings.pop("sigma")
    return certify_models(models_sources(models), sigma, out, sequential=sequential,
                          radii=RADII, progress=False, **settings)


def models_sources(models):
    from cadis.models.sources import ModelSources

    return ModelSources.resolve(str(models))


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("sequential", [False, True], ids=["fixed", "sequential"])
def test_joined_shards_are_the_records_of_one_run(models, tmp_path, shards, sequential):
    whole = certify(models, tmp_path / "whole", sequential)
    summaries = [certify(models, folder, sequential, shard=(part, shards))
                 for part, folder in enumerate(shard_dirs(tmp_path / "sharded", shards))]
    joined = join_shards(tmp_path / "sharded", summaries)
    assert (without_seconds(tmp_path / "sharded" / RECORDS_FILENAME)
            == without_seconds(tmp_path / "whole" / RECORDS_FILENAME))
    assert joined["certified_accuracy"] == whole["certified_accuracy"]
    assert joined["acr"] == whole["acr"] and joined["shards"] == shards
    assert joined["mean_draws"] == whole["mean_draws"]
    # The records vary from image to image: the comparison is not of constants.
    records = read_records(tmp_path / "whole" / RECORDS_FILENAME)
    assert len({(record.predict, record.radius) for record in records}) > 1


def test_an_image_gets_the_same_record_in_any_company(models, tmp_path):
    """Per-image noise: a run over a subset, started at another image, agrees image by
    image with the run over all of them."""
    certify(models, tmp_path / "all")
    certify(models, tmp_path / "some", skip=14, max_images=4)
    everything = {record.idx: record
                  for record in without_seconds(tmp_path / "all" / RECORDS_FILENAME)}
    some = without_seconds(tmp_path / "some" / RECORDS_FILENAME)
    assert some and all(record == everything[record.idx] for record in some)


def test_shards_cover_the_images_once_in_order():
    indices = list(range(0, 70, 7))
    for parts in (1, 2, 3, 7):
        joined = [index for part in range(parts) for index in shard_of(indices, (part, parts))]
        assert joined == indices
    with pytest.raises(CadisError, match="shard 2 of 2 does not exist"):
        shard_of(indices, (2, 2))


def test_parts_of_other_settings_or_missing_images_are_refused_unjoined(models, tmp_path):
    first, second = shard_dirs(tmp_path / "out", 2)
    certify(models, first, shard=(0, 2))
    certify(models, second, shard=(1, 2), seed=1)
    with pytest.raises(CadisError, match="certified with other settings"):
        merge_records(tmp_path / "out", [first, second], None, RADII)
    assert not (tmp_path / "out" / RECORDS_FILENAME).exists()
    with pytest.raises(CadisError, match="no record of 1 of the 2 images"):
        merge_records(tmp_path / "out", [first], [0, 70], RADII)
    assert not (tmp_path / "out" / SETTINGS_FILENAME).exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_the_final_stage_in_two_ray_tasks_equals_one(local_ray, models, tmp_path):
    from cadis.finetuning.config import from_mapping
    from cadis.sweeps.shards import certify_in_shards
    from cadis.sweeps.trial import certify_final

    config = from_mapping({"models": str(models), "sigma": CERTIFY["sigma"],
                           "certify": {key: value for key, value in CERTIFY.items()
                                       if key != "sigma"}}).to_dict()
    task = local_ray.remote(certify_final).options(num_cpus=1)
    one = certify_in_shards(task, (config, None), tmp_path / "one", 1)
    two = certify_in_shards(task, (config, None), tmp_path / "two", 2)
    assert (without_seconds(tmp_path / "two" / RECORDS_FILENAME)
            == without_seconds(tmp_path / "one" / RECORDS_FILENAME))
    assert two["certified_accuracy"] == one["certified_accuracy"] and two["shards"] == 2
    settings = json.loads((tmp_path / "two" / SETTINGS_FILENAME).read_text())
    assert settings["noise"] == NOISE_PER_IMAGE and settings["precision"] == "fp32"
