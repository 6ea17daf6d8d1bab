"""A node's pins (clients/secure.py NodePins): the least protection it takes part under, whatever a lying
server's plan asks for. The adversary is the server: it writes the plan (masking form, self-mask form,
masking graph, colluder allowance) and could ask for less than the deployment was sized for."""

import pytest

from qfl.clients.secure import NodePins
from qfl.config import resolve_config
from qfl.errors import SecAggError, SecAggReason
from qfl.security import secagg as sa
from qfl.security.graph import sparse_degree

SHAPES = {"w": (4, 5)}


def _plan(n, **values):
    cfg = resolve_config({"security": "masked-sum", "codec": "qsgd", "clients": n, **values})
    return sa.make_plan(cfg, 1, list(range(n)), SHAPES, {"w": 1.0}, round_seed=1)


def _refused(pins, plan):
    with pytest.raises(SecAggError) as err:
        pins.check(plan)
    assert err.value.reason is SecAggReason.SETUP and "this node refuses round 1" in str(err.value)
    return str(err.value)


def test_a_node_without_pins_takes_any_plan():
    for values in ({}, {"secure_masking": "single"}, {"secure_corrupt": 0.0, "secure_degree": 2}):
        NodePins.from_node_config({"partition-id": 0, "num-partitions": 40}).check(_plan(40, **values))


def test_masking_and_self_mask_pins_refuse_a_weaker_form():
    double = NodePins.from_node_config({"secure-masking": "double"})
    double.check(_plan(8))
    assert "secure-masking=double" in _refused(double, _plan(8, secure_masking="single"))
    vector = NodePins.from_node_config({"secure-self-mask": "vector"})
    vector.check(_plan(8, secure_self_mask="vector"))
    assert "the server asked for 'seed'" in _refused(vector, _plan(8))  # a ChaCha20 seed: computational only
    assert "'single' masking" in _refused(vector, _plan(8, secure_masking="single"))  # no self-mask at all


def test_a_corrupt_pin_refuses_a_thin_graph_and_a_lowered_colluder_allowance():
    n = 200
    pins = NodePins.from_node_config({"secure-corrupt": 0.05, "secure-dropout": 0.1})
    honest = _plan(n, secure_corrupt=0.05, secure_dropout=0.1)
    assert honest.degree > 0  # sparse: the pin must accept what an honest server sized for the same γ and δ
    pins.check(honest)
    pins.check(_plan(n, secure_corrupt=0.1))  # more than asked for: fine
    pins.check(_plan(n, secure_corrupt=0.05, secure_graph="full"))
    least = sparse_degree(n, 0.1, 0.05)
    assert f"degree >= {least}" in _refused(pins, _plan(n, secure_corrupt=0.05, secure_degree=least - 4))
    lowered = _plan(n, secure_corrupt=0.0, secure_dropout=0.1, secure_degree=honest.degree)
    assert lowered.colluders == 0 and "resist 0" in _refused(pins, lowered)
    # in the full graph the allowance is ⌊γ·n⌋
    small = NodePins.from_node_config({"secure-corrupt": 0.25})
    assert "2 colluding peers" in _refused(small, _plan(8, secure_corrupt=0.0, secure_graph="full"))
    small.check(_plan(8, secure_corrupt=0.25, secure_graph="full"))
    # a γ that no sparse degree satisfies asks for the full graph
    assert "needs the full graph" in _refused(NodePins(corrupt=0.4), _plan(n, secure_corrupt=0.05))


@pytest.mark.parametrize("config, key", [({"secure-masking": "triple"}, "secure-masking"),
                                         ({"secure-self-mask": "zeros"}, "secure-self-mask"),
                                         ({"secure-corrupt": "lots"}, "secure-corrupt"),
                                         ({"secure-corrupt": 1.5}, "secure-corrupt"),
                                         ({"secure-dropout": -0.1}, "secure-dropout")])
def test_a_pin_that_is_not_one_names_its_key(config, key):
    with pytest.raises(SecAggError) as err:
        NodePins.from_node_config(config)
    assert err.value.reason is SecAggReason.SETUP and str(err.value).startswith(f"this node's {key}=")
