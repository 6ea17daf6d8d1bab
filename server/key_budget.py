"""The server's view of the key layer during a run: the QKD network, the budget, the accounting.

With ``key_source = "store"`` (simulations) the server builds the simulated
QKD network (:class:`qfl.quantum.qkd.network.QuantumNetwork`) over the SAEs
``server`` and ``client-0 … client-(n−1)``, depositing into the SQLite pools
at ``key_store`` (default ``<run dir>/keys.db``) that the clients open too.
The network is lazy: a link exists (in the store, and in every tick) only
from the first round whose plan needs it, credited on arrival with the key it
made since the clock's start (:meth:`QuantumNetwork.ensure`), so a run's key
work and store size follow the sampled clients and the masking graph, never
the ``n(n−1)/2`` pairs of all clients. The server owns the simulated clock:

- each round first advances it by ``qkd_round_s`` (the key the links make
  while a round runs);
- :meth:`KeyBudget.admit` then compares each link's cost for the round with
  its pool and applies ``key_policy``: ``wait`` advances the clock until the
  links have made the missing key, ``skip`` leaves out the clients whose links
  are short, ``abort`` stops the run with :class:`KeyBudgetExceeded` (the last
  checkpoint stays valid; resume once the pools are refilled or the policy is
  changed).
- The clock and the links' generation state live in the store (see
  :mod:`qfl.quantum.qkd.network`): a resumed run's network continues from the
  store's clock, whatever metrics.json says, so a crash between a tick and the
  round's record never makes key for the same simulated time twice. Key bits
  come from the OS CSPRNG, never from the run seed (``seed`` only drives the
  BB84 Monte-Carlo physics below).
- A link whose admission run of BB84 aborted (an eavesdropper pushing the
  QBER over the threshold) makes no key; whatever the policy, the clients that
  depend on it are left out, and the log says which link and why.

Accounting: :meth:`usage` reads ``used_bits`` of every link from the store, so
``key_bits_used`` is what the pools actually gave out (the ledger), summed over
the *direct* (physical) links: relayed key (star topology) costs one bit on
each hop and is counted there.

With ``key_source = "kms"`` the pools live behind the KMS; the server sees only
its own links, so it checks nothing in advance: a client whose key request
fails replies with an error and is dropped from the round.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qfl.config import RunConfig
from qfl.errors import KeyBudgetExceeded
from qfl.quantum.qkd.bb84 import simulate_bb84
from qfl.quantum.qkd.network import DirectLink, QuantumNetwork, RelayedLink, parse_link_spec
from qfl.security.keys.source import KeyExhausted, KeySource
from qfl.security.keys.sources import KeySourceConfig, open_key_source
from qfl.security.keys.store import KeyStore, link_name
from qfl.security.secagg import SERVER_SAE, client_sae, network_nodes

log = logging.getLogger("qfl.keys")

MIN_EVE_CHECK_PULSES = 1_000_000


@dataclass
class Admission:
    """Who takes part in a round after the key budget, and what it cost in simulated time."""

    participants: list[int]
    waited_s: float = 0.0
    left_out: dict[int, str] = field(default_factory=dict)  # partition id -> reason


class KeyBudget:
    """Key source, network and budget of one run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.store_path = Path(cfg.key_store) if cfg.key_store else Path(run_dir) / "keys.db"
        self.source: KeySource = open_key_source(
            KeySourceConfig(cfg.key_source, str(self.store_path), cfg.kms_url, cfg.kms_certs), SERVER_SAE
        )
        self.store: KeyStore | None = None
        self.network: QuantumNetwork | None = None
        self.dead: dict[str, str] = {}  # link -> why it makes no key
        self.eve: dict[tuple[str, str], float] = {}  # eavesdropped link -> intercepted fraction
        if cfg.key_source == "store":
            self.store = self.source  # type: ignore[assignment]
            self.network = self._build_network()

    # -- the network ---------------------------------------------------------------------------

    def _build_network(self) -> QuantumNetwork:
        cfg = self.cfg
        nodes = network_nodes(cfg.clients)
        assert self.store is not None  # a network is built only over a key store (key_source = "store")
        overrides = {pair: {"distance_km": km} for pair, km in parse_link_spec(cfg.qkd_links, nodes).items()}
        net = QuantumNetwork.build(
            self.store, nodes, cfg.qkd_topology, hub=SERVER_SAE if cfg.qkd_topology == "star" else None,
            bits_per_s=cfg.qkd_rate or None, distance_km=cfg.qkd_distance_km, overrides=overrides, lazy=True,
            relays=cfg.qkd_relays if cfg.qkd_topology == "trusted" else 0,
        )
        self.eve = parse_link_spec(cfg.qkd_eavesdropped, nodes, default=1.0)
        for pair in self.eve:
            if not net.is_direct(*pair):
                raise ValueError(f"qkd_eavesdropped names {link_name(*pair)}, which is not a direct link of the "
                                 f"{cfg.qkd_topology} network")
        self.network = net
        self.ensure_links(sorted(self.eve))  # the named links exist from the start: their BB84 runs are in the log
        return net

    def ensure_link(self, a: str, b: str) -> None:
        """:meth:`ensure_links` for one link."""
        self.ensure_links([(a, b)])

    def ensure_links(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Add the links of ``pairs`` that are new to the network (the network is lazy: only links a round
        needs exist), and admit each new direct link with a BB84 run when it is eavesdropped or
        ``qkd_check_pulses`` asks for one."""
        net = self.network
        assert net is not None  # only called with a network, i.e. with a key store
        pairs = list(pairs)
        before = set(net.direct)
        net.ensure_all(pairs)
        for name in sorted(set(net.direct) - before):
            self._admit_link(net.direct[name])
        for a, b in pairs:
            link = net.link(a, b)
            if isinstance(link, RelayedLink):
                bad = [link_name(x, y) for x, y in link.hops if link_name(x, y) in self.dead]
                if bad:
                    self.dead[link.name] = f"it is relayed over {', '.join(bad)}, which makes no key"

    def _admit_link(self, link: DirectLink) -> None:
        cfg = self.cfg
        fraction = self.eve.get((link.a, link.b), 0.0)
        pulses = max(cfg.qkd_check_pulses, MIN_EVE_CHECK_PULSES) if fraction else cfg.qkd_check_pulses
        if not pulses:
            return
        result = simulate_bb84(pulses, link.distance_km, eve_fraction=fraction,
                               seed=[cfg.seed, zlib.crc32(link.name.encode())])
        if result.aborted and result.qber is not None and "QBER" in (result.abort_reason or ""):
            link.bits_per_s = 0.0
            self.dead[link.name] = f"its BB84 run aborted: {result.abort_reason}"
            log.warning("QKD link %s makes no key: %s", link.name, self.dead[link.name])

    @property
    def clock_s(self) -> float:
        return self.network.now if self.network is not None else 0.0

    def tick(self) -> None:
        """The key the links make while one round runs (``qkd_round_s`` of simulated time).

        First wipes the keys earlier rounds took but never used (a master's key
        whose slave never fetched it: :meth:`~qfl.security.keys.store.KeyStore.expire_undelivered`),
        then scrubs the store's WAL, so the previous round's key leaves the files
        (see :meth:`qfl.security.keys.store.KeyStore.scrub`).
        """
        if self.store is not None:
            self.store.expire_undelivered(time.time())
            self.store.scrub()
        if self.network is not None and self.cfg.qkd_round_s > 0:
            self.network.advance(self.cfg.qkd_round_s)

    def close(self) -> None:
        """End of the run: wipe unused taken keys, scrub the store's WAL, close this thread's connection."""
        if self.store is not None:
            self.store.expire_undelivered(time.time())
            self.store.scrub(idle=True)  # every round is over: a stray held-key file (a kill -9 before) goes too
            self.store.close()

    # -- admission -----------------------------------------------------------------------------

    def _shortfalls(self, needs: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        assert self.store is not None  # only called with a network, i.e. with a key store
        short = {}
        for (a, b), bits in needs.items():
            left = self.store.status(a, b).left_bits
            if left < bits:
                short[(a, b)] = bits - left
        return short

    def admit(self, participants: list[int], needs: dict[tuple[str, str], int]) -> Admission:
        """Apply ``key_policy`` to the round's per-link costs ``needs`` (bits)."""
        result = Admission(sorted(participants))
        if self.network is None:
            return result
        net = self.network
        self.ensure_links(sorted(needs))
        short = self._shortfalls(needs)
        for (a, b), missing in short.items():  # a relay from key already on the hops costs no time
            if isinstance(net.link(a, b), RelayedLink) and link_name(a, b) not in self.dead:
                net.supply(a, b, missing, wait=False)
        short = self._shortfalls(needs)
        live = {pair: m for pair, m in short.items() if link_name(*pair) not in self.dead}
        if live and self.cfg.key_policy == "abort":
            worst = ", ".join(f"{link_name(*p)} short by {m} bits" for p, m in sorted(live.items())[:5])
            raise KeyBudgetExceeded(
                f"the QKD pools cannot pay for this round ({worst}); key_policy=abort stops here. Resume with "
                "`qfl run --resume DIR` after changing key_policy to wait or skip, or send fewer key bits "
                "(a codec with fewer bits, or security=expanded)"
            )
        if live and self.cfg.key_policy == "wait":
            start = net.now
            for a, b in sorted(live):
                try:
                    still = self._shortfalls({(a, b): needs[(a, b)]}).get((a, b), 0)
                    if still:
                        net.supply(a, b, still, wait=True)
                except KeyExhausted:
                    self.dead.setdefault(link_name(a, b), "it makes no key (rate 0)")
            result.waited_s = net.now - start
            short = self._shortfalls(needs)
        # What is still short (dead links; every short link under "skip") leaves clients out.
        remaining = {pair: m for pair, m in short.items()}
        people = set(result.participants)
        while True:
            active = {p: m for p, m in remaining.items() if all(_pid(x) is None or _pid(x) in people for x in p)}
            if not active:
                break
            counts: dict[int, int] = {}
            for pair in active:
                for node in pair:
                    if (pid := _pid(node)) is not None:
                        counts[pid] = counts.get(pid, 0) + 1
            victim = max(counts, key=lambda p: (counts[p], p))
            pair = next(p for p in sorted(active) if client_sae(victim) in p)
            why = self.dead.get(link_name(*pair)) or f"holds {needs[pair] - active[pair]} of the {needs[pair]} bits needed"
            result.left_out[victim] = f"link {link_name(*pair)} {why}" if why.startswith("holds") else (
                f"link {link_name(*pair)} makes no key: {why}")
            log.warning("round: client %s left out; %s", victim, result.left_out[victim])
            people.discard(victim)
        result.participants = sorted(people)
        return result

    # -- accounting ----------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """used_bits of every link in the store (empty without a store)."""
        if self.network is None:
            return {}
        return {name: self._status(name).used_bits for name in self.network.links()}

    def pools(self, links: Iterable[str]) -> dict[str, int]:
        """left_bits of each of ``links`` (those of the network; empty without a store)."""
        if self.network is None:
            return {}
        return {name: self._status(name).left_bits for name in sorted(links)
                if name in self.network.direct or name in self.network.relayed}

    def _status(self, name: str):
        a, _, b = name.partition("~")
        assert self.store is not None  # only called with a network, i.e. with a key store
        return self.store.status(a, b)

    def physical(self, per_link: dict[str, int]) -> int:
        """Bits of ``per_link`` spent on direct (physical) links."""
        if self.network is None:
            return sum(per_link.values())
        return sum(bits for name, bits in per_link.items() if name in self.network.direct)


def _pid(node: str) -> int | None:
    return int(node.split("-", 1)[1]) if node.startswith("client-") else None
