"""Checks a run must pass before any round starts, across the layers below the server.

``qfl.config`` checks each value on its own (types, ranges, names of modes);
it imports nothing else from qfl. What needs the codec registry, the secure
aggregation rules, the QKD network's link syntax, the quantum backends or the
dataset files is checked here, once, by every entry point that starts a run
(``qfl run`` through :mod:`qfl.simulations.runner`, and the ServerApp that
``flwr run`` loads). Every failure is a :class:`~qfl.config.ConfigError`
naming the fix.
"""

from __future__ import annotations

import math

from qfl.config import ConfigError, RunConfig


def check_components(cfg: RunConfig) -> RunConfig:
    """Codecs, security mode and QKD network keys, quantum settings; return ``cfg``."""
    _check_codecs(cfg)
    if cfg.security != "none":
        _check_security(cfg)
    if cfg.model not in ("cnn", "mlp", "streamsplit") or cfg.dataset in ("ntangled", "magic") or cfg.client_kinds:
        from qfl.clients.quantum import check_quantum_config

        check_quantum_config(cfg)  # ConfigError naming the key
    return cfg


# Fewer validation examples than this per client (on average) make federated evaluation empty or noise.
MIN_VALIDATION_EXAMPLES = 5


def preflight(cfg: RunConfig) -> list[str]:
    """:func:`check_components`, then the dataset: files present, enough samples per client.
    Returns warnings: settings that run but give a result worse than the user likely expects."""
    from qfl.clients.tasks import task_for

    check_components(cfg)
    task = task_for(cfg)  # raises DatasetNotFound with the expected paths
    if cfg.clients > task.train_size():
        raise ConfigError(
            f"clients={cfg.clients} exceeds the {task.train_size()} training samples of {cfg.dataset}; "
            "use fewer clients", key="clients",
        )
    try:
        task.check_partition(cfg.clients)
    except ValueError as err:
        raise ConfigError(str(err), key="clients") from None
    warnings = []
    if cfg.fed_eval and cfg.model != "streamsplit":  # edge devices evaluate on their own streams
        per_client = task.train_size() / cfg.clients * cfg.local_val_fraction
        if per_client < MIN_VALIDATION_EXAMPLES:
            warnings.append(
                f"each client keeps about {per_client:.1f} validation examples (local_val_fraction="
                f"{cfg.local_val_fraction} of ~{task.train_size() / cfg.clients:.0f}), fewer than "
                f"{MIN_VALIDATION_EXAMPLES}: federated accuracy will be noisy or '-' (no client could evaluate); "
                "raise local_val_fraction, use fewer clients, or set fed_eval=false"
            )
    return warnings


def _check_codecs(cfg: RunConfig) -> None:
    from qfl.compression import make_codec
    from qfl.compression.downlink import make_downlink_codec

    try:
        make_codec(cfg.codec, cfg.codec_params)
    except ValueError as err:
        raise ConfigError(str(err), key="codec") from None
    try:
        make_downlink_codec(cfg.downlink_codec, cfg.downlink_codec_params, cfg.downlink_mode)
    except ValueError as err:
        raise ConfigError(str(err), key="downlink_codec") from None
    if cfg.downlink_mode == "delta" and cfg.security != "none":
        raise ConfigError(
            f"downlink_mode=delta is implemented for security=none only (got security={cfg.security}); "
            "set security=none or downlink_mode=model", key="downlink_mode",
        )
    if cfg.model == "streamsplit":
        try:
            make_codec(cfg.edge_codec, cfg.edge_codec_params)
        except ValueError as err:
            raise ConfigError(str(err), key="edge_codec") from None


def _check_security(cfg: RunConfig) -> None:
    """The QKD network keys parse and name real nodes; a masked mode has a codec that commutes with sum
    and no codec parameter its ring form would ignore (``make_summable_codec``)."""
    from qfl.compression import make_summable_codec
    from qfl.compression.summable import MAX_CLIP, MIN_CLIP, ring_bits
    from qfl.quantum.qkd.network import parse_link_spec
    from qfl.security.graph import threshold
    from qfl.security.secagg import MASKED_MODES, network_nodes, round_colluders, round_degree

    nodes = network_nodes(cfg.clients)
    key = "qkd_links"
    try:
        for km in parse_link_spec(cfg.qkd_links, nodes).values():
            if not (math.isfinite(km) and km >= 0):
                raise ValueError(f"qkd_links distances must be finite and >= 0 km, got {km}")
        key = "qkd_eavesdropped"
        for fraction in parse_link_spec(cfg.qkd_eavesdropped, nodes, default=1.0).values():
            if not 0 < fraction <= 1:
                raise ValueError(
                    f"qkd_eavesdropped fractions (the share of pulses Eve intercepts) must be in (0, 1], got {fraction}"
                )
        if cfg.security in MASKED_MODES:
            participants = max(1, round(cfg.fraction * cfg.clients))  # as the strategy samples a round
            if participants < cfg.secure_min_clients:
                key = "clients" if cfg.clients < cfg.secure_min_clients else "fraction"
                raise ValueError(
                    f"security={cfg.security} sums the uploads of {participants} client(s) per round "
                    f"(clients={cfg.clients}, fraction={cfg.fraction}), fewer than secure_min_clients="
                    f"{cfg.secure_min_clients}: the sum would reveal one update; sample at least "
                    f"{cfg.secure_min_clients} clients per round, or set security=none"
                )
            key = "codec"
            codec = make_summable_codec(cfg.codec, cfg.codec_params)  # ValueError naming the parameter or codecs
            bits = ring_bits(codec.ring_levels(), cfg.clients)
            if bits > 64:
                raise ValueError(
                    f"{cfg.clients} clients with codec {cfg.codec!r} need a {bits}-bit ring; "
                    "at most 64 bits are supported; use fewer bits (codec.bits) or fewer clients"
                )
            key = "secure_corrupt"
            n = max(2, round(cfg.fraction * cfg.clients))  # the participants of a full round
            degree = round_degree(cfg, n)
            peers = degree or n - 1
            t = max(cfg.secure_threshold, threshold(peers, round_colluders(cfg, n, degree)))
            if cfg.secure_masking == "double" and t > peers:
                raise ValueError(
                    f"a round of {n} clients, each with {peers} masking peers, needs a self-mask threshold of {t} "
                    f"to resist secure_corrupt={cfg.secure_corrupt} colluders (or secure_threshold), more than "
                    "its peers: lower secure_corrupt or secure_threshold, raise secure_degree, or sample more clients"
                )
            key = "secure_clip"
            if not MIN_CLIP <= cfg.secure_clip <= MAX_CLIP:
                raise ValueError(
                    f"secure_clip={cfg.secure_clip} is outside [2^-100, 2^100], where ring forms quantize "
                    "(qsgd and ternary in float32); set secure_clip between 1e-30 and 1e30"
                )
    except ValueError as err:
        raise ConfigError(str(err), key=key) from None
