"""Secure aggregation of one round: the protocol's steps, on bytes and key sources.

The Flower glue lives in ``qfl.server.secure`` (server half) and
``qfl.clients.secure`` (client half); this module holds the steps both run, so
each is written once. SAE names: the server is ``"server"``, the client of
partition ``p`` is ``"client-p"`` (:func:`client_sae`).

Modes (``security=``):

**masked-sum** — information-theoretically hiding. A round's plan
(:class:`RoundPlan`, chosen by the server) fixes the participants, the
codec and its parameters (every participant builds the same codec with
``make_summable_codec`` and encodes through its ring form,
``Codec.encode_ring``: ``s`` levels, rand-k support), the clip bound per
tensor, the ring ``B = bit_length(n·s)``, the
masking form (``secure_masking``: double, the default, or single) and the
Shamir threshold ``t``.

Double masking (Bonawitz et al., CCS 2017, §4, with one-time pads from QKD
key and information-theoretic Shamir sharing in place of key agreement and a
PRG). Client ``i`` uploads::

    y_i = q_i + b_i + Σ_{j>i} s_ij − Σ_{j<i} s_ij    (mod 2^B, m elements)

1. *setup*: client ``i`` takes, as ETSI master, one key per higher peer
   ``j > i`` on link ``client-i~client-j`` (``enc_keys``) and returns the key
   ids; the server relays ids only, never key. The pair key of a round is cut
   into (:class:`PairKeyLayout`): the pair mask ``s_ij`` (``⌈m·B/8⌉`` bytes),
   two one-time pads for the shares ``i→j`` and ``j→i`` and two 16-byte
   Wegman–Carter keys, one per direction.
2. *train*: client ``j`` fetches the keys of its lower peers by id
   (``dec_keys``), encodes Δ as codes ``q_j`` plus two flags per tensor, draws a
   one-time self-mask ``b_j`` uniform on ``Z_{2^B}^m`` (:func:`self_mask_of`;
   ``secure_self_mask``): by default the ChaCha20 keystream of a 32-byte seed
   from the OS CSPRNG (``secrets``; never from the run seed), or (``vector``)
   ``⌈m·B/8⌉`` bytes drawn straight from it. It adds ``b_j`` and the pair
   masks, packs ``y_j`` at ``B`` bits and seals it with a Wegman–Carter tag
   under a fresh 16-byte key of link ``client-j~server``. It Shamir-shares the
   seed (or the packed ``b_j``), as 16-bit chunks over GF(65537)
   (:mod:`qfl.security.primitives.shamir`),
   with threshold ``t`` to its peers (peer ``k`` gets the point ``k + 1``), and
   sends each share one-time-pad encrypted and MAC'ed under the pair key
   ``j~k`` along with the upload: the server relays shares it can neither read
   nor alter. ``b_j`` itself is forgotten.
3. *unmask* (every round): the server fixes the survivors ``S`` (valid
   uploads) and the dropped ``D`` (everyone else, including a client whose
   upload arrived but failed its MAC or size check) and sends every ``j ∈ S``
   one request with ``S``, ``D`` and the shares addressed to ``j`` by the
   members of ``S``. Client ``j`` (:func:`answer_unmask`) answers once per
   round, only if ``S`` and ``D`` partition its round's participants, ``j ∈ S``
   and ``|S| ≥ t + 1``; it returns, sealed, its shares of ``b_k`` for
   ``k ∈ S`` (whose MAC verifies) and its pair masks ``s_jk`` for ``k ∈ D``:
   never a share for ``k ∈ D``, never a pair mask for ``k ∈ S``.
4. The server (:func:`unmask_sum`) adds the uploads of ``S`` mod ``2^B``,
   removes the revealed pair masks with ``D``, rebuilds every ``b_k`` (``k ∈ S``)
   from ``t`` shares by Lagrange interpolation at 0 and removes it, and
   decodes the sum of the codes.

Guarantee. Every upload is a one-time pad of ``q_i`` (``b_i`` alone is
uniform), so the server learns ``q_k`` only with ``b_k`` *and* every pair mask
of ``k``. An honest peer gives one or the other for ``k``, once per round; the
``t`` peers that gave shares cannot also give their pair masks with ``k``, so
``k`` itself would have to (told they dropped), in a request with
``|S_k| ≥ t + 1`` survivors drawn from the other ``n − 1 − t`` clients: that
needs ``n ≥ 2t + 1``, which the threshold's floor ``t ≥ ⌊(n−1)/2⌋ + 1`` rules
out. So a server that lies about who dropped (different lists to different
clients, a received upload declared dropped, requests sent twice) learns no
single update with honest clients. With ``c`` of ``k``'s ``d`` peers colluding
(they give both), ``a`` honest share-givers suffice when ``a + c ≥ t`` and
``d − a ≥ t``, i.e. ``c ≥ 2t − d``: so each client's threshold is sized for
``c`` colluders, ``t = ⌊(d + c)/2⌋ + 1`` (:func:`qfl.security.graph.threshold`,
``c`` = :attr:`RoundPlan.colluders` from ``secure_corrupt``;
``docs/threat-model.md``). ``t − 1`` shares are independent of ``b_k``'s seed
(Shamir), so withheld or split requests leave ``b_k`` uniform (seed: as
pseudorandom as ChaCha20 under a 256-bit key, the generator the OS CSPRNG
itself runs; vector: uniform outright). The seed is what makes double masking
affordable: a share is 34 bytes, where a shared vector costs ``17/16`` of an
upload per peer in uplink and twice that in pad key (``k`` times the update).

Single masking (``secure_masking=single``): no self-mask and no shares; the
unmask step runs only if someone dropped, and only for the pair masks with
``D``. Secure against an **honest-but-curious** server only: the server never
asks for the pair masks of a client whose upload it received in any form (an
invalid received upload makes the round unopenable), but a server that does
ask reads that client's update.

Masking graph (:mod:`qfl.security.graph`). Everything above runs per
neighbourhood: client ``i`` masks with, shares its self-mask among, and
unmasks for its *peers* ``N(i)`` only (:meth:`RoundPlan.peers`): every other
participant in the full graph (``secure_graph = "full"``), ``k = O(log n)``
of them in a sparse Harary graph (``"sparse"``, the default, which is the
full graph whenever the bound needs ``k ≥ n − 1``). Each client's threshold
is a strict majority of its peers, ``t_i = ⌊|N(i)|/2⌋ + 1``, and it answers
an unmask request only if ``t_i`` of its peers survive, so the argument above
holds for each neighbourhood with ``n − 1`` replaced by ``|N(i)|``.

Key cost per round, ``n`` participants, ``m`` ring elements per upload
(``m = Σ coords + 2·tensors``), ``M = ⌈m·B/8⌉``: ``n·k/2`` pair keys (``k``
peers each; ``n(n−1)/2`` in the full graph) of
``M + 2·34 + 32`` bytes (double with seeded self-masks; ``M + 2·⌈17·⌈M/2⌉/8⌉ + 32``
with ``secure_self_mask=vector``; ``M`` single), plus 128 bits per sealed
message on each client~server link (an upload and an unmask reply). Shared
vectors make double masking cost about ``3.1×`` the key of single masking
(``17/16`` of the mask per direction); seeds, 100 bytes a pair more.

**expanded** — as masked-sum, but each pair key holds a 32-byte seed of
ChaCha20 (``masking.expand_key``) whose keystream gives the pair mask and, in
double masking, the two share pads; the two MAC keys are raw QKD key: 512 bits
per pair and round (256 single). COMPUTATIONALLY hiding only (as strong as
ChaCha20), not information-theoretic; the self-mask and its sharing are the
same as in masked-sum.

**channel-pad** — any codec. The client XORs its encoded payload with fresh
key of its link to the server (``8·len + 128`` bits: the pad and the tag key)
and seals the ciphertext (encrypt-then-MAC). It hides updates from an
eavesdropper on the channel, **not from the server**, which unpads each update.

Tags bind the mode, the purpose (upload/share/reveal), the round, the sender
and the key id (for a share: its recipient), so a replayed upload fails twice
over: its key id was already delivered (:class:`UnknownKeyId`) and its round
does not match.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from qfl.compression import Codec, make_summable_codec
from qfl.compression.payload import tensor_seed
from qfl.compression.summable import ring_bits
from qfl.errors import SecAggError, SecAggReason, UnknownKeyId
from qfl.records import ConfigValue, as_float, as_int, as_iterable
from qfl.security.graph import colluding_peers, neighbours, sparse_degree, threshold
from qfl.security.keys.source import KeyContainer, KeySource, UnknownKey, dec_key_each, enc_key_each
from qfl.security.primitives import mac, shamir
from qfl.security.primitives.masking import (
    add_packed,
    expand_key,
    key_bytes_needed,
    mask_from_key,
    masked_pack,
    pack_ring,
    xor_pad,
)

SERVER_SAE = "server"
SECURITY_LEVELS = {
    "none": "none: updates travel in clear",
    "masked-sum": "information-theoretic: one-time-pad masks, the server sees only the sum",
    "expanded": "COMPUTATIONAL only: ChaCha20-expanded masks, the server sees only the sum",
    "channel-pad": "one-time pad against eavesdroppers; the server sees every update",
}
MASKED_MODES = ("masked-sum", "expanded")
MASKINGS = ("double", "single")
SELF_MASKS = ("seed", "vector")
SELF_MASK_SEED_BYTES = 32
EXPANDED_KEY_BYTES = 32
MAC_KEY_BYTES = mac.mac_key_bytes()
TAG_BYTES = mac.MAC_TAG_BYTES
SEALED_STYPE = "qfl.secagg/v1"
MAX_PARTICIPANTS = shamir.P - 1  # evaluation points pid + 1 must stay below p
_TAG_DOMAIN = b"qfl-secagg/v1\x00"


def client_sae(partition_id: int) -> str:
    """The SAE (key-management name) of the client of partition ``partition_id``."""
    return f"client-{int(partition_id)}"


def network_nodes(clients: int) -> list[str]:
    """The SAEs of a run: the server and one per client partition."""
    return [SERVER_SAE] + [client_sae(i) for i in range(clients)]



# --------------------------------------------------------------------------- the round plan


@dataclass(frozen=True)
class PairKeyLayout:
    """Key bytes one pair ``i~j`` spends per round, by use (in this order in the pair key).

    ``mask``: the pair mask ``s_ij`` (masked-sum) or its ChaCha20 seed
    (expanded). ``share_pads``: two one-time pads for the self-mask shares
    ``i→j`` and ``j→i`` (masked-sum, double; expanded takes them from the
    keystream). ``macs``: two Wegman–Carter keys, one per share direction
    (double).
    """

    mask: int
    share_pads: int = 0
    macs: int = 0

    @property
    def total(self) -> int:
        return self.mask + self.share_pads + self.macs



def _json(value: object) -> Any:
    """json.loads(value) for a str / bytes record value; TypeError otherwise, as json.loads raises."""
    if isinstance(value, str | bytes | bytearray):
        return json.loads(value)
    raise TypeError(f"the JSON object must be str, bytes or bytearray, not {type(value).__name__}")


@dataclass(frozen=True)
class RoundPlan:
    """What every participant of a masked round must agree on (sent by the server).

    ``min_threshold`` is ``secure_threshold`` (0: the default); each client's
    threshold (:meth:`threshold_of`) is never below a strict majority of its
    peers, so a server cannot lower it below that by editing the plan.
    """

    round: int
    mode: str
    participants: tuple[int, ...]  # partition ids, sorted
    codec_name: str  # every participant builds make_summable_codec(codec_name, codec_params)
    codec_params: tuple[tuple[str, object], ...]  # sorted (key, value) pairs of codec.KEY
    tensors: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    clips: tuple[float, ...]
    round_seed: int  # rand-k supports: tensor_seed(round_seed, name)
    masking: str = "double"
    self_mask: str = "seed"  # what a double-masking client Shamir-shares: its self-mask's seed, or the mask itself
    min_threshold: int = 0
    degree: int = 0  # masking graph (qfl.security.graph): 0 = full, else the Harary degree k over graph_of
    colluders: int = 0  # colluding peers each client's threshold resists (qfl.security.graph.threshold)
    graph_of: tuple[int, ...] = ()  # the members the graph was drawn over (setup's participants); () = participants

    @cached_property
    def graph(self) -> dict[int, frozenset[int]]:
        """The round's masking graph over :attr:`graph_of` (see :mod:`qfl.security.graph`)."""
        return neighbours(self.graph_of or self.participants, self.degree, self.round, self.round_seed)

    @cached_property
    def _peers(self) -> dict[int, list[int]]:
        taking_part = set(self.participants)
        return {p: sorted(self.graph.get(p, frozenset()) & taking_part) for p in self.participants}

    def peers(self, me: int) -> list[int]:
        """``me``'s neighbours in the masking graph that take part in the round, sorted (all others when full)."""
        return self._peers.get(int(me), [])

    def mask_degree(self) -> float:
        """Mean number of peers a participant masks with."""
        return float(np.mean([len(self.peers(p)) for p in self.participants])) if self.participants else 0.0

    def threshold_of(self, me: int) -> int:
        """Shares that rebuild ``me``'s self-mask: ``max(secure_threshold, ⌊(d + c)/2⌋ + 1)``, ``d`` its
        peers and ``c`` = :attr:`colluders` (:func:`qfl.security.graph.threshold`).

        At least a strict majority of the peers it shares with (``c = 0``; in
        the full graph ``d = n − 1``): a client computes it itself, so no plan
        sets it below that floor. ``c``, the graph's degree and
        ``secure_threshold`` come from the plan, i.e. from the server
        (docs/threat-model.md, "Who chooses the masking form").
        """
        return max(int(self.min_threshold), threshold(len(self.peers(me)), max(int(self.colluders), 0)))

    @cached_property
    def codec(self) -> Codec:
        """The round's codec (its ring form is what clients encode with and the server decodes with).

        Raises ValueError naming the parameter if the codec or a parameter has no ring form.
        """
        return make_summable_codec(self.codec_name, dict(self.codec_params))

    @property
    def ring_bits(self) -> int:
        """``B = bit_length(n·s)``, s the codec's :meth:`~qfl.compression.Codec.ring_levels`."""
        return ring_bits(self.codec.ring_levels(), len(self.participants))

    @property
    def double(self) -> bool:
        """Whether uploads carry a Shamir-shared self-mask (double masking)."""
        return self.masking == "double"

    @property
    def min_survivors(self) -> int:
        """Fewest valid uploads whose sum can be opened: ``t + 1`` for the least ``t`` of the round
        (double; each survivor's ``t`` shares come from surviving peers), else 1."""
        if not self.double or not self.participants:
            return 1
        return min(self.threshold_of(p) for p in self.participants) + 1

    def coords(self) -> list[int]:
        """Codes per tensor."""
        return list(self._coords)

    @cached_property
    def _coords(self) -> tuple[int, ...]:
        return tuple(self.codec.ring_coords(self.seed(n), int(np.prod(shape))) for n, shape in zip(self.tensors, self.shapes))

    def elements(self) -> int:
        """Ring elements per upload: every tensor's codes, then two flags per tensor."""
        return sum(self.coords()) + 2 * len(self.tensors)

    def seed(self, name: str) -> int:
        return tensor_seed(self.round_seed, name)

    def upload_bytes(self) -> int:
        """Bytes of a packed upload, of a pair mask and of a self-mask: ``⌈m·B/8⌉``."""
        return key_bytes_needed(self.elements(), self.ring_bits)

    @property
    def seeded(self) -> bool:
        """Whether a self-mask is the ChaCha20 keystream of a 32-byte seed, and the seed is what is shared."""
        return self.self_mask == "seed"

    def secret_bytes(self) -> int:
        """Bytes a client Shamir-shares: its self-mask's seed (32) or its packed self-mask (``M``)."""
        return SELF_MASK_SEED_BYTES if self.seeded else self.upload_bytes()

    def share_chunks(self) -> int:
        """GF(65537) elements of one share of a self-mask."""
        return shamir.chunk_count(self.secret_bytes())

    def share_bytes(self) -> int:
        """Bytes of one packed share (and of its one-time pad): ``⌈17·⌈X/2⌉/8⌉``, ``X`` = :meth:`secret_bytes`
        (34 bytes for a seed, about ``17/16·M`` for a whole mask)."""
        return shamir.share_bytes(self.secret_bytes())

    def key_layout(self) -> PairKeyLayout:
        """Key bytes one pair spends this round, by use."""
        mask = EXPANDED_KEY_BYTES if self.mode == "expanded" else self.upload_bytes()
        if not self.double:
            return PairKeyLayout(mask)
        pads = 0 if self.mode == "expanded" else 2 * self.share_bytes()
        return PairKeyLayout(mask, pads, 2 * MAC_KEY_BYTES)

    def pair_key_bytes(self) -> int:
        """Key bytes one pair spends this round."""
        return self.key_layout().total

    def with_participants(self, participants: Iterable[int]) -> RoundPlan:
        """The same plan for fewer participants (the ring and the thresholds follow; the graph is kept)."""
        return replace(self, participants=tuple(sorted(int(p) for p in participants)),
                       graph_of=self.graph_of or self.participants)

    def viable(self) -> RoundPlan:
        """The plan without the participants left with fewer peers than their threshold (repeated until none is)."""
        plan = self
        while plan.double and (alone := {p for p in plan.participants if plan.threshold_of(p) > len(plan.peers(p))}):
            plan = plan.with_participants(set(plan.participants) - alone)
        return plan

    def check(self) -> RoundPlan:
        """Raise SecAggError unless the plan can run; return it.

        A client calls this on every plan it receives: a server cannot make
        it share its self-mask below the majority threshold (:attr:`threshold`
        has that floor) or with more peers than points exist.
        """
        n = len(self.participants)
        if self.mode not in MASKED_MODES:
            raise SecAggError(f"a masked round needs mode {' or '.join(MASKED_MODES)}, got {self.mode!r}", reason=SecAggReason.BAD_PLAN)
        if self.masking not in MASKINGS:
            raise SecAggError(f"unknown masking {self.masking!r}; choose one of {', '.join(MASKINGS)}", reason=SecAggReason.BAD_PLAN)
        if self.self_mask not in SELF_MASKS:
            raise SecAggError(f"unknown self-mask form {self.self_mask!r}; choose one of {', '.join(SELF_MASKS)}", reason=SecAggReason.BAD_PLAN)
        if len(set(self.participants)) != n or any(not 0 <= p < MAX_PARTICIPANTS for p in self.participants):
            raise SecAggError(f"participants must be distinct partition ids in [0, {MAX_PARTICIPANTS})", reason=SecAggReason.BAD_PLAN)
        if self.min_threshold < 0:
            raise SecAggError(f"secure_threshold must be >= 0, got {self.min_threshold}", reason=SecAggReason.BAD_PLAN)
        try:
            _ = self.codec  # builds (and caches) the codec: every parameter has a ring form
        except ValueError as err:
            raise SecAggError(f"the round's codec {self.codec_name!r} cannot be summed under masks: {err}", reason=SecAggReason.UNSUMMABLE_CODEC) from None
        if self.ring_bits > 64:
            raise SecAggError(f"the round needs a {self.ring_bits}-bit ring; at most 64 bits are supported", reason=SecAggReason.BAD_PLAN)
        if self.colluders < 0:
            raise SecAggError(f"colluders must be >= 0, got {self.colluders}", reason=SecAggReason.BAD_PLAN)
        if self.degree < 0 or (self.graph_of and not set(self.participants) <= set(self.graph_of)):
            raise SecAggError("the masking graph must have a degree >= 0 and be drawn over a superset of the participants", reason=SecAggReason.BAD_PLAN)
        if self.double and n >= 2:
            short = [p for p in self.participants if self.threshold_of(p) > len(self.peers(p))]
            if short:
                p = short[0]
                raise SecAggError(
                    f"client {p} shares with {len(self.peers(p))} peers, fewer than its threshold t = "
                    f"{self.threshold_of(p)}; lower secure_threshold (0 = a strict majority) or admit more clients", reason=SecAggReason.TOO_FEW
                )
        return self

    def to_config(self) -> dict[str, ConfigValue]:
        """Flat values for a Flower ConfigRecord."""
        return {
            "round": self.round,
            "mode": self.mode,
            "participants": list(self.participants),
            "codec": self.codec_name,
            "codec-params": json.dumps(dict(self.codec_params), sort_keys=True),
            "tensors": json.dumps(list(self.tensors)),
            "shapes": json.dumps([list(s) for s in self.shapes]),
            "clips": list(self.clips),
            "round-seed": str(self.round_seed),
            "masking": self.masking,
            "self-mask": self.self_mask,
            "threshold": self.min_threshold,
            "degree": self.degree,
            "colluders": self.colluders,
            "graph-of": list(self.graph_of),
        }

    @classmethod
    def from_config(cls, values: Mapping[str, object]) -> RoundPlan:
        """Parse and :meth:`check` a plan; SecAggError if anything is missing, mistyped or unusable."""
        try:
            params = json.loads(str(values["codec-params"]))
            if not isinstance(params, dict):
                raise TypeError(f"codec-params must be a JSON object, got {params!r}")
            plan = cls(
                round=as_int(values["round"]),
                mode=str(values["mode"]),
                participants=tuple(sorted(as_int(p) for p in as_iterable(values["participants"]))),
                codec_name=str(values["codec"]),
                codec_params=tuple(sorted(params.items())),
                tensors=tuple(str(t) for t in _json(values["tensors"])),
                shapes=tuple(tuple(int(x) for x in s) for s in _json(values["shapes"])),
                clips=tuple(as_float(c) for c in as_iterable(values["clips"])),
                round_seed=as_int(values["round-seed"]),
                masking=str(values["masking"]),
                self_mask=str(values["self-mask"]),
                min_threshold=as_int(values["threshold"]),
                degree=as_int(values["degree"]),
                colluders=as_int(values["colluders"]),
                graph_of=tuple(sorted(as_int(p) for p in as_iterable(values["graph-of"]))),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggError(f"malformed round plan: {err}", reason=SecAggReason.MALFORMED) from None
        return plan.check()


def make_plan(
    cfg, server_round: int, participants: list[int], shapes: Mapping[str, tuple[int, ...]], clips: Mapping[str, float],
    round_seed: int,
) -> RoundPlan:
    """The server's plan for a round: the codec and its parameters, the clip bounds, ``secure_masking``,
    ``secure_threshold`` and the masking graph (``secure_graph``, ``secure_degree``, or the degree
    :func:`~qfl.security.graph.sparse_degree` gives for ``secure_dropout`` and ``secure_corrupt``).
    Raises ValueError if the codec or a parameter has no ring form."""
    params = tuple(sorted(dict(cfg.codec_params).items()))
    make_summable_codec(cfg.codec, dict(params))  # refuse here, on the server, naming the parameter
    names = tuple(shapes)
    return RoundPlan(
        round=server_round,
        mode=cfg.security,
        participants=tuple(sorted(participants)),
        codec_name=cfg.codec,
        codec_params=params,
        tensors=names,
        shapes=tuple(tuple(shapes[n]) for n in names),
        clips=tuple(float(clips[n]) for n in names),
        round_seed=int(round_seed),
        masking=cfg.secure_masking,
        self_mask=cfg.secure_self_mask,
        min_threshold=cfg.secure_threshold,
        degree=(degree := round_degree(cfg, len(participants))),
        colluders=round_colluders(cfg, len(participants), degree),
        graph_of=tuple(sorted(participants)),
    )


def round_colluders(cfg, participants: int, degree: int) -> int:
    """Colluding peers the round's thresholds resist, for γ = ``secure_corrupt`` (:func:`colluders_for`)."""
    return colluders_for(cfg.secure_corrupt, participants, degree)


def colluders_for(corrupt: float, participants: int, degree: int) -> int:
    """Colluding peers a threshold must resist when a share γ = ``corrupt`` of clients collude: ``⌊γ·n⌋`` in
    the full graph (``degree`` 0: any colluder may be a peer), the ``2^−σ/n`` quantile of a neighbourhood's
    colluders in a sparse one."""
    if degree == 0:
        return int(corrupt * participants)
    return colluding_peers(degree, participants, corrupt)


def round_degree(cfg, participants: int) -> int:
    """The masking graph's degree for a round of ``participants``: 0 (full) or an even ``k < n − 1``
    (``secure_degree``, or :func:`least_degree` for ``secure_dropout`` and ``secure_corrupt``)."""
    if cfg.secure_graph == "full":
        return 0
    if not cfg.secure_degree:
        return least_degree(participants, cfg.secure_dropout, cfg.secure_corrupt)
    k = cfg.secure_degree + cfg.secure_degree % 2
    return 0 if k >= participants - 1 else k


def least_degree(participants: int, dropout: float, corrupt: float) -> int:
    """The least even degree ``k < n − 1`` whose failure bound at (δ, γ) is ``≤ 2^−σ``; 0 (the full graph)
    if none is (:func:`~qfl.security.graph.sparse_degree`)."""
    k = sparse_degree(participants, dropout, corrupt)
    k += k % 2
    return 0 if k >= participants - 1 else k


# --------------------------------------------------------------------------- pair keys (client side)


def take_pair_keys(source: KeySource, plan: RoundPlan, me: int) -> dict[int, KeyContainer]:
    """Setup, as master: one fresh key per higher peer (``enc_keys``; one store transaction for all),
    ``plan.pair_key_bytes()`` each."""
    higher = [peer for peer in plan.peers(me) if peer > me]
    taken = enc_key_each(source, client_sae(me), [client_sae(p) for p in higher], 8 * plan.pair_key_bytes())
    return {peer: taken[client_sae(peer)] for peer in higher}


def fetch_pair_keys(source: KeySource, me: int, key_ids: Mapping[int, str]) -> dict[int, bytes]:
    """Train, as slave: the keys lower peers took for us, by id (each delivered once)."""
    fetched = dec_key_each(source, client_sae(me), {client_sae(peer): key_id for peer, key_id in key_ids.items()})
    return {peer: fetched[client_sae(peer)].key for peer in key_ids}


@dataclass(frozen=True)
class PairMaterial:
    """What client ``me`` reads from its round key with ``peer`` (:class:`PairKeyLayout`).

    ``mask``: the bytes the pair mask is read from (``mask_from_key``).
    ``pad_out``/``mac_out`` protect ``me``'s share for ``peer``; ``pad_in``/``mac_in``
    the share ``peer`` sends ``me`` (empty in single masking).
    """

    mask: bytes
    pad_out: bytes = b""
    pad_in: bytes = b""
    mac_out: bytes = b""
    mac_in: bytes = b""


def pair_material(plan: RoundPlan, me: int, peer: int, key: bytes) -> PairMaterial:
    """Cut the round's pair key of ``me~peer`` into mask, share pads and MAC keys (same at both ends).

    Layout of the key (lo < hi the two partition ids): masked-sum
    ``[mask M | pad lo→hi S | pad hi→lo S | mac lo→hi 16 | mac hi→lo 16]``;
    expanded ``[seed 32 | mac lo→hi 16 | mac hi→lo 16]`` with
    ``ChaCha20(seed) = [mask M | pad lo→hi S | pad hi→lo S]``. Single masking
    uses the mask part only. Raises SecAggError if the key is too short.
    """
    layout = plan.key_layout()
    key = bytes(key)
    if len(key) < layout.total:
        raise SecAggError(f"the round-{plan.round} key of clients {me}~{peer} has {len(key)} bytes, the plan needs "
                          f"{layout.total}", reason=SecAggReason.NO_KEYS)
    M, S = plan.upload_bytes(), plan.share_bytes()
    lo, hi = sorted((int(me), int(peer)))
    if plan.mode == "expanded":
        nonce = struct.pack("<IQ", plan.round & 0xFFFFFFFF, (lo << 32) | hi)
        stream = expand_key(key[:EXPANDED_KEY_BYTES], M + (2 * S if plan.double else 0), nonce)
        macs = key[EXPANDED_KEY_BYTES : EXPANDED_KEY_BYTES + layout.macs]
    else:
        stream = key[: M + layout.share_pads]
        macs = key[M + layout.share_pads : layout.total]
    if not plan.double:
        return PairMaterial(stream[:M])
    up, down = stream[M : M + S], stream[M + S : M + 2 * S]  # lo→hi, hi→lo
    mac_up, mac_down = macs[:MAC_KEY_BYTES], macs[MAC_KEY_BYTES : 2 * MAC_KEY_BYTES]
    if me == lo:
        return PairMaterial(stream[:M], up, down, mac_up, mac_down)
    return PairMaterial(stream[:M], down, up, mac_down, mac_up)


def _materials(plan: RoundPlan, me: int, pair_keys: Mapping[int, bytes], peers: Iterable[int]) -> dict[int, PairMaterial]:
    peers = list(peers)
    missing = sorted(set(peers) - set(pair_keys))
    if missing:
        raise SecAggError(f"client {me} holds no round-{plan.round} keys with {missing}", reason=SecAggReason.NO_KEYS)
    return {peer: pair_material(plan, me, peer, pair_keys[peer]) for peer in peers}


# --------------------------------------------------------------------------- the upload (client side)


@dataclass(frozen=True)
class SealedShare:
    """One Shamir share of a self-mask on its way to a peer: one-time-pad ciphertext and Wegman–Carter tag.

    The server holds them as views into the upload's wire bytes (see :func:`shares_from_wire`)."""

    cipher: bytes | memoryview
    tag: bytes | memoryview


@dataclass(frozen=True)
class MaskedUpload:
    """Client ``me``'s upload ``y`` (packed at ``B`` bits) and its self-mask shares by recipient (double only)."""

    blob: bytes
    shares: dict[int, SealedShare] = field(default_factory=dict)

    def share_wire(self) -> tuple[bytes, bytes]:
        """(ciphertexts, tags) concatenated in recipient order: what travels beside the upload."""
        peers = sorted(self.shares)
        return b"".join(self.shares[p].cipher for p in peers), b"".join(self.shares[p].tag for p in peers)


def _share_message(plan: RoundPlan, sender: int, recipient: int, cipher: bytes | memoryview) -> bytes:
    return _tag_message(plan.mode, "share", plan.round, sender, f"to-{int(recipient)}", cipher)


def self_mask_of(plan: RoundPlan, me: int, secret: bytes) -> np.ndarray:
    """``me``'s self-mask ``b_me`` (``m`` ring elements of ``B`` bits) from the secret its shares rebuild.

    seed: ``b = ChaCha20(seed, nonce = round ‖ 2^63 + me)`` read as a mask
    (:func:`mask_from_key`); the nonce is apart from every pair key's. vector:
    the secret is the packed mask itself. Either way ``b`` is uniform on
    ``(Z_{2^B})^m`` for a uniform secret; a seed makes it as strong as
    ChaCha20 with a 256-bit key, the primitive the OS CSPRNG that draws a
    vector is itself built on (Linux's getrandom).
    """
    stream = secret
    if plan.seeded:
        nonce = struct.pack("<IQ", plan.round & 0xFFFFFFFF, (1 << 63) | int(me))
        stream = expand_key(secret, plan.upload_bytes(), nonce)
    return mask_from_key(stream, plan.elements(), plan.ring_bits)


def share_self_mask(
    plan: RoundPlan, me: int, secret: bytes, materials: Mapping[int, PairMaterial]
) -> dict[int, SealedShare]:
    """Shamir-share ``me``'s self-mask secret (:meth:`RoundPlan.secret_bytes`: its seed or the packed
    mask) among its peers with threshold ``plan.threshold_of(me)``; encrypt and MAC each share.

    Peer ``k`` gets the share at point ``k + 1``, XORed with the pad ``me→k``
    and tagged under the MAC key ``me→k`` (encrypt-then-MAC; the tag binds the
    mode, round, sender and recipient).
    """
    peers = plan.peers(me)
    values = shamir.split(shamir.to_chunks(secret), [p + 1 for p in peers], plan.threshold_of(me))
    out = {}
    for peer in peers:
        cipher = xor_pad(shamir.pack_share(values[peer + 1]), materials[peer].pad_out)
        out[peer] = SealedShare(cipher, mac.tag(_share_message(plan, me, peer, cipher), materials[peer].mac_out))
    return out


def open_share(plan: RoundPlan, me: int, sender: int, material: PairMaterial, sealed: SealedShare) -> np.ndarray:
    """``sender``'s share of its self-mask addressed to ``me``: verify the tag, then decrypt and unpack.

    Raises SecAggError if the share has the wrong size or fails its MAC
    (tampered in transit, or not made for ``me`` in this round).
    """
    if len(sealed.cipher) != plan.share_bytes() or len(sealed.tag) != TAG_BYTES:
        raise SecAggError(f"the share of client {sender} for client {me} has the wrong size: tampered in transit", reason=SecAggReason.WRONG_SIZE)
    if not mac.verify(_share_message(plan, sender, me, sealed.cipher), sealed.tag, material.mac_in):
        raise SecAggError(f"the share of client {sender} for client {me} fails its MAC: tampered in transit", reason=SecAggReason.BAD_MAC)
    try:
        return shamir.unpack_share(xor_pad(sealed.cipher, material.pad_in), plan.share_chunks())
    except ValueError as err:  # a valid tag on a bad share: the sender made it so
        raise SecAggError(f"the share of client {sender} for client {me} is malformed: {err}", reason=SecAggReason.MALFORMED) from None


def masked_upload(
    plan: RoundPlan, me: int, delta: Mapping[str, np.ndarray], pair_keys: Mapping[int, bytes], rng: np.random.Generator
) -> MaskedUpload:
    """Client ``me``'s upload: its codes and flags plus (double) a fresh self-mask plus its pair masks.

    ``rng`` draws only the codes' stochastic rounding; the self-mask (or its
    seed) comes from ``secrets`` and is forgotten once shared.
    """
    if me not in plan.participants:
        raise SecAggError(f"client {me} is not a participant of round {plan.round}", reason=SecAggReason.BAD_REQUEST)
    peers = plan.peers(me)
    materials = _materials(plan, me, pair_keys, peers)
    parts, flags = [], []
    for name, clip in zip(plan.tensors, plan.clips):
        codes, over, under = plan.codec.encode_ring(delta[name], clip, plan.seed(name), rng)
        parts.append(codes)
        flags += [over, under]
    q = np.concatenate([*parts, np.asarray(flags, dtype=np.uint64)])
    shares: dict[int, SealedShare] = {}
    if plan.double:
        self_mask = self_mask_of(plan, me, secret := secrets.token_bytes(plan.secret_bytes()))  # uniform
        shares = share_self_mask(plan, me, secret if plan.seeded else pack_ring(self_mask, plan.ring_bits), materials)
        q += self_mask  # uint64 wraps mod 2^64, a multiple of 2^B; masked_pack reduces mod 2^B
        del self_mask
    blob = masked_pack(q, me, {peer: materials[peer].mask for peer in peers}, plan.ring_bits)
    return MaskedUpload(blob, shares)


def shares_from_wire(plan: RoundPlan, sender: int, ciphers: bytes, tags: bytes) -> dict[int, SealedShare]:
    """The server's parse of the shares beside ``sender``'s upload; SecAggError if the sizes do not match the plan."""
    peers = plan.peers(sender)
    S = plan.share_bytes()
    if not plan.double:
        if ciphers or tags:
            raise SecAggError("single masking carries no self-mask shares", reason=SecAggReason.WRONG_SIZE)
        return {}
    if len(ciphers) != S * len(peers) or len(tags) != TAG_BYTES * len(peers):
        raise SecAggError(
            f"the self-mask shares have {len(ciphers)} + {len(tags)} bytes, the plan needs "
            f"{S * len(peers)} + {TAG_BYTES * len(peers)} ({len(peers)} peers)", reason=SecAggReason.WRONG_SIZE
        )
    cipher_view, tag_view = memoryview(ciphers), memoryview(tags)  # slices share the wire bytes: no copy per share
    return {
        p: SealedShare(cipher_view[i * S : (i + 1) * S], tag_view[i * TAG_BYTES : (i + 1) * TAG_BYTES])
        for i, p in enumerate(peers)
    }


# --------------------------------------------------------------------------- unmasking (client side)


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's unmask request to one survivor: ``S``, ``D`` and the shares addressed to it, by sender."""

    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    shares: dict[int, SealedShare] = field(default_factory=dict)

    def to_config(self) -> dict[str, ConfigValue]:
        senders = sorted(self.shares)
        return {
            "round": self.round,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "share-from": senders,
            "shares": b"".join(self.shares[k].cipher for k in senders),
            "share-tags": b"".join(self.shares[k].tag for k in senders),
        }

    @classmethod
    def from_config(cls, plan: RoundPlan, values: Mapping[str, object]) -> UnmaskRequest:
        """Parse a request against the client's own plan; SecAggError if mistyped or mis-sized."""
        try:
            survivors = _int_list(values["survivors"], "survivors")
            dropped = _int_list(values["dropped"], "dropped")
            senders = _int_list(values["share-from"], "share-from")
            ciphers, tags = values["shares"], values["share-tags"]
            rnd = values["round"]
        except KeyError as err:
            raise SecAggError(f"the unmask request lacks {err}", reason=SecAggReason.MALFORMED) from None
        if not isinstance(ciphers, bytes) or not isinstance(tags, bytes) or isinstance(rnd, bool) or not isinstance(rnd, int):
            raise SecAggError("the unmask request's shares must be bytes and its round an int", reason=SecAggReason.MALFORMED)
        S = plan.share_bytes()
        if len(set(senders)) != len(senders) or len(ciphers) != S * len(senders) or len(tags) != TAG_BYTES * len(senders):
            raise SecAggError("the unmask request's shares do not match its senders", reason=SecAggReason.MALFORMED)
        shares = {
            k: SealedShare(ciphers[i * S : (i + 1) * S], tags[i * TAG_BYTES : (i + 1) * TAG_BYTES])
            for i, k in enumerate(senders)
        }
        return cls(int(rnd), tuple(survivors), tuple(dropped), shares)


def _int_list(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise SecAggError(f"{name!r} must be a list of partition ids", reason=SecAggReason.MALFORMED)
    return [int(v) for v in value]


@dataclass(frozen=True)
class UnmaskReply:
    """A survivor's answer: pair masks with ``D`` (packed at ``B``, sorted ``D`` order) and the
    shares it received from ``share_from`` (packed at 17 bits each); ``rejected``: senders whose
    share failed its MAC or size check and is withheld."""

    masks: bytes
    share_from: tuple[int, ...] = ()
    shares: bytes = b""
    rejected: tuple[int, ...] = ()

    def body(self) -> bytes:
        """What the reply's seal covers: both id lists, then the masks, then the shares."""
        ids = [len(self.share_from), len(self.rejected), *self.share_from, *self.rejected]
        return struct.pack(f"<{len(ids)}I", *ids) + self.masks + self.shares

    @classmethod
    def decode(cls, plan: RoundPlan, sender: int, body: bytes, survivors: Sequence[int], dropped: Sequence[int]) -> UnmaskReply:
        """The server's parse of a (verified) reply body; SecAggError unless it fits the request it answers."""
        if len(body) < 8:
            raise SecAggError(f"the unmask reply of client {sender} is truncated", reason=SecAggReason.MALFORMED)
        n_from, n_rej = struct.unpack_from("<II", body)
        mine = set(plan.peers(sender))
        others = (set(survivors) - {sender}) & mine
        dropped = sorted(set(dropped) & mine)
        if n_from + n_rej > len(others):
            raise SecAggError(f"the unmask reply of client {sender} lists more senders than survivors", reason=SecAggReason.MALFORMED)
        head = 8 + 4 * (n_from + n_rej)
        if len(body) < head:
            raise SecAggError(f"the unmask reply of client {sender} is truncated", reason=SecAggReason.MALFORMED)
        ids = struct.unpack_from(f"<{n_from + n_rej}I", body, 8)
        share_from, rejected = tuple(ids[:n_from]), tuple(ids[n_from:])
        if (list(share_from) != sorted(set(share_from)) or not set(share_from) <= others
                or not set(rejected) <= others or set(share_from) & set(rejected)):
            raise SecAggError(f"the unmask reply of client {sender} names shares it cannot hold", reason=SecAggReason.MALFORMED)
        if share_from and not plan.double:
            raise SecAggError(f"client {sender} sent self-mask shares in a single-masking round", reason=SecAggReason.MALFORMED)
        mask_len = plan.upload_bytes() * len(dropped)
        if len(body) != head + mask_len + plan.share_bytes() * n_from:
            raise SecAggError(
                f"the unmask reply of client {sender} has {len(body)} bytes, {head + mask_len + plan.share_bytes() * n_from} "
                f"expected for {len(dropped)} pair masks and {n_from} shares", reason=SecAggReason.WRONG_SIZE
            )
        return cls(body[head : head + mask_len], share_from, body[head + mask_len :], rejected)

    def share_of(self, plan: RoundPlan, k: int) -> np.ndarray:
        """The share of ``b_k`` this reply carries (KeyError if none); SecAggError if malformed."""
        idx = self.share_from.index(k) if k in self.share_from else None
        if idx is None:
            raise KeyError(k)
        S = plan.share_bytes()
        try:
            return shamir.unpack_share(self.shares[idx * S : (idx + 1) * S], plan.share_chunks())
        except ValueError as err:
            raise SecAggError(f"a share of client {k}'s self-mask is malformed: {err}", reason=SecAggReason.MALFORMED) from None


def check_unmask_request(plan: RoundPlan, me: int, request: UnmaskRequest) -> None:
    """The rules an honest client applies before it answers (SecAggError naming the broken rule).

    ``S`` and ``D`` partition the round's participants (from the client's own
    plan), ``me ∈ S``, and (double) at least ``t`` of its peers survive
    (``|S ∩ N(me)| ≥ t``; ``|S| ≥ t + 1`` in the full graph), so that a peer
    it reveals pair masks with cannot also be one of the ``t`` holders of
    shares the server would need. Answering at most
    once per round is the caller's job (it holds the client's state).
    """
    S, D = list(request.survivors), list(request.dropped)
    if request.round != plan.round:
        raise SecAggError(f"the unmask request is for round {request.round}, client {me} uploaded in round {plan.round}", reason=SecAggReason.BAD_REQUEST)
    if len(set(S)) != len(S) or len(set(D)) != len(D) or set(S) & set(D):
        raise SecAggError("the unmask request lists a client twice (survivors and dropped must be disjoint)", reason=SecAggReason.BAD_REQUEST)
    if set(S) | set(D) != set(plan.participants):
        raise SecAggError(
            f"the unmask request's survivors and dropped ({sorted(set(S) | set(D))}) are not the round's "
            f"participants {list(plan.participants)}", reason=SecAggReason.BAD_REQUEST
        )
    if me not in S:
        raise SecAggError(f"client {me} is listed as dropped; a dropped client does not unmask", reason=SecAggReason.BAD_REQUEST)
    surviving_peers = len(set(S) & set(plan.peers(me)))
    if plan.double and surviving_peers < plan.threshold_of(me):
        raise SecAggError(
            f"only {surviving_peers} of client {me}'s peers survive; unmasking needs at least its threshold "
            f"t = {plan.threshold_of(me)}", reason=SecAggReason.TOO_FEW
        )


def answer_unmask(plan: RoundPlan, me: int, pair_keys: Mapping[int, bytes], request: UnmaskRequest) -> UnmaskReply:
    """Client ``me``'s answer to an unmask request (after :func:`check_unmask_request`, which it runs).

    Returns its pair masks ``s_{me,k}`` for its peers ``k ∈ D`` and (double)
    the shares of ``b_k`` it received from its peers ``k ∈ S``, each verified
    under its pair key; a share that fails is withheld and listed in
    ``rejected``. Never a share of a dropped client, never a pair mask with a
    survivor.
    """
    check_unmask_request(plan, me, request)
    mine = set(plan.peers(me))
    dropped = sorted(mine & set(request.dropped))
    senders = sorted(mine & set(request.survivors)) if plan.double else []
    materials = _materials(plan, me, pair_keys, dropped + senders)
    m, B = plan.elements(), plan.ring_bits
    masks = b"".join(pack_ring(mask_from_key(materials[k].mask, m, B), B) for k in dropped)
    share_from, rejected, shares = [], [], []
    for k in senders:
        sealed = request.shares.get(k)
        if sealed is None:
            continue
        try:
            values = open_share(plan, me, k, materials[k], sealed)
        except SecAggError:
            rejected.append(k)
            continue
        share_from.append(k)
        shares.append(shamir.pack_share(values))
    return UnmaskReply(masks, tuple(share_from), b"".join(shares), tuple(rejected))


def reveal_masks(plan: RoundPlan, me: int, pair_keys: Mapping[int, bytes], dropped: list[int]) -> bytes:
    """The pair masks ``me`` shared with each dropped peer, packed in sorted order (the masks of an unmask reply)."""
    dropped = sorted(set(plan.peers(me)) & set(dropped))
    materials = _materials(plan, me, pair_keys, dropped)
    m, B = plan.elements(), plan.ring_bits
    return b"".join(pack_ring(mask_from_key(materials[k].mask, m, B), B) for k in dropped)


# --------------------------------------------------------------------------- unmasking (server side)


def unmask_requests(
    plan: RoundPlan, shares: Mapping[int, Mapping[int, SealedShare]], dropped: Sequence[int]
) -> dict[int, UnmaskRequest]:
    """The request for each survivor: ``S`` = the keys of ``shares`` (valid uploads), ``D`` = ``dropped``,
    and the shares addressed to it by its surviving peers (none in single masking)."""
    survivors = tuple(sorted(shares))
    out = {}
    for j in survivors:
        addressed = {k: shares[k][j] for k in survivors if k != j and j in shares[k]} if plan.double else {}
        out[j] = UnmaskRequest(plan.round, survivors, tuple(sorted(dropped)), addressed)
    return out


@dataclass
class MaskedSum:
    """The decoded sum of the survivors' updates and the summed flags per tensor."""

    total: dict[str, np.ndarray]
    over: dict[str, int]
    under: dict[str, int]
    clients: int


def unmask_sum(
    plan: RoundPlan, uploads: Mapping[int, bytes], replies: Mapping[int, UnmaskReply], dropped: Sequence[int]
) -> MaskedSum:
    """Add the survivors' uploads mod 2^B, remove the pair masks with ``dropped`` and (double) every
    survivor's self-mask rebuilt from ``t`` shares, and decode the sum.

    ``uploads`` are the survivors' valid uploads, ``dropped`` every other
    participant, ``replies[j]`` survivor ``j``'s :class:`UnmaskReply`. Raises
    SecAggError if a message has the wrong size, a survivor's pair masks with
    ``D`` are missing, or fewer than ``t`` shares of some self-mask arrived.
    """
    B, m = plan.ring_bits, plan.elements()
    survivors = sorted(uploads)
    if set(survivors) | set(dropped) != set(plan.participants) or set(survivors) & set(dropped):
        raise SecAggError(f"survivors {survivors} and dropped {sorted(dropped)} must partition the participants", reason=SecAggReason.BAD_REQUEST)
    total = np.zeros(m, dtype=np.uint64)
    try:
        for i in survivors:
            add_packed(total, uploads[i], B)
    except ValueError as err:
        raise SecAggError(f"an upload is malformed: {err}", reason=SecAggReason.MALFORMED) from None
    if dropped:
        size = plan.upload_bytes()
        gone = {i: sorted(set(plan.peers(i)) & set(dropped)) for i in survivors}  # i's dropped peers
        missing = [i for i in survivors if gone[i] and (i not in replies or len(replies[i].masks) != size * len(gone[i]))]
        if missing:
            raise SecAggError(f"survivors {missing} did not reveal their pair masks with the dropped {sorted(dropped)}", reason=SecAggReason.TOO_FEW)
        for i in survivors:
            blob = replies[i].masks if gone[i] else b""
            for idx, k in enumerate(gone[i]):  # survivor i added +s_ik for k > i, −s_ik for k < i
                try:
                    add_packed(total, blob[idx * size : (idx + 1) * size], B, subtract=k > i)
                except ValueError as err:
                    raise SecAggError(f"the pair masks of survivor {i} are malformed: {err}", reason=SecAggReason.MALFORMED) from None
    if plan.double:
        for k in survivors:
            t = plan.threshold_of(k)
            points = {j + 1: replies[j].share_of(plan, k) for j in survivors if j in replies and k in replies[j].share_from}
            if len(points) < t:
                raise SecAggError(f"only {len(points)} of the {t} shares of client {k}'s self-mask arrived", reason=SecAggReason.TOO_FEW)
            try:
                secret = shamir.from_chunks(shamir.combine(points, t), plan.secret_bytes())
                packed = pack_ring(self_mask_of(plan, k, secret), B) if plan.seeded else secret
                add_packed(total, packed, B, subtract=True)
            except ValueError as err:
                raise SecAggError(f"the self-mask of client {k} cannot be rebuilt: {err}", reason=SecAggReason.MALFORMED) from None
    out, over, under, start = {}, {}, {}, 0
    for name, shape, clip, c in zip(plan.tensors, plan.shapes, plan.clips, plan.coords()):
        out[name] = plan.codec.decode_ring_sum(total[start : start + c], clip, len(survivors), plan.seed(name), shape)
        start += c
    for name in plan.tensors:
        over[name], under[name] = int(total[start]), int(total[start + 1])
        start += 2
    return MaskedSum(out, over, under, len(survivors))


# --------------------------------------------------------------------------- sealing (Wegman–Carter) and the channel pad


def _tag_message(mode: str, purpose: str, server_round: int, sender: int, key_id: str, body: bytes | memoryview) -> bytes:
    head = f"{mode}|{purpose}|{int(server_round)}|{int(sender)}|{key_id}|".encode()
    return _TAG_DOMAIN + struct.pack("<I", len(head)) + head + bytes(body)


def seal(source: KeySource, me: int, mode: str, purpose: str, server_round: int, body: bytes) -> tuple[str, bytes]:
    """Tag ``body`` under a fresh 16-byte key of link client~server; return (key id, tag)."""
    key = source.enc_keys(client_sae(me), SERVER_SAE, 1, 8 * MAC_KEY_BYTES)[0]
    return key.key_id, mac.tag(_tag_message(mode, purpose, server_round, me, key.key_id, body), key.key)


def _server_key(source: KeySource, sender: int, key_id: str) -> bytes:
    try:
        return source.dec_keys(SERVER_SAE, client_sae(sender), [str(key_id)])[0].key
    except UnknownKey:
        raise UnknownKeyId(
            f"key id {key_id!r} from client {sender} is unknown or was already used: a replayed or forged message"
        ) from None


def open_seal(
    source: KeySource, sender: int, mode: str, purpose: str, server_round: int, body: bytes, key_id: str, tag: bytes
) -> None:
    """Check a sealed message; raise UnknownKeyId if replayed or forged, SecAggError if tampered."""
    if not isinstance(key_id, str) or not isinstance(tag, bytes) or len(tag) != TAG_BYTES or len(key_id) > 256:
        raise SecAggError(f"the {purpose} of client {sender} has a malformed seal (key id str, tag of {TAG_BYTES} bytes)", reason=SecAggReason.MALFORMED)
    key = _server_key(source, sender, key_id)
    if len(key) != MAC_KEY_BYTES or not mac.verify(
        _tag_message(mode, purpose, server_round, sender, key_id, body), tag, key
    ):
        raise SecAggError(f"the {purpose} of client {sender} fails its MAC: tampered in transit", reason=SecAggReason.BAD_MAC)


def pad_and_seal(source: KeySource, me: int, server_round: int, payload: bytes) -> tuple[bytes, str, bytes]:
    """channel-pad: (payload XOR fresh key, key id, tag); one key of 16 + len bytes (tag key, then pad)."""
    key = source.enc_keys(client_sae(me), SERVER_SAE, 1, 8 * (MAC_KEY_BYTES + len(payload)))[0]
    cipher = xor_pad(payload, key.key[MAC_KEY_BYTES:])
    tag = mac.tag(_tag_message("channel-pad", "upload", server_round, me, key.key_id, cipher), key.key[:MAC_KEY_BYTES])
    return cipher, key.key_id, tag


def open_pad(source: KeySource, sender: int, server_round: int, cipher: bytes, key_id: str, tag: bytes) -> bytes:
    """channel-pad, server side: verify then unpad; raise SecAggError if replayed, forged or tampered."""
    if not isinstance(key_id, str) or not isinstance(tag, bytes) or len(tag) != TAG_BYTES or len(key_id) > 256:
        raise SecAggError(f"the upload of client {sender} has a malformed seal (key id str, tag of {TAG_BYTES} bytes)", reason=SecAggReason.MALFORMED)
    key = _server_key(source, sender, key_id)
    if len(key) != MAC_KEY_BYTES + len(cipher):
        raise SecAggError(f"the upload of client {sender} does not match its pad length: tampered in transit", reason=SecAggReason.WRONG_SIZE)
    if not mac.verify(_tag_message("channel-pad", "upload", server_round, sender, key_id, cipher), tag, key[:MAC_KEY_BYTES]):
        raise SecAggError(f"the upload of client {sender} fails its MAC: tampered in transit", reason=SecAggReason.BAD_MAC)
    return xor_pad(cipher, key[MAC_KEY_BYTES:])
