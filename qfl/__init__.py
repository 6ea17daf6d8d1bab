"""qfl: federated learning with compressed updates and QKD-protected aggregation.

The top-level folders of the repository install as subpackages of ``qfl``:
``qfl.server``, ``qfl.clients``, ``qfl.compression``, ``qfl.security``,
``qfl.quantum``, ``qfl.simulations`` and ``qfl.benchmarks``.
"""

__version__ = "0.1.0"
