"""What a run's security settings hide, from whom, in words (docs/threat-model.md, "What each mode hides").

The console's start line and each run's ``report.md`` say it from here, so the
claims are written once beside the code that makes them true.
"""

from __future__ import annotations

from qfl.config import RunConfig

from .secagg import MASKED_MODES, SECURITY_LEVELS


def topology_caveat(cfg: RunConfig) -> str:
    """Who else can read the masks because of how pair keys travel; "" when only the two ends can."""
    if cfg.security not in MASKED_MODES:
        return ""
    if cfg.qkd_topology == "star":
        return "the server relays the pair keys, so it could read the masks"
    if cfg.qkd_topology == "trusted":
        return f"{cfg.qkd_relays} trusted relays read the pair keys they relay: private only if none colludes"
    return ""


def protection(cfg: RunConfig) -> list[tuple[str, str]]:
    """(party, what the run hides from it) rows, then the integrity and the key assumptions."""
    mode = str(cfg.security)
    computational = " (computationally: ChaCha20 keystream from 256-bit QKD seeds)" if mode == "expanded" else ""
    rows: list[tuple[str, str]] = [("level", SECURITY_LEVELS[mode])]
    if mode in MASKED_MODES and cfg.qkd_topology == "star":
        rows.append(("the server", "nothing certain: as the star's hub it relays every pair key and could read the "
                                   "masks; updates are hidden from outsiders only"))
        rows.append(("the network", f"everything: uploads are masked, shares one-time-pad encrypted{computational}"))
    elif mode in MASKED_MODES:
        rows.append(("a curious server", f"every client's update; it learns only the sum of the surviving uploads{computational}"))
        if cfg.secure_masking == "double":
            rows.append((
                "a server that lies about who dropped",
                f"every single update, while fewer than 2t − d of a client's d masking peers collude with it "
                f"(t is sized for secure_corrupt = {cfg.secure_corrupt} of the clients colluding){computational}"
                + ("; self-masks are ChaCha20 keystreams of shared 256-bit seeds" if cfg.secure_self_mask == "seed" else ""),
            ))
        else:
            rows.append(("a server that lies about who dropped",
                         "nothing is guaranteed (secure_masking = single): it could unmask a client it claims dropped"))
        rows.append(("the network", f"everything: uploads are masked, shares one-time-pad encrypted{computational}"))
    elif mode == "channel-pad":
        rows.append(("a curious server", "nothing: the server removes the pad and sees every update"))
        rows.append(("the network", "every payload (a one-time pad under QKD key shared with the server)"))
    else:
        rows.append(("the server and the network", "nothing: updates travel in clear"))
    caveat = topology_caveat(cfg)
    if caveat and cfg.qkd_topology != "star":
        rows.append(("key relays", caveat))
    if mode != "none":
        rows.append(("integrity", "every upload carries a Wegman–Carter MAC under fresh key: no forgery or replay "
                                  "by the network"))
        store = ("key_source = store: one SQLite file holds every link's key, so the separation of links is "
                 "modelled, not enforced (threat model, assumption 3)") if cfg.key_source == "store" else \
            "key_source = kms: each SAE gets only its own links' keys over mutual TLS"
        rows.append(("key", f"QKD key is secret and used once ({cfg.qkd_topology} at {cfg.qkd_distance_km:g} km); {store}"))
    return rows
