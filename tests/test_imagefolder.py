"""A user's own images end to end: `cadis pretrain --dataset imagefolder` on a folder of
grayscale PNGs, then `cadis certify`, `cadis train` and a sweep's plan on the pair it made,
with nothing but the models folder named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from cadis.cli import main
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser

CLASSES = ("circle", "cross", "stripes")
SIZE = 16
TRAIN_PER_CLASS, TEST_PER_CLASS = 12, 4
# A few seconds of pretraining: 16 px, 4x4 patches, a two-level UNet.
TINY_RECIPE = [
    "classifier.epochs=6", "classifier.augment=none", "classifier.lr=3e-3",
    "classifier.batch_size=12",
    "classifier.model_args={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
    "denoiser.steps=20", "denoiser.block_out_channels=[16, 32]", "denoiser.batch_size=16",
    "denoiser.warmup_steps=2", "eval_sigmas=[0.25]",
]


def _shape(name: str, rng: np.random.Generator) -> np.ndarray:
    """A noisy grayscale image of a class's shape, so that the classes can be learned."""
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    shapes = {"circle": np.hypot(x, y) < SIZE / 3, "cross": (abs(x) < 2) | (abs(y) < 2),
              "stripes": (np.arange(SIZE)[None, :].repeat(SIZE, 0) // 2) % 2 == 0}
    image = 200 * shapes[name] + rng.integers(0, 50, (SIZE, SIZE))
    return image.astype(np.uint8)


def make_tree(root, per_split=None) -> None:
    rng = np.random.default_rng(0)
    per_split = per_split or {"train": TRAIN_PER_CLASS, "val": TEST_PER_CLASS}
    for split, count in per_split.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(_shape(name, rng), mode="L").save(folder / f"{k:02d}.png")


def pretrain_args(tree, out, *extra) -> list[str]:
    args = ["pretrain", "--dataset", "imagefolder", "--data-root", str(tree), "--image-size",
            str(SIZE), "--out", str(out), "--quiet", *extra]
    for item in TINY_RECIPE:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_tree(root)
    return root


@pytest.fixture(scope="module")
def pretrained(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "mine"
    assert main(pretrain_args(tree, out)) == 0
    return out


def test_pretrain_makes_a_one_channel_pair_of_the_folders_size(pretrained, tree):
    manifest = json.loads((pretrained / "manifest.json").read_text())
    assert manifest["dataset"] == "imagefolder"
    assert manifest["config"]["data_root"] == str(tree.resolve())
    assert manifest["config"]["image_size"] == SIZE
    assert manifest["num_test_images"] == len(CLASSES) * TEST_PER_CLASS
    # Chance is 1/3: six epochs on these shapes must have learned something.
    assert manifest["clean_accuracy"] > 0.5
    classifier = load_classifier(str(pretrained / "classifier"))
    unet, _ = load_denoiser(str(pretrained / "denoiser"))
    assert classifier.in_chans == 1 and classifier.input_size == (SIZE, SIZE)
    assert (unet.config.in_channels, unet.config.sample_size) == (1, SIZE)


def test_a_rerun_on_the_same_folder_reuses_and_another_folder_retrains(pretrained, tree,
                                                                        tmp_path):
    models = tmp_path / "models"
    shutil.copytree(pretrained, models)
    weights = models / "classifier" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(pretrain_args(tree, models)) == 0
    assert weights.stat().st_mtime_ns == before
    other = tmp_path / "other"
    make_tree(other)  # the same images elsewhere: another folder may hold others
    assert main(pretrain_args(other, models)) == 0
    assert weights.stat().st_mtime_ns != before


def test_certify_takes_data_and_size_from_the_models_folder(pretrained, tmp_path, capsys):
    out = tmp_path / "certified"
    assert main(["certify", "--models", str(pretrained), "--sigma", "0.25", "--n", "20",
                 "--n0", "5", "--alpha", "0.01", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == len(CLASSES) * TEST_PER_CLASS
    assert summary["dataset"] == "imagefolder"
    # Naming the folder and size by hand reads it as one channel too.
    assert main(["certify", "--models", str(pretrained), "--dataset", "imagefolder",
                 "--data-root", str(json.loads((pretrained / "manifest.json").read_text())
                                    ["config"]["data_root"]),
                 "--image-size", str(SIZE), "--sigma", "0.25", "--n", "20", "--n0", "5",
                 "--alpha", "0.01", "--max-images", "2", "--out", str(tmp_path / "named"),
                 "--quiet"]) == 0


def test_train_fine_tunes_and_certifies_on_the_folder(pretrained, tmp_path):
    out = tmp_path / "train"
    args = ["train", "sweeps/default.yaml", "--out", str(out), "--quiet"]
    for item in (f"models={pretrained}", "epochs=1", "max_steps_per_epoch=2", "batch_size=4",
                 "effective_batch_size=8", "val_images=6", "proxy_images=3", "proxy_n=10",
                 "proxy_n0=4", "certify.n=20", "certify.n0=5", "certify.max_images=3",
                 "certify.skip=1", "warmup_steps=1", "train_draws=2", "num_noises=2"):
        args += ["--set", item]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert history[0]["global_step"] == 2
    assert json.loads((out / "certify_epoch_001" / "summary.json").read_text())[
        "num_images"] == 3


def test_a_sweep_plans_on_the_folder(pretrained, tmp_path, capsys):
    sweep = yaml.safe_load(open("sweeps/default.yaml"))
    sweep["base"]["models"] = str(pretrained)
    sweep["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path), "--dry-run", "--set", "base.val_images=6",
                 "--set", "certify.rank.images=6", "--set", "base.proxy_images=6"]) == 0
    assert "trials" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    ("no size", "dataset imagefolder needs image_size >= 1 (--image-size), got None"),
    ("a text file", "imagefolder file {tree}/train/cross/notes.txt is not an image"),
    ("a broken png", "imagefolder image {tree}/val/circle/00.png cannot be read"),
    ("a missing test class", "test split {tree}/val must hold the training split's classes: "
                             "no folder for stripes"),
    ("train only", "imagefolder root {tree} has train/ only"),
])
def test_a_bad_folder_is_one_line_exit_two(tmp_path, capsys, change, message):
    tree = tmp_path / "images"
    make_tree(tree, {"train": 2, "val": 1})
    args = pretrain_args(tree, tmp_path / "out")
    if change == "no size":
        args.remove("--image-size")
        args.remove(str(SIZE))
    elif change == "a text file":
        (tree / "train" / "cross" / "notes.txt").write_text("not an image")
    elif change == "a broken png":
        (tree / "val" / "circle" / "00.png").write_bytes(b"\x89PNG but not really")
    elif change == "a missing test class":
        shutil.rmtree(tree / "val" / "stripes")
    else:
        shutil.rmtree(tree / "val")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cadis: error: ") and err.count("\n") == 1
    assert message.format(tree=tree.resolve()) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_sweep_runs_on_the_folder(pretrained, tmp_path, capsys):
    from tests.test_sweep import by_role, mlflow_runs, tiny_sweep, write

    sweep = tiny_sweep(pretrained, tmp_path, num_trials=1, max_concurrent_trials=1)
    sweep["base"].update(val_images=6)
    sweep["certify"]["rank"]["images"] = 6
    assert main(["sweep", str(write(tmp_path, sweep))]) == 0
    [trial] = by_role(mlflow_runs(tmp_path)[1], "trial")
    assert trial.data.tags["cadis.outcome"] == "completed"
    assert {"val_acr", "acr", "clean_accuracy"} <= set(trial.data.metrics)
    [certified] = (tmp_path / "results" / "trials").glob("*/certify/summary.json")
    summary = json.loads(certified.read_text())
    assert summary["dataset"] == "imagefolder" and summary["num_images"] == 3
