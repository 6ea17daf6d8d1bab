"""The server's key budget over the simulated QKD network: policies, dead links, accounting."""

import pytest

from qfl.config import ConfigError, resolve_config
from qfl.security.secagg import SERVER_SAE, client_sae
from qfl.server.key_budget import KeyBudget, KeyBudgetExceeded
from qfl.server.preflight import check_components


def _cfg(**values):
    base = {"security": "masked-sum", "clients": 4, "qkd_rate": 1000.0, "qkd_round_s": 0.0}
    return check_components(resolve_config({**base, **values}))


def _pair_needs(pids, bits):
    needs = {tuple(sorted((client_sae(i), SERVER_SAE))): 256 for i in pids}
    needs.update({tuple(sorted((client_sae(i), client_sae(j)))): bits for i in pids for j in pids if i < j})
    return needs


def test_wait_advances_the_simulated_clock_until_the_links_made_the_key(tmp_path):
    budget = KeyBudget(_cfg(key_policy="wait"), tmp_path)
    admission = budget.admit([0, 1, 2, 3], _pair_needs(range(4), 8_000))
    assert admission.participants == [0, 1, 2, 3] and not admission.left_out
    # 8,000 bits at 1,000 bits/s: 8 simulated seconds
    assert admission.waited_s == pytest.approx(8.0, abs=0.01)
    assert budget.clock_s == pytest.approx(8.0, abs=0.01)


def test_skip_leaves_out_the_clients_whose_links_are_short(tmp_path):
    budget = KeyBudget(_cfg(key_policy="skip", qkd_links="client-3~server=60, client-2~client-3=60"), tmp_path)
    budget.ensure_link("client-3", "server")
    budget.network.direct["client-3~server"].bits_per_s = 10.0  # a slow link
    budget.network.advance(10.0)  # 10,000 bits on every link but client-3~server (100); the others are
    # added by admit (the network is lazy) with the key they made in those 10 s
    admission = budget.admit([0, 1, 2, 3], _pair_needs(range(4), 8_000))
    assert admission.participants == [0, 1, 2]
    assert "client-3~server" in admission.left_out[3] and admission.waited_s == 0


def test_abort_stops_with_the_fix_named(tmp_path):
    budget = KeyBudget(_cfg(key_policy="abort"), tmp_path)
    with pytest.raises(KeyBudgetExceeded) as err:
        budget.admit([0, 1], _pair_needs(range(2), 8_000))
    assert "--resume" in str(err.value)  # the message names the way on


def test_an_eavesdropped_link_makes_no_key_and_its_client_sits_out(tmp_path):
    budget = KeyBudget(_cfg(key_policy="wait", qkd_eavesdropped="client-1~client-2"), tmp_path)
    assert "client-1~client-2" in budget.dead and "QBER" in budget.dead["client-1~client-2"]
    admission = budget.admit([0, 1, 2, 3], _pair_needs(range(4), 8_000))
    assert len(admission.participants) == 3 and set(admission.left_out) <= {1, 2}
    (reason,) = admission.left_out.values()
    assert "client-1~client-2 makes no key" in reason and "QBER" in reason


def test_star_relays_pair_key_through_the_server(tmp_path):
    budget = KeyBudget(_cfg(key_policy="wait", qkd_topology="star"), tmp_path)
    budget.network.advance(20.0)  # 20,000 bits on every client~server link
    admission = budget.admit([0, 1], _pair_needs(range(2), 8_000))
    assert admission.participants == [0, 1] and admission.waited_s == 0
    assert budget.network.stats()["client-0~client-1"]["relayed_bits"] == 8_000
    usage = budget.usage()
    assert usage["client-0~server"] == 8_000 and usage["client-1~server"] == 8_000  # one bit per hop


@pytest.mark.parametrize(
    "values,key",
    [
        ({"qkd_links": "client-0~client-9=5"}, "qkd_links"),  # a node that does not exist
        ({"qkd_links": "client-0~server=far"}, "qkd_links"),  # not a number
        ({"qkd_eavesdropped": "client-0~server:1.5"}, "qkd_eavesdropped"),  # outside (0, 1]
        ({"key_policy": "pray"}, "key_policy"),
        ({"secure_min_clients": 1}, "secure_min_clients"),
        ({"key_source": "kms"}, "kms_url"),  # the KMS needs its URL
    ],
)
def test_bad_key_settings_are_config_errors(values, key):
    with pytest.raises(ConfigError) as err:
        _cfg(**values)
    assert err.value.key == key


@pytest.mark.parametrize("topology", ["mesh", "star"])
def test_the_network_holds_only_the_links_a_round_needs_with_the_key_an_eager_one_would(tmp_path, topology):
    """1,000 clients, 4 sampled: the store gets the sampled clients' links only, and a link added at
    simulated second 7.5 holds what a link ticked since 0 holds."""
    from qfl.quantum.qkd.network import QuantumNetwork
    from qfl.security.keys.store import KeyStore

    budget = KeyBudget(_cfg(clients=1000, qkd_rate=1000.3, qkd_topology=topology, qkd_round_s=2.5), tmp_path)
    for _ in range(3):
        budget.tick()
    sampled = [3, 141, 592, 653]
    admission = budget.admit(sampled, _pair_needs(sampled, 2_000))
    assert admission.participants == sampled
    assert len(budget.store.links()) == 4 + 6  # 4 client~server links and 6 pair links (direct or relayed)
    eager = QuantumNetwork.build(KeyStore(tmp_path / "eager.db"), ["server", "client-3", "client-141"], topology,
                                 hub="server" if topology == "star" else None, bits_per_s=1000.3)
    for _ in range(3):
        eager.advance(2.5)
    lazy_link = budget.network.link("client-3", "server")
    eager_link = eager.link("client-3", "server")
    assert (lazy_link.made_bits, lazy_link.pending_bits) == (eager_link.made_bits, eager_link.pending_bits)
    assert lazy_link.carry == pytest.approx(eager_link.carry)


def test_trusted_relays_carry_pair_key_over_access_and_backbone_links(tmp_path):
    """qkd_topology = trusted, 3 relays: client-0 and client-3 share relay-0 (2 hops), client-0 and
    client-1 sit on relay-0 and relay-1 (3 hops, one backbone link); every hop spends the pair's bits."""
    budget = KeyBudget(_cfg(clients=6, key_policy="wait", qkd_topology="trusted", qkd_relays=3), tmp_path)
    net = budget.network
    assert net.path("client-0", "client-3") == ("client-0", "relay-0", "client-3")
    assert net.path("client-0", "client-1") == ("client-0", "relay-0", "relay-1", "client-1")
    assert net.path("client-4", "server") == ("client-4", "relay-1", "relay-0", "server")
    admission = budget.admit([0, 1, 3], _pair_needs([0, 1, 3], 8_000))
    assert admission.participants == [0, 1, 3]
    for a, b in (("client-0", "client-1"), ("client-0", "client-3"), ("client-1", "client-3")):
        assert budget.store.status(a, b).left_bits >= 8_000  # relayed into the pair's pool
    usage = budget.usage()
    assert usage["client-0~relay-0"] >= 2 * 8_000  # client-0's access link carries both of its pairs
    assert usage["relay-0~relay-1"] >= 2 * 8_000  # 0~1 and 1~3 cross the backbone
    assert not any(budget.store.has_link("client-0", x) for x in ("client-2", "client-5"))  # nobody asked


def test_the_topology_table_charges_every_hop_and_names_who_reads_the_keys(capsys):
    from qfl.cli import main
    from qfl.simulations.keybudget import topology_rows

    rows = {r["topology"]: r for r in topology_rows(ns=(10,), relays=2)}
    mesh, star, trusted = rows["mesh"], rows["star"], rows["trusted"]
    assert mesh["physical_links"] == 45 + 10 and star["physical_links"] == 10
    assert trusted["physical_links"] == 1 + 11  # one backbone link, an access link per client and the server
    # a star's hub link carries every pair of its client (9) plus its MACs; a mesh link one pair
    assert star["busiest_link_bits"] == 9 * mesh["pair_key_bits"] + 256
    assert mesh["rounds_per_hour"] > star["rounds_per_hour"] and "server" in star["pair_keys_readable_by"]
    assert main(["experiment", "key-budget", "--topologies-only", "--clients", "6"]) == 0
    assert "trusted (4 relays)" in capsys.readouterr().out
