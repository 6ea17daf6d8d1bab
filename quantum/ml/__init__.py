"""Quantum machine learning: variational circuits (PennyLane, Qiskit Aer) and locally generated quantum datasets."""
