import json
import os
from pathlib import Path

import numpy as np
import pytest

from qfl import files
from qfl.server import checkpoint as ck


def test_checkpoint_round_trip(tmp_path):
    weights = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    opt = {"velocity/b": np.full(2, 0.5)}
    history = [{"round": 1, "accuracy": 0.5}]
    ck.save_checkpoint(tmp_path, ck.Checkpoint(3, weights, opt, history))
    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.round == 3 and loaded.history == history
    assert list(loaded.weights) == list(weights)
    assert all(np.array_equal(loaded.weights[k], weights[k]) for k in weights)
    assert np.array_equal(loaded.optimizer_state["velocity/b"], opt["velocity/b"])
    assert ck.load_checkpoint(tmp_path / "empty") is None


def test_a_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    files.atomic_write_json(target, [1])

    disk_full = OSError("disk full")

    def broken_replace(src, dst):
        raise disk_full

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError) as err:
        files.atomic_write_json(target, [1, 2])
    assert err.value is disk_full  # passed on as it was
    assert json.loads(target.read_text()) == [1]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["metrics.json"]
