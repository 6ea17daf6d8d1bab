import numpy as np
import pytest

from qfl.config import RunConfig
from qfl.server.optimizers import make_server_optimizer


def _w(v):
    return {"a": np.array(v, dtype=np.float32)}


def test_fedavg_adds_the_scaled_mean_update():
    opt = make_server_optimizer(RunConfig(server_opt="fedavg", server_lr=0.5))
    new = opt.step(_w([1.0, 2.0]), {"a": np.array([2.0, -2.0])})
    assert np.allclose(new["a"], [2.0, 1.0]) and new["a"].dtype == np.float32


def test_fedavgm_accumulates_velocity():
    opt = make_server_optimizer(RunConfig(server_opt="fedavgm", server_lr=1.0, server_momentum=0.5))
    w = opt.step(_w([0.0]), {"a": np.array([1.0])})  # v = 1
    w = opt.step(w, {"a": np.array([1.0])})  # v = 0.5 + 1 = 1.5
    assert np.allclose(w["a"], [2.5])


def test_fedadam_matches_the_formula():
    cfg = RunConfig(server_opt="fedadam", server_lr=0.1, adam_beta1=0.9, adam_beta2=0.99, adam_tau=1e-3)
    opt = make_server_optimizer(cfg)
    d = np.array([0.2, -0.4])
    w = opt.step(_w([0.0, 0.0]), {"a": d})
    m, v = 0.1 * d, 0.01 * d * d
    assert np.allclose(w["a"], 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_state_round_trip_continues_identically(name):
    cfg = RunConfig(server_opt=name, server_lr=0.1)
    rng = np.random.default_rng(0)
    deltas = [{"a": rng.standard_normal(5)} for _ in range(4)]
    straight = make_server_optimizer(cfg)
    w = _w(np.zeros(5))
    for d in deltas:
        w = straight.step(w, d)
    first = make_server_optimizer(cfg)
    w2 = _w(np.zeros(5))
    for d in deltas[:2]:
        w2 = first.step(w2, d)
    second = make_server_optimizer(cfg)
    second.load_state_arrays(first.state_arrays())
    for d in deltas[2:]:
        w2 = second.step(w2, d)
    assert np.array_equal(w["a"], w2["a"])
