"""Image datasets for the models and the ``fastvq`` command: an embedded default and on-disk loaders.

Nothing is downloaded, ever. The default, ``digits``, is the copy of the UCI handwritten digits
that ships with scikit-learn (1 797 real 8 x 8 images, pixels 0..16), embedded in this package
(``fastvq/_datafiles/digits.csv.gz``, unchanged from scikit-learn 1.7.2). The other loaders read
data the user already has:

- ``mnist:DIR``: the four MNIST idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) in ``DIR``, in
  ``DIR/raw`` or in ``DIR/MNIST/raw`` (torchvision's layout);
- ``cifar10:DIR``: the CIFAR-10 python pickles (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``) in ``DIR`` or ``DIR/cifar-10-batches-py``. They are pickles, read by an
  unpickler that admits only what those files hold (builtin containers, bytes, numbers and numpy
  arrays): a pickle that names any other class or function is refused before anything runs;
- ``images:DIR``: every ``.png``/``.jpg``/``.jpeg``/``.bmp``/``.gif``/``.webp``/``.tif``/``.tiff``
  under ``DIR`` (recursively), centre-cropped to a square and resized to ``image_size`` (default:
  the smallest side among the images, at most 64; a warning names an image much smaller than the
  others, which would shrink them all). 16-bit greyscale images are scaled from their full range
  (``0..65535`` to ``0..255``), 32-bit integer ones too when their values fit in 16 bits (else from
  the whole signed 32-bit range), and float ones are read as ``[0, 1]`` (clipped). Needs Pillow.

A missing file raises ``FileNotFoundError`` and a malformed one ``DatasetError`` (a ``ValueError``);
both name the path and the format that was expected. Images are kept as ``uint8`` (digits: 0..16)
and turned into float32 in ``[0, 1]`` one batch at a time.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "DatasetError",
    "ImageData",
    "DATASET_KINDS",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "load_image_folder",
    "parse_dataset_spec",
]

PathLike = Union[str, "os.PathLike[str]"]

DATASET_KINDS = ("digits", "mnist", "cifar10", "images")
DIGITS_FILE = Path(__file__).parent.parent / "_datafiles" / "digits.csv.gz"
DIGITS_COUNT, DIGITS_SIDE, DIGITS_MAX = 1797, 8, 16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The held-out split is drawn with its own seed, so runs with different --seed values are
# evaluated on the same images.
SPLIT_SEED = 0
MAX_DEFAULT_IMAGE_SIZE = 64

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_IMAGE_MAGIC, MNIST_LABEL_MAGIC = 2051, 2049
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_ROW = 3 * 32 * 32
# Everything a CIFAR-10 batch's pickle may name beyond its builtin dicts, lists, bytes and ints:
# numpy's array reconstruction (protocols 0-4, and 5's buffer form), under the numpy 1 and numpy 2
# module names, and what a Python 3 pickle of protocol 0-2 writes bytes with (a codec, or bytes()
# for empty ones; "__builtin__" is Python 2's name for builtins).
CIFAR_PICKLE_GLOBALS = frozenset({
    ("_codecs", "encode"),
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
})


class DatasetError(ValueError):
    """A dataset file exists but does not hold what its format promises."""


@dataclass
class ImageData:
    """A dataset split into a training part and a held-out part the training never sees.

    ``train`` and ``val`` are ``[N, C, H, W]`` tensors of pixel values in ``[0, max_value]``
    (uint8 for every built-in source); ``batch`` turns rows of them into float32 in ``[0, 1]``.
    ``train_labels``/``val_labels`` are int64 class labels where the source has them.
    """

    name: str
    train: Tensor
    val: Tensor
    max_value: float
    train_labels: Optional[Tensor] = None
    val_labels: Optional[Tensor] = None
    description: str = ""

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.shape[2]), int(self.train.shape[3])

    def batch(self, images: Tensor, device: Union[str, torch.device, None] = None) -> Tensor:
        """``images`` (rows of ``train`` or ``val``) as float32 in ``[0, 1]`` on ``device``."""
        return images.to(device=device, dtype=torch.float32) / self.max_value

    def variance(self) -> float:
        """Pixel variance of the training part in ``[0, 1]`` units (VQ-VAE's loss normaliser)."""
        scaled = self.train.to(torch.float64) / self.max_value
        return float(scaled.var())


def parse_dataset_spec(spec: str) -> tuple[str, Optional[Path]]:
    """``"digits"`` -> ``("digits", None)``; ``"mnist:DIR"`` -> ``("mnist", Path(DIR))``."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset {spec!r}: use digits, mnist:DIR, cifar10:DIR or images:DIR")
    if kind == "digits":
        if sep:
            raise ValueError(f"the digits dataset is embedded and takes no directory, got {spec!r}")
        return kind, None
    if not path:
        raise ValueError(f"{kind} needs a directory: {kind}:DIR, got {spec!r}")
    return kind, Path(path).expanduser()


def load_dataset(
    spec: str,
    *,
    val_fraction: float = 0.1,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
) -> ImageData:
    """Loads ``spec`` (``digits``, ``mnist:DIR``, ``cifar10:DIR`` or ``images:DIR``) and splits it.

    MNIST and CIFAR-10 hold out their official test set when its files are present; otherwise, and
    for ``digits`` and ``images``, a fixed random ``val_fraction`` of the images is held out (the
    same images whatever the training seed).

    Args:
        val_fraction: share of the images held out when there is no official test set, in (0, 1).
        image_size: ``images:DIR`` only: the side the images are resized to.
        channels: ``images:DIR`` only: 1 (grey) or 3 (RGB); default 1 when every image is grey.

    Raises:
        ValueError: a bad ``spec`` or ``val_fraction``; ``DatasetError`` (a ``ValueError``) for a
        malformed file; ``FileNotFoundError`` for a missing one. Both name the path.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    kind, root = parse_dataset_spec(spec)
    if kind != "images" and (image_size is not None or channels is not None):
        raise ValueError(f"image_size and channels apply to images:DIR only, not to {kind}")
    if kind == "digits":
        images, labels = load_digits()
        train, val, train_labels, val_labels = _split(images, labels, val_fraction)
        return ImageData("digits", train, val, DIGITS_MAX, train_labels, val_labels,
                         "UCI handwritten digits (scikit-learn's copy, embedded)")
    if kind == "mnist":
        images, labels = load_mnist(root, "train")
        if _mnist_test_present(root):
            val, val_labels = load_mnist(root, "test")
            return ImageData("mnist", images, val, 255.0, labels, val_labels, f"MNIST idx files in {root}")
        train, val, train_labels, val_labels = _split(images, labels, val_fraction)
        return ImageData("mnist", train, val, 255.0, train_labels, val_labels, f"MNIST idx files in {root}")
    if kind == "cifar10":
        images, labels = load_cifar10(root, "train")
        if _cifar_dir(root, required=False) is not None and (_cifar_dir(root) / "test_batch").exists():
            val, val_labels = load_cifar10(root, "test")
            return ImageData("cifar10", images, val, 255.0, labels, val_labels, f"CIFAR-10 pickles in {root}")
        train, val, train_labels, val_labels = _split(images, labels, val_fraction)
        return ImageData("cifar10", train, val, 255.0, train_labels, val_labels, f"CIFAR-10 pickles in {root}")
    images = load_image_folder(root, image_size=image_size, channels=channels)
    train, val, _, _ = _split(images, None, val_fraction)
    return ImageData("images", train, val, 255.0, None, None, f"{images.shape[0]} images under {root}")


def _split(images: Tensor, labels: Optional[Tensor], val_fraction: float):
    count = images.shape[0]
    if count < 2:
        raise DatasetError(f"need at least 2 images to hold some out, found {count}")
    num_val = min(max(1, round(count * val_fraction)), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_rows, train_rows = order[:num_val].sort().values, order[num_val:].sort().values
    train_labels = None if labels is None else labels[train_rows]
    val_labels = None if labels is None else labels[val_rows]
    return images[train_rows], images[val_rows], train_labels, val_labels


# --------------------------------------------------------------------------- digits


def load_digits() -> tuple[Tensor, Tensor]:
    """The embedded digits: ``(images uint8 [1797, 1, 8, 8] in 0..16, labels int64 [1797])``."""
    try:
        text = gzip.decompress(DIGITS_FILE.read_bytes()).decode("ascii")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the embedded digits file {DIGITS_FILE} is missing: fastvq was installed without its data files "
            "(reinstall fastvq; the file is scikit-learn's sklearn/datasets/data/digits.csv.gz)"
        ) from None
    rows = [line.split(",") for line in text.splitlines() if line]
    expected = DIGITS_SIDE * DIGITS_SIDE + 1
    if len(rows) != DIGITS_COUNT or any(len(row) != expected for row in rows):
        raise DatasetError(
            f"{DIGITS_FILE} is malformed: expected {DIGITS_COUNT} comma-separated rows of {expected} integers "
            "(64 pixels in 0..16, then the label)"
        )
    values = torch.tensor([[int(value) for value in row] for row in rows], dtype=torch.int64)
    images = values[:, :-1].to(torch.uint8).reshape(DIGITS_COUNT, 1, DIGITS_SIDE, DIGITS_SIDE)
    return images, values[:, -1].clone()


# --------------------------------------------------------------------------- MNIST


def _find_file(root: Path, names: Sequence[str], subdirs: Sequence[str], what: str) -> Path:
    """The first of ``names`` (or ``name.gz``) in ``root`` or one of its ``subdirs``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a directory holding {what})")
    for subdir in ("", *subdirs):
        for name in names:
            for candidate in (root / subdir / name, root / subdir / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    looked = ", ".join(str(root / subdir) for subdir in ("", *subdirs))
    raise FileNotFoundError(f"{names[0]} (or {names[0]}.gz) not found in {looked}: expected {what}")


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise DatasetError(f"{path} is not a valid gzip file ({error})") from None
    return data


def _mnist_test_present(root: Path) -> bool:
    try:
        _find_file(root, MNIST_FILES["test"][:1], ("raw", "MNIST/raw"), "MNIST idx files")
    except FileNotFoundError:
        return False
    return True


def _read_idx(path: Path, magic: int, dims: int) -> tuple[bytes, tuple[int, ...]]:
    data = _read_maybe_gzip(path)
    header = 4 + 4 * dims
    kind = "images (magic 2051, 3 dimensions)" if dims == 3 else "labels (magic 2049, 1 dimension)"
    if len(data) < header:
        raise DatasetError(f"{path} is too short ({len(data)} bytes) for an idx header: expected MNIST {kind}")
    found_magic = struct.unpack(">i", data[:4])[0]
    if found_magic != magic:
        raise DatasetError(f"{path} has magic number {found_magic}, expected MNIST idx {kind}")
    shape = struct.unpack(f">{dims}i", data[4:header])
    size = math.prod(shape)
    if len(data) - header != size:
        raise DatasetError(
            f"{path} holds {len(data) - header} bytes of data but its header {shape} promises {size}: "
            "the file is truncated or corrupt"
        )
    return data[header:], shape


def load_mnist(root: PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST from its idx files: ``(images uint8 [N, 1, 28, 28], labels int64 [N])``.

    ``split`` is ``"train"`` or ``"test"`` (the ``t10k`` files). Files may be gzipped.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    image_name, label_name = MNIST_FILES[split]
    what = "the MNIST idx files (train-images-idx3-ubyte, ...; optionally .gz)"
    image_path = _find_file(root, (image_name,), ("raw", "MNIST/raw"), what)
    label_path = _find_file(root, (label_name,), ("raw", "MNIST/raw"), what)
    pixels, (count, height, width) = _read_idx(image_path, MNIST_IMAGE_MAGIC, 3)
    labels, (label_count,) = _read_idx(label_path, MNIST_LABEL_MAGIC, 1)
    if label_count != count:
        raise DatasetError(f"{label_path} has {label_count} labels but {image_path} has {count} images")
    images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).reshape(count, 1, height, width)
    return images, torch.frombuffer(bytearray(labels), dtype=torch.uint8).to(torch.int64)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(root: Path, required: bool = True) -> Optional[Path]:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    if required:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory (expected the CIFAR-10 python pickles)")
        raise FileNotFoundError(
            f"data_batch_1 not found in {root} or {root / 'cifar-10-batches-py'}: expected the CIFAR-10 python "
            "pickles (data_batch_1 .. data_batch_5, test_batch from cifar-10-python.tar.gz)"
        )
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: any global outside ``CIFAR_PICKLE_GLOBALS`` (the
    way a pickle calls code) is an ``UnpicklingError``, raised before the global is even imported."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"the pickle names {module}.{name}, which no CIFAR-10 batch holds: refused")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    expected = "a CIFAR-10 python pickle: a dict with b'data' (uint8 [N, 3072]) and b'labels' (N ints)"
    try:
        with path.open("rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: expected {expected}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, UnicodeDecodeError) as error:
        raise DatasetError(
            f"{path} could not be unpickled ({type(error).__name__}: {error}): expected {expected}"
        ) from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, expected {expected}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path} has keys {sorted(map(str, batch))}, expected {expected}")
    try:
        tensor = torch.as_tensor(data)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DatasetError(f"{path}: b'data' is not an array ({error}); expected {expected}") from None
    if tensor.dtype != torch.uint8 or tensor.dim() != 2 or tensor.shape[1] != CIFAR_ROW:
        raise DatasetError(f"{path}: b'data' is {tensor.dtype} {tuple(tensor.shape)}, expected {expected}")
    labels = torch.as_tensor(list(labels), dtype=torch.int64)
    if labels.shape[0] != tensor.shape[0]:
        raise DatasetError(f"{path} has {labels.shape[0]} labels for {tensor.shape[0]} images")
    return tensor.reshape(-1, 3, 32, 32).clone(), labels


def load_cifar10(root: PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from its python pickles: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``."""
    if split not in CIFAR_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = _cifar_dir(Path(root))
    parts = [_load_cifar_batch(directory / name) for name in CIFAR_FILES[split]]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


# --------------------------------------------------------------------------- image folders


def _to_8_bits(image):
    """``image`` with 8-bit channels. Pillow's ``convert("L")`` clips wider greyscale modes at 255
    (a 16-bit image comes out almost all white), so those are scaled from their range instead."""
    from PIL import Image

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0
    elif image.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
        top = 65535.0
    else:
        top = 2.0**32 - 1
        values = values + 2.0**31 if values.size and values.min() < 0 else values
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _default_image_size(paths: Sequence[Path], opened: Sequence) -> int:
    """The smallest side among the images, at most ``MAX_DEFAULT_IMAGE_SIZE``; an image whose side is
    under half the median one is named in a warning, since it alone shrinks every other image."""
    import statistics
    import warnings

    sides = [min(image.size) for image in opened]
    size = min(MAX_DEFAULT_IMAGE_SIZE, min(sides))
    median = statistics.median(sides)
    if size < min(MAX_DEFAULT_IMAGE_SIZE, median) / 2:
        smallest = min(range(len(sides)), key=sides.__getitem__)
        width, height = opened[smallest].size
        warnings.warn(
            f"{paths[smallest]} is {width} x {height}: the default image size is the smallest side, so every image is "
            f"resized to {size} x {size} (the median side is {median:g}); pass image_size (fastvq train --image-size) "
            "or remove the small image",
            stacklevel=3,
        )
    return size


def load_image_folder(root: PathLike, *, image_size: Optional[int] = None, channels: Optional[int] = None) -> Tensor:
    """Every image under ``root`` (recursively, sorted by path) as uint8 ``[N, C, S, S]``.

    Each image is centre-cropped to a square and resized to ``S = image_size`` (default: the
    smallest side among the images, capped at 64). ``channels`` is 1 or 3; by default 1 when every
    image is greyscale, else 3.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a dependency of fastvq
        raise ImportError("images:DIR needs Pillow: pip install pillow") from None
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a folder of {'/'.join(IMAGE_SUFFIXES)} images)")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    paths = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    opened = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                opened.append(image.copy())
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise DatasetError(
                f"{path} is not a readable image ({error}); expected a {'/'.join(IMAGE_SUFFIXES)} file"
            ) from None
    if channels is None:
        channels = 1 if all(image.mode in ("1", "L", "LA", "La", "F") or image.mode.startswith("I")
                            for image in opened) else 3
    if image_size is None:
        image_size = _default_image_size(paths, opened)
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for image in opened:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = _to_8_bits(image).convert(mode).crop((left, top, left + side, top + side))
        square = square.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8))
    images = torch.stack(arrays).reshape(len(arrays), image_size, image_size, channels)
    return images.permute(0, 3, 1, 2).contiguous()

