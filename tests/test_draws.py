"""Stored denoised draws: certifying from a store gives exactly the counts of denoising the
same seeded draws again; a store of other settings is refused untouched; one that would not
fit on the disk is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cadis.errors import CadisError
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.denoise import DenoisedClassifier, OneShotDenoiser
from cadis.draws.certification_store import DrawStore, build_store
from cadis.draws.folder import STORE_META
from cadis.draws.keys import certification_key, store_folder
from cadis.smoothing.image_noise import image_noise
from cadis.smoothing.sequential import SequentialPlan
from cadis.smoothing.smooth import Smooth
from tests.conftest import make_scheduler, make_tiny_unet
from tests.test_attack import CountingModel

SIGMA = 0.5
CLASSES = 3
CPU = torch.device("cpu")


class Linear(nn.Module):
    """A seeded linear classifier of 1x8x8 images whose answers vary from draw to draw."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layer = nn.Linear(64, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images.flatten(1) - 0.5) * 20


def key(**changes):
    fields = {"dataset": "digits", "split": "train", "indices": [3, 9, 4, 1, 7], "denoiser": "d",
              "sigma": SIGMA, "n0": 6, "n": 30, "seed": 5, **changes}
    return certification_key(**fields)


def parts():
    torch.manual_seed(0)
    denoiser = OneShotDenoiser(make_tiny_unet(), make_scheduler(), SIGMA)
    images = torch.rand(5, 1, 8, 8)
    return denoiser, Linear(), images


@pytest.mark.parametrize("batch_size", [7, 36, 80, 500])  # within an image, one, two, all
def test_stored_draws_give_the_counts_of_denoising_them_again(tmp_path, batch_size):
    denoiser, classifier, images = parts()
    store = build_store(tmp_path / "store", key(), denoiser, images, [0, 1, 2, 0, 1], CLASSES,
                        batch_size, progress=False)
    stored = store.certify(classifier, [3, 9, 4, 1, 7], 0.01, torch.device("cpu"))
    smooth = Smooth(DenoisedClassifier(denoiser, classifier), CLASSES, SIGMA)
    again = smooth.certify_many(images, CertificationParameters(6, 30, 0.01, batch_size),
                                image_noise(5, "train", [3, 9, 4, 1, 7], CPU))
    assert [answer[1:] for answer in stored] == again
    assert [answer[0] for answer in stored] == [0, 1, 2, 0, 1]
    # The classifier really varies: not every image gets the same answer.
    assert len({prediction for prediction, _ in again}) > 1
    # Live at another batch size draws the same noise, so it answers the same.
    other = 500 if batch_size != 500 else 7
    assert smooth.certify_many(images, CertificationParameters(6, 30, 0.01, other),
                               image_noise(5, "train", [3, 9, 4, 1, 7], CPU)) == again


def test_any_subset_and_order_of_images_gets_the_same_answers(tmp_path):
    denoiser, classifier, images = parts()
    store = build_store(tmp_path / "store", key(), denoiser, images, [0, 1, 2, 0, 1], CLASSES,
                        36, progress=False)
    everything = dict(zip([3, 9, 4, 1, 7], store.certify(classifier, [3, 9, 4, 1, 7], 0.01,
                                                         torch.device("cpu"))))
    some = store.certify(classifier, [7, 4], 0.01, torch.device("cpu"))
    assert some == [everything[7], everything[4]]
    with pytest.raises(CadisError, match="image 2 has no draws"):
        store.certify(classifier, [2], 0.01, torch.device("cpu"))


def test_a_store_records_what_it_cost(tmp_path):
    denoiser, classifier, images = parts()
    store = build_store(tmp_path / "store", key(), denoiser, images, [0] * 5, CLASSES, 36,
                        classifier=classifier, progress=False)
    info = store.info
    assert info.bytes == 5 * 36 * 64 * 4
    assert info.build_seconds > 0 and info.denoiser_ms_per_draw > 0
    assert info.classifier_ms_per_draw is not None and info.classifier_ms_per_draw > 0


def test_a_store_of_other_settings_is_refused_untouched(tmp_path):
    denoiser, _, images = parts()
    folder = tmp_path / "store"
    build_store(folder, key(), denoiser, images, [0] * 5, CLASSES, 36, progress=False)
    before = (folder / STORE_META).read_text()
    for changed in ({"sigma": 0.25}, {"seed": 6}, {"n": 31}, {"indices": [3, 9, 4, 1, 8]}):
        with pytest.raises(CadisError, match=f"{next(iter(changed))} differ"):
            DrawStore.open(folder, key(**changed))
        with pytest.raises(CadisError, match="made with other settings"):
            build_store(folder, key(**changed), denoiser, images, [0] * 5, CLASSES, 36,
                        progress=False)
    assert (folder / STORE_META).read_text() == before


def test_other_settings_get_a_folder_of_their_own(tmp_path):
    assert store_folder(tmp_path, "rank", key()) == store_folder(tmp_path, "rank", key())
    assert store_folder(tmp_path, "rank", key()) != store_folder(tmp_path, "rank",
                                                                 key(sigma=0.25))
    assert store_folder(tmp_path, "rank", key()).name.startswith("rank-")


def test_a_store_that_does_not_fit_on_the_disk_is_refused_before_any_work(tmp_path):
    denoiser, _, images = parts()
    huge = key(n=10 ** 12)
    with pytest.raises(CadisError, match=r"the denoised draws need [0-9.]+ GiB .* are free"):
        build_store(tmp_path / "store", huge, denoiser, images, [0] * 5, CLASSES, 36,
                    progress=False)
    assert not (tmp_path / "store").exists() and list(tmp_path.iterdir()) == []


def test_the_store_says_its_dtype_and_batch_size(tmp_path):
    denoiser, _, images = parts()
    store = build_store(tmp_path / "store", key(), denoiser, images, [0] * 5, CLASSES, 36,
                        progress=False)
    meta = json.loads((store.folder / STORE_META).read_text())
    assert meta["key"]["dtype"] == "float32" and meta["batch_size"] == 36


def test_sequential_from_a_store_with_one_look_agrees_with_certify_from_it(tmp_path):
    # One look at all n draws (alpha unsplit): the largest grid radius the sequential test
    # certifies is the largest grid radius at or below CERTIFY's radius, image by image.
    denoiser, classifier, images = parts()
    store = build_store(tmp_path / "store", key(n=300), denoiser, images, [0, 1, 2, 0, 1],
                        CLASSES, 36, progress=False)
    indices = [3, 9, 4, 1, 7]
    fixed = store.certify(classifier, indices, 0.2, torch.device("cpu"))
    grid = (0.0, 0.05, 0.1, 0.2, 0.3)
    plan = SequentialPlan.single_look(grid, SIGMA, 0.2, n=300)
    sequential = store.certify_sequential(classifier, indices, plan, torch.device("cpu"))
    for (label, prediction, radius), (s_label, s_prediction, s_radius, draws) in zip(
            fixed, sequential):
        assert s_label == label and s_prediction == prediction and draws == 6 + 300
        if prediction != -1:
            assert s_radius == max(r for r in grid if r <= radius)
    # With looks, images stop early and never read past the store's n.
    plan = SequentialPlan(grid, SIGMA, 0.2, n_max=300)
    spent = [answer[3] for answer in store.certify_sequential(classifier, indices, plan,
                                                              torch.device("cpu"))]
    assert all(6 + plan.looks[0] <= draws <= 6 + 300 for draws in spent)
    with pytest.raises(CadisError, match="may spend 400 draws but the store"):
        store.certify_sequential(classifier, indices, SequentialPlan(grid, SIGMA, 0.2, 400),
                                 torch.device("cpu"))


# n0 = 10: the sequential test's first selection draws are all of them; n0 = 100: it reads its
# first look's estimation draws before the rest of the selection draws, which the store holds
# in CERTIFY's order (all n0 first).
@pytest.mark.parametrize("n0", [10, 100])
def test_sequential_live_and_from_a_store_read_the_same_draws_at_any_n0(tmp_path, n0):
    denoiser, classifier, images = parts()
    indices = [3, 9, 4, 1, 7]
    store = build_store(tmp_path / "store", key(n0=n0, n=400), denoiser, images,
                        [0, 1, 2, 0, 1], CLASSES, 36, progress=False)
    plan = SequentialPlan((0.0, 0.1, 0.2), SIGMA, 0.2, 400)
    stored = [answer[1:] for answer in store.certify_sequential(classifier, indices, plan, CPU)]
    smooth = Smooth(DenoisedClassifier(denoiser, classifier), CLASSES, SIGMA)
    for live_batch in (36, 100):  # the store's batch size, and another
        live = [smooth.certify_sequential(image, n0, plan, live_batch, noise)
                for image, noise in zip(images, image_noise(5, "train", indices, CPU))]
        assert live == stored
    # Some image runs past its first look, and some stops there: the looks are exercised.
    assert len({spent for _, _, spent in stored}) > 1


def test_builders_of_one_store_at_once_take_turns_and_denoise_once(tmp_path):
    import threading

    denoiser, classifier, images = parts()
    counting = CountingModel(denoiser)
    stores = []

    def build() -> None:
        stores.append(build_store(tmp_path / "store", key(), counting, images, [0, 1, 2, 0, 1],
                                  CLASSES, 36, progress=False))

    builders = [threading.Thread(target=build) for _ in range(3)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    # One build's forwards (5 images x 36 draws in batches of 36), not three.
    assert counting.calls == 5 and len(stores) == 3
    answers = [store.certify(classifier, [3, 9, 4, 1, 7], 0.01, torch.device("cpu"))
               for store in stores]
    assert answers[0] == answers[1] == answers[2]
