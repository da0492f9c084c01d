"""fastvq.train.data: the embedded digits, the on-disk loaders on small files written here, and their errors."""

import gzip
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from fastvq.train.data import (
    DatasetError,
    _split,
    load_cifar10,
    load_dataset,
    load_digits,
    load_image_folder,
    load_mnist,
    parse_dataset_spec,
)


def test_digits_are_the_1797_real_images():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    assert int(images.max()) == 16 and int(images.min()) == 0
    assert labels.shape == (1797,) and sorted(labels.unique().tolist()) == list(range(10))
    # The first image of scikit-learn's copy is a zero.
    assert int(labels[0]) == 0 and images[0, 0, 0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_digits_match_scikit_learn_when_installed():
    datasets = pytest.importorskip("sklearn.datasets")
    reference = datasets.load_digits()
    images, labels = load_digits()
    assert np.array_equal(images.reshape(1797, 64).numpy(), reference.data.astype(np.uint8))
    assert np.array_equal(labels.numpy(), reference.target)


def test_digits_split_is_fixed_and_held_out():
    data = load_dataset("digits")
    assert data.train.shape[0] + data.val.shape[0] == 1797 and data.val.shape[0] == 180
    assert torch.equal(data.val, load_dataset("digits").val)
    batch = data.batch(data.val[:4])
    assert batch.dtype == torch.float32 and float(batch.max()) <= 1.0 and float(batch.min()) >= 0.0
    assert 0.1 < data.variance() < 0.2


def test_split_rows_are_disjoint_and_complete():
    rows = torch.arange(1000).reshape(1000, 1, 1, 1)
    train, val, _, _ = _split(rows, None, 0.1)
    train_set, val_set = set(train.flatten().tolist()), set(val.flatten().tolist())
    assert len(val_set) == 100 and not train_set & val_set and train_set | val_set == set(range(1000))


@pytest.mark.parametrize("spec, message", [
    ("svhn", "unknown dataset"),
    ("mnist", "needs a directory"),
    ("digits:/tmp", "takes no directory"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_dataset_spec(spec)


# --------------------------------------------------------------------------- MNIST


def _write_idx(path, array, magic, compress=False):
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _mnist_dir(root, count=12, test=True, compress=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    splits = [("train", count)] + ([("t10k", 5)] if test else [])
    for split, n in splits:
        _write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), 2051, compress)
        _write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), 2049, compress)
    return root


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_mnist_idx_files(tmp_path, compress):
    _mnist_dir(tmp_path, compress=compress)
    images, labels = load_mnist(tmp_path)
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (12,)
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.train.shape[0] == 12 and data.val.shape[0] == 5  # the t10k files are the held-out split


def test_mnist_torchvision_layout_and_split_without_test(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _mnist_dir(raw, count=20, test=False)
    data = load_dataset(f"mnist:{tmp_path}", val_fraction=0.25)
    assert data.train.shape[0] == 15 and data.val.shape[0] == 5


def test_mnist_truncated_file_names_path(tmp_path):
    _mnist_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*truncated"):
        load_mnist(tmp_path)


def test_mnist_wrong_file_names_path_and_format(tmp_path):
    _mnist_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"this is not an idx file at all")
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.*magic number.*MNIST idx labels"):
        load_mnist(tmp_path)


def test_mnist_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_mnist(tmp_path / "nowhere")


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(root, per_batch=4, test=True):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + (["test_batch"] if test else [])
    for name in names:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"batch_label": name.encode()}
        with (root / name).open("wb") as handle:
            pickle.dump(batch, handle)
    return root


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _cifar_dir(folder)
    images, labels = load_cifar10(tmp_path)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (20,)
    data = load_dataset(f"cifar10:{tmp_path}")
    assert data.train.shape[0] == 20 and data.val.shape[0] == 4 and data.channels == 3
    # Channel-major rows: the first 1024 bytes of a row are its red plane.
    with (folder / "data_batch_1").open("rb") as handle:
        raw = pickle.load(handle, encoding="bytes")[b"data"]
    assert np.array_equal(images[0, 0].reshape(-1).numpy(), raw[0, :1024])


def test_cifar10_wrong_shape_names_path(tmp_path):
    _cifar_dir(tmp_path)
    with (tmp_path / "data_batch_3").open("wb") as handle:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0] * 4}, handle)
    with pytest.raises(DatasetError, match="data_batch_3.*uint8 \\[N, 3072\\]"):
        load_cifar10(tmp_path)


def test_cifar10_truncated_pickle_names_path(tmp_path):
    _cifar_dir(tmp_path)
    path = tmp_path / "data_batch_2"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DatasetError, match="data_batch_2.*could not be unpickled"):
        load_cifar10(tmp_path)


class _WritesTheMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar10_pickles_of_every_protocol_load(tmp_path, protocol):
    """The restricted unpickler admits everything a CIFAR-10 batch holds, however it was pickled."""
    _cifar_dir(tmp_path)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1], b"filenames": [b"a.png", b""],
             b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = load_cifar10(tmp_path)
    assert np.array_equal(images[:2].reshape(2, -1).numpy(), batch[b"data"]) and labels[:2].tolist() == [3, 1]


def test_cifar10_pickle_payload_is_refused_before_it_runs(tmp_path):
    """A "batch" whose pickle calls a function: refused by name, and the function never runs."""
    _cifar_dir(tmp_path)
    marker = tmp_path / "marker"
    (tmp_path / "data_batch_4").write_bytes(pickle.dumps({b"data": _WritesTheMarker(marker), b"labels": [0]}))
    with pytest.raises(DatasetError, match="data_batch_4.*names io.open, which no CIFAR-10 batch holds: refused"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_cifar10_missing_batch_names_path(tmp_path):
    _cifar_dir(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 python pickles"):
        load_cifar10(tmp_path / "empty")


# --------------------------------------------------------------------------- image folders


def test_image_folder_grey_and_rgb(tmp_path):
    from PIL import Image

    (tmp_path / "sub").mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(tmp_path / f"g{index}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "sub" / "g.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    grey = load_image_folder(tmp_path)
    assert grey.shape == (4, 1, 16, 16) and grey.dtype == torch.uint8
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "c.jpg")
    colour = load_image_folder(tmp_path, image_size=8)
    assert colour.shape == (5, 3, 8, 8)
    data = load_dataset(f"images:{tmp_path}", image_size=8, channels=1, val_fraction=0.2)
    assert data.train.shape == (4, 1, 8, 8) and data.val.shape == (1, 1, 8, 8)


def test_image_folder_corrupt_file_names_path(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "fine.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="broken.png.*not a readable image"):
        load_image_folder(tmp_path)


def test_image_folder_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path)


def test_image_folder_scales_16_bit_images_by_their_depth(tmp_path):
    """convert("L") clips 16-bit values at 255 (1000, 30000, 65535 all came out white)."""
    from PIL import Image

    values = np.array([[1000, 30000], [65535, 0]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    Image.fromarray(values.astype(np.int32), mode="I").save(tmp_path / "wide.tif")
    Image.fromarray(values.astype(np.float32) / 65535, mode="F").save(tmp_path / "float.tif")
    images = load_image_folder(tmp_path, image_size=2)
    expected = np.rint(values / 65535 * 255)
    for image in images:  # the bicubic resize to the same size keeps every pixel
        assert image.shape == (1, 2, 2)
        assert np.abs(image[0].numpy().astype(np.float64) - expected).max() <= 1, image[0].tolist()
    colour = load_image_folder(tmp_path, image_size=2, channels=3)
    assert np.abs(colour[0, 2].numpy().astype(np.float64) - expected).max() <= 1


def test_image_folder_warns_when_one_tiny_image_shrinks_the_rest(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / f"big{index}.png")
    Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"tiny.png is 1 x 1.*resized to 1 x 1.*median side is 16"):
        images = load_image_folder(tmp_path)
    assert images.shape == (5, 1, 1, 1)
    (tmp_path / "tiny.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image_folder(tmp_path).shape == (4, 1, 16, 16)
