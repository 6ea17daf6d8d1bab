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
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar, get_type_hints

import tomli_w

from qfl.errors import ConfigError

_T = TypeVar("_T")
_PARAM_TABLES = {"codec": "codec_params", "downlink_codec": "downlink_codec_params", "edge_codec": "edge_codec_params"}


class Choice(StrEnum):
    """A config value from a closed set. Members compare equal to their strings (``cfg.security ==
    "masked-sum"``); :meth:`parse` turns a bad value into a :class:`ConfigError` naming the key and the choices."""

    @classmethod
    def parse(cls, key: str, value: object) -> Self:
        for member in cls:
            if value == member.value:
                return member
        raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(member.value for member in cls)}", key=key)


class Model(Choice):
    CNN = "cnn"
    MLP = "mlp"
    VQC = "vqc"
    HYBRID = "hybrid"
    STREAMSPLIT = "streamsplit"  # edge clients: split contrastive learning on audio (qfl.clients.edge)


class Dataset(Choice):
    DIGITS = "digits"
    MNIST = "mnist"
    CIFAR10 = "cifar10"
    NTANGLED = "ntangled"
    MAGIC = "magic"


class Security(Choice):
    NONE = "none"
    MASKED_SUM = "masked-sum"
    CHANNEL_PAD = "channel-pad"
    EXPANDED = "expanded"


class SecureMasking(Choice):
    DOUBLE = "double"  # pair masks + Shamir-shared self-masks: safe against a server that lies about dropouts
    SINGLE = "single"  # pair masks only: safe against an honest-but-curious server only


class SelfMask(Choice):
    SEED = "seed"  # b_i = ChaCha20(32-byte seed); the seed is Shamir-shared: a share is 34 bytes
    VECTOR = "vector"  # b_i drawn whole from the OS CSPRNG and Shamir-shared whole: a share is 17/16 of an upload


class SecureGraph(Choice):
    SPARSE = "sparse"  # a Harary graph of degree k = O(log n) (Bell et al. 2020); the full graph when k >= n - 1
    FULL = "full"  # every pair of participants masks together (Bonawitz et al. 2017)


class KeyPolicy(Choice):
    WAIT = "wait"
    SKIP = "skip"
    ABORT = "abort"


class KeySource(Choice):
    STORE = "store"
    KMS = "kms"


class QkdTopology(Choice):
    MESH = "mesh"  # a direct link per pair that needs key
    STAR = "star"  # the server relays every pair's key (it can read the relayed masks)
    TRUSTED = "trusted"  # clients attach to qkd_relays trusted relay nodes joined by a backbone mesh


class ServerOptimizer(Choice):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"


class EdgeSplit(Choice):
    ADAPTIVE = "adaptive"  # PPO policy trained in the measured-cost simulator
    STATIC = "static"  # always edge_split_k
    HEURISTIC = "heuristic"  # k = clip(floor(L*(0.6*(1-load) + 0.4*bandwidth)), 1, L-1)
    RANDOM = "random"


class EdgeNegatives(Choice):
    VIRTUAL = "virtual"  # sampled from the device's streaming mixture
    IN_BATCH = "in-batch"  # the other windows of the device's batch


def _is_host_port(address: str) -> bool:
    host, colon, port = address.rpartition(":")
    return bool(colon and host and port.isdigit() and 0 < int(port) < 65536)


def _key(default: _T, meaning: str) -> _T:
    """A config field and its one-line meaning, the one source of `qfl run --help` (:func:`describe_keys`)."""
    return field(default=default, metadata={"help": meaning})


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key=key)


# Each concern is a frozen dataclass that checks its own values; RunConfig inherits them all, so a
# component can take the narrow type it reads (``def f(cfg: QkdConfig)``) while a run passes one RunConfig.


@dataclass(frozen=True)
class _ConfigPart:
    def check(self) -> None:
        """Raise :class:`ConfigError` (naming the key and the fix) on the first invalid value."""


@dataclass(frozen=True)
class FederationConfig(_ConfigPart):
    """Rounds, sampling and the simulation engine."""

    rounds: int = _key(20, "federated rounds to run")
    clients: int = _key(10, "simulated clients (one data partition each)")
    fraction: float = _key(1.0, "share of clients sampled for training each round")
    seed: int = _key(0, "seed of the partitions, sampling and model init (never of QKD key)")
    fed_eval: bool = _key(True, "also evaluate on a sample of clients' local data each round (as many as `fraction` trains)")
    timeout_s: float = _key(600.0, "how long the server waits for replies per round")
    max_client_examples: int = _key(
        100_000, "largest averaging weight ('num-examples') accepted from a client of unknown partition size; "
        "a reply claiming more is dropped")
    client_cpus: float = _key(1.0, "Ray CPUs per simulated client")
    client_state_dir: str = _key(
        "", "where clients keep codec state (error-feedback residuals) between the rounds they train, as files "
        "(qfl.clients.state); empty = <run dir>/client-state in `qfl run`, the node's memory under `flwr run`")
    ray_address: str = _key(
        "", "HOST:PORT of a running Ray cluster's head (`ray start --head`) to run the clients on; "
        "empty = a private Ray instance, stopped when the run ends")

    def check(self) -> None:
        super().check()
        _need(self.rounds >= 1, "rounds", f"rounds must be >= 1, got {self.rounds}")
        _need(self.clients >= 1, "clients", f"clients must be >= 1, got {self.clients}; set e.g. clients=10")
        _need(0.0 < self.fraction <= 1.0, "fraction", f"fraction must be in (0, 1], got {self.fraction}")
        _need(self.timeout_s > 0, "timeout_s", f"timeout_s must be > 0, got {self.timeout_s}")
        _need(
            1 <= self.max_client_examples <= 2**53, "max_client_examples",
            f"max_client_examples must be in [1, 2**53], got {self.max_client_examples}; "
            "set it to at least the largest client's training-set size",
        )
        _need(self.client_cpus > 0, "client_cpus", f"client_cpus must be > 0, got {self.client_cpus}")
        _need(
            self.ray_address == "" or _is_host_port(self.ray_address), "ray_address",
            f"ray_address must be HOST:PORT of a Ray head node (as printed by `ray start --head`), got "
            f"{self.ray_address!r}; leave it empty to run on a private Ray instance on this machine",
        )


@dataclass(frozen=True)
class DataConfig(_ConfigPart):
    """Which data, and how it is split between clients and held out."""

    dataset: Dataset = _key(Dataset.DIGITS, "what the clients learn; digits ships with scikit-learn")
    data_dir: str = _key("data", "where MNIST / CIFAR-10 files are looked for")
    alpha: float | None = _key(None, 'Dirichlet concentration over labels (smaller = more skew); "iid" or left out = IID')
    test_fraction: float = _key(0.2, "held-out share of digits for central evaluation")
    local_val_fraction: float = _key(0.1, "share of each client's data kept for federated evaluation")

    def check(self) -> None:
        super().check()
        _need(
            self.alpha is None or self.alpha > 0, "alpha",
            f"alpha must be > 0 (smaller = more label skew), got {self.alpha}; leave it out for IID",
        )
        _need(0.0 < self.test_fraction < 1.0, "test_fraction", f"test_fraction must be in (0, 1), got {self.test_fraction}")
        _need(
            0.0 <= self.local_val_fraction < 1.0, "local_val_fraction",
            f"local_val_fraction must be in [0, 1), got {self.local_val_fraction}",
        )


@dataclass(frozen=True)
class TrainingConfig(_ConfigPart):
    """The model, the clients' local SGD and the server's optimizer."""

    model: Model = _key(Model.CNN, "the model every client trains")
    local_epochs: int = _key(3, "epochs of local SGD per round")
    batch_size: int = _key(32, "client SGD batch size")
    lr: float = _key(0.1, "client SGD learning rate")
    momentum: float = _key(0.9, "client SGD momentum")
    server_opt: ServerOptimizer = _key(ServerOptimizer.FEDAVG, "how the server applies the mean update")
    server_lr: float = _key(1.0, "server learning rate (≈ 0.01 for fedadam)")
    server_momentum: float = _key(0.9, "FedAvgM server momentum")
    adam_beta1: float = _key(0.9, "FedAdam first-moment decay")
    adam_beta2: float = _key(0.99, "FedAdam second-moment decay")
    adam_tau: float = _key(1e-3, "FedAdam adaptivity (added to the root of the second moment)")

    def check(self) -> None:
        super().check()
        _need(self.local_epochs >= 1, "local_epochs", f"local_epochs must be >= 1, got {self.local_epochs}")
        _need(self.batch_size >= 1, "batch_size", f"batch_size must be >= 1, got {self.batch_size}")
        _need(self.lr > 0, "lr", f"lr must be > 0, got {self.lr}")
        _need(0 <= self.momentum < 1, "momentum", f"momentum must be in [0, 1), got {self.momentum}")
        _need(self.server_lr > 0, "server_lr", f"server_lr must be > 0, got {self.server_lr}")
        _need(
            0 <= self.server_momentum < 1, "server_momentum",
            f"server_momentum must be in [0, 1), got {self.server_momentum}",
        )
        _need(0 <= self.adam_beta1 < 1, "adam_beta1", f"adam_beta1 must be in [0, 1), got {self.adam_beta1}")
        _need(0 <= self.adam_beta2 < 1, "adam_beta2", f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        _need(self.adam_tau > 0, "adam_tau", f"adam_tau must be > 0, got {self.adam_tau}")


@dataclass(frozen=True)
class CodecConfig(_ConfigPart):
    """How updates travel up and the model travels down (codec names and parameters are checked by
    :func:`qfl.server.preflight.check_components`, which may import the codec registry)."""

    codec: str = _key("qsgd", "how clients encode their updates (codec.NAME sets its parameters; qsgd is 4-bit)")
    codec_params: dict[str, Any] = field(default_factory=dict, metadata={"help": "codec.NAME keys: the codec's parameters"})
    downlink_codec: str = _key("fp32", "how the global model travels to clients (stateless codecs only in model mode)")
    downlink_codec_params: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "downlink_codec.NAME keys: the downlink codec's parameters"})
    downlink_mode: str = _key(
        "model", "model: the global model, encoded by downlink_codec, every round; delta: the model's change against "
        "the clients' replica, which the server keeps as its error feedback; any codec (security=none only)")

    def check(self) -> None:
        super().check()
        _need(
            self.downlink_mode in ("model", "delta"), "downlink_mode",
            f"downlink_mode must be 'model' or 'delta', got {self.downlink_mode!r}",
        )


@dataclass(frozen=True)
class SecurityConfig(_ConfigPart):
    """Secure aggregation (qfl.security.secagg) and where its keys come from."""

    security: Security = _key(Security.MASKED_SUM, "secure aggregation mode (docs/threat-model.md)")
    key_policy: KeyPolicy = _key(KeyPolicy.WAIT, "a link short of key: wait (simulated clock) | skip (leave clients out) | abort")
    key_source: KeySource = _key(KeySource.STORE, "store (SQLite pools, simulations) | kms (ETSI GS QKD 014 service)")
    key_store: str = _key("", "SQLite key store path; empty = <run dir>/keys.db")
    kms_url: str = _key("", 'https://host:port for key_source = "kms"')
    kms_certs: str = _key("", 'a `qfl certs` directory for key_source = "kms"')
    secure_clip: float = _key(0.25, "first round's shared clip bound |Δ| <= C of masked sums (adapted per tensor)")
    secure_min_clients: int = _key(2, "fewest surviving uploads a masked sum may reveal")
    secure_masking: SecureMasking = _key(
        SecureMasking.DOUBLE, "double: Shamir-shared self-masks too, safe against a server that lies about "
        "dropouts (Bonawitz et al. 2017); single: ~1/3 of the key, honest-but-curious server only")
    secure_self_mask: SelfMask = _key(
        SelfMask.SEED, "double masking's self-mask: seed (a ChaCha20 keystream from a 256-bit seed, the seed is what "
        "is shared; shares of 34 B) | vector (drawn whole and shared whole; each share 17/16 of an upload)")
    secure_threshold: int = _key(0, "Shamir threshold t of the self-masks; 0 = a strict majority of each client's peers")
    secure_graph: SecureGraph = _key(
        SecureGraph.SPARSE, "masking graph (qfl.security.graph); sparse takes the least even degree whose "
        "failure bound is <= 2^-40 at secure_dropout and secure_corrupt")
    secure_degree: int = _key(0, "peers per client in the sparse graph (rounded up to even); 0 = chosen from the bound")
    secure_dropout: float = _key(0.1, "share of a round's clients expected to drop (sizes the sparse graph)")
    secure_corrupt: float = _key(0.05, "share of clients assumed to collude with the server (sizes thresholds and the graph)")

    def check(self) -> None:
        super().check()
        _need(self.secure_degree >= 0, "secure_degree", f"secure_degree must be >= 0 (0 = chosen), got {self.secure_degree}")
        for key in ("secure_dropout", "secure_corrupt"):
            value = getattr(self, key)
            _need(0 <= value < 0.5, key, f"{key} must be in [0, 0.5), got {value}")
        _need(
            self.key_source != KeySource.KMS or (self.kms_url.startswith("https://") and bool(self.kms_certs)),
            "kms_url", "key_source='kms' needs kms_url='https://host:port' and kms_certs=DIR (made by `qfl certs`)",
        )
        _need(self.secure_clip > 0, "secure_clip", f"secure_clip must be > 0, got {self.secure_clip}")
        _need(
            self.secure_min_clients >= 2, "secure_min_clients",
            f"secure_min_clients must be >= 2 (one upload would be revealed), got {self.secure_min_clients}",
        )


@dataclass(frozen=True)
class QkdConfig(_ConfigPart):
    """The simulated QKD network (qfl.quantum.qkd.network); link specs are parsed by preflight."""

    qkd_topology: QkdTopology = _key(QkdTopology.MESH, "mesh (a link per pair) | star (the server relays; it can read relayed masks) | trusted")
    qkd_relays: int = _key(4, 'trusted relay nodes of qkd_topology = "trusted" (each learns the keys it relays)')
    qkd_distance_km: float = _key(10.0, "fibre length of every direct link")
    qkd_links: str = _key("", 'per-link distances, e.g. "client-0~client-1=50, client-2~server=80"')
    qkd_eavesdropped: str = _key("", 'intercept-resend eavesdroppers, e.g. "client-1~client-2" or "client-0~server:0.5"')
    qkd_rate: float = _key(0.0, "secret-key bits/s of every link; 0 = the decoy-BB84 model at the distance")
    qkd_round_s: float = _key(1.0, "simulated seconds of key generation per round")
    qkd_check_pulses: int = _key(0, "pulses of a BB84 Monte-Carlo run that admits every link (0: only eavesdropped links)")

    def check(self) -> None:
        super().check()
        _need(self.qkd_relays >= 1, "qkd_relays", f"qkd_relays must be >= 1, got {self.qkd_relays}")
        _need(self.qkd_distance_km >= 0, "qkd_distance_km", f"qkd_distance_km must be >= 0, got {self.qkd_distance_km}")
        _need(self.qkd_rate >= 0, "qkd_rate", f"qkd_rate must be >= 0 (0 = the decoy-BB84 model), got {self.qkd_rate}")
        _need(self.qkd_round_s >= 0, "qkd_round_s", f"qkd_round_s must be >= 0, got {self.qkd_round_s}")
        _need(self.qkd_check_pulses >= 0, "qkd_check_pulses", f"qkd_check_pulses must be >= 0, got {self.qkd_check_pulses}")


@dataclass(frozen=True)
class QuantumConfig(_ConfigPart):
    """Quantum clients (qfl.clients.quantum, which checks the combinations through preflight)."""

    qubits: int = _key(4, "circuit width; quantum datasets have this many qubits")
    layers: int = _key(2, "variational layers")
    ansatz: str = _key("hardware-efficient", "hardware-efficient | strongly-entangling")
    embedding: str = _key("angle", "angle | amplitude | state (quantum data fed as states)")
    backend: str = _key("default", "default (default.qubit, broadcast; fastest here) | lightning (adjoint) | qiskit (aer estimator)")
    shots: int = _key(0, "measurement shots per circuit; 0 = exact expectations")
    noise: float = _key(0.0, "depolarizing probability per layer (0 = noiseless)")
    quantum_samples: int = _key(400, "states generated for ntangled / magic (train + test)")
    data_qubits: int = _key(0, "qubits of the ntangled / magic states; 0 = qubits (a wider circuit adds |0> ancillas)")
    client_kinds: str = _key("", 'mixed federations, e.g. "quantum:1,classical:3" or "bell:1,classical:3" (in partition order)')


@dataclass(frozen=True)
class RunConfig(QuantumConfig, QkdConfig, SecurityConfig, CodecConfig, TrainingConfig, DataConfig, FederationConfig):
    """Everything one federated run needs, one concern per base class. Defaults are the `make demo` run."""

    def check(self) -> None:
        """Every concern's own checks, then those across concerns."""
        super().check()
        _need(
            0 <= self.secure_threshold < self.clients, "secure_threshold",
            f"secure_threshold must be in [0, clients) (0 = a strict majority of the peers), got {self.secure_threshold}",
        )
        # Codecs, security rules, QKD link specs, quantum backends and datasets are checked by
        # qfl.server.preflight, which may import the layers that own them; this module imports none.
        _need(
            self.copies == 0 or self.copies >= 2, "copies",
            f"copies must be 0 (unlimited: exact expectations) or >= 2 (classical shadows split the "
            f"snapshots in two halves), got {self.copies}; set e.g. copies=1000",
        )
        _need(
            self.shadow_model in ("mlp", "logreg"), "shadow_model",
            f"shadow_model must be 'mlp' or 'logreg', got {self.shadow_model!r}",
        )
        _need(self.shadow_lr > 0, "shadow_lr", f"shadow_lr must be > 0, got {self.shadow_lr}; set e.g. shadow_lr=0.03")
        self.check_edge()

    # --- equal copy budgets on quantum datasets (issue 17; qfl.clients.quantum, qfl.quantum.ml.shadows) ---
    copies: int = _key(
        0, "copies M of every state each client gets: M shots for a quantum client (overrides shots), "
        "M classical-shadow snapshots for a classical one, M/2 Bell samples of two copies for a bell one; "
        "0 = unlimited (exact expectations)")
    shadow_model: str = _key("mlp", "learner of classical (shadow) and bell (purity) clients: mlp (one hidden layer) | logreg")
    shadow_lr: float = _key(0.03, "classical and bell clients' Adam learning rate (the circuit's is `lr`)")

    # -- edge clients: StreamSplit (qfl.clients.edge; used when model = "streamsplit") --------------------
    edge_audio: str = _key("", '"" = the seeded synthetic stream; a folder with one subfolder per class; or an ESC-50 style CSV')
    edge_classes: int = _key(10, "sound classes of the synthetic stream (2..10)")
    edge_window_s: float = _key(1.0, "seconds of 16 kHz audio per window")
    edge_mels: int = _key(64, "log-mel bins")
    edge_blocks: int = _key(6, "L, residual blocks of the splittable encoder (4..8); split points 0..L")
    edge_dim: int = _key(128, "embedding dimension d")
    edge_windows: int = _key(64, "windows each device streams (and trains on) per round")
    edge_batch: int = _key(8, "consecutive windows per on-device step")
    edge_negatives: EdgeNegatives = _key(EdgeNegatives.VIRTUAL, "where the InfoNCE negatives come from")
    edge_virtual_negatives: int = _key(256, "virtual negatives per anchor")
    edge_components: int = _key(64, "C, components of the streaming mixture")
    edge_gmm_rate: float = _key(0.01, "stepwise-EM rate of the mixture")
    edge_tau: float = _key(0.1, "InfoNCE temperature (and the negatives' component kernel width)")
    edge_lambda_sw: float = _key(0.1, "λ1, sliced-Wasserstein-to-uniform weight (0 = off)")
    edge_lambda_lap: float = _key(0.01, "λ2, temporal-Laplacian weight (0 = off)")
    edge_lr: float = _key(1e-3, "Adam learning rate on the device and server blocks")
    edge_split: EdgeSplit = _key(EdgeSplit.ADAPTIVE, "how each window's split point k is chosen")
    edge_split_k: int = _key(3, 'the split point of edge_split = "static" (0 = server-centric, L = edge-only)')
    edge_codec: str = _key("qsgd", "codec of the activations (and gradients) crossing the split")
    edge_codec_params: dict[str, Any] = field(default_factory=dict, metadata={"help": 'edge_codec.NAME keys: the edge codec\'s parameters'})
    edge_device_slowdown: float = _key(8.0, "edge core time / this machine's measured core time")
    edge_server_speedup: float = _key(4.0, "server time = measured time / this")
    edge_rtt_ms: float = _key(50.0, "network round-trip delay added to every window")
    edge_joule_per_flop: float = _key(1e-9, "linear energy model: device compute")
    edge_joule_per_byte: float = _key(7e-6, "linear energy model: bytes sent")
    edge_reward_alpha: float = _key(10.0, "splitter reward α·fidelity − β·latency/T_max − η·energy/E_budget: α")
    edge_reward_beta: float = _key(5.0, "splitter reward: β, the latency weight")
    edge_reward_eta: float = _key(3.0, "splitter reward: η, the energy weight")
    edge_t_max_ms: float = _key(200.0, "splitter reward: T_max, the latency scale (ms)")
    edge_e_budget_mj: float = _key(100.0, "splitter reward: E_budget, the energy scale (mJ)")
    edge_reward_zeta: float = _key(0.0, "splitter reward: ζ, a price on uplink bytes beyond their latency and energy "
                                        "(0 = the paper's reward)")
    edge_b_budget_bytes: float = _key(1000.0, "splitter reward: B_budget, the uplink scale (bytes per window)")
    edge_ppo_iterations: int = _key(80, "PPO iterations (512 simulated decisions each) to train the splitter")
    edge_probe_windows: int = _key(600, "held-out windows of the linear probe (half fit, half scored)")

    def check_edge(self) -> None:
        """The edge_* keys, each on its own (the codec name is checked by preflight)."""
        positive_ints = ("edge_classes", "edge_mels", "edge_dim", "edge_windows", "edge_batch", "edge_virtual_negatives",
                         "edge_components", "edge_ppo_iterations")
        for key in positive_ints:
            _need(getattr(self, key) >= 1, key, f"{key} must be >= 1, got {getattr(self, key)}")
        positive_floats = ("edge_window_s", "edge_gmm_rate", "edge_tau", "edge_lr", "edge_device_slowdown",
                           "edge_server_speedup", "edge_t_max_ms", "edge_e_budget_mj", "edge_b_budget_bytes")
        for key in positive_floats:
            _need(getattr(self, key) > 0, key, f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("edge_lambda_sw", "edge_lambda_lap", "edge_rtt_ms", "edge_joule_per_flop", "edge_joule_per_byte",
                    "edge_reward_alpha", "edge_reward_beta", "edge_reward_eta", "edge_reward_zeta"):
            _need(getattr(self, key) >= 0, key, f"{key} must be >= 0, got {getattr(self, key)}")
        _need(4 <= self.edge_blocks <= 8, "edge_blocks", f"edge_blocks must be in [4, 8], got {self.edge_blocks}")
        _need(0 <= self.edge_split_k <= self.edge_blocks, "edge_split_k",
              f"edge_split_k must be in [0, edge_blocks={self.edge_blocks}], got {self.edge_split_k}")
        _need(2 <= self.edge_classes <= 10, "edge_classes", f"edge_classes must be in [2, 10], got {self.edge_classes}")
        _need(self.edge_gmm_rate <= 1, "edge_gmm_rate", f"edge_gmm_rate must be in (0, 1], got {self.edge_gmm_rate}")
        _need(self.edge_batch >= 2, "edge_batch", f"edge_batch must be >= 2 (a positive needs a batch), got {self.edge_batch}")
        _need(self.edge_windows >= self.edge_batch, "edge_windows",
              f"edge_windows ({self.edge_windows}) must be at least edge_batch ({self.edge_batch})")
        _need(self.edge_probe_windows >= 20, "edge_probe_windows",
              f"edge_probe_windows must be >= 20 (half fit, half scored), got {self.edge_probe_windows}")

    # --- deployment (issue 16: edge daemons, `qfl deploy local`) ---
    run_dir: str = _key(
        "", "run directory of `flwr run`'s ServerApp (empty = runs/<timestamp>); a checkpoint there is resumed")

    def to_flat(self) -> dict[str, Any]:
        """Flat key/value view (codec params as ``codec.NAME``), None values left out."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _PARAM_TABLES.values():
                prefix = next(k for k, v in _PARAM_TABLES.items() if v == f.name)
                flat.update({f"{prefix}.{k}": v for k, v in value.items()})
            elif isinstance(value, Choice):
                flat[f.name] = value.value  # a plain str: Flower's records and TOML take no subclasses
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


_RUN_OWN_KEYS = "Copy budgets on quantum datasets, edge clients (model = streamsplit) and deployment."
_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in _PARAM_TABLES.values()}
_TYPES = get_type_hints(RunConfig)


@dataclass(frozen=True)
class KeyInfo:
    """One config key as `qfl run --help` lists it."""

    key: str  # as written in a TOML file or --set (codec.NAME for a parameter table)
    default: str  # the default as a TOML literal ("unset" where there is none)
    meaning: str  # one line, from the field's metadata
    choices: tuple[str, ...]  # the closed set of a Choice key; () for any other
    concern: str  # the first line of the docstring of the dataclass that defines the key


def _literal(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Choice):
        value = value.value
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def describe_keys() -> list[KeyInfo]:
    """Every config key with its default and meaning, grouped by concern, in schema order."""
    rows = []
    for part in reversed(RunConfig.__mro__):
        if not (isinstance(part, type) and issubclass(part, _ConfigPart)) or part is _ConfigPart:
            continue
        concern = re.split(r" \(|\. ", " ".join((part.__doc__ or "").split()))[0].rstrip(".") + "."
        concern = concern if part is not RunConfig else _RUN_OWN_KEYS
        for f in dataclasses.fields(part):
            if f.name not in part.__annotations__:
                continue  # inherited: listed under the concern that defines it
            kind = _TYPES[f.name]
            choices = tuple(m.value for m in kind) if isinstance(kind, type) and issubclass(kind, Choice) else ()
            if f.name in _PARAM_TABLES.values():
                name = next(k for k, v in _PARAM_TABLES.items() if v == f.name) + ".NAME"
                default = "{}"
            else:
                name, default = f.name, _literal(f.default)
            rows.append(KeyInfo(name, default, f.metadata["help"], choices, concern))
    return rows


def _coerce(key: str, value: Any) -> Any:
    kind = _TYPES[key]
    if key == "alpha":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "iid", "")):
            return None
        if isinstance(value, str) or isinstance(value, bool):
            raise ConfigError(
                f"alpha must be a number > 0 (Dirichlet label skew, smaller = more skew) or 'iid', got {value!r}; "
                "set e.g. alpha=0.5, or alpha=iid (the same as leaving it out) for IID shards", key=key,
            )
        kind = float
    if isinstance(kind, type) and issubclass(kind, Choice):
        return kind.parse(key, value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}", key=key)


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
            raise ConfigError(
                f"unknown config key {key!r}{hint} (valid keys: {', '.join(sorted(_FIELDS))}, {table_keys})", key=key
            )
    cfg = RunConfig(**kwargs, **tables)
    cfg.check()
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
