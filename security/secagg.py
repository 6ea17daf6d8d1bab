"""Secure aggregation of one round: the protocol's steps, on bytes and key sources.

The Flower glue lives in ``qfl.server.strategy`` (server half) and
``qfl.clients.app`` (client half); this module holds the steps both run, so
each is written once. SAE names: the server is ``"server"``, the client of
partition ``p`` is ``"client-p"`` (:func:`client_sae`).

Modes (``security=``):

**masked-sum** — information-theoretically hiding. A round's plan
(:class:`RoundPlan`, chosen by the server) fixes the participants, the
codec's integer form (``qfl.compression.summable``: ``s`` levels, rand-k
support), the clip bound per tensor and the ring ``B = bit_length(n·s)``.

1. *setup*: client ``i`` takes, as ETSI master, one key per higher peer
   ``j > i`` on link ``client-i~client-j`` (``enc_keys``) and returns the key
   ids; the server relays ids only, never key.
2. *train*: client ``j`` fetches the keys of its lower peers by id
   (``dec_keys``), encodes Δ as codes plus two flags per tensor, adds
   ``+m_ij`` for ``j > i`` and ``−m_ij`` for ``j < i`` (masks read straight
   from the key, ``B`` bits per element), packs the result at ``B`` bits per
   element and seals it with a Wegman–Carter tag under a fresh 16-byte key of
   link ``client-i~server`` (client as master; the key id travels with it).
3. *reveal* (only if someone dropped): the server fixes the dropped set ``D``
   first, then each survivor reveals its masks with the dropped (sealed too);
   uploads arriving later are never used. The server removes those masks.
4. The server adds the uploads mod ``2^B``: the masks cancel and only the sum of
   the codes remains, which it decodes. It never holds one client's update.

Key cost per round, ``n`` participants, ``m`` ring elements per upload
(``m = Σ coords + 2·tensors``): ``n(n−1)/2`` pair keys of
``⌈m·B/8⌉`` bytes, plus 128 bits per sealed message on each client~server link.

**expanded** — as masked-sum, but each pair key is 32 bytes that seed ChaCha20
(``masking.expand_key``) to make the mask: 256 bits per pair and round.
COMPUTATIONALLY secure only (as strong as ChaCha20), not information-theoretic.

**channel-pad** — any codec. The client XORs its encoded payload with fresh
key of its link to the server (``8·len + 128`` bits: the pad and the tag key)
and seals the ciphertext (encrypt-then-MAC). It hides updates from an
eavesdropper on the channel, **not from the server**, which unpads each update.

Tags bind the mode, the purpose (upload/reveal), the round, the sender and the
key id, so a replayed upload fails twice over: its key id was already
delivered (``UnknownKey``) and its round does not match.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qfl.compression import make_codec
from qfl.compression.summable import SumForm, decode_code_sum, encode_codes, sum_form
from qfl.compression.payload import tensor_seed

from . import mac
from .keys import KeyContainer, KeySource, UnknownKey
from .masking import add_packed, expand_key, key_bytes_needed, mask_from_key, masked_pack, pack_ring, xor_pad

SERVER_SAE = "server"
SECURITY_LEVELS = {
    "none": "none: updates travel in clear",
    "masked-sum": "information-theoretic: one-time-pad masks, the server sees only the sum",
    "expanded": "COMPUTATIONAL only: ChaCha20-expanded masks, the server sees only the sum",
    "channel-pad": "one-time pad against eavesdroppers; the server sees every update",
}
MASKED_MODES = ("masked-sum", "expanded")
EXPANDED_KEY_BYTES = 32
MAC_KEY_BYTES = mac.mac_key_bytes()
SEALED_STYPE = "qfl.secagg/v1"
_TAG_DOMAIN = b"qfl-secagg/v1\x00"


class SecAggError(ValueError):
    """An upload or reveal that must not be used: tampered, replayed, or malformed."""


def client_sae(partition_id: int) -> str:
    """The SAE (key-management name) of the client of partition ``partition_id``."""
    return f"client-{int(partition_id)}"


def network_nodes(clients: int) -> list[str]:
    """The SAEs of a run: the server and one per client partition."""
    return [SERVER_SAE] + [client_sae(i) for i in range(clients)]


# --------------------------------------------------------------------------- the round plan


@dataclass(frozen=True)
class RoundPlan:
    """What every participant of a masked round must agree on (sent by the server)."""

    round: int
    mode: str
    participants: tuple[int, ...]  # partition ids, sorted
    form: SumForm
    tensors: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    clips: tuple[float, ...]
    round_seed: int  # rand-k supports: tensor_seed(round_seed, name)

    @property
    def ring_bits(self) -> int:
        return self.form.ring_bits(len(self.participants))

    def coords(self) -> list[int]:
        """Codes per tensor."""
        return [self.form.coords(self.seed(name), int(np.prod(shape))) for name, shape in zip(self.tensors, self.shapes)]

    def elements(self) -> int:
        """Ring elements per upload: every tensor's codes, then two flags per tensor."""
        return sum(self.coords()) + 2 * len(self.tensors)

    def seed(self, name: str) -> int:
        return tensor_seed(self.round_seed, name)

    def pair_key_bytes(self) -> int:
        """Key bytes one pair spends this round."""
        if self.mode == "expanded":
            return EXPANDED_KEY_BYTES
        return key_bytes_needed(self.elements(), self.ring_bits)

    def upload_bytes(self) -> int:
        return key_bytes_needed(self.elements(), self.ring_bits)

    def to_config(self) -> dict[str, object]:
        """Flat values for a Flower ConfigRecord."""
        return {
            "round": self.round,
            "mode": self.mode,
            "participants": list(self.participants),
            "levels": str(self.form.levels),  # may exceed int64 bounds? (2^32-1 does not, but keep it exact)
            "ratio": -1.0 if self.form.ratio is None else self.form.ratio,
            "tensors": json.dumps(list(self.tensors)),
            "shapes": json.dumps([list(s) for s in self.shapes]),
            "clips": list(self.clips),
            "round-seed": str(self.round_seed),
        }

    @classmethod
    def from_config(cls, values: Mapping[str, object]) -> RoundPlan:
        try:
            ratio = float(values["ratio"])
            return cls(
                round=int(values["round"]),
                mode=str(values["mode"]),
                participants=tuple(sorted(int(p) for p in values["participants"])),
                form=SumForm(int(values["levels"]), None if ratio < 0 else ratio),
                tensors=tuple(json.loads(values["tensors"])),
                shapes=tuple(tuple(int(x) for x in s) for s in json.loads(values["shapes"])),
                clips=tuple(float(c) for c in values["clips"]),
                round_seed=int(values["round-seed"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggError(f"malformed round plan: {err}") from None


def make_plan(
    cfg, server_round: int, participants: list[int], shapes: Mapping[str, tuple[int, ...]], clips: Mapping[str, float],
    round_seed: int,
) -> RoundPlan:
    form = sum_form(make_codec(cfg.codec, cfg.codec_params))
    names = tuple(shapes)
    return RoundPlan(
        round=server_round,
        mode=cfg.security,
        participants=tuple(sorted(participants)),
        form=form,
        tensors=names,
        shapes=tuple(tuple(shapes[n]) for n in names),
        clips=tuple(float(clips[n]) for n in names),
        round_seed=int(round_seed),
    )


# --------------------------------------------------------------------------- pair keys and masks (client side)


def take_pair_keys(source: KeySource, plan: RoundPlan, me: int) -> dict[int, KeyContainer]:
    """Setup, as master: one fresh key per higher peer (``enc_keys``)."""
    bits = 8 * plan.pair_key_bytes()
    return {
        peer: source.enc_keys(client_sae(me), client_sae(peer), 1, bits)[0]
        for peer in plan.participants
        if peer > me
    }


def fetch_pair_keys(source: KeySource, me: int, key_ids: Mapping[int, str]) -> dict[int, bytes]:
    """Train, as slave: the keys lower peers took for us, by id (each delivered once)."""
    return {
        peer: source.dec_keys(client_sae(me), client_sae(peer), [key_id])[0].key for peer, key_id in key_ids.items()
    }


def _mask_key(plan: RoundPlan, me: int, peer: int, key: bytes) -> bytes:
    """The key bytes the pair's mask is read from: the QKD key itself, or (expanded) its ChaCha20 stream."""
    if plan.mode != "expanded":
        return key
    lo, hi = sorted((me, peer))
    nonce = struct.pack("<IQ", plan.round & 0xFFFFFFFF, (lo << 32) | hi)
    return expand_key(key[:EXPANDED_KEY_BYTES], key_bytes_needed(plan.elements(), plan.ring_bits), nonce)


def masked_upload(
    plan: RoundPlan, me: int, delta: Mapping[str, np.ndarray], pair_keys: Mapping[int, bytes], rng: np.random.Generator
) -> bytes:
    """Client ``me``'s upload: its codes and flags plus its pairwise masks, packed at ``B`` bits."""
    missing = set(plan.participants) - {me} - set(pair_keys)
    if missing:
        raise SecAggError(f"client {me} lacks pair keys with {sorted(missing)}")
    parts, flags = [], []
    for name, clip in zip(plan.tensors, plan.clips):
        codes, over, under = encode_codes(delta[name], plan.form, clip, plan.seed(name), rng)
        parts.append(codes)
        flags += [over, under]
    q = np.concatenate([*parts, np.asarray(flags, dtype=np.uint64)])
    keys = {peer: _mask_key(plan, me, peer, key) for peer, key in pair_keys.items() if peer in plan.participants}
    return masked_pack(q, me, keys, plan.ring_bits)


def reveal_masks(plan: RoundPlan, me: int, pair_keys: Mapping[int, bytes], dropped: list[int]) -> bytes:
    """Recovery: the masks ``me`` shared with each dropped peer, packed in ``dropped`` order."""
    m, B = plan.elements(), plan.ring_bits
    return b"".join(pack_ring(mask_from_key(_mask_key(plan, me, k, pair_keys[k]), m, B), B) for k in sorted(dropped))


# --------------------------------------------------------------------------- unmasking (server side)


@dataclass
class MaskedSum:
    """The decoded sum of the survivors' updates and the summed flags per tensor."""

    total: dict[str, np.ndarray]
    over: dict[str, int]
    under: dict[str, int]
    clients: int


def unmask_sum(
    plan: RoundPlan, uploads: Mapping[int, bytes], reveals: Mapping[int, bytes], dropped: list[int]
) -> MaskedSum:
    """Add the survivors' uploads mod 2^B, remove the revealed masks of the dropped, decode the sum.

    ``reveals[i]`` is survivor ``i``'s :func:`reveal_masks` output for ``dropped``.
    Raises SecAggError if a message has the wrong size or a reveal is missing.
    """
    B, m = plan.ring_bits, plan.elements()
    survivors = sorted(uploads)
    total = np.zeros(m, dtype=np.uint64)
    try:
        for i in survivors:
            add_packed(total, uploads[i], B)
    except ValueError as err:
        raise SecAggError(f"an upload is malformed: {err}") from None
    if dropped:
        size = key_bytes_needed(m, B)
        for i in survivors:
            blob = reveals.get(i)
            if blob is None or len(blob) != size * len(dropped):
                raise SecAggError(f"survivor {i} did not reveal its masks with the dropped clients {sorted(dropped)}")
            for idx, k in enumerate(sorted(dropped)):  # survivor i added +m_ik for k > i, −m_ik for k < i
                try:
                    add_packed(total, blob[idx * size : (idx + 1) * size], B, subtract=k > i)
                except ValueError as err:
                    raise SecAggError(f"the reveal of survivor {i} is malformed: {err}") from None
    out, over, under, start = {}, {}, {}, 0
    coords = plan.coords()
    for name, shape, clip, c in zip(plan.tensors, plan.shapes, plan.clips, coords):
        out[name] = decode_code_sum(total[start : start + c], plan.form, clip, len(survivors), plan.seed(name), shape)
        start += c
    for name in plan.tensors:
        over[name], under[name] = int(total[start]), int(total[start + 1])
        start += 2
    return MaskedSum(out, over, under, len(survivors))


# --------------------------------------------------------------------------- sealing (Wegman–Carter) and the channel pad


def _tag_message(mode: str, purpose: str, server_round: int, sender: int, key_id: str, body: bytes) -> bytes:
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
        raise SecAggError(
            f"key id {key_id!r} from client {sender} is unknown or was already used: a replayed or forged message"
        ) from None


def open_seal(
    source: KeySource, sender: int, mode: str, purpose: str, server_round: int, body: bytes, key_id: str, tag: bytes
) -> None:
    """Check a sealed message; raise SecAggError if replayed, forged or tampered."""
    key = _server_key(source, sender, key_id)
    if len(key) != MAC_KEY_BYTES or not mac.verify(
        _tag_message(mode, purpose, server_round, sender, key_id, body), tag, key
    ):
        raise SecAggError(f"the {purpose} of client {sender} fails its MAC: tampered in transit")


def pad_and_seal(source: KeySource, me: int, server_round: int, payload: bytes) -> tuple[bytes, str, bytes]:
    """channel-pad: (payload XOR fresh key, key id, tag); one key of 16 + len bytes (tag key, then pad)."""
    key = source.enc_keys(client_sae(me), SERVER_SAE, 1, 8 * (MAC_KEY_BYTES + len(payload)))[0]
    cipher = xor_pad(payload, key.key[MAC_KEY_BYTES:])
    tag = mac.tag(_tag_message("channel-pad", "upload", server_round, me, key.key_id, cipher), key.key[:MAC_KEY_BYTES])
    return cipher, key.key_id, tag


def open_pad(source: KeySource, sender: int, server_round: int, cipher: bytes, key_id: str, tag: bytes) -> bytes:
    """channel-pad, server side: verify then unpad; raise SecAggError if replayed, forged or tampered."""
    key = _server_key(source, sender, key_id)
    if len(key) != MAC_KEY_BYTES + len(cipher):
        raise SecAggError(f"the upload of client {sender} does not match its pad length: tampered in transit")
    if not mac.verify(_tag_message("channel-pad", "upload", server_round, sender, key_id, cipher), tag, key[:MAC_KEY_BYTES]):
        raise SecAggError(f"the upload of client {sender} fails its MAC: tampered in transit")
    return xor_pad(cipher, key[MAC_KEY_BYTES:])
