"""QKD protocol simulation, the quantum network, VQC models and quantum datasets."""
