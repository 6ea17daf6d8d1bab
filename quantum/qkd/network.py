"""A network of QKD links on a simulated clock, filling the pools of a :class:`KeyStore`.

Nodes are SAEs (the server, clients). A *direct* link is a physical QKD link
with its own distance and key rate; on :meth:`QuantumNetwork.advance` it makes
``floor(rate · t)`` new bits (fractions of a bit carry over to the next tick)
and deposits them into the link's pool in the store. Two topologies:

- ``mesh``: a direct link between every pair of nodes.
- ``star``: a direct link between a hub (a trusted node; in federated learning
  usually the server) and every leaf. Two leaves share key through a *relayed*
  link: hop-by-hop XOR key relay through the hub.
- ``trusted``: ``h`` trusted relay nodes (``relay-0 … relay-(h−1)``, e.g.
  metro QKD switches run by a party other than the FL server) joined by a
  full mesh of backbone links; every other node has one access link to the
  relay ``attach(node)`` picks (client ``i`` to ``relay-(i mod h)``, the
  server to ``relay-0``). Two nodes share key over the path node → its relay
  → (the other's relay) → node: 2 or 3 hops, each relayed bit spent on each.
  This is how deployed networks reach many users (SECOQC, Tokyo QKD,
  Beijing–Shanghai); a full mesh of fibres between ``n`` users is not.
  **Each relay learns every key it relays**: masked sums stay hidden from the
  server only while no relay on a pair's path colludes with it.

Relay (trusted-node key relay, as in the SECOQC / Tokyo QKD networks). To make
``n`` bits for the leaves A and B through hub R:

1. A and R take ``k1`` (n bits) from the pool of the direct link A–R;
2. R and B take ``k2`` (n bits) from the pool of the direct link R–B;
3. R publishes ``m = k1 ⊕ k2`` on the public (authenticated) classical channel;
4. B computes ``m ⊕ k2 = k1``; A already holds ``k1``. ``k1`` goes into the
   pool of the relayed link A~B.

``m`` alone says nothing about ``k1`` (it is one-time-padded by ``k2``), so an
eavesdropper on the classical channel learns nothing. **The relay learns the
key**: R holds both ``k1`` and ``k2``. Relayed key is only as secret as the
relay is trustworthy — the defining assumption of trusted-node networks. In a
star whose hub is the FL server, the server can read every pairwise mask made
this way, so masked-sum aggregation over relayed pairwise keys hides updates
from outsiders but not from the server; a mesh (or an untrusted-relay
technology such as MDI-QKD) is needed for that.

Every relayed bit costs one bit of key on *each* hop; the ledgers of the direct
links record the intervals consumed (state ``relayed``), and
:meth:`QuantumNetwork.stats` counts them. A relay is one store transaction:
either every hop gives its key and the relayed pool receives it, or nothing
changes (a hop short of key raises KeyExhausted). Paths with several relays
(``via=[r1, r2, …]``) work the same way: each relay publishes the XOR of its
two hop keys, B XORs everything published with its own hop key.

Relayed pools are filled on demand — :meth:`relay`, or :meth:`supply`, which
the server's key budget (``key_policy``) calls — never automatically on
a tick, so the direct links' key is not spent on pairs that never ask.

Rates. ``bits_per_s`` is a number of secret-key bits per second, a function
``f(distance_km) -> bits/s``, a :class:`qfl.quantum.qkd.keyrate.LinkParams`, or
None — then the analytic decoy-BB84 model of :mod:`qfl.quantum.qkd.keyrate` (its
default, GYS-experiment parameters, 1 GHz) gives the *finite-key* rate at the
link's ``distance_km``: the Lim et al. (2014) secure length of a block of
``keyrate.DEFAULT_BLOCK_PULSES`` = 10^10 pulses (10 s at 1 GHz) at
eps_sec = ``keyrate.DEFAULT_EPS_SEC`` = 1e-10, divided by the block's duration
(:func:`qfl.quantum.qkd.keyrate.finite_key_bits_per_s`). Over whole blocks the clock
so hands out at most the finite-key secure length. At 10 km that is 844 kbit/s
(the asymptotic rate, used before, was 1.40 Mbit/s); blocks of 10^10 pulses give
no key beyond about 69 km — pass ``bits_per_s`` (e.g. from
``keyrate.finite_key_bits_per_s`` with a larger block) for longer links. The
rate is fixed when the link is added.

Randomness. Key bits always come from the OS CSPRNG (:func:`secrets.token_bytes`),
never from a seeded generator: a run seed is public (it is in config.toml), so
key derived from it would be known to anyone. Masks cancel in the aggregate, so
runs stay reproducible although their key differs.

Lazy materialisation. A tick does not write key: it *credits* each direct link
with the whole bytes its clock made (:meth:`qfl.security.keys.store.StoreTransaction.credit`);
the store draws them from the CSPRNG inside the transaction of the take that
needs them. So the store holds no key that nobody takes, and the accounting —
made/used/left bits, :meth:`time_to_make`, :meth:`supply`, KeyExhausted — is the
same as if every tick had deposited its key. A relay takes from its hops the
same way (materialising what they lack) and deposits only the relayed bits.

State. The clock (``now``) and every direct link's clock state (whole bits
made, bits pending until a whole byte, the fraction of a bit carried) live in
the store and are written in the same transaction as the tick's credits; the
attributes of :class:`DirectLink` mirror them. A network rebuilt on the same
store (a resumed run) continues from the last committed tick, so no simulated
second makes key twice. One network object drives a store's clock at a time
(typically the server of a simulation); every process can take from the pools.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from qfl.quantum.qkd import keyrate
from qfl.security.keys.source import KeyExhausted, UnknownLink
from qfl.security.keys.store import GeneratorState, KeyStore, link_name

if TYPE_CHECKING:
    from qfl.quantum.qkd.keyrate import LinkParams

__all__ = ["DirectLink", "QuantumNetwork", "RelayedLink", "RelayRecord", "parse_link_spec", "resolve_rate"]

RateSpec = float | int | Callable[[float], float]
_EPS_BITS = 1e-6  # float slack when flooring rate·t (a tick never makes more than 1e-6 bit extra)
DEFAULT_DISTANCE_KM = 10.0


def resolve_rate(bits_per_s: RateSpec | object | None, distance_km: float) -> float:
    """Secret-key bits per second of a link of ``distance_km``.

    ``bits_per_s`` is a number, a function ``f(distance_km) -> bits/s``, a
    :class:`qfl.quantum.qkd.keyrate.LinkParams` (the analytic decoy-BB84 model,
    evaluated at ``distance_km``), or ``None``: the analytic model with its
    default parameters (the GYS experiment, 1 GHz source) at ``distance_km``.
    The analytic model gives the finite-key rate for blocks of
    ``keyrate.DEFAULT_BLOCK_PULSES`` pulses at ``keyrate.DEFAULT_EPS_SEC`` (see
    the module docstring), never the asymptotic one.
    """
    if bits_per_s is None or _is_link_params(bits_per_s):
        return _keyrate_bits_per_s(bits_per_s, distance_km)
    if isinstance(bits_per_s, bool):
        raise ValueError(f"bits_per_s must be a number, got {bits_per_s!r}")
    if isinstance(bits_per_s, (int, float)):
        rate = float(bits_per_s)
    elif callable(bits_per_s):
        rate = float(bits_per_s(distance_km))
    else:
        raise ValueError(
            f"bits_per_s must be a number, a function of distance_km, a keyrate.LinkParams or None, got {bits_per_s!r}"
        )
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"a key rate is a finite number of bits/s >= 0, got {rate!r}")
    return rate


def _is_link_params(obj: object) -> TypeGuard[LinkParams]:
    return isinstance(obj, keyrate.LinkParams)


@lru_cache(maxsize=4096)
def _keyrate_bits_per_s(params: LinkParams | None, distance_km: float) -> float:
    """Adapter to :mod:`qfl.quantum.qkd.keyrate`: finite-key secret bits/s at ``distance_km``.

    ``l(N) * pulse_rate_hz / N`` with ``l`` the finite-key length of a block of
    N = ``keyrate.DEFAULT_BLOCK_PULSES`` pulses at eps_sec = ``keyrate.DEFAULT_EPS_SEC``.
    Cached: the rate is a pure function of the (frozen) parameters and the
    distance, and a mesh has thousands of links of a few lengths (evaluating
    it once per link, with its optimisation over the pulse intensity, took
    2.6 ms: 13 s for the 4,950 new links of a 100-client round).
    """
    p = keyrate.LinkParams(distance_km=distance_km) if params is None else params.with_distance(distance_km)
    return float(keyrate.finite_key_bits_per_s(p, keyrate.DEFAULT_BLOCK_PULSES, eps_sec=keyrate.DEFAULT_EPS_SEC))


@dataclass
class DirectLink:
    """A physical QKD link and its clock-side counters."""

    name: str
    a: str
    b: str
    distance_km: float
    bits_per_s: float
    made_bits: int = 0  # exact whole bits made by the clock (mirrors the store's gen_bits)
    deposited_bits: int = 0  # bits credited to the store's pool (made_bits − pending_bits)
    pending_bits: int = 0  # < 8 bits made but not yet a whole byte; credited with the next tick
    carry: float = 0.0  # fraction of a bit made, carried to the next tick
    relay_bits: int = 0  # bits of this link's pool consumed by relays (this object's relays)

    def _load(self, state: GeneratorState) -> None:
        self.made_bits, self.pending_bits, self.carry = state.gen_bits, state.pending_bits, state.carry
        self.deposited_bits = state.gen_bits - state.pending_bits


@dataclass
class RelayedLink:
    """A leaf–leaf link whose pool is filled by XOR key relay along ``path`` (both ends included)."""

    name: str
    a: str
    b: str
    path: tuple[str, ...]
    relayed_bits: int = 0

    @property
    def hops(self) -> list[tuple[str, str]]:
        return list(itertools.pairwise(self.path))


@dataclass(frozen=True)
class RelayRecord:
    """What one relay did: the bits made for a~b, and what each relay published (public)."""

    link: str
    bits: int
    published: tuple[bytes, ...]


def _xor(x: bytes, y: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(x, np.uint8), np.frombuffer(y, np.uint8)).tobytes()


class QuantumNetwork:
    """QKD links between nodes, on a simulated clock, depositing into ``store``."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.nodes: list[str] = []
        self.direct: dict[str, DirectLink] = {}
        self.relayed: dict[str, RelayedLink] = {}
        self.topology = "mesh"
        self.hub: str | None = None
        self.relays: list[str] = []
        self._params: Callable[[str, str], dict[str, Any]] = lambda a, b: {}

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        store: KeyStore,
        nodes: Sequence[str],
        topology: str = "mesh",
        *,
        hub: str | None = None,
        bits_per_s: RateSpec | object | None = None,
        distance_km: float | None = None,
        overrides: Mapping[tuple[str, str], Mapping[str, object]] | None = None,
        lazy: bool = False,
        relays: int = 0,
    ) -> QuantumNetwork:
        """A ``mesh`` over ``nodes``, or a ``star`` around ``hub`` (one of ``nodes`` or a node of its own).

        ``bits_per_s`` / ``distance_km`` apply to every direct link;
        ``overrides[(a, b)] = {"distance_km": …, "bits_per_s": …}`` changes one.
        ``relays``: the number ``h`` of trusted relay nodes of topology ``trusted``.
        ``lazy``: add no link now; :meth:`ensure` adds each link the first time
        it is needed, with the key it would have made since the clock's start
        (the pools hold exactly what an eager network's would, but the store
        and every tick touch only the links in use: O(links used), not O(n²)).
        """
        nodes = list(dict.fromkeys(nodes))
        net = cls(store)
        by_pair = {frozenset(k): dict(v) for k, v in (overrides or {}).items()}

        def params(a: str, b: str) -> dict[str, Any]:  # add_link's keyword arguments
            p: dict[str, Any] = {"bits_per_s": bits_per_s, "distance_km": distance_km}
            p.update(by_pair.get(frozenset((a, b)), {}))
            return p

        if topology == "mesh" and hub is not None:
            raise ValueError("hub is for topology 'star'; a mesh has a direct link per pair")
        if topology == "star" and hub is None:
            raise ValueError("topology 'star' needs hub= (the trusted relay node, e.g. the server)")
        if topology not in ("mesh", "star", "trusted"):
            raise ValueError(f"topology must be 'mesh', 'star' or 'trusted', got {topology!r}")
        if (topology == "trusted") != (relays > 0):
            raise ValueError("topology 'trusted' needs relays >= 1 (and only it takes relays)")
        net.topology, net.hub, net._params = topology, hub, params
        net.relays = [f"relay-{r}" for r in range(relays)]
        for node in [*net.relays, *nodes]:
            net.add_node(node)
        if topology == "trusted":
            nodes = net.relays  # eagerly: the backbone; the access links come with the pairs that need them
        if not lazy:
            net.ensure_all(itertools.combinations(nodes, 2))
        return net

    def is_direct(self, a: str, b: str) -> bool:
        """Whether the topology joins a and b by a physical link (mesh: every pair; star: hub–leaf;
        trusted: relay–relay and node–its relay)."""
        if self.topology == "trusted":
            return (a in self.relays and b in self.relays) or self.attach(a) == b or self.attach(b) == a
        return self.topology == "mesh" or self.hub in (a, b)

    def attach(self, node: str) -> str | None:
        """The relay a non-relay node's access link goes to (topology ``trusted``; None otherwise)."""
        if self.topology != "trusted" or node in self.relays:
            return None
        index = int(node.rsplit("-", 1)[1]) if node.startswith("client-") else 0
        return self.relays[index % len(self.relays)]

    def path(self, a: str, b: str) -> tuple[str, ...]:
        """The nodes key between a and b passes through, both ends included."""
        if self.is_direct(a, b):
            return (a, b)
        if self.topology == "star":
            assert self.hub is not None
            return (a, self.hub, b)
        ra, rb = self.attach(a) or a, self.attach(b) or b
        return tuple(dict.fromkeys((a, ra, rb, b)))

    def ensure(self, a: str, b: str) -> DirectLink | RelayedLink:
        """The link a~b of the topology, added now if it is not yet (see ``lazy`` in :meth:`build`)."""
        self.ensure_all([(a, b)])
        return self.link(a, b)

    def ensure_all(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Add every link of ``pairs`` the network lacks (and, in a star, the hops a relayed one needs).

        The new links enter the store in one transaction; each new direct link
        is then credited the key it made since the clock's start
        (:meth:`_catch_up`), all in a second one. Two disk syncs, however many links.
        """
        wanted: list[tuple[str, str]] = []
        for a, b in pairs:
            for node in (a, b):
                if node not in self.nodes:
                    raise UnknownLink(f"{node!r} is not a node of this network")
            wanted += list(itertools.pairwise(self.path(a, b)))  # the hops first
            wanted.append((a, b))
        new = [p for p in dict.fromkeys(wanted) if link_name(*p) not in self.direct and link_name(*p) not in self.relayed]
        new = list({link_name(*p): p for p in new}.values())
        if not new:
            return
        self.store.add_links(new)
        fresh = []
        for a, b in new:
            if self.is_direct(a, b):
                fresh.append(self._add_direct(a, b, **self._params(a, b)))
            else:
                self._add_relayed(a, b, self.path(a, b))
        self._catch_up(fresh)

    def _catch_up(self, links: Sequence[DirectLink]) -> None:
        """Credit each link what its clock made from 0 to :attr:`now` beyond what the store records.

        ``floor(rate · now)`` bits in all (the fraction carries), less the
        bits the store already counts: a no-op for a link that was ticked all
        along, the whole history for one added now. One transaction.
        """
        states: dict[str, GeneratorState] = {}
        with self.store.transaction() as tx:
            now = tx.clock()
            for link in links:
                old = tx.generator(link.a, link.b)
                total = link.bits_per_s * now
                made = math.floor(total + _EPS_BITS)
                if made <= old.gen_bits:
                    continue
                whole = old.pending_bits + made - old.gen_bits
                states[link.name] = GeneratorState(made, whole % 8, max(total - made, 0.0))
                tx.credit(link.a, link.b, 8 * (whole // 8), states[link.name])
        for link in links:
            if link.name in states:
                link._load(states[link.name])

    @classmethod
    def mesh(cls, store: KeyStore, nodes: Sequence[str], **kwargs: Any) -> QuantumNetwork:
        return cls.build(store, nodes, "mesh", **kwargs)

    @classmethod
    def star(cls, store: KeyStore, nodes: Sequence[str], hub: str, **kwargs: Any) -> QuantumNetwork:
        return cls.build(store, nodes, "star", hub=hub, **kwargs)

    def add_node(self, name: str) -> None:
        link_name(name, name + "'")  # validates the SAE name
        if name not in self.nodes:
            self.nodes.append(name)

    def add_link(
        self, a: str, b: str, *, bits_per_s: RateSpec | object | None = None,
        distance_km: float | None = None,
    ) -> str:
        """A direct QKD link a–b (its pool is created in the store); return its name.

        ``bits_per_s``: see :func:`resolve_rate` (None: the analytic model).
        ``distance_km``: the fibre length; if None, that of a ``LinkParams``
        given as ``bits_per_s``, else 10 km.
        """
        name = link_name(a, b)
        if name in self.direct or name in self.relayed:
            raise ValueError(f"link {name!r} exists already")
        if distance_km is not None and not (math.isfinite(distance_km) and distance_km >= 0):
            raise ValueError(f"distance_km must be a finite number >= 0, got {distance_km!r}")
        self.store.add_link(a, b)
        self._add_direct(a, b, bits_per_s=bits_per_s, distance_km=distance_km)
        return name

    def _add_direct(
        self, a: str, b: str, *, bits_per_s: RateSpec | object | None = None, distance_km: float | None = None,
    ) -> DirectLink:
        """The DirectLink object of a link already in the store, its clock state loaded from there."""
        if distance_km is None:
            distance_km = float(bits_per_s.distance_km) if _is_link_params(bits_per_s) else DEFAULT_DISTANCE_KM
        if not (math.isfinite(distance_km) and distance_km >= 0):
            raise ValueError(f"distance_km must be a finite number >= 0, got {distance_km!r}")
        rate = resolve_rate(bits_per_s, distance_km)
        self.add_node(a)
        self.add_node(b)
        lo, hi = sorted((a, b))
        link = DirectLink(link_name(a, b), lo, hi, float(distance_km), rate)
        link._load(self.store.generator(a, b))  # a link of an existing store continues its clock
        self.direct[link.name] = link
        return link

    def add_relayed_link(self, a: str, b: str, via: str | Sequence[str]) -> str:
        """A link a~b made by XOR relay through ``via`` (one trusted node or a path of them)."""
        name = link_name(a, b)
        if name in self.direct or name in self.relayed:
            raise ValueError(f"link {name!r} exists already")
        path = (a, *([via] if isinstance(via, str) else list(via)), b)
        if len(set(path)) != len(path):
            raise ValueError(f"a relay path visits a node twice: {path}")
        for x, y in itertools.pairwise(path):
            if link_name(x, y) not in self.direct:
                raise UnknownLink(f"relay path {path} needs a direct link {x}–{y}")
        self.store.add_link(a, b)
        self._add_relayed(a, b, path)
        return name

    def _add_relayed(self, a: str, b: str, path: tuple[str, ...]) -> RelayedLink:
        """The RelayedLink object of a link already in the store."""
        link = RelayedLink(link_name(a, b), a, b, path)
        self.relayed[link.name] = link
        return link

    def link(self, a: str, b: str) -> DirectLink | RelayedLink:
        name = link_name(a, b)
        found = self.direct.get(name) or self.relayed.get(name)
        if found is None:
            raise UnknownLink(f"no link joins {a!r} and {b!r} in this network")
        return found

    def _by_name(self, link: str) -> DirectLink | RelayedLink:
        found = self.direct.get(link) or self.relayed.get(link)
        if found is None:
            raise UnknownLink(f"no link named {link!r} in this network")
        return found

    # -- the clock --------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The simulated clock in seconds, as saved in the store."""
        return self.store.clock()

    def advance(self, seconds: float) -> dict[str, int]:
        """Move the clock; every direct link is credited the whole bytes it made. Returns bits credited per link.

        A link of rate r makes ``floor(carry + r·t)`` bits (the fraction
        carries over); bits short of a whole byte wait for the next tick. The
        credits, every link's clock state and the clock itself are one store
        transaction, computed from the state saved in the store.
        """
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"advance() takes a finite number of seconds >= 0, got {seconds!r}")
        credited: dict[str, int] = {}
        states: dict[str, GeneratorState] = {}
        with self.store.transaction() as tx:
            for link in self.direct.values():
                old = tx.generator(link.a, link.b)
                acc = old.carry + link.bits_per_s * seconds
                new = math.floor(acc + _EPS_BITS)
                whole = old.pending_bits + new
                states[link.name] = GeneratorState(old.gen_bits + new, whole % 8, max(acc - new, 0.0))
                credited[link.name] = 8 * (whole // 8)
                tx.credit(link.a, link.b, credited[link.name], states[link.name])
            tx.set_clock(tx.clock() + seconds)
        for link in self.direct.values():  # only after the commit
            link._load(states[link.name])
        return credited

    def time_to_make(self, link: str, bits: int) -> float:
        """Simulated seconds until ``link`` has been credited ``bits`` more bits (math.inf at rate 0).

        For a relayed link: until every hop has deposited ``bits`` more bits.
        Key already in the pools is not counted (see :meth:`supply` for that).
        """
        found = self._by_name(link)
        if isinstance(found, RelayedLink):
            return max(self.time_to_make(link_name(x, y), bits) for x, y in found.hops)
        if bits <= 0:
            return 0.0
        need = 8 * -(-int(bits) // 8) - found.pending_bits  # whole bits to make for that many whole bytes
        if need <= 0:
            return 0.0
        if found.bits_per_s == 0:
            return math.inf
        return max(need - found.carry, 0.0) / found.bits_per_s

    # -- relay ------------------------------------------------------------------------------------

    def relay(self, a: str, b: str, bits: int) -> RelayRecord:
        """Make ``bits`` (a multiple of 8) of key for the relayed link a~b, hop by hop (one transaction).

        Each hop's key is materialised by its take; the relayed link receives
        one ``relay`` block. Raises KeyExhausted, changing nothing, when a hop
        holds too little key.
        """
        found = self.link(a, b)
        if not isinstance(found, RelayedLink):
            raise ValueError(f"{found.name} is a direct link; only relayed links are filled by relay")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 8 or bits % 8:
            raise ValueError(f"relay bits must be a positive multiple of 8, got {bits!r}")
        nbytes = bits // 8
        with self.store.transaction() as tx:
            # Hop i is the direct link path[i]–path[i+1]; both its ends now hold hop_keys[i].
            hop_keys = [tx.take_relayed(x, y, nbytes, purpose=found.name) for x, y in found.hops]
            # Each relay path[i+1] holds hop_keys[i] and hop_keys[i+1] and publishes their XOR.
            published = [_xor(k, k_next) for k, k_next in itertools.pairwise(hop_keys)]
            at_a = hop_keys[0]
            at_b = hop_keys[-1]  # b XORs its own hop key with everything published: the k's telescope to k1
            for m in reversed(published):
                at_b = _xor(at_b, m)
            if at_a != at_b:  # cannot happen; a guard against editing mistakes
                raise AssertionError("relay: the two ends disagree")
            tx.deposit(found.a, found.b, at_a, kind="relay")
        for x, y in found.hops:
            self.direct[link_name(x, y)].relay_bits += bits
        found.relayed_bits += bits
        return RelayRecord(found.name, bits, tuple(published))

    def supply(self, master: str, slave: str, bits: int, *, wait: bool) -> float:
        """Add ``bits`` (rounded up to bytes) to the pool of master~slave; return simulated seconds advanced.

        Direct link: with ``wait``, advance the clock until it has made them;
        without, nothing can be done (returns 0). Relayed link: relay from key
        already on the hops; with ``wait``, first advance the clock until every
        hop holds enough, without, relay only what the hops hold now. Raises
        KeyExhausted when the key can never come (a link of rate 0).
        :meth:`qfl.server.key_budget.KeyBudget.admit` calls it to apply ``key_policy``.
        """
        found = self.link(master, slave)
        nbytes = -(-int(bits) // 8)
        if nbytes <= 0:
            return 0.0
        if isinstance(found, DirectLink):
            if not wait:
                return 0.0
            waited = self.time_to_make(found.name, 8 * nbytes)
            if math.isinf(waited):
                left = self.store.status(master, slave).left_bits
                raise KeyExhausted(found.name, left + 8 * nbytes, left)
            self.advance(waited)
            return waited
        waited = 0.0
        lefts = {(x, y): self.store.status(x, y).left_bits for x, y in found.hops}
        if wait:
            waited = max(
                self.time_to_make(link_name(x, y), max(0, 8 * nbytes - left)) for (x, y), left in lefts.items()
            )
            if math.isinf(waited):
                raise KeyExhausted(found.name, 8 * nbytes, min(lefts.values()))
            if waited > 0:
                self.advance(waited)
        else:
            nbytes = min(nbytes, min(lefts.values()) // 8)
        if nbytes > 0:
            try:
                self.relay(found.a, found.b, 8 * nbytes)
            except KeyExhausted:  # another process took hop key meanwhile; the caller retries
                pass
        return waited

    # -- reporting --------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, object]]:
        """Per link: kind, parameters, bits made/relayed, and the store's made/used/left counters."""
        out: dict[str, dict[str, object]] = {}
        for link in self.direct.values():
            st = self.store.status(link.a, link.b)
            out[link.name] = {
                "kind": "direct", "distance_km": link.distance_km, "bits_per_s": link.bits_per_s,
                "made_bits": link.made_bits, "pending_bits": link.pending_bits, "relay_bits": link.relay_bits,
                "pool_made_bits": st.made_bits, "pool_used_bits": st.used_bits, "pool_left_bits": st.left_bits,
            }
        for relayed in self.relayed.values():
            st = self.store.status(relayed.a, relayed.b)
            out[relayed.name] = {
                "kind": "relayed", "path": list(relayed.path), "relayed_bits": relayed.relayed_bits,
                "pool_made_bits": st.made_bits, "pool_used_bits": st.used_bits, "pool_left_bits": st.left_bits,
            }
        return out

    def links(self) -> list[str]:
        return sorted([*self.direct, *self.relayed])

    def __repr__(self) -> str:
        return (
            f"QuantumNetwork(nodes={self.nodes}, direct={list(self.direct)}, "
            f"relayed={list(self.relayed)}, now={self.now})"
        )


def parse_link_spec(text: str, nodes: Sequence[str], *, default: float | None = None) -> dict[tuple[str, str], float]:
    """Parse ``"a~b=50, c~d=80"`` (or ``"a~b, c~d:0.5"`` with ``default``) into {(a, b): value}.

    Every name must be one of ``nodes``; ValueError names the bad entry and the valid nodes.
    ``=`` and ``:`` both separate a link from its value; an entry without a value gets ``default``
    (ValueError if there is none).
    """
    out: dict[tuple[str, str], float] = {}
    for entry in filter(None, (part.strip() for part in str(text).split(","))):
        link, sep, value = entry.replace(":", "=").partition("=")
        a, tilde, b = link.strip().partition("~")
        a, b = a.strip(), b.strip()
        if not tilde or a not in nodes or b not in nodes or a == b:
            raise ValueError(
                f"bad link {entry!r}: write NODE~NODE with two different nodes of {', '.join(nodes[:4])}"
                f"{', …' if len(nodes) > 4 else ''}"
            )
        if sep:
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"bad value in link entry {entry!r}: {value.strip()!r} is not a number") from None
        elif default is None:
            raise ValueError(f"link entry {entry!r} needs a value: {link.strip()}=NUMBER")
        else:
            number = float(default)
        out[(min(a, b), max(a, b))] = number  # sorted pair
    return out
