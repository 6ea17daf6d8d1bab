"""The variational quantum classifier's circuit, on three simulators that agree.

One circuit, built gate for gate on every backend::

    |ψ_in⟩ ── embedding ── layer 1 ── … ── layer L ── ⟨Z_0⟩ … ⟨Z_{n−1}⟩

* **Embedding** (input mode of the circuit):

  - ``angle``: RY(x_i) on qubit i (one feature per qubit);
  - ``amplitude``: the features, zero-padded to 2^n and normalised, are the
    amplitudes of |ψ_in⟩ (prepared like ``state``);
  - ``state``: a given state vector |ψ_in⟩ (quantum data) is prepared exactly
    (PennyLane ``StatePrep``, Qiskit ``initialize``).

* **Layers** (weights ``w``):

  - ``hardware-efficient``: RY(w[l,i,0]) RZ(w[l,i,1]) on every qubit, then the
    CNOT ring (0,1), (1,2), …, (n−1,0); ``w`` is ``(L, n, 2)``;
  - ``strongly-entangling``: Rot(w[l,i,0], w[l,i,1], w[l,i,2]) = RZ·RY·RZ on
    every qubit, then CNOT(i, i+r) with range r = (l mod (n−1)) + 1
    (PennyLane's ``StronglyEntanglingLayers``); ``w`` is ``(L, n, 3)``.

  With ``noise = p > 0`` every layer ends with a depolarizing channel on each
  qubit, ρ → (1−p)ρ + (p/3)(XρX + YρY + ZρZ) (PennyLane's
  ``DepolarizingChannel(p)``; Qiskit Aer's ``depolarizing_error(4p/3)``, which
  is the same map).

* **Readout**: the Pauli expectations ⟨Z_i⟩ of every qubit, ``(B, n)``.

Backends (``backend``):

* ``lightning``: PennyLane ``lightning.qubit`` (C++ state vector), gradients by
  the adjoint method (one forward and one backward sweep per circuit, exact).
  PennyLane runs a batch as one circuit per input.
* ``default``: PennyLane ``default.qubit`` with parameter broadcasting — the
  whole batch is one vectorised torch simulation — and backpropagation.
  With ``noise > 0`` the device is ``default.mixed`` (density matrices).
* ``qiskit``: the same circuit as a Qiskit ``QuantumCircuit`` evaluated by
  ``qiskit_aer.primitives.EstimatorV2`` (statevector; density matrix under
  noise). Gradients by the parameter-shift rule, ∂f/∂θ = [f(θ+π/2) − f(θ−π/2)]/2
  (exact: every weight sits in one Pauli rotation), all shifted circuits of a
  batch in one estimator call; slow, meant for checks and small runs.

Shots: ``shots = 0`` is exact. With ``shots > 0`` PennyLane samples that many
shots per circuit (gradients by parameter shift on the sampled values); on
``default`` (noiseless) the circuit and its 2P shifted copies for a whole batch
run as ONE broadcast tape (:class:`PennyLaneShotCircuit`), on ``lightning`` and
under noise PennyLane's own parameter shift runs 2P + 1 tapes. Aer's
EstimatorV2 models a shot budget as Gaussian noise of standard deviation
1/√shots on each expectation (its ``precision``), all shifted circuits in one call.

Qubit order: PennyLane wire i is Qiskit qubit n−1−i, so a state vector means
the same thing on both (wire 0 = most significant bit of the index).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

BACKENDS = ("lightning", "default", "qiskit")
ANSATZE = ("hardware-efficient", "strongly-entangling")
EMBEDDINGS = ("angle", "amplitude", "state")
# The package each backend needs beyond PennyLane, and how to get it.
_BACKEND_MODULES = {
    "lightning": ("pennylane_lightning", "pip install pennylane-lightning"),
    "default": ("pennylane", "pip install pennylane"),
    "qiskit": ("qiskit_aer", "pip install qiskit-aer"),
}


@dataclass(frozen=True)
class CircuitSpec:
    """The circuit: width, depth, ansatz, input mode, and how it is simulated."""

    qubits: int
    layers: int
    ansatz: str = "hardware-efficient"
    embedding: str = "state"
    shots: int = 0
    noise: float = 0.0
    seed: int = 0  # sampling seed when shots > 0

    @property
    def input_mode(self) -> str:
        """``angle`` (n angles per input) or ``state`` (a state vector per input)."""
        return "angle" if self.embedding == "angle" else "state"


def weight_shape(qubits: int, layers: int, ansatz: str) -> tuple[int, int, int]:
    """Shape of the circuit weights: (L, n, 2) hardware-efficient, (L, n, 3) strongly entangling."""
    if ansatz not in ANSATZE:
        raise ValueError(f"unknown ansatz {ansatz!r}; choose one of {', '.join(ANSATZE)}")
    return (layers, qubits, 2 if ansatz == "hardware-efficient" else 3)


def check_backend(backend: str) -> None:
    """Raise ValueError for an unknown backend or one whose package is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantum backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module, fix = _BACKEND_MODULES[backend]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"backend {backend!r} needs the optional package {module!r}, which is not installed; "
            f"run `{fix}` or choose another backend ({', '.join(b for b in BACKENDS if b != backend)})"
        ) from None


def ring_pairs(qubits: int) -> list[tuple[int, int]]:
    """CNOTs of a hardware-efficient layer: the ring (0,1), …, (n−1,0); one CNOT for 2 qubits."""
    if qubits == 1:
        return []
    return [(i, (i + 1) % qubits) for i in range(qubits)] if qubits > 2 else [(0, 1)]


def sel_pairs(qubits: int, layer: int) -> list[tuple[int, int]]:
    """CNOTs of strongly-entangling layer ``layer``: (i, i + r mod n), r = (layer mod (n−1)) + 1."""
    if qubits == 1:
        return []
    r = layer % (qubits - 1) + 1
    return [(i, (i + r) % qubits) for i in range(qubits)]


def pack_states(states: np.ndarray) -> np.ndarray:
    """Complex state vectors ``(B, d)`` as real ``(B, 2d)`` [real | imag] (torch layers take real inputs)."""
    states = np.asarray(states)
    return np.concatenate([states.real, states.imag], axis=-1).astype(np.float64)


def amplitude_states(features: np.ndarray, qubits: int) -> np.ndarray:
    """Features ``(B, F)``, zero-padded to 2^n and normalised: amplitude-embedded states (real)."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    d = 2**qubits
    if x.shape[1] > d:
        raise ValueError(f"amplitude embedding of {x.shape[1]} features needs >= {int(np.ceil(np.log2(x.shape[1])))} qubits, got {qubits}")
    out = np.zeros((len(x), d))
    out[:, : x.shape[1]] = x
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out[:, 0] += (norm[:, 0] == 0)  # an all-zero input becomes |0…0⟩
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- PennyLane


def _pennylane_qnode(spec: CircuitSpec, backend: str, broadcast_probs: bool = False) -> Any:
    """The circuit as a QNode. ``broadcast_probs``: a plain (numpy, no-gradient, analytic) QNode on
    ``default.qubit`` whose inputs *and* weights may carry one shared broadcast axis, returning the
    computational-basis probabilities of every broadcast element."""
    import pennylane as qml

    n = spec.qubits
    d = 2**n
    shots = spec.shots or None
    if spec.noise > 0:
        if backend != "default":
            raise ValueError("noise needs a mixed-state simulator: use backend 'default' (default.mixed) or 'qiskit'")
        device = qml.device("default.mixed", wires=n, seed=spec.seed)
        diff = "backprop" if shots is None else "parameter-shift"
    elif backend == "lightning":
        device = qml.device("lightning.qubit", wires=n, seed=spec.seed)
        diff = "adjoint" if shots is None else "parameter-shift"
    else:
        device = qml.device("default.qubit", wires=n, seed=spec.seed)
        diff = "backprop" if shots is None else "parameter-shift"

    def circuit(inputs, weights):
        if spec.input_mode == "angle":
            for i in range(n):
                qml.RY(inputs[..., i], wires=i)
        else:
            qml.StatePrep(inputs[..., :d] + 1j * inputs[..., d:], wires=range(n))
        for layer in range(spec.layers):
            if spec.ansatz == "hardware-efficient":
                for i in range(n):
                    qml.RY(weights[..., layer, i, 0], wires=i)
                    qml.RZ(weights[..., layer, i, 1], wires=i)
                pairs = ring_pairs(n)
            else:
                for i in range(n):
                    qml.Rot(weights[..., layer, i, 0], weights[..., layer, i, 1], weights[..., layer, i, 2], wires=i)
                pairs = sel_pairs(n, layer)
            for c, t in pairs:
                qml.CNOT(wires=[c, t])
            if spec.noise > 0:
                for i in range(n):
                    qml.DepolarizingChannel(spec.noise, wires=i)
        if broadcast_probs:
            return qml.probs(wires=range(n))
        return [qml.expval(qml.PauliZ(i)) for i in range(n)]

    if broadcast_probs:
        return qml.QNode(circuit, qml.device("default.qubit", wires=n), interface=None, diff_method=None)
    return qml.QNode(circuit, device, interface="torch", diff_method=diff, shots=shots)


def pennylane_layer(spec: CircuitSpec, backend: str = "default") -> nn.Module:
    """The circuit as PennyLane's ``TorchLayer``: inputs ``(B, n)`` angles or packed states ``(B, 2^{n+1})``, output ``(B, n)``."""
    import pennylane as qml

    qnode = _pennylane_qnode(spec, backend)
    shape = weight_shape(spec.qubits, spec.layers, spec.ansatz)
    return qml.qnn.TorchLayer(qnode, {"weights": shape})


# ----------------------------------------------------------------------------- Qiskit


class ShiftRuleCircuit:
    """A circuit evaluated in batches of (input, weight row) pairs, differentiated by the parameter-shift rule.

    Subclasses give ``spec``, ``shape`` and ``_run(inputs, rows) -> (B, R, n)``;
    :meth:`jacobians` evaluates the 2P + 1 weight rows w, w ± (π/2)·e_p of every
    input in one ``_run`` call.
    """

    spec: CircuitSpec
    shape: tuple[int, int, int]

    def _run(self, inputs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def expectations(self, inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """⟨Z_i⟩ for each input: ``(B, n)``."""
        return self._run(np.asarray(inputs, dtype=np.float64), np.asarray(weights, np.float64).reshape(1, -1))[:, 0, :]

    def jacobians(self, inputs: np.ndarray, weights: np.ndarray, wrt_inputs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Expectations ``(B, n)``, ∂⟨Z⟩/∂w ``(B, n, P)``, and ∂⟨Z⟩/∂x ``(B, n, n)`` (angle inputs) by parameter shift."""
        inputs = np.asarray(inputs, dtype=np.float64)
        w = np.asarray(weights, np.float64).reshape(-1)
        p = len(w)
        shifts = np.eye(p) * (np.pi / 2)
        rows = np.concatenate([w[None], w + shifts, w - shifts])
        ev = self._run(inputs, rows)  # (B, 1 + 2P, n)
        value = ev[:, 0]
        dw = (ev[:, 1 : 1 + p] - ev[:, 1 + p :]).transpose(0, 2, 1) / 2
        dx = None
        if wrt_inputs and self.spec.input_mode == "angle":
            n = self.spec.qubits
            xs = np.eye(n) * (np.pi / 2)
            plus = np.stack([self.expectations(inputs + xs[k], w) for k in range(n)], axis=-1)
            minus = np.stack([self.expectations(inputs - xs[k], w) for k in range(n)], axis=-1)
            dx = (plus - minus) / 2
        return value, dw, dx




class QiskitCircuit(ShiftRuleCircuit):
    """The circuit on Qiskit Aer's EstimatorV2; expectations and parameter-shift gradients in numpy."""

    def __init__(self, spec: CircuitSpec) -> None:
        from qiskit import QuantumCircuit
        from qiskit.circuit import ParameterVector
        from qiskit_aer.noise import depolarizing_error
        from qiskit_aer.primitives import EstimatorV2

        self.spec = spec
        n = spec.qubits
        self.shape = weight_shape(n, spec.layers, spec.ansatz)
        self.num_weights = int(np.prod(self.shape))
        def q(wire: int) -> int:  # PennyLane wire → Qiskit qubit
            return n - 1 - wire

        x = ParameterVector("in", n if spec.input_mode == "angle" else 0)
        w = ParameterVector("w", self.num_weights)
        wt = np.array(list(w), dtype=object).reshape(self.shape)
        qc = QuantumCircuit(n)
        if spec.input_mode == "angle":
            for i in range(n):
                qc.ry(x[i], q(i))
        for layer in range(spec.layers):
            if spec.ansatz == "hardware-efficient":
                for i in range(n):
                    qc.ry(wt[layer, i, 0], q(i))
                    qc.rz(wt[layer, i, 1], q(i))
                pairs = ring_pairs(n)
            else:
                for i in range(n):  # Rot(φ, θ, ω) = RZ(ω) RY(θ) RZ(φ)
                    qc.rz(wt[layer, i, 0], q(i))
                    qc.ry(wt[layer, i, 1], q(i))
                    qc.rz(wt[layer, i, 2], q(i))
                pairs = sel_pairs(n, layer)
            for c, t in pairs:
                qc.cx(q(c), q(t))
            if spec.noise > 0:
                channel = depolarizing_error(4.0 * spec.noise / 3.0, 1)
                for i in range(n):
                    qc.append(channel, [q(i)])
        self.template = qc
        # Parameters in the order Aer binds them (sorted by name): in[...] before w[...].
        self.order = list(x) + list(w)
        assert list(qc.parameters) == [p for p in self.order if p in set(qc.parameters)]
        # Z on wire i = Z on Qiskit qubit n−1−i, i.e. position i of a Pauli label read left to right.
        self.observables = ["I" * i + "Z" + "I" * (n - 1 - i) for i in range(n)]
        options: dict[str, Any] = {"run_options": {"seed_simulator": spec.seed}}
        options["backend_options"] = {"method": "density_matrix" if spec.noise > 0 else "statevector"}
        if spec.shots > 0:
            options["default_precision"] = 1.0 / np.sqrt(spec.shots)
        self.estimator = EstimatorV2(options=options)

    def _circuit_for(self, state: np.ndarray | None):
        if state is None:
            return self.template
        from qiskit import QuantumCircuit
        from qiskit.quantum_info import DensityMatrix, Statevector
        from qiskit_aer.library import SetDensityMatrix, SetStatevector

        # Aer's own state-setting instructions (``initialize`` is not available for density matrices).
        qc = QuantumCircuit(self.spec.qubits)
        if self.spec.noise > 0:
            qc.append(SetDensityMatrix(DensityMatrix(state)), range(self.spec.qubits))
        else:
            qc.append(SetStatevector(Statevector(state)), range(self.spec.qubits))
        return qc.compose(self.template)

    def _run(self, inputs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Expectations for every input and every weight row: ``(B, R, n)``."""
        n = self.spec.qubits
        if self.spec.input_mode == "angle":
            b, r = len(inputs), len(rows)
            params = np.concatenate(
                [np.broadcast_to(inputs[:, None, :], (b, r, n)), np.broadcast_to(rows[None], (b, r, rows.shape[1]))], axis=-1
            )
            pub = (self.template, self.observables, params[:, :, None, :])
            return np.asarray(self.estimator.run([pub]).result()[0].data.evs)
        d = 2**n
        states = inputs[:, :d] + 1j * inputs[:, d:]
        pubs = [(self._circuit_for(s), self.observables, rows[:, None, :]) for s in states]
        return np.stack([np.asarray(res.data.evs) for res in self.estimator.run(pubs).result()])

class PennyLaneShotCircuit(ShiftRuleCircuit):
    """``default.qubit`` with ``shots``: the circuit and all its shifted copies for a batch in ONE broadcast tape.

    The tape gives the Born probabilities p(x) of every broadcast element (input
    state, weight row); each element then gets its own M = ``shots`` measurement
    record, counts ~ Multinomial(M, p) (numpy, all elements at once), and
    ⟨Z_i⟩^ = Σ_x counts(x)·(−1)^{x_i} / M: genuine M-shot estimates (standard
    deviation √((1 − ⟨Z_i⟩²)/M), correlated across qubits as real shots are),
    and gradients by the parameter-shift rule on sampled values. PennyLane's own
    parameter shift would run 2P + 1 tapes and sample each element in a Python loop.
    """

    def __init__(self, spec: CircuitSpec) -> None:
        if spec.shots <= 0 or spec.noise > 0:
            raise ValueError("PennyLaneShotCircuit samples pure states: needs shots > 0 and noise = 0")
        self.spec = spec
        self.shape = weight_shape(spec.qubits, spec.layers, spec.ansatz)
        self.qnode = _pennylane_qnode(spec, "default", broadcast_probs=True)
        self.rng = np.random.default_rng([spec.seed, 0x5407])
        n = spec.qubits
        self.signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> (n - 1 - np.arange(n))[None, :]) & 1)  # (2^n, n): (−1)^{x_i}

    def _run(self, inputs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        b, r = len(inputs), len(rows)
        x = np.repeat(inputs, r, axis=0)
        w = np.tile(rows, (b, 1)).reshape((b * r,) + self.shape)
        probs = np.clip(np.asarray(self.qnode(x, w), dtype=np.float64).reshape(b * r, -1), 0.0, None)
        counts = self.rng.multinomial(self.spec.shots, probs / probs.sum(axis=1, keepdims=True))
        return (counts @ self.signs / self.spec.shots).reshape(b, r, self.spec.qubits)


class _QiskitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weights: torch.Tensor, circuit: ShiftRuleCircuit) -> torch.Tensor:
        x = inputs.detach().cpu().numpy()
        w = weights.detach().cpu().numpy()
        if weights.requires_grad or inputs.requires_grad:
            value, dw, dx = circuit.jacobians(x, w, wrt_inputs=inputs.requires_grad)
            ctx.save_for_backward(torch.from_numpy(dw), torch.from_numpy(dx) if dx is not None else torch.zeros(0))
        else:
            value = circuit.expectations(x, w)
        ctx.weight_shape = tuple(weights.shape)
        return torch.from_numpy(value).to(weights.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dw, dx = ctx.saved_tensors
        g = grad.to(dw.dtype)
        grad_w = torch.einsum("bi,bip->p", g, dw).reshape(ctx.weight_shape)
        grad_x = torch.einsum("bi,bij->bj", g, dx) if dx.numel() else None
        return grad_x, grad_w, None


class QiskitLayer(nn.Module):
    """A :class:`ShiftRuleCircuit` (Qiskit Aer by default) as a torch layer (same inputs, output and ``weights`` as the PennyLane layer)."""

    def __init__(self, spec: CircuitSpec, circuit: ShiftRuleCircuit | None = None) -> None:
        super().__init__()
        self.circuit = circuit if circuit is not None else QiskitCircuit(spec)
        self.weights = nn.Parameter(torch.zeros(self.circuit.shape, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: no parameter-shift circuits
            value = self.circuit.expectations(inputs.detach().cpu().numpy(), self.weights.detach().cpu().numpy())
            return torch.from_numpy(value).to(self.weights.dtype)
        return _QiskitFunction.apply(inputs, self.weights, self.circuit)


# ----------------------------------------------------------------------------- one entry point


def quantum_layer(spec: CircuitSpec, backend: str) -> nn.Module:
    """The circuit as a torch module with parameter ``weights``; input ``(B, n)`` angles or packed states, output ``(B, n)``."""
    check_backend(backend)
    if spec.ansatz not in ANSATZE:
        raise ValueError(f"unknown ansatz {spec.ansatz!r}; choose one of {', '.join(ANSATZE)}")
    if spec.embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {spec.embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    if backend == "qiskit":
        layer: nn.Module = QiskitLayer(spec)
    elif backend == "default" and spec.shots > 0 and spec.noise == 0:
        layer = QiskitLayer(spec, PennyLaneShotCircuit(spec))
    else:
        layer = pennylane_layer(spec, backend)
    return layer.double()


def expectations(spec: CircuitSpec, backend: str, inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """⟨Z_i⟩ of the circuit for each input row (angles, or packed states from :func:`pack_states`)."""
    layer = quantum_layer(spec, backend)
    with torch.no_grad():
        layer.get_parameter("weights").copy_(torch.as_tensor(np.asarray(weights, dtype=np.float64)))
        return layer(torch.from_numpy(np.array(inputs, dtype=np.float64))).numpy()
