"""Two subjects: QKD physics and the quantum network (:mod:`qfl.quantum.qkd`), and quantum ML (:mod:`qfl.quantum.ml`)."""
