import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from cadis.data import (AUGMENTATIONS, DATASETS, DEBIAN_FASHION_MNIST, LOADERS, augment_image,
                        load_dataset, stack_images, subset_indices)
from cadis.errors import CadisError

has_fashion_mnist = (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file()


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.skipif(not has_fashion_mnist, reason="Debian's dataset-fashion-mnist not installed")
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_from_debian_package(split, count, monkeypatch):
    monkeypatch.delenv("CADIS_DATA", raising=False)
    dataset = load_dataset("fashion-mnist", split)
    assert len(dataset) == count
    assert (dataset.info.channels, dataset.info.image_size, dataset.info.num_classes) == (1, 28, 10)
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert torch.bincount(dataset.labels).tolist() == [count // 10] * 10
    assert 0 <= label < 10


def test_fashion_mnist_from_cadis_data(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([7, 0, 3]))
    monkeypatch.setenv("CADIS_DATA", str(tmp_path))
    dataset = load_dataset("fashion-mnist", "test", download=False)
    assert len(dataset) == 3 and dataset.labels.tolist() == [7, 0, 3]
    image, _ = dataset[1]
    assert torch.allclose(image[0] * 255, torch.from_numpy(images[1]).float())


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(CadisError, match="apt-get install dataset-fashion-mnist") as error:
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    assert "\n" not in str(error.value)


def test_digits_split_is_deterministic_and_disjoint():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.info.image_size == 8 and train.info.num_classes == 10
    again = load_dataset("digits", "test")
    assert torch.equal(test.images, again.images)
    assert not torch.equal(train.images[:len(test)], test.images)
    image, _ = train[0]
    assert image.shape == (1, 8, 8) and 0 <= image.min() and image.max() <= 1


def test_imagefolder_on_a_generated_tree(tmp_path):
    classes = ("cat", "dog", "fox")
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for k in range(2):
                colour = (index * 100, k * 50, 0)
                Image.new("RGB", (20, 12), colour).save(folder / f"{k}.png")
    dataset = load_dataset("imagefolder", "test", root=tmp_path, image_size=16)
    assert dataset.info.class_names == classes and dataset.info.channels == 3
    images, labels = stack_images(dataset, range(len(dataset)))
    assert images.shape == (6, 3, 16, 16)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert 0 <= images.min() and images.max() <= 1
    # The red channel carries the class: 0, 100/255, 200/255.
    assert torch.allclose(images[::2, 0].mean((1, 2)), torch.tensor([0, 100, 200]) / 255,
                          atol=0.01)


@pytest.mark.parametrize("name,kwargs,match", [
    ("mnist", {}, "unknown dataset 'mnist'; allowed: fashion-mnist, cifar10"),
    ("imagefolder", {}, "needs a root"),
    ("imagefolder", {"root": "/nonexistent/tree", "image_size": 8}, "does not exist"),
    ("cifar10", {"download": False}, "CIFAR-10 not found"),
])
def test_bad_dataset_requests_raise_one_line(name, kwargs, match, tmp_path, monkeypatch):
    monkeypatch.setenv("CADIS_DATA", str(tmp_path))
    with pytest.raises(CadisError, match=match):
        load_dataset(name, "test", **kwargs)


def test_unknown_split():
    with pytest.raises(CadisError, match="unknown split 'val'"):
        load_dataset("digits", "val")


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_of_the_table_refuses_an_unknown_split(name):
    # Checked before the loader runs: no data needed.
    with pytest.raises(CadisError, match="unknown split 'val'; allowed: train, test"):
        load_dataset(name, "val")


def test_the_dataset_names_are_the_loaders_table():
    assert DATASETS == tuple(LOADERS)
    with pytest.raises(CadisError, match=f"allowed: {', '.join(LOADERS)}$"):
        load_dataset("mnist", "test")


@pytest.mark.parametrize("length,skip,max_images,expected", [
    (100, 20, None, [0, 20, 40, 60, 80]),
    (100, 20, 2, [0, 20]),
    (5, 1, None, [0, 1, 2, 3, 4]),
])
def test_subset_indices(length, skip, max_images, expected):
    assert subset_indices(length, skip, max_images) == expected


@pytest.mark.parametrize("skip,max_images", [(0, None), (1, 0)])
def test_subset_indices_rejects_bad_values(skip, max_images):
    with pytest.raises(CadisError):
        subset_indices(10, skip, max_images)


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_augmentation_keeps_shape_and_range(augment):
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    out = augment_image(image, augment) if augment != "none" else image
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1


def test_crop_moves_content():
    torch.manual_seed(0)
    image = torch.rand(1, 16, 16)
    outputs = [augment_image(image, "crop") for _ in range(20)]
    assert any(not torch.equal(out, image) for out in outputs)


def test_the_holdout_is_stratified_seeded_and_disjoint():
    from cadis.data import stratified_holdout

    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    train, validation = stratified_holdout(labels, 20, seed=3)
    assert len(validation) == 20 and len(train) == 80
    assert set(train).isdisjoint(validation) and sorted(train + validation) == list(range(100))
    counts = torch.bincount(labels[validation], minlength=3).tolist()
    assert counts == [12, 6, 2]  # in proportion to the classes' shares
    assert stratified_holdout(labels, 20, seed=3) == (train, validation)
    assert stratified_holdout(labels, 20, seed=4)[1] != validation
    # Classes take turns: the first three validation images are one of each.
    assert sorted(labels[validation[:3]].tolist()) == [0, 1, 2]


def test_a_sorted_split_gets_every_class_in_its_holdout():
    from cadis.data import stratified_holdout

    # ImageFolder's layout: sorted by class. The last images would all be class 4.
    labels = torch.arange(5).repeat_interleave(40)
    _, validation = stratified_holdout(labels, 10, seed=0)
    assert torch.bincount(labels[validation], minlength=5).tolist() == [2] * 5


@pytest.mark.parametrize("size,message", [
    (2, "val_images=2 would leave class"),
    (0, "val_images must be between 1 and 99"),
    (100, "val_images must be between 1 and 99"),
])
def test_a_holdout_that_cannot_be_stratified_is_refused(size, message):
    from cadis.data import stratified_holdout

    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    with pytest.raises(CadisError, match=message):
        stratified_holdout(labels, size, seed=0)


# ------------------------------------------------------------------ a folder of one's own images


def _tree(root, layout: dict[str, int], mode: str = "L", size: int = 10) -> None:
    """Class folders under ``root`` (``{"train/cat": 4, ...}``) of ``size`` px images whose
    brightness is the class's rank: class k is ``40 * k + image number``."""
    for folder, count in layout.items():
        path = root / folder
        path.mkdir(parents=True)
        rank = sorted({f.rsplit("/", 1)[-1] for f in layout}).index(folder.rsplit("/", 1)[-1])
        for k in range(count):
            Image.new(mode, (size + 4, size), (40 * rank + k,) * len(mode)).save(
                path / f"{k:02d}.png")


def test_a_grayscale_folder_stays_one_channel_and_rgb_stays_three(tmp_path):
    _tree(tmp_path / "gray", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1}, mode="L")
    _tree(tmp_path / "rgba", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1}, mode="RGBA")
    gray = load_dataset("imagefolder", "test", root=tmp_path / "gray", image_size=8)
    assert gray.info.channels == 1 and gray[1][0].shape == (1, 8, 8)
    assert gray[1][0].mean().item() == pytest.approx(40 / 255, abs=1e-6)
    colour = load_dataset("imagefolder", "train", root=tmp_path / "rgba", image_size=8)
    assert colour.info.channels == 3 and colour[0][0].shape == (3, 8, 8)


def test_one_colour_class_makes_the_whole_tree_rgb(tmp_path):
    _tree(tmp_path, {"train/a": 2, "val/a": 1}, mode="L")
    _tree(tmp_path, {"train/b": 2, "val/b": 1}, mode="RGB")
    for split in ("train", "test"):
        dataset = load_dataset("imagefolder", split, root=tmp_path, image_size=8)
        assert dataset.info.channels == 3 and dataset[0][0].shape == (3, 8, 8)


def test_class_folders_alone_are_split_disjoint_stratified_and_fixed(tmp_path):
    from cadis.data import FOLDER_TEST_FRACTION

    _tree(tmp_path, {"a": 10, "b": 6, "c": 2})
    train = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    test = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    assert set(train.files).isdisjoint(test.files)
    assert len(train.files) + len(test.files) == 18
    assert torch.bincount(test.labels).tolist() == [round(10 * FOLDER_TEST_FRACTION), 1, 1]
    assert load_dataset("imagefolder", "test", root=tmp_path, image_size=8).files == test.files
    # More images in a class leave its earlier test images where they were.
    _tree(tmp_path, {"d": 3})
    again = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    assert set(test.files) <= set(again.files)


def test_in_memory_holds_the_same_pixels(tmp_path):
    from cadis.data import in_memory

    _tree(tmp_path, {"a": 3, "b": 3}, mode="RGB")
    lazy = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    held = in_memory(lazy, augment="flip")
    assert held.images.dtype == torch.uint8 and held.augment == "flip"
    assert torch.equal(in_memory(lazy)[2][0], lazy[2][0])
    assert held.labels.tolist() == lazy.labels.tolist()


@pytest.mark.parametrize("layout,extra,message", [
    ({"train/a": 2}, {}, "has train/ only: a tree holds "),
    ({"val/a": 2, "test/a": 2}, {}, "has val/, test/ only"),
    ({"train/a": 2, "train/b": 2, "val/a": 1}, {},
     "test split {root}/val must hold the training split's classes: no folder for b"),
    ({"train/a": 2, "val/a": 1, "val/z": 1}, {}, "z not in {root}/train"),
    ({"a": 2, "b": 1}, {}, "class folder {root}/b holds one image"),
    ({"train/a": 2, "val/a": 1}, {"train/b/notes.txt": b"hi"},
     "imagefolder file {root}/train/b/notes.txt is not an image"),
    ({"train/a": 2, "val/a": 1}, {"train/b/.hidden/x.png": b""},
     "class folder {root}/train/b holds no images"),
    ({}, {"README": b""}, "imagefolder root {root} holds no class folders: a tree holds"),
])
def test_a_tree_that_cannot_be_read_right_is_refused(tmp_path, layout, extra, message):
    _tree(tmp_path, layout)
    for name, content in extra.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CadisError) as error:
        for split in ("train", "test"):
            load_dataset("imagefolder", split, root=tmp_path, image_size=8)
    assert message.format(root=tmp_path) in str(error.value)
    assert "\n" not in str(error.value)


def test_an_unreadable_image_is_named(tmp_path):
    _tree(tmp_path, {"train/a": 2, "val/a": 1})
    (tmp_path / "train" / "a" / "01.png").write_bytes(b"not a png")
    dataset = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    dataset[0]
    with pytest.raises(CadisError, match=f"imagefolder image {tmp_path}/train/a/01.png cannot "
                                         "be read: cannot identify image file"):
        dataset[1]


def test_another_image_size_for_a_dataset_with_its_own_is_an_error():
    assert load_dataset("digits", "test", image_size=8).info.image_size == 8
    with pytest.raises(CadisError, match="image_size 28 given, but digits images are 8 px"):
        load_dataset("digits", "test", image_size=28)
