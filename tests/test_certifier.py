"""The one certifier (cadis.certifier): a folder of records that resumes and refuses other
settings; the proxy and the rank stage give the same figures from stored draws as live, in
seconds, on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cadis.certifier import CertificationSettings, LiveDraws, certify_into
from cadis.errors import CadisError
from cadis.finetuning.config import from_mapping
from cadis.models.classifier import load_classifier
from cadis.models.sources import ModelSources
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.denoise import OneShotDenoiser
from cadis.smoothing.records import (
    PLOT_FILENAME,
    RECORDS_FILENAME,
    SETTINGS_FILENAME,
    SUMMARY_FILENAME,
    certified_accuracy,
    read_records,
)
from cadis.smoothing.sequential import SequentialPlan
from cadis.smoothing.smooth import Smooth, images_per_forward

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


# --------------------------------------------------------------------------- into a folder


class CountingLinear(nn.Module):
    """A cheap analytic base, ``class = [x.w > 0]``, that counts the draws it classifies."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.tensor([[[1.0, -1.0], [1.0, -1.0]]])
        self.draws = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.draws += len(images)
        score = (images * self.weight).flatten(1).sum(dim=1)
        return torch.stack([-score, score], dim=1)


def tiny_dataset(size: int = 6) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((size, 1, 2, 2), generator=generator)
    # Labels alternate, so some predictions are right and some wrong.
    return [(image, index % 2) for index, image in enumerate(images)]


N0, N, ALPHA = 10, 20, 0.01
SETTINGS = {"classifier": "linear", "denoiser": "none"}


def run(base, out_dir, indices, batch_size=1000, settings=SETTINGS, n=N, progress=False):
    smooth = Smooth(base, 2, 0.5, generator=torch.Generator().manual_seed(0))
    return certify_into(LiveDraws(smooth, tiny_dataset()), indices, CertificationSettings(
        0.5, CertificationParameters(N0, n, ALPHA, batch_size), tuple(RADII)), out_dir,
        settings, progress=progress)


@pytest.mark.parametrize("batch_size", [16, 1000])  # image by image, and packed
def test_resume_certifies_only_the_missing_images(tmp_path, batch_size):
    base = CountingLinear()
    first = run(base, tmp_path, range(3), batch_size)
    assert base.draws == 3 * (N0 + N)
    assert first["num_images"] == 3

    summary = run(base, tmp_path, range(5), batch_size, progress=True)
    assert base.draws == 5 * (N0 + N)
    records = read_records(tmp_path / RECORDS_FILENAME)
    assert [record.idx for record in records] == [0, 1, 2, 3, 4]
    assert [record.label for record in records] == [0, 1, 0, 1, 0]
    assert summary == json.loads((tmp_path / SUMMARY_FILENAME).read_text())
    assert summary["num_images"] == 5
    assert summary["certified_accuracy"]["0.0"] == pytest.approx(
        certified_accuracy(records, [0.0])[0.0])
    assert (summary["n"], summary["n0"], summary["classifier"]) == (N, N0, "linear")
    assert json.loads((tmp_path / SETTINGS_FILENAME).read_text()) == {
        **SETTINGS, "sigma": 0.5, "n": N, "n0": N0, "alpha": ALPHA}
    assert (tmp_path / PLOT_FILENAME).read_bytes().startswith(PNG_SIGNATURE)


def test_images_per_forward():
    assert images_per_forward(10, 20, 16) == 1
    assert images_per_forward(10, 20, 1000) == 33
    assert images_per_forward(100, 100_000, 1000) == 1


@pytest.mark.parametrize("change, named", [({"settings": {**SETTINGS, "classifier": "other"}},
                                             "classifier"),
                                            ({"n": 40}, "n:"),
                                            ({"settings": {"classifier": "linear"}}, "denoiser")])
def test_other_settings_are_refused_and_nothing_is_touched(tmp_path, change, named):
    base = CountingLinear()
    run(base, tmp_path, range(2))
    before = {entry.name: entry.read_bytes() for entry in tmp_path.iterdir()}
    draws = base.draws
    with pytest.raises(CadisError, match=named):
        run(base, tmp_path, range(4), **change)
    assert {entry.name: entry.read_bytes() for entry in tmp_path.iterdir()} == before
    assert base.draws == draws


def test_settings_that_contradict_the_certification_are_refused(tmp_path):
    with pytest.raises(CadisError, match="n=5"):
        run(CountingLinear(), tmp_path, range(2), settings={**SETTINGS, "n": 5})
    with pytest.raises(CadisError, match="acr"):
        run(CountingLinear(), tmp_path, range(2), settings={**SETTINGS, "acr": 1})
    assert not (tmp_path / RECORDS_FILENAME).exists()


def test_a_plan_of_other_settings_is_refused_when_the_settings_are_made():
    parameters = CertificationParameters(N0, N, ALPHA, 100)
    with pytest.raises(CadisError, match="plan's n, alpha and sigma"):
        CertificationSettings(0.5, parameters, tuple(RADII),
                              SequentialPlan([0.0], 0.5, ALPHA, 2 * N))


# --------------------------------------------------------------------------- the proxy


def test_the_proxy_from_stored_draws_equals_the_proxy_denoised_live(tiny_models_dir, tmp_path):
    from cadis.data import load_dataset, stack_images, stratified_holdout
    from cadis.draws.certification_store import build_store
    from cadis.finetuning.loop import proxy_metrics
    from cadis.finetuning.store_keys import proxy_store_key
    from cadis.models.denoiser import load_denoiser

    config = from_mapping({"models": str(tiny_models_dir), "val_images": 20, "proxy_images": 6,
                           "proxy_n": 30, "proxy_n0": 5})
    sources = ModelSources.resolve(str(tiny_models_dir))
    dataset = load_dataset("digits", "train")
    _, validation = stratified_holdout(dataset.labels, config.val_images, config.val_seed)
    classifier = load_classifier(sources.classifier)
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, config.sigma)
    live = proxy_metrics(classifier, denoiser, dataset, validation, config, sources, 10, 8)
    proxy = validation[:config.proxy_images]
    images, labels = stack_images(dataset, proxy)
    key = proxy_store_key(config, sources, proxy, torch.device("cpu"))
    store = build_store(tmp_path / "proxy", key, denoiser, images, labels.tolist(), 10, 100,
                        progress=False)
    config.proxy_store = str(store.folder)
    stored = proxy_metrics(classifier, denoiser, dataset, validation, config, sources, 10, 8)
    assert stored == live and "proxy_acr" in stored


# --------------------------------------------------------------------------- the rank stage


def rank_inputs(tiny_models_dir, tmp_path, sequential, n0=5, n=60):
    """A sweep's base config, its rank settings (``n0`` and ``n`` draws), a trained checkpoint
    and the sweep's stores, as the driver has them when the rank stage starts (no Ray)."""
    from cadis.finetuning.checkpoint import save_trained
    from cadis.finetuning.lora import apply_finetuning
    from cadis.sweeps.spec import RankSettings
    from cadis.sweeps.stores import build_sweep_stores

    config = from_mapping({"models": str(tiny_models_dir), "val_images": 20, "proxy_images": 4,
                           "proxy_n": 20, "proxy_n0": 5})
    rank = RankSettings(n=n, n0=n0, alpha=0.1, images=7, batch_size=50, sequential=sequential,
                        radii=(0.25,) if sequential else ())
    classifier = load_classifier(ModelSources.resolve(str(tiny_models_dir)).classifier)
    apply_finetuning(classifier, config.finetune_config())
    checkpoint = tmp_path / "checkpoint"
    save_trained(classifier, checkpoint, config.finetune_config(), {"epoch": 1})
    stores = build_sweep_stores(config.to_dict(), rank, str(tmp_path / "draws"),
                                progress=False)
    return config.to_dict(), rank, str(checkpoint), stores["rank"]["folder"]


# Sequentially at n0 = 100 the first look's estimation draws are read before the rest of the
# selection draws, which a store holds first: each image's two streams keep them the same.
@pytest.mark.parametrize("sequential, n0, n", [(False, 5, 60), (True, 5, 60), (True, 10, 60),
                                               (True, 100, 200)])
def test_the_rank_stage_from_stored_draws_makes_the_live_records(tiny_models_dir, tmp_path,
                                                                 sequential, n0, n):
    from cadis.sweeps.trial import certify_rank

    config, rank, checkpoint, store = rank_inputs(tiny_models_dir, tmp_path, sequential, n0, n)
    live = certify_rank(config, rank, checkpoint, None, str(tmp_path / "live"))
    stored = certify_rank(config, rank, checkpoint, store, str(tmp_path / "stored"))

    def fields(folder):
        return [(r.idx, r.label, r.predict, r.radius, r.correct, r.draws)
                for r in read_records(tmp_path / folder / RECORDS_FILENAME)]

    assert fields("stored") == fields("live") and len(fields("live")) == rank.images
    for name in ("certified_accuracy", "acr", "num_images", "mean_draws", "mode"):
        assert stored[name] == live[name]
    assert live["mode"] == ("sequential" if sequential else "fixed")
    made_with = json.loads((tmp_path / "stored" / SETTINGS_FILENAME).read_text())
    assert made_with["stored_draws"] == store and made_with["split"] == "validation"
    assert json.loads((tmp_path / "live" / SETTINGS_FILENAME).read_text())["stored_draws"] is None
    # Resumed: a second call certifies nothing new and returns the same summary.
    assert certify_rank(config, rank, checkpoint, store, str(tmp_path / "stored")) == stored


def test_the_rank_stage_in_shards_joins_into_the_records_of_one_run(tiny_models_dir, tmp_path):
    from cadis.sweeps.shards import join_shards, shard_dirs
    from cadis.sweeps.trial import certify_rank

    config, rank, checkpoint, store = rank_inputs(tiny_models_dir, tmp_path, False)
    whole = certify_rank(config, rank, checkpoint, store, str(tmp_path / "whole"))
    out = tmp_path / "sharded"
    parts = [certify_rank(config, rank, checkpoint, store, str(folder), (part, 2))
             for part, folder in enumerate(shard_dirs(out, 2))]
    joined = join_shards(out, parts)
    assert joined["certified_accuracy"] == whole["certified_accuracy"]
    assert [(r.idx, r.predict, r.radius) for r in read_records(out / RECORDS_FILENAME)] == [
        (r.idx, r.predict, r.radius) for r in read_records(tmp_path / "whole" / RECORDS_FILENAME)]
