"""The run configuration: one schema, its defaults, and its validation.

A run is configured by a TOML file, ``--set key=value`` overrides, or Flower's
``run_config`` (for ``flwr run .``); all three go through :func:`resolve_config`,
which rejects unknown keys and bad values with a message that names the key
and the fix. This module is plain data and imports nothing else from qfl:
what needs another layer (the codec registry, secure aggregation's rules, the
quantum backends, the dataset files) is checked by
:func:`qfl.server.preflight.check_components` before any round starts.
Keys of the form ``codec.NAME`` are codec parameters and land in
:attr:`RunConfig.codec_params`.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from qfl.errors import ConfigError

MODELS = ("cnn", "mlp", "vqc", "hybrid")
DATASETS = ("digits", "mnist", "cifar10", "ntangled", "magic")
SECURITY_MODES = ("none", "masked-sum", "channel-pad", "expanded")
SECURE_MASKINGS = ("double", "single")
KEY_POLICIES = ("wait", "skip", "abort")
KEY_SOURCES = ("store", "kms")
QKD_TOPOLOGIES = ("mesh", "star")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
_PARAM_TABLES = {"codec": "codec_params", "downlink_codec": "downlink_codec_params"}


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs. Defaults are the `make demo` run."""

    rounds: int = 20
    clients: int = 10
    fraction: float = 1.0  # share of clients sampled for training each round
    alpha: float | None = None  # Dirichlet concentration over labels; None = IID
    seed: int = 0
    model: str = "cnn"
    dataset: str = "digits"
    data_dir: str = "data"  # where MNIST / CIFAR-10 files are looked for
    test_fraction: float = 0.2  # held-out share of digits for central evaluation
    local_val_fraction: float = 0.1  # share of each client's data kept for federated evaluation
    codec: str = "qsgd"  # 4-bit QSGD by default (codec.bits); the demo's masked sums take it
    codec_params: dict[str, Any] = field(default_factory=dict)
    downlink_codec: str = "fp32"  # how the global model travels to clients (stateless codecs only)
    downlink_codec_params: dict[str, Any] = field(default_factory=dict)
    # -- secure aggregation (qfl.security.secagg) and the simulated QKD network (qfl.quantum.qkd.network)
    security: str = "masked-sum"  # none | masked-sum | channel-pad | expanded
    key_policy: str = "wait"  # a link short of key: wait (simulated clock) | skip (leave clients out) | abort
    key_source: str = "store"  # store (SQLite pools, simulations) | kms (ETSI GS QKD 014 service)
    key_store: str = ""  # SQLite key store path; empty = <run dir>/keys.db
    kms_url: str = ""  # https://host:port for key_source = "kms"
    kms_certs: str = ""  # a `qfl certs` directory for key_source = "kms"
    qkd_topology: str = "mesh"  # mesh (a link per pair) | star (the server relays; it can read relayed masks)
    qkd_distance_km: float = 10.0  # fibre length of every direct link
    qkd_links: str = ""  # per-link distances, e.g. "client-0~client-1=50, client-2~server=80"
    qkd_eavesdropped: str = ""  # intercept-resend eavesdroppers, e.g. "client-1~client-2" or "client-0~server:0.5"
    qkd_rate: float = 0.0  # secret-key bits/s of every link; 0 = the decoy-BB84 model at the distance
    qkd_round_s: float = 1.0  # simulated seconds of key generation per round
    qkd_check_pulses: int = 0  # pulses of a BB84 Monte-Carlo run that admits every link (0: only eavesdropped links)
    secure_clip: float = 0.25  # first round's shared clip bound |Δ| <= C of masked sums (adapted per tensor)
    secure_min_clients: int = 2  # fewest surviving uploads a masked sum may reveal
    # double (default): every upload also carries a Shamir-shared one-time self-mask, so a server that
    # lies about who dropped still cannot unmask one update (Bonawitz et al. 2017). single: pair masks
    # only, ~1/3 of the key, secure against an HONEST-BUT-CURIOUS server only (one that never asks
    # for the pair masks of a client whose upload it received).
    secure_masking: str = "double"  # double | single
    secure_threshold: int = 0  # Shamir threshold t of the self-masks; 0 = a strict majority of each client's peers
    server_opt: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9  # FedAvgM
    adam_beta1: float = 0.9  # FedAdam
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3
    local_epochs: int = 3
    batch_size: int = 32
    lr: float = 0.1  # client SGD learning rate
    momentum: float = 0.9  # client SGD momentum
    fed_eval: bool = True  # also evaluate on the clients' local data each round
    timeout_s: float = 600.0  # how long the server waits for replies per round
    # Largest 'num-examples' (averaging weight) the server accepts from one client
    # whose partition size it does not know; a reply claiming more is dropped.
    max_client_examples: int = 100_000
    client_cpus: float = 1.0  # Ray CPUs per simulated client
    # HOST:PORT of a running Ray cluster's head (`ray start --head --port=PORT`) to run the clients on;
    # empty = a private Ray instance on this machine, stopped when the run ends.
    ray_address: str = ""
    # -- quantum clients (qfl.clients.quantum; checked there)
    qubits: int = 4  # circuit width; quantum datasets have this many qubits
    layers: int = 2  # variational layers
    ansatz: str = "hardware-efficient"  # hardware-efficient | strongly-entangling
    embedding: str = "angle"  # angle | amplitude | state (quantum data fed as states)
    backend: str = "default"  # default (default.qubit, broadcast; fastest here) | lightning (adjoint) | qiskit (aer estimator)
    shots: int = 0  # 0 = exact expectations
    noise: float = 0.0  # depolarizing probability per layer (0 = noiseless)
    quantum_samples: int = 400  # states generated for ntangled / magic (train + test)
    data_qubits: int = 0  # qubits of the ntangled / magic states; 0 = qubits (a wider circuit adds |0> ancillas)
    client_kinds: str = ""  # mixed federations, e.g. "quantum:1,classical:3" (in partition order)

    def to_flat(self) -> dict[str, Any]:
        """Flat key/value view (codec params as ``codec.NAME``), None values left out."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _PARAM_TABLES.values():
                prefix = next(k for k, v in _PARAM_TABLES.items() if v == f.name)
                flat.update({f"{prefix}.{k}": v for k, v in value.items()})
            elif value is not None:
                flat[f.name] = value
        return flat

    def to_toml(self) -> str:
        """The resolved configuration as TOML, readable by :func:`load_config_file`."""
        top = {k: v for k, v in self.to_flat().items() if "." not in k}
        for prefix, name in _PARAM_TABLES.items():
            if getattr(self, name):
                top[prefix + "_params"] = dict(getattr(self, name))
        return tomli_w.dumps(top)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in _PARAM_TABLES.values()}
_TYPES = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _coerce(key: str, value: Any) -> Any:
    kind = _TYPES[key]
    if key == "alpha":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "iid", "")):
            return None
        kind = "float"
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key!r} must be {kind}, got {value!r}")


def _check(cfg: RunConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(
        0.0 <= cfg.local_val_fraction < 1.0,
        f"local_val_fraction must be in [0, 1), got {cfg.local_val_fraction}",
    )
    need(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    need(cfg.clients >= 1, f"clients must be >= 1, got {cfg.clients}; set e.g. clients=10")
    need(0.0 < cfg.fraction <= 1.0, f"fraction must be in (0, 1], got {cfg.fraction}")
    need(
        cfg.alpha is None or cfg.alpha > 0,
        f"alpha must be > 0 (smaller = more label skew), got {cfg.alpha}; leave it out for IID",
    )
    need(cfg.model in MODELS, f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    need(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    need(0.0 < cfg.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {cfg.test_fraction}")
    need(
        cfg.security in SECURITY_MODES,
        f"unknown security mode {cfg.security!r}; choose one of {', '.join(SECURITY_MODES)}",
    )
    need(cfg.key_policy in KEY_POLICIES, f"unknown key_policy {cfg.key_policy!r}; choose one of {', '.join(KEY_POLICIES)}")
    need(cfg.key_source in KEY_SOURCES, f"unknown key_source {cfg.key_source!r}; choose one of {', '.join(KEY_SOURCES)}")
    need(
        cfg.key_source != "kms" or (cfg.kms_url.startswith("https://") and bool(cfg.kms_certs)),
        "key_source='kms' needs kms_url='https://host:port' and kms_certs=DIR (made by `qfl certs`)",
    )
    need(
        cfg.qkd_topology in QKD_TOPOLOGIES,
        f"unknown qkd_topology {cfg.qkd_topology!r}; choose one of {', '.join(QKD_TOPOLOGIES)}",
    )
    need(cfg.qkd_distance_km >= 0, f"qkd_distance_km must be >= 0, got {cfg.qkd_distance_km}")
    need(cfg.qkd_rate >= 0, f"qkd_rate must be >= 0 (0 = the decoy-BB84 model), got {cfg.qkd_rate}")
    need(cfg.qkd_round_s >= 0, f"qkd_round_s must be >= 0, got {cfg.qkd_round_s}")
    need(cfg.qkd_check_pulses >= 0, f"qkd_check_pulses must be >= 0, got {cfg.qkd_check_pulses}")
    need(cfg.secure_clip > 0, f"secure_clip must be > 0, got {cfg.secure_clip}")
    need(cfg.secure_min_clients >= 2, f"secure_min_clients must be >= 2 (one upload would be revealed), got {cfg.secure_min_clients}")
    need(
        cfg.secure_masking in SECURE_MASKINGS,
        f"unknown secure_masking {cfg.secure_masking!r}; choose double (secure against a lying server) or single "
        "(honest-but-curious server only)",
    )
    need(
        0 <= cfg.secure_threshold < cfg.clients,
        f"secure_threshold must be in [0, clients) (0 = a strict majority of the peers), got {cfg.secure_threshold}",
    )
    need(
        cfg.server_opt in SERVER_OPTIMIZERS,
        f"unknown server_opt {cfg.server_opt!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}",
    )
    need(cfg.server_lr > 0, f"server_lr must be > 0, got {cfg.server_lr}")
    need(0 <= cfg.server_momentum < 1, f"server_momentum must be in [0, 1), got {cfg.server_momentum}")
    need(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)")
    need(cfg.adam_tau > 0, f"adam_tau must be > 0, got {cfg.adam_tau}")
    need(cfg.local_epochs >= 1, f"local_epochs must be >= 1, got {cfg.local_epochs}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.timeout_s > 0, f"timeout_s must be > 0, got {cfg.timeout_s}")
    need(
        1 <= cfg.max_client_examples <= 2**53,
        f"max_client_examples must be in [1, 2**53], got {cfg.max_client_examples}; "
        "set it to at least the largest client's training-set size",
    )
    need(cfg.client_cpus > 0, f"client_cpus must be > 0, got {cfg.client_cpus}")
    need(
        cfg.ray_address == "" or _is_host_port(cfg.ray_address),
        f"ray_address must be HOST:PORT of a Ray head node (as printed by `ray start --head`), got {cfg.ray_address!r}; "
        "leave it empty to run on a private Ray instance on this machine",
    )
    # Codecs, security rules, QKD link specs, quantum backends and datasets are checked by
    # qfl.server.preflight, which may import the layers that own them; this module imports none.


def _is_host_port(address: str) -> bool:
    host, colon, port = address.rpartition(":")
    return bool(colon and host and port.isdigit() and 0 < int(port) < 65536)


def resolve_config(values: Mapping[str, Any]) -> RunConfig:
    """Build a checked RunConfig from flat keys (``codec.bits`` style allowed)."""
    kwargs: dict[str, Any] = {}
    # RunConfig's *_params fields, each a dict[str, Any]; typed Any so that **tables type-checks beside **kwargs
    tables: dict[str, Any] = {name: {} for name in _PARAM_TABLES.values()}
    for key, value in values.items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in _PARAM_TABLES:
            tables[_PARAM_TABLES[prefix]][rest] = value
        elif dot and prefix in tables:  # codec_params.bits (a flattened [codec_params] table)
            tables[prefix][rest] = value
        elif key.endswith("_params") and key[: -len("_params")] in _PARAM_TABLES and isinstance(value, Mapping):
            tables[key].update(value)
        elif key in _FIELDS:
            kwargs[key] = _coerce(key, value)
        else:
            close = difflib.get_close_matches(key, list(_FIELDS) + [p + ".NAME" for p in _PARAM_TABLES], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            table_keys = ", ".join(f"{p}.NAME" for p in _PARAM_TABLES)
            raise ConfigError(f"unknown config key {key!r}{hint} (valid keys: {', '.join(sorted(_FIELDS))}, {table_keys})")
    cfg = RunConfig(**kwargs, **tables)
    _check(cfg)
    return cfg


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and (prefix + key) in _PARAM_TABLES:
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, Mapping) and key.endswith("_params"):
            flat.update(_flatten(value, f"{prefix}{key[: -len('_params')]}."))
        else:
            flat[prefix + key] = value
    return flat


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into flat keys; raise ConfigError if unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        return _flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are TOML literals or bare strings."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            values[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw.strip()
    return values


def build_config(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the file, then ``--set`` overrides; checked."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update(parse_overrides(overrides))
    return resolve_config(values)
