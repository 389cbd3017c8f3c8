"""Image datasets by name, as float tensors in [0, 1] (C x H x W) with integer labels.

Every dataset reports its channels, image size and class names through :class:`DatasetInfo`, so
the models and the denoiser can be built to match without the caller repeating them. Test subsets
are deterministic (:func:`subset_indices`), which is what makes certification records resumable
and comparable across trials.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from cadis.errors import CadisError, first_line
from cadis.validation import known_name, positive_int

# The dataset of the user's own folder-per-class tree; the others are named datasets held in
# memory (LOADERS, at the end of the module, is the table of all of them).
FOLDER_DATASET = "imagefolder"
SPLITS = ("train", "test")
AUGMENTATIONS = ("none", "flip", "crop", "crop-flip")

# Where Debian's dataset-fashion-mnist package puts the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# IDX files a process keeps decoded: a split's images and labels, of both splits.
IDX_FILES_CACHED = 4
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# scikit-learn's digits has no split of its own: a fixed seeded permutation makes one.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Padding of the random-crop augmentation, in pixels (the usual CIFAR recipe uses 4 at 32 px).
CROP_PADDING_FRACTION = 0.125

# An imagefolder tree: the split folders of the split layout (ImageNet's train/ + val/).
FOLDER_TRAIN = "train"
FOLDER_TESTS = ("val", "test")
# A tree of class folders alone is split: this share of each class is its test split.
FOLDER_TEST_FRACTION = 0.2
# The files an imagefolder tree may hold (torchvision's list). Any other file is an error, but
# hidden ones (.DS_Store, macOS's ._ copies), which are skipped.
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# The modes images are read in: grayscale stays one channel, anything else becomes RGB.
GRAYSCALE, COLOUR = "L", "RGB"


@dataclass(frozen=True)
class DatasetInfo:
    """What the models need to know about a dataset."""

    name: str
    channels: int
    image_size: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The directory data sets are read from and downloaded to: ``root``, else ``$CADIS_DATA``,
    else ``~/.cache/cadis/data``."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("CADIS_DATA"):
        return Path(os.environ["CADIS_DATA"]).expanduser()
    return Path.home() / ".cache" / "cadis" / "data"


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 N x C x H x W; items are ``(float image in [0,1], label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                 augment: str = "none") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        known_name(augment, "augment", AUGMENTATIONS)
        self.images = images
        self.labels = labels.long()
        self.info = info
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)
        if self.augment != "none":
            image = augment_image(image, self.augment)
        return image, int(self.labels[index])


class FolderDataset(Dataset):
    """The image files of a folder-per-class tree, read lazily in one ``mode`` (grayscale: one
    channel, else RGB), resized on the shorter side and centre-cropped to ``image_size``.

    Items are ``(float image in [0, 1], label)``, the values an :class:`ImageTensorDataset`
    of the same uint8 pixels gives; ``labels`` holds every item's class without opening an
    image. An image that cannot be read is a :class:`CadisError` naming its file.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int],
                 class_names: Sequence[str], mode: str, image_size: int,
                 augment: str = "none") -> None:
        from torchvision.transforms import v2

        known_name(augment, "augment", AUGMENTATIONS)
        self.files = list(files)
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.mode = mode
        self.resize = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, antialias=True),
                                  v2.CenterCrop(image_size)])
        self.info = DatasetInfo(FOLDER_DATASET, 1 if mode == GRAYSCALE else 3, image_size,
                                tuple(class_names))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, index: int) -> torch.Tensor:
        """Item ``index`` as uint8 C x H x W, un-augmented."""
        return self.resize(_read_image(self.files[index], self.mode))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.pixels(index).float().div_(255.0)
        if self.augment != "none":
            image = augment_image(image, self.augment)
        return image, int(self.labels[index])


#: ``(split, root, augment, image_size, download) -> dataset``: one entry of :data:`LOADERS`.
DatasetLoader = Callable[[str, Any, str, Union[int, None], bool],
                         Union[ImageTensorDataset, FolderDataset]]


def augment_image(image: torch.Tensor, augment: str) -> torch.Tensor:
    """Random crop (zero padding) and/or horizontal flip of one C x H x W image."""
    if "crop" in augment:
        size = image.shape[-1]
        pad = max(1, round(size * CROP_PADDING_FRACTION))
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        image = padded[:, top:top + image.shape[-2], left:left + size]
    if "flip" in augment and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None,
                 augment: str = "none", image_size: int | None = None,
                 download: bool = True) -> ImageTensorDataset | FolderDataset:
    """Load a dataset split by name.

    ``root`` overrides where the files are looked for (for ``imagefolder`` it is the tree itself:
    see :func:`folder_split`). ``image_size`` is what ``imagefolder`` images are resized to; the
    other datasets have a size of their own, and another one given is an error.
    Raises :class:`CadisError` with a one-line hint when the data is missing.
    """
    load = LOADERS[known_name(name, "dataset", DATASETS)]
    return load(known_name(split, "split", SPLITS), root, augment, image_size, download)


def in_memory(dataset: ImageTensorDataset | FolderDataset,
              augment: str = "none") -> ImageTensorDataset:
    """The dataset's images held in memory as uint8 (N x C x H x W bytes), items augmented by
    ``augment``: a folder is read once, whole; an in-memory dataset shares its tensors."""
    if isinstance(dataset, ImageTensorDataset):
        return ImageTensorDataset(dataset.images, dataset.labels, dataset.info, augment)
    images = torch.stack([dataset.pixels(index) for index in range(len(dataset))])
    return ImageTensorDataset(images, dataset.labels, dataset.info, augment)


def subset_indices(length: int, skip: int = 1, max_images: int | None = None) -> list[int]:
    """Deterministic test subset: every ``skip``-th index from 0, at most ``max_images``."""
    positive_int(skip, "skip")
    if max_images is not None:
        positive_int(max_images, "max_images")
    indices = list(range(0, length, skip))
    return indices if max_images is None else indices[:max_images]


def stratified_holdout(labels: Sequence[int] | torch.Tensor, size: int,
                       seed: int) -> tuple[list[int], list[int]]:
    """Split indices into ``(train, validation)`` with ``size`` validation images drawn per
    class in proportion to the class's share (largest remainders), seeded: the same labels,
    size and seed give the same split on every machine.

    The validation indices interleave the classes (one of each in turn, in a seeded order),
    so every prefix of them is close to stratified too: the proxy and the rank stage take
    prefixes. The training indices are the rest, ascending. Raises :class:`CadisError` when
    ``size`` would leave a class without a validation image or the training split empty.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    classes, counts = torch.unique(labels, return_counts=True)
    if not 0 < size < len(labels):
        raise CadisError(f"val_images must be between 1 and {len(labels) - 1} (the training "
                         f"split holds {len(labels)} images), got {size}")
    shares = counts.double() * size / len(labels)
    quota = shares.floor().long()
    remainder_order = torch.argsort(shares - quota.double(), descending=True, stable=True)
    quota[remainder_order[:size - int(quota.sum())]] += 1
    if int(quota.min()) < 1:
        empty = int(classes[int(torch.argmin(quota))])
        raise CadisError(f"val_images={size} would leave class {empty} with no validation "
                         f"image (the split has {len(classes)} classes): raise val_images to "
                         f"at least {-(-len(labels) // int(counts.min()))}")
    generator = torch.Generator().manual_seed(seed)
    per_class = []
    for label, take in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == label).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:take]]
        per_class.append(chosen.tolist())
    class_order = torch.randperm(len(per_class), generator=generator).tolist()
    validation = [per_class[c][rank] for rank in range(max(quota.tolist()))
                  for c in class_order if rank < len(per_class[c])]
    held_out = set(validation)
    return [index for index in range(len(labels)) if index not in held_out], validation


def stack_images(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels at ``indices`` as one batch (for evaluation on a fixed subset)."""
    items = [dataset[i] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not: once a process while the file is
    unchanged (a sweep trial's worker reads the training split for its loop, its proxy and its
    rank stage). The array is read-only: callers copy what they change."""
    status = path.stat()
    return _read_idx_once(str(path.resolve()), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=IDX_FILES_CACHED)
def _read_idx_once(path_text: str, mtime_ns: int, size: int) -> np.ndarray:
    path = Path(path_text)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:  # unsigned byte: the only type the (Fashion-)MNIST files use
        raise CadisError(f"{path}: unsupported IDX element type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem,
                      directory / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(split: str, root, augment: str, download: bool) -> ImageTensorDataset:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    candidates = [data_root(root)] if root is not None else [data_root(), DEBIAN_FASHION_MNIST]
    for directory in candidates:
        paths = [_find_idx(directory, stem) for stem in stems]
        if all(paths):
            break
    else:
        directory = candidates[0]
        if download:
            _torchvision_download("FashionMNIST", directory, split)
        paths = [_find_idx(directory, stem) for stem in stems]
        if not all(paths):
            raise CadisError(
                f"Fashion-MNIST not found in {', '.join(str(c) for c in candidates)}: "
                "install Debian's package (apt-get install dataset-fashion-mnist) or set "
                "CADIS_DATA to a directory holding the IDX files")
    images = torch.from_numpy(_read_idx(paths[0]).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    info = DatasetInfo("fashion-mnist", 1, images.shape[-1], FASHION_MNIST_CLASSES)
    return ImageTensorDataset(images, labels, info, augment)


def _torchvision_download(class_name: str, directory: Path, split: str) -> None:
    """Try torchvision's downloader; stay silent on failure (the caller reports what is
    missing), leaving no folder behind that the failed download made."""
    import torchvision.datasets

    # torchvision makes the root and (Fashion-MNIST) a folder of the class's name below it.
    made = next((folder for folder in (directory, directory / class_name)
                 if not folder.exists()), None)
    try:
        getattr(torchvision.datasets, class_name)(str(directory), train=split == "train",
                                                  download=True)
    except (OSError, RuntimeError, ValueError):
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _cifar10(split: str, root, augment: str, download: bool) -> ImageTensorDataset:
    import torchvision.datasets

    directory = data_root(root)
    if download:
        _torchvision_download("CIFAR10", directory, split)
    try:
        cifar = torchvision.datasets.CIFAR10(str(directory), train=split == "train", download=False)
    except RuntimeError:
        raise CadisError(
            f"CIFAR-10 not found in {directory}: download it with network access "
            "(torchvision fetches it automatically) or set CADIS_DATA to a directory holding "
            "cifar-10-batches-py") from None
    images = torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(cifar.targets)
    return ImageTensorDataset(images, labels, DatasetInfo("cifar10", 3, 32, CIFAR10_CLASSES),
                              augment)


def _digits(split: str, root, augment: str, download: bool) -> ImageTensorDataset:
    # Shipped with scikit-learn: nothing to find under root or download.
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to the uint8 range the in-memory datasets share.
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    num_test = int(len(labels) * DIGITS_TEST_FRACTION)
    chosen = order[:num_test] if split == "test" else order[num_test:]
    info = DatasetInfo("digits", 1, 8, tuple(str(d) for d in range(10)))
    return ImageTensorDataset(images[chosen].unsqueeze(1), labels[chosen], info, augment)


def folder_split(root: Path, split: str) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """The image files of one split of an imagefolder tree, their labels and the class names.

    Two layouts. Split folders: ``root/train/CLASS/...`` and ``root/val/CLASS/...`` (or
    ``test/``), the test split holding exactly the training split's classes. Class folders
    alone: ``root/CLASS/...``, split per class by a fixed rule, the same on every machine:
    the images ranked by the SHA-256 of their path below ``root``, the first
    :data:`FOLDER_TEST_FRACTION` of each class (at least one) are the test split and the rest
    the training split, so adding images moves few others across. Raises
    :class:`CadisError` for a half split layout, a test split whose classes differ, a class
    without images (or with one, which a split cannot share), and a file that is not an
    image.
    """
    trees = _split_trees(root)
    if trees is not None:
        classes = _class_folders(trees[0])
        tree = trees[0] if split == "train" else trees[1]
        if tree is not trees[0]:
            _check_same_classes(tree, _class_folders(tree), trees[0], classes)
        return (*_class_files(tree, classes), classes)
    classes = _class_folders(root, _layout(root))
    files, labels = _class_files(root, classes)
    chosen = []
    for label in range(len(classes)):
        members = [index for index, member in enumerate(labels) if member == label]
        if len(members) < 2:
            raise CadisError(f"imagefolder class folder {root / classes[label]} holds one image: "
                             "a tree without split folders needs at least 2 per class to split")
        ranked = sorted(members, key=lambda index: hashlib.sha256(
            files[index].relative_to(root).as_posix().encode()).hexdigest())
        test = set(ranked[:max(1, round(len(members) * FOLDER_TEST_FRACTION))])
        chosen += [index for index in members if (index in test) == (split == "test")]
    return [files[i] for i in chosen], [labels[i] for i in chosen], classes


def folder_mode(root: Path) -> str:
    """The mode an imagefolder tree is read in: :data:`GRAYSCALE` when the first image of
    every class folder of its training tree (``train/``, or the root for class folders alone)
    is grayscale (one band, alpha aside), else :data:`COLOUR`. Both splits are read in it, so
    a test split is read as the models were trained; one image per class is opened."""
    from PIL import Image

    trees = _split_trees(root)
    tree = root if trees is None else trees[0]
    modes = set()
    for name in _class_folders(tree, _layout(root)):
        first = next(_images_below(tree / name), None)
        if first is None:
            raise CadisError(f"imagefolder class folder {tree / name} holds no images")
        with _opened(first) as image:
            modes.add(Image.getmodebase(image.mode))
    return GRAYSCALE if modes == {GRAYSCALE} else COLOUR


def _layout(root: Path) -> str:
    """The layouts a tree may have, for errors."""
    return (f"{root}/{FOLDER_TRAIN}/CLASS/ beside {root}/{FOLDER_TESTS[0]}/CLASS/ (or "
            f"{FOLDER_TESTS[1]}/), or class folders {root}/CLASS/ alone (then split "
            f"{1 - FOLDER_TEST_FRACTION:.0%}/{FOLDER_TEST_FRACTION:.0%} per class)")


def _split_trees(root: Path) -> tuple[Path, Path] | None:
    """The training and test trees of the split layout; None for class folders alone."""
    present = [name for name in (FOLDER_TRAIN, *FOLDER_TESTS) if (root / name).is_dir()]
    if not present:
        return None
    tests = [name for name in present if name in FOLDER_TESTS]
    if FOLDER_TRAIN not in present or not tests:
        raise CadisError(f"imagefolder root {root} has {'/, '.join(present)}/ only: a tree "
                         f"holds {_layout(root)}")
    return root / FOLDER_TRAIN, root / tests[0]


def _check_same_classes(tree: Path, classes: Sequence[str], train_tree: Path,
                        train_classes: Sequence[str]) -> None:
    # Labels are positions in the sorted class names: other names would relabel silently.
    missing = sorted(set(train_classes) - set(classes))
    extra = sorted(set(classes) - set(train_classes))
    problems = [f"no folder for {', '.join(missing)}"] if missing else []
    problems += [f"{', '.join(extra)} not in {train_tree}"] if extra else []
    if problems:
        raise CadisError(f"imagefolder test split {tree} must hold the training split's "
                         f"classes: {'; '.join(problems)}")


def _class_folders(tree: Path, layout: str | None = None) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in tree.iterdir()
                           if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise CadisError(f"imagefolder root {tree} holds no class folders"
                         + (f": a tree holds {layout}" if layout else ""))
    return classes


def _images_below(folder: Path) -> Iterator[Path]:
    """The image files below ``folder`` in a fixed order (names sorted, a folder's files
    before its subfolders'), hidden files and folders skipped; any other file is an error."""
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(directory) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise CadisError(f"imagefolder file {path} is not an image (extensions read: "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
            yield path


def _class_files(tree: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = list(_images_below(tree / name))
        if not found:
            raise CadisError(f"imagefolder class folder {tree / name} holds no images")
        files += found
        labels += [label] * len(found)
    return files, labels


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """The PIL image at ``path``; a file PIL cannot open or decode is a :class:`CadisError`
    naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise CadisError(f"imagefolder image {path} cannot be read: {first_line(error)}") \
            from None


def _read_image(path: Path, mode: str) -> Any:
    """The image at ``path`` converted to ``mode``, as a PIL image."""
    with _opened(path) as image:
        return image.convert(mode)


def _image_folder(split: str, root, augment: str, image_size: int | None,
                  download: bool) -> FolderDataset:
    # The user's own tree: nothing to download.
    if root is None:
        raise CadisError("dataset imagefolder needs a root: the folder-per-class tree "
                         "(set data.root in the config or --data-root)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise CadisError(f"imagefolder root {base} does not exist")
    if image_size is None or image_size < 1:
        raise CadisError(f"dataset imagefolder needs image_size >= 1 (--image-size), got "
                         f"{image_size}")
    files, labels, classes = folder_split(base, split)
    return FolderDataset(files, labels, classes, folder_mode(base), image_size, augment)


def _own_size(load: Callable[[str, Any, str, bool], ImageTensorDataset]) -> DatasetLoader:
    """A loader of a dataset whose images have a size of their own: another ``image_size``
    given is an error."""
    def loader(split: str, root: Any, augment: str, image_size: int | None,
               download: bool) -> ImageTensorDataset:
        dataset = load(split, root, augment, download)
        if image_size is not None and image_size != dataset.info.image_size:
            raise CadisError(f"image_size {image_size} given, but {dataset.info.name} images "
                             f"are {dataset.info.image_size} px (image_size is for "
                             "imagefolder data)")
        return dataset

    return loader


#: Each named dataset's loader: ``(split, root, augment, image_size, download)``.
LOADERS: dict[str, DatasetLoader] = {
    "fashion-mnist": _own_size(_fashion_mnist),
    "cifar10": _own_size(_cifar10),
    FOLDER_DATASET: _image_folder,
    "digits": _own_size(_digits),
}
#: The dataset names, in the order errors list them.
DATASETS = tuple(LOADERS)
#: The datasets held in memory whole, with an image size of their own.
IN_MEMORY_DATASETS = tuple(name for name in DATASETS if name != FOLDER_DATASET)
