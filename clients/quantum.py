"""Quantum and hybrid client tasks: a variational circuit trained like any other model.

:class:`QuantumTask` implements :class:`qfl.clients.tasks.ClientTask` for
``model = "vqc"`` and ``model = "hybrid"``. Its parameters are float32 arrays
like a CNN's, so compression and secure aggregation treat them the same way:

* ``q.weights`` — the circuit's rotation angles, ``(layers, qubits, 2)``
  (hardware-efficient) or ``(layers, qubits, 3)`` (strongly entangling), see
  :mod:`qfl.quantum.ml.vqc`;
* ``head.weight`` ``(classes, qubits)``, ``head.bias`` ``(classes,)`` — the
  readout: logits = W·⟨Z⟩ + b from the Pauli expectations ⟨Z_i⟩ of every qubit;
* ``pre.0.*``, ``pre.2.*`` — only when hybrid clients take part: a small
  classical network (Linear → tanh → Linear) whose outputs y become the angles
  π·tanh(y) of the circuit's RY embedding.

Models and data
---------------
* ``vqc`` on a quantum dataset (``ntangled``, ``magic``; :mod:`qfl.quantum.ml.qdata`)
  with ``embedding = "state"``: the dataset's state vectors are prepared
  exactly. ``data_qubits`` (0 = ``qubits``) is the width of the states; a wider
  circuit pads them with |0⟩ ancillas.
* ``vqc`` on classical data (digits …): ``amplitude`` embedding of the
  flattened image (needs 2^qubits ≥ features) or ``angle`` embedding RY(π x_i)
  (needs one feature per qubit).
* ``hybrid`` on classical data: flattened image → Linear(F, 16) → tanh →
  Linear(16, qubits) → angles → circuit (PennyLane ``TorchLayer``) → head.

Client kinds (``client_kinds``, quantum datasets only)
------------------------------------------------------
Clients are listed in partition order, e.g. ``"quantum:1,classical:3"``;
empty means every client is the model's own kind. All kinds share one
parameter vector (each sends Δ = 0 for tensors it does not use):

* ``quantum``: feeds the states themselves to the circuit;
* ``classical``: has no quantum memory. It measures its ``copies`` (M) copies
  of each state in random Pauli bases (classical shadows,
  :mod:`qfl.quantum.ml.shadows`) and trains its own classical learner
  (``shadow_model``: a one-hidden-layer MLP or a logistic regression, Adam at
  ``shadow_lr``) on the shadow estimates of every 1- and 2-body Pauli
  expectation and of their squares; its tensors are ``shadow.*``;
* ``bell``: has a two-copy quantum memory. It Bell-samples pairs of its M
  copies (M/2 measurements, :mod:`qfl.quantum.ml.bell`), which estimates every
  subsystem purity Tr ρ_A² at once, and trains the same classical learner as
  ``classical`` on those 2^n − 1 estimates; its tensors are ``bell.*``;
* ``hybrid``: feeds a 16-shot single-qubit summary (3 numbers per qubit)
  through the small classical network into the circuit's angle embedding.

Equal copy budgets: with ``copies = M > 0`` a quantum client's circuit is
estimated from M shots per evaluation (``copies`` overrides ``shots``), a
classical client gets M snapshots per state; ``copies = 0`` gives both exact
expectations (unlimited copies).

The global model of a federation is the mixture of its kinds' models: on a
test state it predicts Σ_kind (share of clients of that kind) · softmax(model
of that kind), each kind's model seeing the test state as that kind does (the
circuit with M shots, the shadow learner with M fresh snapshots). A mixed
federation therefore reads each test state with M copies per kind (generous
to mixed federations).

Training
--------
Adam on all parameters (``lr``, ``local_epochs``, ``batch_size``; ``momentum``
is not used), cross-entropy loss, gradients by torch autograd through the
circuit (backprop on ``default``, adjoint on ``lightning``, parameter shift on
``qiskit``). Δ = w_local − w_global per tensor, as for classical clients.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from qfl.config import RunConfig
from qfl.errors import ConfigError
from qfl.quantum.ml import bell, qdata, shadows, vqc
from qfl.seeds import task_seed

from .classical import shard, split_shard, training_sizes
from .training import evaluate, train

KINDS = ("quantum", "classical", "hybrid", "bell")
FEATURE_KINDS = {"classical": "shadow", "bell": "bell"}  # kinds that train a classical learner on measured features: prefix
QUANTUM_MODELS = ("vqc", "hybrid")
CLASSICAL_FEATURES = {"digits": 64, "mnist": 784, "cifar10": 3072}
MIN_CIRCUIT_QUBITS = 2
MAX_CIRCUIT_QUBITS = 10
HYBRID_HIDDEN = 16
SHADOW_HIDDEN = 32
INIT_STD = 0.1  # circuit angles start near 0 (the circuit near its CNOT skeleton): no barren start
MIN_SAMPLES_PER_CLASS = 10


# ----------------------------------------------------------------------------- configuration


def data_qubits(cfg: RunConfig) -> int:
    """Width of the quantum dataset's states (``data_qubits``, or ``qubits`` when 0)."""
    return cfg.data_qubits or cfg.qubits


def natural_kind(cfg: RunConfig) -> str:
    """The kind of a client when ``client_kinds`` is empty: ``hybrid`` for the hybrid model, else ``quantum``."""
    return "hybrid" if cfg.model == "hybrid" else "quantum"


def parse_client_kinds(text: str, clients: int, natural: str = "quantum") -> list[str]:
    """``"quantum:1,classical:3"`` → one kind per client in partition order; ``""`` → all ``natural``."""
    if not text.strip():
        return [natural] * clients
    kinds: list[str] = []
    for item in text.split(","):
        name, colon, count = item.strip().partition(":")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"unknown client kind {name!r} in client_kinds={text!r}; choose among {', '.join(KINDS)}")
        try:
            k = int(count) if colon else 1
        except ValueError:
            raise ValueError(f"client_kinds item {item.strip()!r} needs an integer count, e.g. '{name}:2'") from None
        if k < 1:
            raise ValueError(f"client_kinds item {item.strip()!r} needs a count >= 1")
        kinds += [name] * k
    if len(kinds) != clients:
        raise ValueError(
            f"client_kinds={text!r} lists {len(kinds)} clients but there are {clients}; make the counts add up to clients"
        )
    return kinds


def _client_kinds(cfg: RunConfig) -> list[str]:
    try:
        return parse_client_kinds(cfg.client_kinds, cfg.clients, natural_kind(cfg))
    except ValueError as err:
        raise ConfigError(str(err), key="client_kinds") from None


def check_quantum_config(cfg: RunConfig) -> None:
    """Raise ConfigError, naming the key and the fix, for a quantum configuration that cannot train."""
    quantum_data = cfg.dataset in qdata.QUANTUM_DATASETS
    if cfg.model not in QUANTUM_MODELS:
        if quantum_data:
            raise ConfigError(f"dataset {cfg.dataset!r} holds quantum states, which model {cfg.model!r} cannot read; set model='vqc'", key="model")
        if cfg.client_kinds:
            raise ConfigError("client_kinds mixes clients of a quantum model; set model='vqc' or leave client_kinds empty", key="client_kinds")
        return
    try:
        vqc.check_backend(cfg.backend)
    except ValueError as err:
        raise ConfigError(str(err), key="backend") from None
    if cfg.ansatz not in vqc.ANSATZE:
        raise ConfigError(f"unknown ansatz {cfg.ansatz!r}; choose one of {', '.join(vqc.ANSATZE)}", key="ansatz")
    if cfg.embedding not in vqc.EMBEDDINGS:
        raise ConfigError(f"unknown embedding {cfg.embedding!r}; choose one of {', '.join(vqc.EMBEDDINGS)}", key="embedding")
    if not MIN_CIRCUIT_QUBITS <= cfg.qubits <= MAX_CIRCUIT_QUBITS:
        raise ConfigError(
            f"qubits={cfg.qubits} is outside the supported range {MIN_CIRCUIT_QUBITS}..{MAX_CIRCUIT_QUBITS}; "
            f"set qubits between {MIN_CIRCUIT_QUBITS} and {MAX_CIRCUIT_QUBITS}", key="qubits"
        )
    if cfg.layers < 1:
        raise ConfigError(f"layers must be >= 1, got {cfg.layers}", key="layers")
    if cfg.shots < 0:
        raise ConfigError(f"shots must be >= 0 (0 = exact expectations), got {cfg.shots}", key="shots")
    if not 0.0 <= cfg.noise <= 0.75:
        raise ConfigError(f"noise is a depolarizing probability in [0, 0.75], got {cfg.noise}", key="noise")
    if cfg.noise > 0 and cfg.backend == "lightning":
        raise ConfigError("noise needs a mixed-state simulator; lightning.qubit holds pure states: set backend='default' or 'qiskit'", key="backend")
    if quantum_data:
        if cfg.model == "hybrid":
            raise ConfigError(
                f"model 'hybrid' is for classical data (digits, mnist, cifar10); on {cfg.dataset!r} set model='vqc' "
                "and add hybrid clients with client_kinds, e.g. 'quantum:1,hybrid:3'", key="model"
            )
        if cfg.embedding != "state":
            raise ConfigError(f"dataset {cfg.dataset!r} holds quantum states; set embedding='state' to feed them to the circuit", key="embedding")
        width = data_qubits(cfg)
        if not qdata.MIN_QUBITS <= width <= qdata.MAX_QUBITS:
            key = "data_qubits" if cfg.data_qubits else "qubits"
            raise ConfigError(
                f"dataset {cfg.dataset!r} supports {qdata.MIN_QUBITS} to {qdata.MAX_QUBITS} qubits, got {key}={width}; "
                f"set {key} between {qdata.MIN_QUBITS} and {qdata.MAX_QUBITS}", key=key
            )
        if width > cfg.qubits:
            raise ConfigError(
                f"the {cfg.dataset} states have data_qubits={width} qubits but the circuit has qubits={cfg.qubits}; "
                f"set qubits >= {width} (extra qubits start in |0>) or data_qubits <= {cfg.qubits}", key="qubits"
            )
        if cfg.quantum_samples < 2 * MIN_SAMPLES_PER_CLASS:
            raise ConfigError(f"quantum_samples={cfg.quantum_samples} is too few; set quantum_samples >= {2 * MIN_SAMPLES_PER_CLASS}", key="quantum_samples")
        _client_kinds(cfg)
        return
    if cfg.data_qubits:
        raise ConfigError(f"data_qubits sets the width of ntangled / magic states; leave it 0 for dataset {cfg.dataset!r}", key="data_qubits")
    features = CLASSICAL_FEATURES.get(cfg.dataset, 0)
    if cfg.embedding == "state":
        raise ConfigError(f"embedding='state' feeds quantum states; dataset {cfg.dataset!r} is classical: use 'amplitude' or 'angle'", key="embedding")
    if cfg.model == "hybrid" and cfg.embedding != "angle":
        raise ConfigError("model 'hybrid' feeds its classical network's outputs to the circuit as angles; set embedding='angle'", key="embedding")
    if cfg.model == "vqc" and cfg.embedding == "angle" and features != cfg.qubits:
        raise ConfigError(
            f"embedding='angle' needs one feature per qubit, but {cfg.dataset} has {features} features and qubits={cfg.qubits}; "
            f"use embedding='amplitude' (qubits >= {math.ceil(math.log2(features))}) or model='hybrid'", key="embedding"
        )
    if cfg.model == "vqc" and cfg.embedding == "amplitude" and 2**cfg.qubits < features:
        need = math.ceil(math.log2(features))
        raise ConfigError(
            f"amplitude embedding of the {features} features of {cfg.dataset} needs qubits >= {need}, got qubits={cfg.qubits}"
            + (f"; set qubits={need}" if need <= MAX_CIRCUIT_QUBITS else "; use model='hybrid'"), key="qubits"
        )
    kinds = _client_kinds(cfg)
    if any(k != natural_kind(cfg) for k in kinds):
        raise ConfigError(
            f"client kinds other than {natural_kind(cfg)!r} need a quantum dataset (ntangled, magic); "
            f"dataset {cfg.dataset!r} is classical: leave client_kinds empty", key="client_kinds"
        )


# ----------------------------------------------------------------------------- data


def quantum_dataset(cfg: RunConfig) -> qdata.QuantumDataset:
    """The run's quantum dataset (generated once per process)."""
    return qdata.load_quantum_dataset(cfg.dataset, data_qubits(cfg), cfg.quantum_samples, cfg.test_fraction, cfg.seed)


def pad_states(states: np.ndarray, qubits: int) -> np.ndarray:
    """|ψ⟩ ⊗ |0…0⟩: ``(B, 2^k)`` states widened to ``qubits`` (the new qubits are the last wires)."""
    k = int(round(math.log2(states.shape[1])))
    if k == qubits:
        return states
    out = np.zeros((len(states), 2**qubits), dtype=states.dtype)
    out[:, :: 2 ** (qubits - k)] = states
    return out


def _inputs(cfg: RunConfig, kind: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(model inputs, labels) of a split (``train`` or ``test``) as client kind ``kind`` sees it (cached)."""
    return _inputs_cached(tuple(getattr(cfg, k) for k in _DATA_KEYS), kind, split)


_DATA_KEYS = ("dataset", "data_dir", "test_fraction", "seed", "qubits", "data_qubits", "quantum_samples", "embedding", "copies")


@lru_cache(maxsize=16)
def _inputs_cached(key: tuple[Any, ...], kind: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    cfg = RunConfig(**dict(zip(_DATA_KEYS, key)))
    if cfg.dataset in qdata.QUANTUM_DATASETS:
        data = quantum_dataset(cfg)
        states, summary, y = (
            (data.x_train, data.summary_train, data.y_train) if split == "train" else (data.x_test, data.summary_test, data.y_test)
        )
        if kind == "quantum":
            x = vqc.pack_states(pad_states(states, cfg.qubits))
        elif kind == "classical":
            x = shadows.shadow_features(states, cfg.copies, seed=_shadow_seed(cfg.seed, split))
        elif kind == "bell":
            x = bell.bell_features(states, cfg.copies, seed=_shadow_seed(cfg.seed, split))
        else:
            x = summary.reshape(len(summary), -1).astype(np.float64)
    else:
        from .classical import dataset_for

        images_data = dataset_for(cfg)
        images, y = (
            (images_data.x_train, images_data.y_train) if split == "train" else (images_data.x_test, images_data.y_test)
        )
        flat = images.reshape(len(images), -1).astype(np.float64)
        if kind == "hybrid":
            x = flat
        elif cfg.embedding == "amplitude":
            x = vqc.pack_states(vqc.amplitude_states(flat, cfg.qubits))
        else:
            x = np.pi * flat
    x.setflags(write=False)
    return x, np.asarray(y, dtype=np.int64)


def _shadow_seed(run_seed: int, split: str) -> int:
    """Measurement seed of a split's classical shadows or Bell samples (train and test measurements are independent)."""
    return int(np.random.SeedSequence([run_seed, 0x5AD0, 0 if split == "train" else 1]).generate_state(1)[0])


def effective_shots(cfg: RunConfig) -> int:
    """Shots per circuit evaluation of a quantum client: ``copies`` when set (equal copy budgets), else ``shots``."""
    return cfg.copies if cfg.copies > 0 else cfg.shots


def num_classes(cfg: RunConfig) -> int:
    if cfg.dataset in qdata.QUANTUM_DATASETS:
        return quantum_dataset(cfg).num_classes
    from .classical import dataset_for

    return dataset_for(cfg).num_classes


def train_labels(cfg: RunConfig) -> np.ndarray:
    return _inputs(cfg, natural_kind(cfg), "train")[1]


def local_split(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, local validation indices) of one client's shard (as for classical clients)."""
    return split_shard(cfg, train_labels(cfg), partition_id, num_partitions)


def kind_of(cfg: RunConfig, partition_id: int, num_partitions: int) -> str:
    """The kind of client ``partition_id`` (``client_kinds`` is read with ``num_partitions`` clients)."""
    return parse_client_kinds(cfg.client_kinds, num_partitions, natural_kind(cfg))[partition_id]


# ----------------------------------------------------------------------------- model


def uses_pre(cfg: RunConfig) -> bool:
    """Whether the parameter vector holds the hybrid pre-network."""
    return cfg.model == "hybrid" or "hybrid" in kinds_of(cfg)


def pre_features(cfg: RunConfig) -> int:
    """Inputs of the hybrid pre-network: 3 summary numbers per data qubit, or the image's features."""
    if cfg.dataset in qdata.QUANTUM_DATASETS:
        return 3 * data_qubits(cfg)
    return CLASSICAL_FEATURES[cfg.dataset]


def model_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the run's parameter vector."""
    classes = num_classes(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    if uses_pre(cfg):
        shapes |= {
            "pre.0.weight": (HYBRID_HIDDEN, pre_features(cfg)),
            "pre.0.bias": (HYBRID_HIDDEN,),
            "pre.2.weight": (cfg.qubits, HYBRID_HIDDEN),
            "pre.2.bias": (cfg.qubits,),
        }
    shapes |= {
        "q.weights": vqc.weight_shape(cfg.qubits, cfg.layers, cfg.ansatz),
        "head.weight": (classes, cfg.qubits),
        "head.bias": (classes,),
    }
    for kind, prefix in FEATURE_KINDS.items():
        if kind in kinds_of(cfg):
            shapes |= {f"{prefix}.{name}": shape for name, shape in _learner_shapes(cfg, kind).items()}
    return shapes


def _feature_count(cfg: RunConfig, kind: str) -> int:
    return shadows.num_features(data_qubits(cfg)) if kind == "classical" else bell.num_features(data_qubits(cfg))


def _learner_shapes(cfg: RunConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """The classical learner of a feature kind: ``shadow_model`` (mlp: Linear → ReLU → Linear; logreg: one Linear)."""
    features, classes = _feature_count(cfg, kind), num_classes(cfg)
    if cfg.shadow_model == "mlp":
        return {"0.weight": (SHADOW_HIDDEN, features), "0.bias": (SHADOW_HIDDEN,),
                "2.weight": (classes, SHADOW_HIDDEN), "2.bias": (classes,)}
    return {"0.weight": (classes, features), "0.bias": (classes,)}


def kinds_of(cfg: RunConfig) -> list[str]:
    """The kind of every client, in partition order."""
    return parse_client_kinds(cfg.client_kinds, cfg.clients, natural_kind(cfg))


def kind_shares(cfg: RunConfig) -> dict[str, float]:
    """Share of the clients of each kind present: the weights of the global mixture model."""
    kinds = kinds_of(cfg)
    return {k: kinds.count(k) / len(kinds) for k in dict.fromkeys(kinds)}


def tensors_of_kind(cfg: RunConfig, kind: str) -> list[str]:
    """The parameter tensors a client of ``kind`` trains (it sends Δ = 0 for the others)."""
    names = list(model_shapes(cfg))
    if kind in FEATURE_KINDS:
        return [k for k in names if k.startswith(FEATURE_KINDS[kind] + ".")]
    learners = tuple(prefix + "." for prefix in FEATURE_KINDS.values())
    return [k for k in names if not k.startswith(learners) and (kind == "hybrid" or not k.startswith("pre."))]


class KindModel(nn.Module):
    """A client kind's model: loads its own tensors from the shared parameter dict and exports them as float32."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def load(self, weights: dict[str, np.ndarray]) -> None:
        own = self.state_dict()
        self.load_state_dict({k: torch.as_tensor(np.asarray(weights[k], dtype=np.float64)) for k in own})

    def export(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.state_dict().items()}


class QuantumModel(KindModel):
    """[pre-network →] circuit → linear readout of ⟨Z_i⟩; float64 inside."""

    def __init__(self, cfg: RunConfig, kind: str, seed: int) -> None:
        super().__init__(kind)
        embedding = "angle" if kind == "hybrid" else cfg.embedding
        if kind == "hybrid":
            self.pre = nn.Sequential(
                nn.Linear(pre_features(cfg), HYBRID_HIDDEN), nn.Tanh(), nn.Linear(HYBRID_HIDDEN, cfg.qubits)
            ).double()
        spec = vqc.CircuitSpec(cfg.qubits, cfg.layers, cfg.ansatz, embedding, effective_shots(cfg), cfg.noise, seed)
        self.q = vqc.quantum_layer(spec, cfg.backend)
        self.head = nn.Linear(cfg.qubits, num_classes(cfg)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hybrid":
            x = torch.pi * torch.tanh(self.pre(x))
        return self.head(self.q(x))


class FeatureModel(KindModel):
    """The classical learner of a ``classical`` (shadow features) or ``bell`` (Bell-sampled purities) client:
    Linear → ReLU → Linear (``mlp``) or one Linear (``logreg``) on standardised features; float64."""

    def __init__(self, cfg: RunConfig, kind: str) -> None:
        super().__init__(kind)
        features, classes = _feature_count(cfg, kind), num_classes(cfg)
        layers: list[nn.Module] = (
            [nn.Linear(features, SHADOW_HIDDEN), nn.ReLU(), nn.Linear(SHADOW_HIDDEN, classes)]
            if cfg.shadow_model == "mlp"
            else [nn.Linear(features, classes)]
        )
        self.prefix = FEATURE_KINDS[kind]
        self.add_module(self.prefix, nn.Sequential(*layers).double())  # tensors named shadow.* or bell.*
        mean, std = feature_scale(cfg, kind)
        self.feature_mean, self.feature_std = torch.from_numpy(mean), torch.from_numpy(std)  # fixed, not parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learner = getattr(self, self.prefix)
        return learner((x - self.feature_mean) / self.feature_std)


def feature_scale(cfg: RunConfig, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of the training split's features for ``kind`` (std floored at 1e-6).

    These are the pooled moments a one-off federated sum of (n, Σx, Σx²) over the
    clients of that kind gives each of them; the simulation computes them directly.
    """
    x, _ = _inputs(cfg, kind, "train")
    return x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)


def model_of_kind(cfg: RunConfig, kind: str, seed: int) -> KindModel:
    """The model a client of ``kind`` trains: the circuit (quantum, hybrid) or a classical learner (classical, bell)."""
    return FeatureModel(cfg, kind) if kind in FEATURE_KINDS else QuantumModel(cfg, kind, seed)


# ----------------------------------------------------------------------------- the task


class QuantumTask:
    """:class:`qfl.clients.tasks.ClientTask` for the quantum models (vqc, hybrid)."""

    def __init__(self, cfg: RunConfig) -> None:
        check_quantum_config(cfg)
        self.cfg = cfg
        self._central: dict[str, KindModel] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return model_shapes(self.cfg)

    def initial_weights(self) -> dict[str, np.ndarray]:
        """Circuit angles ~ N(0, INIT_STD²); linear layers ~ U(±1/√fan_in) (torch's default); seeded by ``cfg.seed``."""
        rng = np.random.default_rng([self.cfg.seed, 0x9C])
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes().items():
            if name == "q.weights":
                w = rng.normal(0.0, INIT_STD, shape)
            else:
                fan_in = self.shapes()[name.replace("bias", "weight")][1]
                w = rng.uniform(-1.0, 1.0, shape) / math.sqrt(fan_in)
            out[name] = w.astype(np.float32)
        return out

    def local_update(
        self, weights: dict[str, np.ndarray], partition_id: int, num_partitions: int, server_round: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        cfg = self.cfg
        kind = kind_of(cfg, partition_id, num_partitions)
        idx, _ = local_split(cfg, partition_id, num_partitions)
        x, y = _inputs(cfg, kind, "train")
        seed = task_seed(cfg.seed, server_round, partition_id)
        model = model_of_kind(cfg, kind, seed)
        model.load(weights)
        torch.manual_seed(seed)
        lr = cfg.shadow_lr if kind in FEATURE_KINDS else cfg.lr
        loss = train(model, x[idx], y[idx], cfg.local_epochs, cfg.batch_size, lr, 0.0, seed, optimizer="adam")
        local = model.export()
        delta = {k: (local[k] - weights[k]) if k in local else np.zeros_like(weights[k]) for k in weights}
        return delta, len(idx), loss

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def local_evaluate(
        self, weights: dict[str, np.ndarray], partition_id: int, num_partitions: int
    ) -> tuple[float, float, int]:
        cfg = self.cfg
        kind = kind_of(cfg, partition_id, num_partitions)
        _, idx = local_split(cfg, partition_id, num_partitions)
        if len(idx) == 0:
            return 0.0, 0.0, 0
        x, y = _inputs(cfg, kind, "train")
        model = model_of_kind(cfg, kind, task_seed(cfg.seed, 0, partition_id))
        model.load(weights)
        loss, acc = evaluate(model, x[idx], y[idx])
        return loss, acc, len(idx)

    def central_evaluate(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        """(cross-entropy, accuracy) on the test split of the mixture Σ_kind share · softmax(model of that kind).

        Each kind's model reads the test data as that kind does: the circuit on
        the states (with M shots when ``copies`` is set), the shadow learner on
        M fresh snapshots. One kind: exactly that kind's model.
        """
        cfg = self.cfg
        shares = kind_shares(cfg) if cfg.dataset in qdata.QUANTUM_DATASETS else {natural_kind(cfg): 1.0}
        probs = self.kind_probabilities(weights, list(shares))
        mixture = sum(share * probs[kind] for kind, share in shares.items())
        assert isinstance(mixture, torch.Tensor)
        labels = torch.from_numpy(_inputs(cfg, next(iter(shares)), "test")[1])
        loss = float(torch.nn.functional.nll_loss(torch.log(mixture.clamp_min(1e-300)), labels))
        return loss, float((mixture.argmax(dim=1) == labels).double().mean())

    def kind_probabilities(self, weights: dict[str, np.ndarray], kinds: list[str]) -> dict[str, torch.Tensor]:
        """Class probabilities ``(N_test, C)`` of each kind's model on the test split, read as that kind reads it."""
        out = {}
        for kind in kinds:
            if kind not in self._central:
                self._central[kind] = model_of_kind(self.cfg, kind, self.cfg.seed)
            model = self._central[kind]
            model.load(weights)
            model.eval()
            x, _ = _inputs(self.cfg, kind, "test")
            with torch.no_grad():
                out[kind] = torch.softmax(model(torch.from_numpy(np.array(x))), dim=1)
        return out

    def kind_accuracies(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        """Test accuracy of each kind's model alone (what the mixture is made of)."""
        y = torch.from_numpy(_inputs(self.cfg, natural_kind(self.cfg), "test")[1])
        probs = self.kind_probabilities(weights, list(kind_shares(self.cfg)))
        return {kind: float((p.argmax(dim=1) == y).double().mean()) for kind, p in probs.items()}

    def train_size(self) -> int:
        return len(train_labels(self.cfg))

    def training_sizes(self, num_partitions: int) -> list[int]:
        return training_sizes(self.cfg, train_labels(self.cfg), num_partitions)

    def check_partition(self, num_partitions: int) -> None:
        shard(self.cfg, train_labels(self.cfg), 0, num_partitions, salt=0)
        if self.cfg.client_kinds:
            parse_client_kinds(self.cfg.client_kinds, num_partitions, natural_kind(self.cfg))

