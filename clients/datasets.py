"""Datasets as numpy arrays: digits (shipped with scikit-learn), MNIST, CIFAR-10.

Every loader returns a :class:`Dataset` with images as float32 ``[N, C, H, W]``
scaled to [0, 1] and labels as int64. Nothing is downloaded: digits ships
inside scikit-learn; MNIST and CIFAR-10 are read from files the user already
has under ``data_dir``, in any of these layouts:

- MNIST: ``mnist.npz`` (keys x_train, y_train, x_test, y_test), raw IDX files
  (``train-images-idx3-ubyte[.gz]`` ...) in ``data_dir`` or in
  ``data_dir/MNIST/raw`` (torchvision's layout).
- CIFAR-10: ``cifar10.npz`` (same keys), or torchvision's
  ``data_dir/cifar-10-batches-py`` (the official python batches).

Missing files raise :class:`DatasetNotFound` naming the paths looked at.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from qfl.errors import DatasetNotFound


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_dir: str = "data", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load ``name`` (digits, mnist or cifar10); cached per process."""
    return _load_cached(name, str(data_dir), float(test_fraction), int(seed))


@lru_cache(maxsize=4)
def _load_cached(name: str, data_dir: str, test_fraction: float, seed: int) -> Dataset:
    if name == "digits":
        return _digits(test_fraction, seed)
    if name == "mnist":
        return _mnist(Path(data_dir))
    if name == "cifar10":
        return _cifar10(Path(data_dir))
    raise ValueError(f"unknown dataset {name!r}; choose digits, mnist or cifar10")


def _digits(test_fraction: float, seed: int) -> Dataset:
    """1,797 real 8x8 handwritten digits; a stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, body has {body.size} bytes")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _mnist(data_dir: Path) -> Dataset:
    npz = data_dir / "mnist.npz"
    if npz.exists():
        return _from_npz("mnist", npz, channels_last=True, scale=255.0)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        found = [_find(folder, stem) for stem in stems]
        if all(found):
            xs, ys, xt, yt = (_read_idx(p) for p in found)  # type: ignore[arg-type]
            return Dataset(
                "mnist",
                (xs.astype(np.float32) / 255.0)[:, None],
                ys.astype(np.int64),
                (xt.astype(np.float32) / 255.0)[:, None],
                yt.astype(np.int64),
                10,
            )
    raise DatasetNotFound(
        f"MNIST not found: expected {npz}, or the four IDX files ({', '.join(stems)}, optionally .gz) "
        f"in {data_dir} or {data_dir / 'MNIST' / 'raw'}; set data_dir=PATH to where they are"
    )


def _cifar10(data_dir: Path) -> Dataset:
    npz = data_dir / "cifar10.npz"
    if npz.exists():
        return _from_npz("cifar10", npz, channels_last=True, scale=255.0)
    folder = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if all((folder / n).exists() for n in names):
        batches = []
        for n in names:
            with open(folder / n, "rb") as fh:
                # The official CIFAR-10 python batches are pickles; they are the user's own files.
                batch = pickle.load(fh, encoding="bytes")
            batches.append((batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"])))
        x_tr = np.concatenate([b[0] for b in batches[:5]]).astype(np.float32) / 255.0
        y_tr = np.concatenate([b[1] for b in batches[:5]]).astype(np.int64)
        return Dataset("cifar10", x_tr, y_tr, batches[5][0].astype(np.float32) / 255.0, batches[5][1].astype(np.int64), 10)
    raise DatasetNotFound(
        f"CIFAR-10 not found: expected {npz} or torchvision's folder {folder} "
        f"(data_batch_1..5, test_batch); set data_dir=PATH to where they are"
    )


def _from_npz(name: str, path: Path, channels_last: bool, scale: float) -> Dataset:
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}")
        arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]

    def images(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / scale
        if x.ndim == 3:
            return x[:, None]
        return np.transpose(x, (0, 3, 1, 2)) if channels_last else x

    return Dataset(
        name,
        images(arrays[0]),
        arrays[1].reshape(-1).astype(np.int64),
        images(arrays[2]),
        arrays[3].reshape(-1).astype(np.int64),
        int(max(arrays[1].max(), arrays[3].max())) + 1,
    )
