import gzip
import pickle
import struct

import numpy as np
import pytest

from qfl.clients.datasets import DatasetNotFound, load_dataset


def test_digits_split_is_stratified_and_scaled():
    data = load_dataset("digits", test_fraction=0.2, seed=0)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert set(np.unique(data.y_test)) == set(range(10))


def _write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_from_idx_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)), gz=True)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(6) % 10, gz=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(3))
    data = load_dataset("mnist", str(tmp_path))
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    assert list(data.y_train) == [0, 1, 2, 3, 4, 5] and data.x_train.max() <= 1.0


def test_mnist_from_npz(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        y_train=np.array([0, 1, 2, 9]),
        x_test=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        y_test=np.array([3, 4]),
    )
    data = load_dataset("mnist", str(tmp_path))
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_cifar10_from_torchvision_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.x_train.shape == (10, 3, 32, 32) and data.x_test.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name, expected", [("mnist", "mnist.npz"), ("cifar10", "cifar-10-batches-py")])
def test_missing_files_name_the_expected_path(tmp_path, name, expected):
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, str(tmp_path / "nowhere"))
    message = str(info.value)  # names what is missing, where, and the key that moves it
    assert expected in message and str(tmp_path / "nowhere") in message and "data_dir=" in message
