import numpy as np
import pytest

from qfl.clients.partition import PartitionError, partition_dirichlet, partition_iid
from qfl.errors import PartitionReason


def _check_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert len(np.unique(joined)) == n


def test_iid_sizes_cover_and_balance():
    parts = partition_iid(1437, 10, seed=0)
    _check_disjoint_cover(parts, 1437)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_covers_every_sample_and_respects_min_size():
    labels = np.repeat(np.arange(10), 100)
    parts = partition_dirichlet(labels, 20, alpha=0.5, seed=1, min_size=5)
    _check_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 5


def _label_skew(parts, labels):
    """Mean total-variation distance between client and global label distributions."""
    classes = np.unique(labels)
    global_dist = np.bincount(labels, minlength=len(classes)) / len(labels)
    tvs = []
    for p in parts:
        dist = np.bincount(labels[p], minlength=len(classes)) / len(p)
        tvs.append(0.5 * np.abs(dist - global_dist).sum())
    return float(np.mean(tvs))


def test_label_skew_grows_as_alpha_shrinks():
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    skews = [_label_skew(partition_dirichlet(labels, 10, a, seed=3), labels) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5
    iid = _label_skew(partition_iid(len(labels), 10, seed=3), labels)
    assert iid < 0.1


def test_partitions_are_deterministic_in_the_seed():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    a = partition_dirichlet(labels, 8, 0.5, seed=11)
    b = partition_dirichlet(labels, 8, 0.5, seed=11)
    c = partition_dirichlet(labels, 8, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(np.array_equal(x, y) for x, y in zip(partition_iid(500, 8, 4), partition_iid(500, 8, 4)))


def test_more_clients_than_samples_is_refused():
    with pytest.raises(PartitionError) as err:
        partition_iid(10, 11, seed=0)
    assert err.value.reason is PartitionReason.TOO_FEW_SAMPLES
    with pytest.raises(PartitionError) as err:
        partition_dirichlet(np.zeros(5, dtype=int), 6, 1.0, seed=0)
    assert err.value.reason is PartitionReason.TOO_FEW_SAMPLES
