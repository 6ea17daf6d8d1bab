"""Flower ServerApp, the QflFedAvg strategy, server optimizers and checkpoints.

Importing this package sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``
in the process's environment unless it is already set. qfl runs where it is
installed: a Flower SuperLink started from such a process must not install the
app's dependencies into a fresh per-run environment (Flower 1.41 does so by
default: a CUDA torch, gigabytes). That is what makes a plain ``flwr run .``
work: to validate ``[tool.flwr.app.components]`` the ``flwr`` CLI looks up
``qfl.server.app``, which imports this package, before it starts its local
simulation SuperLink, which inherits the variable. Set the variable to 0 to
have Flower install them anyway.
"""

import os

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
