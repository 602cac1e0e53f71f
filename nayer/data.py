"""Labeled image sets (real test/train data) and the per-dataset presets a teacher expects.

Everything is held in memory as uint8 NHWC RGB arrays (what :func:`nayer.evaluate.evaluate` takes).
Three sources are supported, chosen by :func:`load_labeled` from a spec string:

- ``digits:train`` / ``digits:test``: scikit-learn's bundled 8x8 digits (offline), upsampled to 32x32 RGB,
  the tiny end-to-end fallback when no real data is at hand;
- a ``.npz`` file with keys ``x`` (uint8 N,H,W,3), ``y`` (int N) and ``classes`` (str), the format of
  ``/work/shared/data/README.md``;
- an image folder in torchvision ``ImageFolder`` layout (``root/<class>/<image>``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nayer.runtime import first_line
from nayer.specs import ImageSpec, check_label_range


@dataclass(frozen=True)
class DatasetPreset:
    """What a teacher trained on this dataset expects as input, and its label names."""

    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...] | None  # None: the user must supply them (TinyImageNet wnids have no fixed names)

    def image_spec(self) -> ImageSpec:
        """The preset as an ImageSpec; class indices stand in for names where it has none."""
        names = self.class_names or tuple(str(i) for i in range(self.num_classes))
        return ImageSpec(names, self.image_size, self.mean, self.std)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The 100 official CIFAR-100 fine label names in label-index order (copied from the test set's `classes`).
CIFAR100_CLASSES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl',
    'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair',
    'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin',
    'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp',
    'lawn_mower', 'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain',
    'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck',
    'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
    'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider',
    'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone', 'television', 'tiger',
    'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman',
    'worm',
)

DIGITS_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Pixel mean/std of load_digits("train") (seed 0, test_fraction 0.3) in [0,1]; the three channels are equal
# because the images are gray. Computed once; tests/test_data.py recomputes them.
DIGITS_MEAN = (0.3055, 0.3055, 0.3055)
DIGITS_STD = (0.3237, 0.3237, 0.3237)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_EAGER_PRESETS: dict[str, DatasetPreset] = {
    # The teacher repos' CIFAR-10 std (0.2023, ...) is not the true std, but it is what their weights expect.
    "cifar10": DatasetPreset(10, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), CIFAR10_CLASSES),
    "cifar100": DatasetPreset(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), CIFAR100_CLASSES),
    # The reference normalizes TinyImageNet with 0.5 / 0.5 (registry.NORMALIZE_DICT['tiny_imagenet']): what
    # teachers trained with its code expect, rather than the dataset's own statistics.
    "tiny": DatasetPreset(200, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None),
    "digits": DatasetPreset(10, 32, DIGITS_MEAN, DIGITS_STD, DIGITS_CLASSES),
}


@functools.cache
def _imagenet_preset() -> DatasetPreset:
    # torchvision's weight metadata ships in the wheel (no download) but importing it costs ~1 s: do it on use.
    from torchvision.models import ResNet50_Weights

    names = tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    return DatasetPreset(1000, 224, IMAGENET_MEAN, IMAGENET_STD, names)


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The ImageNet-1k synset ids in label order (n01440764, ...): the folder names of the val set's ImageFolder."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@functools.cache
def imagenet_wordnet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k classes' WordNet lines in label order ("tench, Tinca tinca"), the reference's
    label_embedding/imagenet_label.txt, read from the synset files timm ships. The two lines that are equal (crane
    the bird, crane the machine) get their synset's gloss appended, so that no two classes share a prompt."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    lines = info.label_descriptions()
    glossed = info.label_descriptions(detailed=True)
    counts = {line: lines.count(line) for line in lines}
    return tuple(full if counts[line] > 1 else line for line, full in zip(lines, glossed))


def folder_read(dataset: str, class_names: tuple[str, ...], crop_pct: float | None = None, workers: int = 0,
                cache: str = "") -> "FolderRead":
    """How an evaluation image folder is read for `dataset`: the crop share (`crop_pct`, else ImageNet's 0.875 =
    Resize 256 / CenterCrop 224, else 1), the ids its class folders may be named by (the ImageNet wnids for 1000
    classes, else the class names), the loader processes and the cache folder."""
    if crop_pct is None:
        crop_pct = 0.875 if dataset == "imagenet" else 1.0
    ids = imagenet_wnids() if dataset == "imagenet" and len(class_names) == 1000 else class_names
    return FolderRead(crop_pct, workers, tuple(ids), cache)


class _PresetTable(Mapping[str, DatasetPreset]):
    """Read-only name -> preset table that builds the ImageNet entry on first access."""

    _names = ("cifar10", "cifar100", "tiny", "imagenet", "digits")

    def __getitem__(self, name: str) -> DatasetPreset:
        if name == "imagenet":
            return _imagenet_preset()
        return _EAGER_PRESETS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


PRESETS: Mapping[str, DatasetPreset] = _PresetTable()


def preset(name: str) -> DatasetPreset:
    """The preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown dataset preset '{name}'; known: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class LabeledImages:
    """Images with integer labels: x uint8 (N,H,W,3) RGB, y int64 (N,), classes[i] = name of label i."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N,H,W,3) RGB, got {self.x.dtype} {tuple(self.x.shape)}")
        self.y = np.asarray(self.y)
        if self.y.ndim != 1 or len(self.y) != len(self.x) or not np.issubdtype(self.y.dtype, np.integer):
            raise ValueError(f"labels must be one integer per image ({len(self.x)}), got {self.y.dtype} "
                             f"{tuple(self.y.shape)}")
        self.y = self.y.astype(np.int64, copy=False)
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, limit: int) -> "LabeledImages":
        """A fixed random subset of `limit` images (seed 0, in their original order: the test sets are sorted by
        class, so a prefix would miss classes); all of them for limit 0 or limit >= len."""
        if not limit or limit >= len(self):
            return self
        idx = np.sort(np.random.default_rng(0).permutation(len(self))[:limit])
        return LabeledImages(self.x[idx], self.y[idx], self.classes)


def load_npz(path: str) -> LabeledImages:
    """Load a .npz with keys x (uint8 N,H,W,3), y (int N), classes (str); no pickle is allowed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: '{path}'")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read '{path}' as a .npz archive: {first_line(exc)}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' holds a single array, not a .npz archive with keys x, y and classes")
    with data:
        missing = [k for k in ("x", "y", "classes") if k not in data.files]
        if missing:
            raise ValueError(f"'{path}' lacks key(s) {', '.join(missing)}; a labeled .npz needs x, y and classes "
                             f"(it has {', '.join(data.files) or 'none'})")
        try:
            x, y, classes = data["x"], data["y"], [str(c) for c in data["classes"]]
        except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
            raise ValueError(f"'{path}': {first_line(exc)}; store x, y and classes as plain (non-object) "
                             f"arrays") from None
    try:
        images = LabeledImages(x, y, classes)
    except ValueError as exc:
        raise ValueError(f"'{path}': {exc}") from None
    if not images.classes:
        raise ValueError(f"'{path}' has an empty class list")
    check_label_range(images.y, len(images.classes), f"'{path}'", "its class list")
    return images


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def resize_center_crop(img, size: int, crop_pct: float = 1.0):
    """torchvision's eval transform on a PIL image: Resize(short side -> round(size / crop_pct), bilinear,
    antialiased) then CenterCrop(size). crop_pct 0.875 at 224 px is the standard Resize 256 / CenterCrop 224."""
    import torchvision.transforms.functional as TF

    resize = int(round(size / crop_pct))
    if img.size != (size, size) or resize != size:
        img = TF.center_crop(TF.resize(img, resize), size)
    return img


def folder_classes(root: Path) -> list[str]:
    """The class sub-folders of an ImageFolder, sorted (torchvision's order)."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_label_map(folders: list[str], class_ids: Sequence[str] | None) -> tuple[dict[str, int], list[str]]:
    """Folder name -> label, and the label names. Folders named by `class_ids` (the run's class names, or the
    ImageNet-1k wnids) take those ids' indices, so a val folder with some classes only keeps the right labels;
    other folders are numbered in sorted order, as torchvision's ImageFolder does."""
    if class_ids and set(folders) <= set(class_ids):
        index = {name: i for i, name in enumerate(class_ids)}
        return {f: index[f] for f in folders}, list(class_ids)
    return {f: i for i, f in enumerate(folders)}, folders


class _FolderImages:
    """(path, label) -> uint8 HWC at the eval size, for a DataLoader's worker processes."""

    def __init__(self, files: list[tuple[Path, int]], image_size: int | None, crop_pct: float):
        self.files, self.image_size, self.crop_pct = files, image_size, crop_pct

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        file, label = self.files[i]
        with Image.open(file) as img:
            img = img.convert("RGB")
            if self.image_size is not None:
                img = resize_center_crop(img, self.image_size, self.crop_pct)
            return np.asarray(img, dtype=np.uint8), label, str(file)


@dataclass(frozen=True)
class FolderRead:
    """How an image folder is read: the eval crop share, decode processes, the class ids folders may be named by
    (the run's class names or the ImageNet wnids) and the cache folder (`nayer.eval_cache`; "" = decode into
    memory)."""

    crop_pct: float = 1.0
    workers: int = 0
    class_ids: tuple[str, ...] | None = None
    cache: str = ""


def _uncollated(batch):
    return batch


def load_image_folder(path: str, image_size: int | None, crop_pct: float = 1.0, workers: int = 0,
                      class_ids: Sequence[str] | None = None) -> LabeledImages:
    """Load `path/<class>/<image>` (torchvision ImageFolder layout) as uint8 NHWC: `folder_files`, then
    `decode_images`."""
    files, classes = folder_files(Path(path), class_ids)
    return decode_images(files, classes, image_size, crop_pct, workers)


def decode_images(files: list[tuple[Path, int]], classes: list[str], image_size: int | None, crop_pct: float = 1.0,
                  workers: int = 0, out: np.ndarray | None = None) -> LabeledImages:
    """The listed images (`folder_files`) as uint8 NHWC with their labels.

    Images are converted to RGB and brought to image_size x image_size (`resize_center_crop`). With image_size
    None they are kept as they are and must all share one size. `workers` > 0 decodes in that many DataLoader
    processes. The images are written into `out` when given (a memory-mapped file of the right shape), else into
    one array allocated once: never a list of arrays and a stacked copy of it.
    """
    if image_size is None:
        from PIL import Image

        with Image.open(files[0][0]) as first:
            shape = (len(files), first.size[1], first.size[0], 3)
    else:
        shape = (len(files), image_size, image_size, 3)
    x = np.empty(shape, dtype=np.uint8) if out is None else out
    if x.shape != shape:
        raise ValueError(f"the output array is {x.shape}, the folder needs {shape}")
    y = np.asarray([label for _, label in files], dtype=np.int64)
    import torch.utils.data

    # its own generator: an iterated DataLoader draws a base seed, which must not come from the run's global RNG
    # (the student's and generator's initial weights would then depend on whether the folder was decoded)
    loader = torch.utils.data.DataLoader(_FolderImages(files, image_size, crop_pct), batch_size=8,
                                         num_workers=workers, collate_fn=_uncollated, generator=torch.Generator())
    i = 0
    for batch in loader:
        for arr, _, file in batch:
            if arr.shape != shape[1:]:
                raise ValueError(f"'{file}' is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                                 f"{shape[2]}x{shape[1]}; pass an image size to resize them")
            x[i] = arr
            i += 1
    return LabeledImages(x, y, classes)


def folder_files(root: Path, class_ids: Sequence[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Every image of an ImageFolder with its label (sorted by class folder, then path), and the label names."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: '{root}'")
    folders = folder_classes(root)
    if not folders:
        raise ValueError(f"image folder '{root}' has no class sub-folders; expected {root}/<class>/<image>")
    labels, classes = folder_label_map(folders, class_ids)
    files = [(f, labels[name]) for name in folders
             for f in sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"image folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return files, classes


DIGITS_SPLITS = ("train", "test")


@functools.cache
def _digits_split(split: str, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
    upsampled = F.interpolate(torch.from_numpy(images)[:, None], size=(32, 32), mode="bilinear",
                              align_corners=False)[:, 0].numpy()
    gray = np.clip(np.rint(upsampled), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    idx = np.sort(train_idx if split == "train" else test_idx)
    return rgb[idx], labels[idx]


def load_digits(split: str, seed: int = 0, test_fraction: float = 0.3) -> LabeledImages:
    """scikit-learn's 1,797 digits as 32x32 RGB uint8, with a fixed stratified train/test split.

    The 8x8 0..16 images are scaled to 0..255, upsampled bilinearly to 32x32 and repeated to 3 channels.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split '{split}'; use one of: {', '.join(DIGITS_SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _digits_split(split, seed, test_fraction)
    # Copies, so a caller that edits the arrays cannot corrupt the cached split.
    return LabeledImages(x.copy(), y.copy(), list(DIGITS_CLASSES))


SPEC_FORMS = "'digits:train', 'digits:test', a .npz file (keys x, y, classes) or an image folder (root/<class>/<image>)"


def load_labeled(spec: str, image_size: int | None = None, read: FolderRead = FolderRead()) -> LabeledImages:
    """Load a labeled set from `spec` (see SPEC_FORMS); with image_size, every image must be that size.

    Image folders are resized to image_size as `read` says (and decoded into its cache, memory-mapped); .npz and
    digits images are not, and a mismatch is an error.
    """
    if spec.startswith("digits:"):
        images = load_digits(spec.split(":", 1)[1])
    elif os.path.isdir(spec):
        if read.cache and image_size is not None:
            from nayer.eval_cache import cached_image_folder
            images = cached_image_folder(spec, image_size, read)
        else:
            images = load_image_folder(spec, image_size, read.crop_pct, read.workers, read.class_ids)
    elif os.path.isfile(spec):
        if not spec.endswith(".npz"):
            raise ValueError(f"'{spec}' is a file but not a .npz; accepted: {SPEC_FORMS}")
        images = load_npz(spec)
    else:
        raise FileNotFoundError(f"data not found: '{spec}'; accepted: {SPEC_FORMS}")
    if image_size is not None and images.x.shape[1:3] != (image_size, image_size):
        h, w = images.x.shape[1:3]
        raise ValueError(f"'{spec}' holds {w}x{h} images but {image_size}x{image_size} are expected")
    return images


def read_class_names(path: str) -> list[str]:
    """Class names from a text file, one per line in label order (blank lines ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file not found: '{path}'")
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-name file '{path}' has no names; write one class name per line")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"class-name file '{path}' lists '{name}' twice; names must be unique")
        seen.add(name)
    return names
