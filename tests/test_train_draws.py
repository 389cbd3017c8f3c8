"""Training draws denoised once: the store holds what the live loop would denoise, each step
samples M distinct stored draws of each image in the live layout, training from the store
never runs the denoiser, and settings that cannot use a store are refused before work."""

from __future__ import annotations

import json

import pytest
import torch

from cadis.cli import main
from cadis.errors import CadisError
from cadis.finetuning.config import from_mapping
from cadis.finetuning.loop import denoise_draws
from cadis.draws.folder import STORE_META
from cadis.draws.keys import training_key
from cadis.draws.training_store import TrainDrawStore, build_train_store, sample_draws
from cadis.smoothing.denoise import OneShotDenoiser
from cadis.smoothing.precision import FP32
from cadis.sweeps.parse import sweep_from_mapping
from tests.conftest import make_scheduler, make_tiny_unet, set_flags
from tests.test_train import TINY

SIGMA = 0.25
DRAWS = 4
INDICES = [5, 2, 7, 0, 3]


class Levels(torch.utils.data.Dataset):
    """Eight flat 1x8x8 images, image i at a level of its own, labelled i % 3."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.full((1, 8, 8), 0.1 + 0.1 * index), index % 3


def key(**changes):
    fields = {"dataset": "levels", "indices": INDICES, "denoiser": "d", "sigma": SIGMA,
              "draws": DRAWS, "seed": 3, "precision": "fp32", **changes}
    return training_key(**fields)


def denoiser() -> OneShotDenoiser:
    torch.manual_seed(0)
    return OneShotDenoiser(make_tiny_unet(), make_scheduler(), SIGMA)


def test_the_store_holds_k_draws_of_each_image_as_the_loop_denoises_them(tmp_path):
    model = denoiser()
    store = build_train_store(tmp_path / "train", key(), model, Levels(), progress=False)
    assert len(store) == len(INDICES) and store.labels == [i % 3 for i in INDICES]
    draws, label = store[1]
    assert draws.shape == (DRAWS, 1, 8, 8) and label == INDICES[1] % 3
    assert len({tuple(draw.flatten().tolist()) for draw in draws}) == DRAWS  # fresh noise each
    # The same noise through the loop's own live path gives the same stored values.
    generator = torch.Generator().manual_seed(3)
    images = torch.stack([Levels()[i][0] for i in INDICES])
    noise = SIGMA * torch.randn((len(INDICES) * DRAWS, 1, 8, 8), generator=generator)
    live = model.denoise(images.repeat_interleave(DRAWS, 0) + noise)
    stored = torch.stack([store[p][0] for p in range(len(store))]).flatten(0, 1)
    assert torch.allclose(stored, live, atol=1e-6)
    # Rebuilding elsewhere gives the same bits: the draws depend on the key alone.
    again = build_train_store(tmp_path / "again", key(), model, Levels(), progress=False)
    assert all(torch.equal(store[p][0], again[p][0]) for p in range(len(store)))


def test_each_step_samples_distinct_stored_draws_in_the_live_layout():
    images, stored_draws, m = 3, 5, 3
    # Stored draw k of image i is the constant 10 * i + k: every row says where it came from.
    stored = (10 * torch.arange(images).view(-1, 1) + torch.arange(stored_draws)).float()
    stored = stored.view(images, stored_draws, 1, 1, 1).expand(-1, -1, 1, 2, 2)
    torch.manual_seed(0)
    rows = sample_draws(stored, m)[:, 0, 0, 0]
    assert rows.shape == (images * m,)
    for image in range(images):
        picked = rows[image * m:(image + 1) * m].tolist()  # image-major, as the losses read
        assert all(10 * image <= value < 10 * image + stored_draws for value in picked)
        assert len(set(picked)) == m  # without replacement
    # Afresh at every visit.
    assert any(not torch.equal(sample_draws(stored, m), sample_draws(stored, m))
               for _ in range(5))
    with pytest.raises(CadisError, match="exceeds the 5 stored draws"):
        sample_draws(stored, 6)


def test_live_draws_have_the_same_layout_as_stored_ones():
    model = denoiser()
    images = torch.stack([Levels()[i][0] for i in INDICES])
    torch.manual_seed(0)
    live = denoise_draws(images, model, SIGMA, 3, FP32)
    assert live.shape == (len(INDICES) * 3, 1, 8, 8)
    levels = live.mean(dim=(1, 2, 3)).view(len(INDICES), 3)
    # Rows of one image are adjacent: within an image they are closer than across images.
    assert float((levels[:, 0] - levels[:, 1]).abs().max()) < 0.2


def test_a_store_of_other_settings_is_refused_untouched(tmp_path):
    folder = tmp_path / "train"
    build_train_store(folder, key(), denoiser(), Levels(), progress=False)
    before = (folder / STORE_META).read_text()
    for changed in ({"sigma": 0.5}, {"draws": 3}, {"seed": 4}, {"indices": [5, 2, 7, 0]}):
        with pytest.raises(CadisError, match=f"{next(iter(changed))} differ"):
            TrainDrawStore(folder, key(**changed))
    assert (folder / STORE_META).read_text() == before
    meta = json.loads(before)
    assert meta["bytes"] == len(INDICES) * DRAWS * 64 * 4 and meta["denoiser_ms_per_draw"] > 0


def test_builders_of_one_training_store_at_once_take_turns_and_denoise_once(tmp_path):
    # Two sweeps sharing a draws_dir start together: one denoises, the other waits for its
    # store. Each forward is slowed, so that without the lock both would be denoising.
    import threading
    import time

    model = denoiser()
    original = model.denoise
    forwards = []

    def slow_denoise(noisy):
        forwards.append(len(noisy))
        time.sleep(0.2)
        return original(noisy)

    model.denoise = slow_denoise
    stores = []

    def build() -> None:
        stores.append(build_train_store(tmp_path / "train", key(), model, Levels(),
                                        progress=False))

    builders = [threading.Thread(target=build) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    # One build's forwards (5 images x 4 draws in one forward), not two.
    assert forwards == [len(INDICES) * DRAWS] and len(stores) == 2
    assert all(torch.equal(stores[0][p][0], stores[1][p][0]) for p in range(len(INDICES)))


def test_a_store_that_does_not_fit_is_refused_before_any_work(tmp_path):
    huge = key(draws=10 ** 9)
    with pytest.raises(CadisError, match=r"the denoised draws need [0-9.]+ GiB"):
        build_train_store(tmp_path / "train", huge, denoiser(), Levels(), progress=False)
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("settings,message", [
    ({"train_draws": 2, "num_noises": 3}, "num_noises (3) must be at most train_draws (2)"),
    ({"train_draws": 4, "augment": "crop-flip"}, "train_draws needs augment: none"),
    ({"train_draws": -1}, "train_draws must be an integer >= 1"),
])
def test_settings_a_store_cannot_serve_are_refused(settings, message):
    with pytest.raises(CadisError) as error:
        from_mapping(settings)
    assert message in str(error.value)


def sweep(**changes):
    data = {"name": "t", "base": {"models": "m", "train_draws": 3},
            "search": {"lambda": {"uniform": [1.0, 2.0]}}, "num_trials": 2,
            "objective": {"metric": "certified_accuracy_r0.25", "mode": "max"}, **changes}
    return sweep_from_mapping(data)


@pytest.mark.parametrize("changes,message", [
    ({"search": {"num_noises": {"int": [1, 4]}}}, "search.num_noises: num_noises (4) must be at "
                                                 "most train_draws (3)"),
    ({"search": {"train_draws": {"choice": [2, 4]}}}, "not searchable"),
    ({"search": {"sigma": {"choice": [0.25, 0.5]}}}, "the draws depend on the searched sigma"),
    ({"store_draws": False}, "base.train_draws needs draws shared by every trial, but "
                             "store_draws is false"),
])
def test_a_sweep_refuses_training_draws_it_cannot_share(changes, message):
    with pytest.raises(CadisError) as error:
        sweep(**changes)
    assert message in str(error.value)


def test_a_sweep_that_shares_its_draws_says_so():
    from cadis.sweeps.describe import describe

    assert "and the training draws (3 per image) denoised once" in describe(sweep())


def test_train_from_stored_draws_never_denoises_in_a_step(tiny_models_dir, tmp_path,
                                                         monkeypatch):
    import cadis.finetuning.loop as loop

    live = []
    original = loop.denoise_draws
    monkeypatch.setattr(loop, "denoise_draws", lambda *args: live.append(1) or original(*args))
    def train(out, *extra):
        return main(["train", "sweeps/default.yaml", "--out", str(out), "--quiet",
                     *set_flags(f"models={tiny_models_dir}", *TINY, "max_train_images=40",
                                "certify.max_images=1", *extra)])

    out = tmp_path / "out"
    assert train(out, "train_draws=3") == 0
    stores = list((out / "draws").glob("train-*"))
    assert len(stores) == 1
    meta = json.loads((stores[0] / STORE_META).read_text())
    assert len(meta["key"]["indices"]) == 40 and meta["key"]["draws"] == 3
    assert live == []  # every step sampled its draws from the store
    history = json.loads((out / "history.json").read_text())
    assert history[0]["global_step"] == 2 and "proxy_acr" in history[0]
    config = json.loads((out / "config.json").read_text())
    assert config["train_draws"] == 3
    # Without the store the same run denoises in every micro-step (2 steps x 2 micro-batches).
    assert train(tmp_path / "live") == 0
    assert len(live) == 4
